"""Serialization of commands and of the whole cluster state (Raft log, snapshots, export).

msgpack for the log and snapshots, JSON for export/import; both round-trip exactly.
"""

from __future__ import annotations

import typing
from typing import Any

import immutables
import msgspec

from .commands import Command
from .errors import InvalidRequestError
from .types import ClusterState

__all__ = [
    "dec_hook",
    "decode_command",
    "decode_state",
    "enc_hook",
    "encode_command",
    "encode_state",
    "encode_value",
    "state_from_json",
    "state_to_json",
]


def enc_hook(obj: Any) -> Any:
    """Encode the persistent maps of :class:`ClusterState` as plain mappings."""
    if isinstance(obj, immutables.Map):
        return dict(obj.items())
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def dec_hook(tp: Any, obj: Any) -> Any:
    """Decode plain mappings back into typed persistent maps."""
    return _to_map(tp, obj, str_keys=False)


def _json_dec_hook(tp: Any, obj: Any) -> Any:
    # From JSON every mapping key is a string: the int keys of ClientSession.results too.
    return _to_map(tp, obj, str_keys=True)


def _to_map(tp: Any, obj: Any, *, str_keys: bool) -> Any:
    if typing.get_origin(tp) is immutables.Map:
        key, value = typing.get_args(tp)
        return immutables.Map(
            msgspec.convert(obj, dict[key, value], str_keys=str_keys)  # type: ignore[valid-type]
        )
    raise NotImplementedError(f"cannot decode {tp!r}")


_msgpack_encoder = msgspec.msgpack.Encoder(enc_hook=enc_hook)
_json_encoder = msgspec.json.Encoder(enc_hook=enc_hook)
_command_decoder: msgspec.msgpack.Decoder[Command] = msgspec.msgpack.Decoder(
    Command, dec_hook=dec_hook
)
_state_decoder = msgspec.msgpack.Decoder(ClusterState, dec_hook=dec_hook)
_state_json_decoder = msgspec.json.Decoder(ClusterState, dec_hook=_json_dec_hook)


def encode_command(command: Command) -> bytes:
    """Encode a command for the Raft log or the wire."""
    return _msgpack_encoder.encode(command)


def decode_command(data: bytes) -> Command:
    """Decode a command; raise ``InvalidRequestError`` on malformed input."""
    try:
        return _command_decoder.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise InvalidRequestError(f"malformed command: {exc}") from None


def encode_state(state: ClusterState) -> bytes:
    """Encode the whole state as msgpack (Raft snapshots)."""
    return _msgpack_encoder.encode(state)


def decode_state(data: bytes) -> ClusterState:
    """Decode a state encoded by :func:`encode_state`."""
    try:
        return _state_decoder.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise InvalidRequestError(f"malformed cluster state: {exc}") from None


def state_to_json(state: ClusterState) -> bytes:
    """Export the whole state as JSON (the migration path between backends)."""
    return _json_encoder.encode(state)


def state_from_json(data: bytes | str) -> ClusterState:
    """Import a state exported by :func:`state_to_json`."""
    try:
        return _state_json_decoder.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise InvalidRequestError(f"malformed cluster state JSON: {exc}") from None


def encode_value(value: Any) -> bytes:
    """Encode a command's result (a node, index, lock, ...) for a client; ``None`` too."""
    return _msgpack_encoder.encode(value)
