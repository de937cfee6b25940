"""The messages Raft members exchange, as frozen, tagged ``msgspec`` structs.

Every message carries the sender's ``term`` and the ``src``/``dst`` member ids. They are encoded
as msgpack arrays (``array_like=True``) whose first element is a small integer tag, so fields
never reorder: new fields are only ever appended, with defaults. :data:`Message` is the union
the transport decodes; :func:`encode` / :func:`decode` use encoders built once, up front.

Which message goes where:

- ``VoteRequest`` / ``VoteResponse``: elections, and pre-vote rounds (``pre=True``) that do not
  change anyone's term.
- ``Append`` / ``AppendResponse``: log replication from the leader; a rejection carries a hint
  that lets the leader skip a whole divergent term in one round trip.
- ``Heartbeat`` / ``HeartbeatResponse``: leader liveness, commit propagation, and the quorum
  confirmation behind ReadIndex reads (``read_seq``).
- ``InstallSnapshot``: emitted by a leader's core for the driver, which streams the snapshot
  data to the follower and then steps this message (carrying only the metadata) into the
  follower's core; the follower answers with an ``AppendResponse``.
- ``TimeoutNow``: leadership transfer; the target campaigns at once, bypassing pre-vote and
  the leader lease.
- ``ReadIndexRequest`` / ``ReadIndexResponse``: a follower forwards a linearizable read to the
  leader and receives the index to wait for.
"""

from __future__ import annotations

import msgspec

from controlplane.backends.raft.records import Entry, SnapshotMeta

__all__ = (
    "Append",
    "AppendResponse",
    "BaseMessage",
    "Heartbeat",
    "HeartbeatResponse",
    "InstallSnapshot",
    "Message",
    "ReadIndexRequest",
    "ReadIndexResponse",
    "TimeoutNow",
    "VoteRequest",
    "VoteResponse",
    "decode",
    "encode",
)


class BaseMessage(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Fields every message starts with."""

    term: int
    """The sender's current term (for a pre-vote request: the term it would campaign in)."""
    src: str
    """The sender's member id."""
    dst: str
    """The recipient's member id."""


class VoteRequest(BaseMessage, frozen=True, tag=1):
    """A candidate asks for a vote (or, with ``pre``, whether it could win one)."""

    last_index: int
    last_term: int
    pre: bool = False
    """A pre-vote probe: granting it changes neither the voter's term nor its vote."""
    transfer: bool = False
    """Part of a leadership transfer: voters grant it even while they still see a leader."""


class VoteResponse(BaseMessage, frozen=True, tag=2):
    """A voter's answer to a :class:`VoteRequest`."""

    granted: bool
    pre: bool = False


class Append(BaseMessage, frozen=True, tag=3):
    """The leader's AppendEntries: ``entries`` follow ``(prev_index, prev_term)``."""

    prev_index: int
    prev_term: int
    commit: int
    entries: tuple[Entry, ...] = ()
    quiet: bool = False
    """Only a newer commit index, for a member known to hold every entry up to
    ``prev_index``: success is not answered (the answer would tell the leader nothing)."""


class AppendResponse(BaseMessage, frozen=True, tag=4):
    """A follower's answer to an :class:`Append` or an :class:`InstallSnapshot`.

    On success ``index`` is the last index the follower now knows matches the leader's log. On
    rejection ``index`` is the rejected ``prev_index`` and ``(hint_index, hint_term)`` is the
    last entry of the follower's log at or below it whose term is not newer than the probed
    term (the follower's last entry when its log is shorter), so the leader can skip back over
    a whole divergent term at once.
    """

    index: int
    reject: bool = False
    hint_index: int = 0
    hint_term: int = 0
    lazy: bool = False
    """Nothing on the follower waits for entries to apply: a newer commit index may wait for
    the next Append or Heartbeat instead of coming alone."""


class Heartbeat(BaseMessage, frozen=True, tag=5):
    """Leader liveness. ``commit`` never exceeds what the follower is known to hold."""

    commit: int
    read_seq: int = 0
    """The newest ReadIndex round the leader has started; echoed in the response."""


class HeartbeatResponse(BaseMessage, frozen=True, tag=6):
    """A follower's answer to a :class:`Heartbeat`."""

    read_seq: int = 0
    lazy: bool = False
    """As in :class:`AppendResponse`."""


class InstallSnapshot(BaseMessage, frozen=True, tag=7):
    """A leader's snapshot for a follower whose next entries were compacted away.

    In a leader's ``Ready.messages`` it asks the driver to stream the snapshot described by
    ``meta`` to ``dst``. The receiving driver steps it into the follower's core once the data
    has arrived, and the sending driver reports the outcome with ``RaftCore.report_snapshot``.
    """

    meta: SnapshotMeta


class TimeoutNow(BaseMessage, frozen=True, tag=8):
    """Leadership transfer: the recipient starts an election immediately."""


class ReadIndexRequest(BaseMessage, frozen=True, tag=9):
    """A follower forwards a linearizable read (identified by ``ctx``) to the leader."""

    ctx: bytes


class ReadIndexResponse(BaseMessage, frozen=True, tag=10):
    """The leader's answer: the read may be served once the follower has applied ``index``."""

    ctx: bytes
    index: int


Message = (
    VoteRequest
    | VoteResponse
    | Append
    | AppendResponse
    | Heartbeat
    | HeartbeatResponse
    | InstallSnapshot
    | TimeoutNow
    | ReadIndexRequest
    | ReadIndexResponse
)
"""Every Raft message; decode wire bytes with :func:`decode`."""

_ENCODER = msgspec.msgpack.Encoder()
_DECODER: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    """Encode one message as msgpack."""
    return _ENCODER.encode(msg)


def decode(data: bytes | memoryview) -> Message:
    """Decode one message; raises ``msgspec.ValidationError``/``DecodeError`` on bad input."""
    return _DECODER.decode(data)
