"""What a leader knows about each member's log, and the membership those members form.

A leader keeps one :class:`Progress` per member: the highest index known to match its own log
(``match``), the next index to send (``next``), and a flow-control state:

- ``PROBE``: the leader does not know where the member's log diverges; it sends one Append at a
  time and waits for the answer (or the next heartbeat answer) before sending another.
- ``REPLICATE``: the member is in sync; Appends are pipelined optimistically (``next`` moves as
  soon as an Append is sent), bounded by :class:`Inflights` in count and bytes.
- ``SNAPSHOT``: the member needs entries that were compacted; nothing is sent until the driver
  reports how the snapshot transfer went.

:class:`ProgressTracker` also holds the configuration (voters and learners), counts votes and
computes quorum positions. Only voters ever count; learners only receive the log.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping

import msgspec

from controlplane.backends.raft.records import ConfState

__all__ = (
    "Inflights",
    "Progress",
    "ProgressState",
    "ProgressTracker",
    "VoteResult",
    "decode_conf_state",
    "encode_conf_state",
)

_CONF_ENCODER = msgspec.msgpack.Encoder()
_CONF_DECODER = msgspec.msgpack.Decoder(ConfState)


def encode_conf_state(conf: ConfState) -> bytes:
    """The ``data`` of a ``CONF_CHANGE`` entry carrying ``conf``."""
    return _CONF_ENCODER.encode(conf)


def decode_conf_state(data: bytes) -> ConfState:
    """The configuration carried by a ``CONF_CHANGE`` entry's ``data``."""
    return _CONF_DECODER.decode(data)


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class VoteResult(enum.Enum):
    PENDING = "pending"
    WON = "won"
    LOST = "lost"


class Inflights:
    """The Appends sent to one member and not yet acknowledged, oldest first."""

    __slots__ = ("_items", "bytes", "max_bytes", "max_count")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self._items: deque[tuple[int, int]] = deque()
        self.bytes = 0
        self.max_count = max_count
        self.max_bytes = max_bytes
        """0 means no byte limit."""

    def __len__(self) -> int:
        return len(self._items)

    def add(self, last_index: int, size: int) -> None:
        self._items.append((last_index, size))
        self.bytes += size

    def free_le(self, index: int) -> None:
        """Forget the Appends whose last entry is at or before ``index`` (acknowledged)."""
        items = self._items
        while items and items[0][0] <= index:
            self.bytes -= items.popleft()[1]

    def free_first_one(self) -> None:
        if self._items:
            self.bytes -= self._items.popleft()[1]

    def full(self) -> bool:
        return len(self._items) >= self.max_count or (
            self.max_bytes > 0 and self.bytes >= self.max_bytes
        )

    def reset(self) -> None:
        self._items.clear()
        self.bytes = 0


class Progress:
    """A leader's view of one member's log (see the module docstring)."""

    __slots__ = (
        "inflights",
        "match",
        "next",
        "pending_snapshot",
        "probe_sent",
        "recent_active",
        "sent_commit",
        "state",
        "want_send",
    )

    def __init__(self, next_index: int, inflights: Inflights, *, recent_active: bool) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        """In PROBE: an Append is outstanding, send nothing until an answer arrives."""
        self.pending_snapshot = 0
        self.recent_active = recent_active
        """An answer arrived since the last check-quorum round."""
        self.sent_commit = 0
        """The highest commit index this member can have learned from what was sent."""
        self.want_send = False
        """Send an Append even if it carries no entries (lost-message recovery)."""
        self.inflights = inflights

    def __repr__(self) -> str:
        return (
            f"Progress(match={self.match}, next={self.next}, state={self.state.value}, "
            f"probe_sent={self.probe_sent}, inflight={len(self.inflights)})"
        )

    def _reset_state(self, state: ProgressState) -> None:
        self.state = state
        self.probe_sent = False
        self.pending_snapshot = 0
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = index

    def maybe_update(self, index: int) -> bool:
        """An acknowledgement up to ``index``; returns whether ``match`` moved."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        if index >= self.next:
            self.next = index + 1
        return updated

    def maybe_decr_to(self, rejected: int, hint_next: int) -> bool:
        """A rejection of the Append whose ``prev_index`` was ``rejected``; ``hint_next`` is
        where the follower's hint says to probe next. Returns False for a stale rejection."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            # Something was lost or reordered; everything up to `match` is known to match.
            self.next = self.match + 1
            return True
        if self.state is ProgressState.SNAPSHOT or self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, hint_next), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        state = self.state
        if state is ProgressState.PROBE:
            return self.probe_sent
        if state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True


