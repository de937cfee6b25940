"""The client protocol: what network clients (:mod:`.client`) and members (:mod:`.service`) say.

Every message is a ``msgspec`` struct encoded as a msgpack array, in a length-prefixed frame
(:mod:`.framing`). The conversation on one connection:

1. The client sends :class:`ClientHello`; the member answers :class:`ServerHello`. A refusal
   (wrong protocol or cluster id, too many connections) carries a reason and an error code,
   and the member closes the connection.
2. The client then sends :data:`Request` messages, each with a ``request`` id of its choosing;
   every reply echoes it. Requests are served concurrently, so replies may arrive in any order.
3. :class:`Subscribe` starts the replication stream on the connection: the member acknowledges
   with a :class:`VersionReply` (its state version: the replica is current once it got there),
   then sends the whole state as :class:`StateChunk` frames if the client asked for history it
   no longer keeps, and then one :class:`Replicate` frame per state-changing command, forever.
4. A client that asked for keep-alives in its hello (``keepalive`` seconds) gets an
   :class:`Alive` frame whenever the member sent it nothing for that long: a client that hears
   nothing for a few intervals knows the member hangs (or the network drops its frames),
   though the connection looks open, and moves to another member.

A request the member cannot decode is answered with an :class:`ErrorReply` of code
``invalid_request`` (with the request id when it could be read, else 0) and the connection stays
open; a frame that breaks the framing (too large, truncated) closes the connection. Errors travel
as ``(code, message)`` and are rebuilt as the same :mod:`controlplane.errors` class.

Fields are only ever appended, with defaults.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from ...errors import ControlPlaneError, NotLeaderError, error_from_code

__all__ = [
    "HELLO_MAX_SIZE",
    "MIN_KEEPALIVE",
    "PROTOCOL_NAME",
    "PROTOCOL_VERSION",
    "Alive",
    "ClientHello",
    "ErrorReply",
    "Execute",
    "ExecuteReply",
    "Heartbeat",
    "MemberChange",
    "MemberStatus",
    "PeerProgress",
    "ReadIndex",
    "Replicate",
    "Reply",
    "Request",
    "ServerHello",
    "SnapshotSave",
    "StateChunk",
    "Status",
    "StatusReply",
    "Subscribe",
    "TransferLeader",
    "VersionReply",
    "error_from_reply",
    "error_reply",
    "request_id_of",
]

PROTOCOL_NAME = "controlplane-client"
"""Names the protocol in the hello, so that a peer of another service is told what it hit."""
PROTOCOL_VERSION = 1
"""The only version spoken; a hello with another version is refused."""
HELLO_MAX_SIZE = 64 * 1024
"""Maximum size of a hello frame (either way)."""


# --- hello ----------------------------------------------------------------------------------


MIN_KEEPALIVE = 0.05
"""The shortest keep-alive interval a member keeps (seconds): a shorter one asked for gets this."""


class ClientHello(msgspec.Struct, frozen=True, array_like=True):
    """The first frame a client sends."""

    protocol: str
    version: int
    cluster_id: str
    client_id: str
    keepalive: Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)] = 0.0
    """Send :class:`Alive` after this many seconds without another frame (0: never)."""


class ServerHello(msgspec.Struct, frozen=True, array_like=True):
    """The member's answer to :class:`ClientHello`; a refusal (not ``ok``) is followed by close."""

    ok: bool
    reason: str = ""
    member_id: str = ""
    leader_id: str | None = None
    client_address: str = ""
    """The ``host:port`` this member serves clients on."""
    code: str = ""
    """The error code of a refusal (``permission_denied``, ``unavailable``, ...)."""
    keepalive: float = 0.0
    """The keep-alive interval this member will keep (0: none; a member older than
    keep-alives says nothing, which reads as 0)."""


# --- requests (client to member) --------------------------------------------------------------


class _Request(msgspec.Struct, frozen=True, array_like=True, tag=True):
    request: int


class Execute(_Request, frozen=True):
    """Commit ``command``: an encoded :class:`~controlplane.commands.ClientCommand`."""

    command: bytes


class ReadIndex(_Request, frozen=True):
    """A linearizable read: answered with the member's state version after a Raft ReadIndex."""


class Heartbeat(_Request, frozen=True):
    """Report ``node_id`` alive, once the member's state reached ``min_version``."""

    node_id: str
    min_version: int = 0


