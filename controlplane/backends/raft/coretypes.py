"""The values the Raft core takes and gives: its configuration, its output (``Ready``), roles,
membership change kinds, and the errors it raises, grouped by what the caller can do.

:mod:`.core` re-exports all of them; import them from there.
"""

from __future__ import annotations

import enum

import msgspec

from controlplane.backends.raft.messages import Message
from controlplane.backends.raft.raftlog import RaftError
from controlplane.backends.raft.records import Entry, HardState, SnapshotMeta

__all__ = (
    "Busy",
    "ConfChangeInProgress",
    "ConfChangeType",
    "CoreConfig",
    "InvalidRequest",
    "LeadershipTransferInProgress",
    "LearnerNotCaughtUp",
    "NotLeader",
    "ReadState",
    "Ready",
    "Role",
    "SoftState",
    "UncommittedLimitExceeded",
)


class NotLeader(RaftError):
    """Raised when a request needs the leader and this member is not it; retry at ``leader``
    (``None`` while no leader is known)."""

    def __init__(self, leader: str | None) -> None:
        self.leader = leader
        where = f"the leader is {leader}" if leader else "no leader is known yet"
        super().__init__(f"not the leader ({where}); retry there")


class Busy(RaftError):
    """Raised when the leader cannot take the request right now; retry after a short while."""


class LeadershipTransferInProgress(Busy):
    """Raised for proposals while leadership is being handed to another member."""


class UncommittedLimitExceeded(Busy):
    """Raised when the leader's uncommitted entries would exceed ``max_uncommitted_entries_size``
    (typically because it cannot reach a quorum)."""


class ConfChangeInProgress(Busy):
    """Raised when a membership change is refused until an earlier entry commits."""


class LearnerNotCaughtUp(Busy):
    """Raised when promoting a learner that does not yet hold every committed entry."""


class InvalidRequest(RaftError):
    """Raised for a request that cannot succeed as given (a caller bug)."""


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class ConfChangeType(enum.Enum):
    ADD_VOTER = "add-voter"
    """Add a voter; for a current learner this is a promotion (see ``PROMOTE_LEARNER``)."""
    ADD_LEARNER = "add-learner"
    PROMOTE_LEARNER = "promote-learner"
    """Make a learner a voter; refused until it holds every committed entry."""
    REMOVE = "remove"


class CoreConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Tuning of the core. Times are in ticks; sizes in bytes of entry data plus
    ``ENTRY_OVERHEAD`` per entry."""

    election_tick: int = 10
    """Followers campaign after a random timeout in ``[election_tick, 2*election_tick)``."""
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    """A leader steps down unless a quorum answered within each election timeout; members
    ignore vote requests while they heard from a leader within the election timeout."""
    leader_loss_ticks: int = 2
    """A follower told that its leader is unreachable (:meth:`RaftCore.report_unreachable`:
    the transport lost its connection to it) campaigns within this many ticks, at random,
    instead of after the election timeout; 0: it waits for the timeout. Needs ``pre_vote``
    and ``check_quorum``: the other members then refuse the vote while they still hear from
    a live leader."""
    max_size_per_msg: int = 1 << 20
    max_inflight_msgs: int = 256
    """Appends in flight to one member in REPLICATE state."""
    max_inflight_bytes: int = 0
    """Bytes in flight to one member (0: unlimited)."""
    max_uncommitted_entries_size: int = 64 << 20
    """Proposals beyond this many uncommitted bytes are refused (0: unlimited)."""
    max_committed_size_per_ready: int = 16 << 20

    def __post_init__(self) -> None:
        if self.heartbeat_tick < 1:
            raise ValueError("heartbeat_tick must be at least 1")
        if self.election_tick <= self.heartbeat_tick:
            raise ValueError("election_tick must be greater than heartbeat_tick")
        if self.leader_loss_ticks < 0:
            raise ValueError("leader_loss_ticks must not be negative")
        if self.max_inflight_msgs < 1:
            raise ValueError("max_inflight_msgs must be at least 1")
        if self.max_size_per_msg < 1 or self.max_committed_size_per_ready < 1:
            raise ValueError("message and batch sizes must be positive")


class SoftState(msgspec.Struct, frozen=True):
    """Volatile state, reported in a Ready when it changes; never persisted."""

    lead: str | None
    role: Role
    term: int


class ReadState(msgspec.Struct, frozen=True):
    """A confirmed ReadIndex read: serve ``ctx`` once the state machine applied ``index``."""

    ctx: bytes
    index: int


class Ready:
    """A batch of work for the driver. Its duties, in order:

    0. ``early_messages``: a leader's Appends and Heartbeats. Send them at once: they may go
       out before, or while, steps 1-2 make this Ready's entries durable (Raft thesis
       §10.2.1). The core only puts messages here when it leads in a term whose term and
       vote an earlier, already advanced, Ready made durable; it counts its own log towards
       the commit quorum only for entries :meth:`RaftCore.advance` reported durable.
    1. ``snapshot``: if set, install the snapshot data the leader streamed into the state
       machine and replace the log with it in storage (``MemoryStorage.apply_snapshot``).
    2. ``entries``: append them to storage, replacing any stored entries at and after
       ``entries[0].index``; save ``hard_state`` if set; then sync (``must_sync`` says whether
       anything needs an fsync at all).
    3. ``messages``: send them only after steps 1-2 are durable (votes, acknowledgements,
       everything of a member that is not a settled leader). An ``InstallSnapshot`` is an
       order to stream the snapshot named by its ``meta`` (or a newer one) to ``dst``, then
       deliver the message; report the outcome with ``RaftCore.report_snapshot``.
    4. ``committed_entries``: apply them in order. They are already durable here, so this
       may overlap with steps 2-3 of the same Ready.
    5. ``read_states``: answer each read once the applied index reaches its ``index``.
    6. Call ``RaftCore.advance(ready)`` once steps 1-2 are durable: this is the persistence
       acknowledgement (etcd's ``MsgStorageAppendResp``). It marks ``entries`` durable by
       their last ``(index, term)`` — ignored if they were truncated or replaced meanwhile —
       and only then may a leader count them as held by itself.
    """

    __slots__ = (
        "committed_entries",
        "early_messages",
        "entries",
        "hard_state",
        "messages",
        "must_sync",
        "read_states",
        "snapshot",
        "soft_state",
    )

    def __init__(
        self,
        *,
        soft_state: SoftState | None,
        hard_state: HardState | None,
        snapshot: SnapshotMeta | None,
        entries: list[Entry],
        committed_entries: list[Entry],
        messages: list[Message],
        read_states: list[ReadState],
        must_sync: bool,
        early_messages: list[Message] | None = None,
    ) -> None:
        self.soft_state = soft_state
        """Leader, role and term, when any of them changed since the last Ready."""
        self.hard_state = hard_state
        """Term, vote and commit index, when changed; persist before sending ``messages``."""
        self.snapshot = snapshot
        """A snapshot from the leader to install before anything else."""
        self.entries = entries
        """Entries to persist before sending ``messages``."""
        self.committed_entries = committed_entries
        """Committed, locally durable entries to apply, in order."""
        self.messages = messages
        """Messages to send once this Ready's state is durable."""
        self.early_messages: list[Message] = early_messages if early_messages is not None else []
        """A settled leader's Appends and Heartbeats: send them without waiting for this
        Ready's state to be durable (see step 0)."""
        self.read_states = read_states
        """Linearizable reads confirmed by the leader."""
        self.must_sync = must_sync
        """Whether entries, a snapshot, the term or the vote changed (a bare commit-index
        change may be written lazily)."""

    def __repr__(self) -> str:
        return (
            f"Ready(soft={self.soft_state}, hard={self.hard_state}, snapshot={self.snapshot}, "
            f"entries={len(self.entries)}, committed={len(self.committed_entries)}, "
            f"messages={len(self.messages)}, early={len(self.early_messages)}, "
            f"reads={len(self.read_states)})"
        )