class ProgressTracker:
    """The configuration, each member's :class:`Progress` (on a leader) and election votes."""

    __slots__ = (
        "learner_set",
        "max_inflight_bytes",
        "max_inflight_msgs",
        "progress",
        "voter_set",
        "voters",
        "votes",
    )

    def __init__(self, max_inflight_msgs: int, max_inflight_bytes: int) -> None:
        self.max_inflight_msgs = max_inflight_msgs
        self.max_inflight_bytes = max_inflight_bytes
        self.voters: tuple[str, ...] = ()
        self.voter_set: frozenset[str] = frozenset()
        self.learner_set: frozenset[str] = frozenset()
        self.progress: dict[str, Progress] = {}
        """Voters, learners, and (on a leader) members whose removal is not yet committed."""
        self.votes: dict[str, bool] = {}

    def _new_progress(self, next_index: int, *, recent_active: bool) -> Progress:
        inflights = Inflights(self.max_inflight_msgs, self.max_inflight_bytes)
        return Progress(next_index, inflights, recent_active=recent_active)

    def set_conf(self, conf: ConfState, next_index: int, *, keep_removed: bool) -> None:
        """Switch to ``conf``. New members start probing at ``next_index``; members no longer
        in it keep their progress when ``keep_removed`` (a leader keeps replicating to them
        until their removal commits, so they learn about it)."""
        self.voters = conf.voters
        self.voter_set = frozenset(conf.voters)
        self.learner_set = frozenset(conf.learners)
        progress = self.progress
        for member in (*conf.voters, *conf.learners):
            if member not in progress:
                # Counted as active so that a new member can be sent a snapshot at once and
                # does not count against check-quorum before it had a chance to answer.
                progress[member] = self._new_progress(next_index, recent_active=True)
        if not keep_removed:
            self.prune()

    def prune(self) -> None:
        """Drop the progress of members that are no longer in the configuration."""
        members = self.voter_set | self.learner_set
        for member in [m for m in self.progress if m not in members]:
            del self.progress[member]

    def reset_progress(self, next_index: int, self_id: str, self_match: int) -> None:
        """A new leader's view: nothing known to match, everyone probed from ``next_index``."""
        for member in list(self.progress):
            pr = self._new_progress(next_index, recent_active=False)
            if member == self_id:
                pr.match = self_match
                pr.recent_active = True
            self.progress[member] = pr

    def quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def quorum_value(self, values: Mapping[str, int]) -> int:
        """The highest value that a quorum of voters has reached (0 if none)."""
        voters = self.voters
        if not voters:
            return 0
        got = sorted((values.get(v, 0) for v in voters), reverse=True)
        return got[len(voters) // 2]

    def committed_index(self) -> int:
        """The highest index a quorum of voters holds (§5.3); the caller applies §5.4.2."""
        voters = self.voters
        if not voters:
            return 0
        progress = self.progress
        matches = sorted((progress[v].match if v in progress else 0 for v in voters), reverse=True)
        return matches[len(voters) // 2]

    def quorum_active(self, self_id: str) -> bool:
        """Whether a quorum of voters answered since the last call; then starts a new round."""
        active = 0
        for member, pr in self.progress.items():
            if member == self_id:
                if member in self.voter_set:
                    active += 1
                continue
            if pr.recent_active and member in self.voter_set:
                active += 1
            pr.recent_active = False
        return active >= self.quorum()

    def record_vote(self, member: str, granted: bool) -> None:
        self.votes.setdefault(member, granted)

    def tally(self) -> VoteResult:
        granted = rejected = 0
        for member in self.voters:
            vote = self.votes.get(member)
            if vote is True:
                granted += 1
            elif vote is False:
                rejected += 1
        quorum = self.quorum()
        if granted >= quorum:
            return VoteResult.WON
        if rejected > len(self.voters) - quorum:
            return VoteResult.LOST
        return VoteResult.PENDING
