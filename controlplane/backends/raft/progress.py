"""What a leader knows about each member's log, and the membership those members form.

A leader keeps one :class:`Progress` per member: the highest index known to match its own log
(``match``), the next index to send (``next``), and a flow-control state:

- ``PROBE``: the leader does not know where the member's log diverges; it sends one Append at a
  time and waits for the answer (or the next heartbeat answer) before sending another.
- ``REPLICATE``: the member is in sync; Appends are pipelined optimistically (``next`` moves as
  soon as an Append is sent), bounded by :class:`Inflights` in count and bytes.
- ``SNAPSHOT``: the member needs entries that were compacted; nothing is sent until the driver
  reports how the snapshot transfer went.

:class:`ProgressTracker` also holds the configuration (voters and learners), counts votes,
computes quorum positions and builds the Appends, snapshot orders and heartbeats a leader sends.
Only voters ever count; learners only receive the log. :class:`ReadIndexQueue` holds the
linearizable reads waiting for a quorum to confirm the leader.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping

import msgspec

from controlplane.backends.raft.messages import Append, Heartbeat, InstallSnapshot, Message
from controlplane.backends.raft.raftlog import ENTRY_OVERHEAD, CompactedError, RaftLog
from controlplane.backends.raft.records import ConfState

__all__ = (
    "Inflights",
    "Progress",
    "ProgressState",
    "ProgressTracker",
    "ReadIndexQueue",
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
        "lazy",
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
        self.lazy = False
        """The member's last answer said nothing there waits on a newer commit index."""
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
    """The configuration, election votes and, on a leader, each member's :class:`Progress`
    and the messages that follow from it."""

    __slots__ = (
        "learner_set",
        "log",
        "max_inflight_bytes",
        "max_inflight_msgs",
        "max_size_per_msg",
        "progress",
        "self_id",
        "voter_set",
        "voters",
        "votes",
    )

    def __init__(
        self,
        self_id: str,
        log: RaftLog,
        *,
        max_inflight_msgs: int,
        max_inflight_bytes: int,
        max_size_per_msg: int,
    ) -> None:
        self.self_id = self_id
        self.log = log
        self.max_inflight_msgs = max_inflight_msgs
        self.max_inflight_bytes = max_inflight_bytes
        self.max_size_per_msg = max_size_per_msg
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

    def reset_progress(self, next_index: int, self_match: int) -> None:
        """A new leader's view: nothing known to match, everyone probed from ``next_index``."""
        for member in list(self.progress):
            pr = self._new_progress(next_index, recent_active=False)
            if member == self.self_id:
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

    def quorum_active(self) -> bool:
        """Whether a quorum of voters answered since the last call; then starts a new round."""
        active = 0
        for member, pr in self.progress.items():
            if member == self.self_id:
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

    # -- what a leader sends ----------------------------------------------------------------------

    def send_appends(self, term: int, out: list[Message], *, lazy_too: bool = False) -> None:
        """Append to ``out`` what each member is missing, within its flow-control limits: new
        entries, or an empty Append to carry a newer commit index or to probe. A lazy member
        in sync gets no Append for a commit index alone unless ``lazy_too``."""
        last = self.log.last_index()
        committed = self.log.committed
        for member, pr in self.progress.items():
            if member == self.self_id:
                continue
            # A lazy member in sync learns a newer commit index from the next Append (or from
            # the driver's broadcast): an Append for it alone would wake it up to apply what
            # nobody there waits for.
            commit_due = self._lacks_commit(pr, committed) and (
                lazy_too or not self._holds_back(pr)
            )
            want_empty = pr.want_send or commit_due
            pr.want_send = False
            self._send_append(member, pr, term, last, want_empty=want_empty, out=out)

    def holds_commit(self, index: int) -> bool:
        """Whether a lazy member was not sent a commit index up to ``index`` yet."""
        return any(
            self._holds_back(pr) and self._lacks_commit(pr, index)
            for member, pr in self.progress.items()
            if member != self.self_id
        )

    @staticmethod
    def _holds_back(pr: Progress) -> bool:
        return pr.lazy and pr.state is ProgressState.REPLICATE

    @staticmethod
    def _lacks_commit(pr: Progress, index: int) -> bool:
        """Whether the member was not sent a commit index up to ``index`` (as far as the
        entries it is known or assumed to hold go)."""
        return pr.sent_commit < min(index, pr.next - 1)

    def _send_append(
        self, to: str, pr: Progress, term: int, last: int, *, want_empty: bool, out: list[Message]
    ) -> None:
        log = self.log
        while not pr.is_paused():
            next_index = pr.next
            if next_index > last and not want_empty:
                return
            try:
                prev_term = log.term(next_index - 1)
                entries = log.entries(next_index, last + 1, self.max_size_per_msg)
            except CompactedError:
                self._send_snapshot(to, pr, term, out)
                return
            commit = log.committed
            # Carrying only the commit index to a member known to hold the entries: its answer
            # would change nothing here, and costs a message each way per commit.
            quiet = (
                not entries and pr.state is ProgressState.REPLICATE and pr.match >= next_index - 1
            )
            out.append(
                Append(
                    term, self.self_id, to, next_index - 1, prev_term, commit, tuple(entries), quiet
                )
            )
            sent_last = entries[-1].index if entries else next_index - 1
            pr.sent_commit = max(pr.sent_commit, min(commit, sent_last))
            if not entries:
                if pr.state is ProgressState.PROBE:
                    pr.probe_sent = True
                return
            if pr.state is not ProgressState.REPLICATE:
                pr.probe_sent = True
                return
            pr.next = sent_last + 1  # optimistic: pipelined, no waiting for the answer
            size = sum(len(e.data) for e in entries) + ENTRY_OVERHEAD * len(entries)
            pr.inflights.add(sent_last, size)
            want_empty = False

    def _send_snapshot(self, to: str, pr: Progress, term: int, out: list[Message]) -> None:
        if not pr.recent_active:
            return  # do not stream a snapshot to a member that is not answering
        meta = self.log.storage.snapshot_meta()
        pr.become_snapshot(meta.index)
        out.append(InstallSnapshot(term, self.self_id, to, meta))

    def send_heartbeats(self, term: int, read_seq: int, out: list[Message]) -> None:
        committed = self.log.committed
        for member, pr in self.progress.items():
            if member != self.self_id:
                # Never a commit index beyond what the member is known to hold.
                commit = min(pr.match, committed)
                out.append(Heartbeat(term, self.self_id, member, commit, read_seq))
                pr.sent_commit = max(pr.sent_commit, commit)


