"""Several proposals in one log entry.

Proposals that wait together on the leader share one entry: the per-entry work (append,
replication, storage record, acknowledgement, apply bookkeeping) is then paid once for all of
them, while each is still applied on its own, in order, with its own result. A batch entry is
byte 0xC1 (a byte msgpack never uses, so no single command starts with it) followed by the
msgpack array of the commands' bytes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import msgspec

from ...errors import InvalidRequestError

__all__ = ["MARK", "MAX_BYTES", "MAX_COMMANDS", "check_data", "decode", "take"]

MARK = 0xC1
_MARK_BYTE = bytes((MARK,))
MAX_COMMANDS = 256
MAX_BYTES = 256 * 1024

_ENCODER = msgspec.msgpack.Encoder()
_DECODER: msgspec.msgpack.Decoder[list[bytes]] = msgspec.msgpack.Decoder(list[bytes])

Proposals = deque[tuple[bytes, asyncio.Future[Any]]]


def check_data(data: bytes) -> None:
    """Refuse proposal data that would read as a batch."""
    if data[:1] == _MARK_BYTE:
        raise InvalidRequestError("proposal data must not start with byte 0xC1 (reserved)")


def take(proposals: Proposals) -> tuple[bytes, list[asyncio.Future[Any]]] | None:
    """Pop the next proposal still awaited and the ones behind it that fit one entry (up to
    :data:`MAX_COMMANDS` and :data:`MAX_BYTES`, a larger first one alone): the entry's data
    and their futures, in order. None when no proposal is awaited any more."""
    while proposals:
        data, future = proposals.popleft()
        if not future.done():
            break
    else:
        return None
    futures = [future]
    if not proposals:
        return data, futures
    batch = [data]
    size = len(data)
    while proposals and len(batch) < MAX_COMMANDS:
        more, more_future = proposals[0]
        if size + len(more) > MAX_BYTES:
            break
        proposals.popleft()
        if not more_future.done():
            batch.append(more)
            futures.append(more_future)
            size += len(more)
    if len(batch) == 1:
        return data, futures
    return _MARK_BYTE + _ENCODER.encode(batch), futures


def decode(data: bytes) -> list[bytes] | None:
    """The commands of a batch entry, or None when ``data`` is one command."""
    if data[0] != MARK:
        return None
    return _DECODER.decode(memoryview(data)[1:])