class Subscribe(_Request, frozen=True):
    """Stream every state-changing command after version ``since``.

    When the member no longer keeps them it sends its whole state first if ``snapshot_ok``, else
    it answers ``compacted`` (the client may find another member that still keeps them).
    """

    since: int
    snapshot_ok: bool = True


class Status(_Request, frozen=True):
    """The member's Raft status."""


class MemberChange(_Request, frozen=True):
    """A membership change (``kind``: a :class:`~.coretypes.ConfChangeType` value); leader only.

    ``peer_address`` (``host:port`` of its peer listener) is needed to add a new member.
    """

    kind: str
    member_id: str
    peer_address: str = ""


class TransferLeader(_Request, frozen=True):
    """Hand leadership to ``to`` (None: the most caught-up voter); leader only."""

    to: str | None = None


class SnapshotSave(_Request, frozen=True):
    """The member's whole state, ``encode_state``-encoded, as :class:`StateChunk` replies."""


Request = (
    Execute
    | ReadIndex
    | Heartbeat
    | Subscribe
    | Status
    | MemberChange
    | TransferLeader
    | SnapshotSave
)


# --- replies (member to client) -----------------------------------------------------------------


class PeerProgress(msgspec.Struct, frozen=True, array_like=True):
    """The leader's view of one member's log."""

    member_id: str
    match: int
    next: int
    state: str
    lag: int
    """Entries the member is missing: the leader's last index minus ``match``."""


class MemberStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What a member reports about itself (and, on the leader, about the others)."""

    member_id: str
    cluster_id: str
    role: str
    leader_id: str | None
    term: int
    commit_index: int
    applied_index: int
    last_index: int
    state_version: int
    voters: tuple[str, ...] = ()
    learners: tuple[str, ...] = ()
    client_address: str = ""
    progress: tuple[PeerProgress, ...] = ()
    """Empty unless this member leads."""
    failure: str | None = None
    """Why the member stopped on its own, if it did."""


class _Reply(msgspec.Struct, frozen=True, array_like=True, tag=True):
    pass


class ErrorReply(_Reply, frozen=True):
    """The request failed: ``code`` names the :mod:`controlplane.errors` class."""

    request: int
    code: str
    message: str
    leader_id: str | None = None


class ExecuteReply(_Reply, frozen=True):
    """The command's result: the version it produced and its value (``encode_value``)."""

    request: int
    version: int
    value: bytes


class VersionReply(_Reply, frozen=True):
    """Done; the member's state was at ``version`` (wait for it to read your writes)."""

    request: int
    version: int


class StatusReply(_Reply, frozen=True):
    """The answer to :class:`Status`."""

    request: int
    status: MemberStatus


class StateChunk(_Reply, frozen=True):
    """A piece of an encoded state at ``version``; ``last`` ends it."""

    request: int
    version: int
    data: bytes
    last: bool


class Replicate(_Reply, frozen=True):
    """The encoded command that produced ``version`` (the subscription stream)."""

    version: int
    command: bytes


class Alive(_Reply, frozen=True):
    """Nothing else was sent for the keep-alive interval the client asked for."""


Reply = ErrorReply | ExecuteReply | VersionReply | StatusReply | StateChunk | Replicate | Alive


# --- errors -----------------------------------------------------------------------------------


def error_reply(request: int, exc: ControlPlaneError) -> ErrorReply:
    """The wire form of ``exc`` as the answer to ``request``."""
    leader = exc.leader_id if isinstance(exc, NotLeaderError) else None
    return ErrorReply(request=request, code=exc.code, message=exc.message, leader_id=leader)


def error_from_reply(reply: ErrorReply) -> ControlPlaneError:
    """Rebuild the error of an :class:`ErrorReply` as the class the member raised."""
    exc = error_from_code(reply.code, reply.message)
    if isinstance(exc, NotLeaderError):
        exc.leader_id = reply.leader_id
    return exc


def request_id_of(payload: bytes) -> int:
    """The request id of an undecodable request, if its envelope is readable (else 0)."""
    try:
        raw: Any = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return 0
    if isinstance(raw, list) and len(raw) >= 2:
        rid = raw[1]
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 < rid < 2**63:
            return rid
    return 0