class ReadIndexQueue:
    """Reads waiting for the leader to confirm, with a heartbeat round answered by a quorum,
    that it was still the leader after they arrived (thesis §6.4).

    Each read gets a round number (``seq``) that the next heartbeats carry and the answers
    echo. An answer to round ``n`` confirms every read of rounds up to ``n``.
    """

    __slots__ = ("acks", "pending", "queue", "round_due", "seq")

    def __init__(self) -> None:
        self.seq = 0
        self.acks: dict[str, int] = {}
        self.queue: deque[tuple[int, int, bytes, str]] = deque()
        """(round, read index, ctx, requesting member)."""
        self.pending: list[tuple[bytes, str]] = []
        """Reads that arrived before the leader committed an entry of its term."""
        self.round_due = False

    def reset(self) -> None:
        self.acks.clear()
        self.queue.clear()
        self.pending.clear()
        self.round_due = False

    def add(self, self_id: str, index: int, ctx: bytes, origin: str) -> None:
        self.seq += 1
        self.queue.append((self.seq, index, ctx, origin))
        self.acks[self_id] = self.seq
        self.round_due = True

    def ack(self, member: str, seq: int) -> bool:
        """Record an answer to round ``seq``; returns whether that may confirm reads."""
        if not self.queue or seq <= self.acks.get(member, 0):
            return False
        self.acks[member] = seq
        return True

    def release(self, tracker: ProgressTracker) -> list[tuple[int, bytes, str]]:
        """The reads a quorum has now confirmed, as (index, ctx, origin), oldest first."""
        confirmed = tracker.quorum_value(self.acks)
        queue = self.queue
        done = []
        while queue and queue[0][0] <= confirmed:
            _, index, ctx, origin = queue.popleft()
            done.append((index, ctx, origin))
        if not queue:
            self.round_due = False
        return done
