"""The Raft algorithm as a deterministic state machine: no I/O, no clock, no asyncio.

:class:`RaftCore` has a few inputs — :meth:`~RaftCore.tick` (one unit of logical time; the
driver decides how long it is), :meth:`~RaftCore.step` (a message from a peer), proposals,
reads and membership changes — and one output, :class:`Ready`: a batch of work for the driver.
The driver loop is::

    while True:
        feed ticks, received messages and client requests into the core
        if core.has_ready():
            rd = core.ready()
            send rd.early_messages              (a leader's Appends/Heartbeats: no waiting)
            install rd.snapshot (if any), append rd.entries, save rd.hard_state; sync
            send rd.messages
            apply rd.committed_entries; answer rd.read_states once applied >= their index
            core.advance(rd)                    (= "persisted": the durability acknowledgement)

Design decisions worth knowing:

- The persistence contract. Every message leaves the core only through a Ready. A Ready's
  ``messages`` are sent after that Ready's (and every earlier Ready's) state is durable, so a
  vote, a follower's acknowledgement, a vote request or anything sent by a member that is not
  a settled leader is never based on something a crash can take back. The one exception is
  ``early_messages``: a leader's Appends and Heartbeats, which the driver sends *before or
  while* it persists the Ready's entries (Raft thesis §10.2.1, as etcd's raft does). This is
  safe because:

  * a leader's term and vote are durable before it sends anything early (early messages exist
    only when the term and vote of the core equal those of the last hard state reported
    durable through :meth:`~RaftCore.advance`, and never in a Ready that installs a snapshot);
  * followers persist before they acknowledge, and only acknowledgements count;
  * the leader counts its own log towards the commit quorum only up to ``log.persisted``, which
    moves only in :meth:`~RaftCore.advance` — the explicit persistence acknowledgement, like
    etcd's ``MsgStorageAppendResp``. It names the persisted tail by ``(index, term)`` and is
    ignored for entries truncated or replaced since (a leader deposed, and its tail overwritten
    by a newer leader, while its write was in flight); a new leader starts from
    ``log.persisted``, never from entries merely handed to the driver. A leader that crashes
    before persisting entries it already sent may lose them locally: if a quorum of followers
    holds them they are committed and come back to it from the next leader, otherwise they
    were never committed.

  Only one Ready is outstanding at a time; the core may be stepped and ticked between
  :meth:`~RaftCore.ready` and :meth:`~RaftCore.advance` (for example while a thread syncs),
  and followers' acknowledgements that arrive meanwhile may commit entries without the
  leader's own vote.
- ``committed_entries`` only contains entries that are durable here, so they may be applied
  while the next entries are being written (a leader's commit index may run ahead of its
  own durable log; it applies only what it holds durably).
- Replication is batched: proposals and acknowledgements only mark work, and Appends are built
  when the driver asks for a Ready, so everything proposed between two Readys travels in one
  Append per follower (up to ``max_size_per_msg``), pipelined within the in-flight limits.
- Snapshots: when a follower needs compacted entries, the leader's Ready carries an
  ``InstallSnapshot`` for the driver to stream. The follower installs it and drops its log,
  unless its log holds the snapshot's last entry (same index and term): then it keeps its log
  and only commits up to there (§7).
- Membership: a ``CONF_CHANGE`` entry carries the complete new :class:`ConfState` (with the
  members' peer addresses, for the drivers), and a
  member uses the latest configuration in its log from the moment the entry is *appended*,
  committed or not (Raft thesis §4.1). Should the entry be truncated, the member reverts to the
  previous one. Changes go one member at a time, and a leader refuses a new change until it has
  committed an entry of its own term and the previous change is committed — the fix for the
  single-server change bug described on the raft-dev list in 2015.
  A removed member stops campaigning as soon as its log holds its removal; a leader keeps
  replicating to removed members until the change commits, and a leader that removed itself
  then hands over (``TimeoutNow`` to an up-to-date voter) and steps down.
- Pre-vote (thesis §9.6), check-quorum and a leader lease on votes (§4.2.3) keep a partitioned
  or removed member from disrupting a healthy cluster.

Not provided: joint consensus (changes of more than one voter at a time), and more than one
Ready in flight (the driver's persist of one Ready overlaps with stepping, not with the next
Ready's persist).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

from controlplane.backends.raft.coretypes import (
    Busy,
    ConfChangeInProgress,
    ConfChangeType,
    CoreConfig,
    InvalidRequest,
    LeadershipTransferInProgress,
    LearnerNotCaughtUp,
    NotLeader,
    ReadState,
    Ready,
    Role,
    SoftState,
    UncommittedLimitExceeded,
)
from controlplane.backends.raft.messages import (
    Append,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from controlplane.backends.raft.progress import (
    ProgressState,
    ProgressTracker,
    ReadIndexQueue,
    VoteResult,
    decode_conf_state,
    encode_conf_state,
)
from controlplane.backends.raft.raftlog import (
    ENTRY_OVERHEAD,
    CompactedError,
    RaftError,
    RaftLog,
    Storage,
    StorageError,
    UnavailableError,
)
from controlplane.backends.raft.records import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    SnapshotMeta,
)

__all__ = (
    "Busy",
    "CompactedError",
    "ConfChangeInProgress",
    "ConfChangeType",
    "CoreConfig",
    "InvalidRequest",
    "LeadershipTransferInProgress",
    "LearnerNotCaughtUp",
    "NotLeader",
    "RaftCore",
    "RaftError",
    "ReadState",
    "Ready",
    "Role",
    "SoftState",
    "Storage",
    "StorageError",
    "UnavailableError",
    "UncommittedLimitExceeded",
    "decode_conf_state",
    "encode_conf_state",
)


class RaftCore:
    """One member's Raft state machine. See the module docstring for the driver contract.

    Read-only attributes for drivers and tests: ``id``, ``term``, ``vote``, ``lead`` (the known
    leader or ``None``), ``role``, ``conf`` (the configuration in use), ``log`` (a
    :class:`RaftLog`: ``committed``, ``applied``, ``last_index()``...) and ``tracker`` (on a
    leader, each member's :class:`Progress`).

    ``applied`` tells a restarted core how far the driver's state machine already is (entries
    after the last snapshot that it applied durably); committed entries resume after it.
    """

    def __init__(
        self,
        id: str,
        storage: Storage,
        config: CoreConfig,
        rng: random.Random,
        *,
        applied: int = 0,
    ) -> None:
        self.id = id
        self.cfg = config
        self._rng = rng
        self.log = log = RaftLog(storage)
        hs, conf = storage.initial_state()
        first = log.first_index()
        # A torn write may have kept the hard state but lost the entries it covered.
        log.committed = max(first - 1, min(hs.commit, log.last_index()))
        log.applied = max(first - 1, min(applied, log.committed))
        self.term = hs.term
        self.vote = hs.vote
        self.lead: str | None = None
        self.role = Role.FOLLOWER
        self.tracker = ProgressTracker(
            id,
            log,
            max_inflight_msgs=config.max_inflight_msgs,
            max_inflight_bytes=config.max_inflight_bytes,
            max_size_per_msg=config.max_size_per_msg,
        )
        self._conf_base = (first - 1, conf)
        self._confs: list[tuple[int, ConfState]] = self._scan_confs(first, log.last_index())
        self.conf = self._confs[-1][1] if self._confs else conf
        self.tracker.set_conf(self.conf, log.last_index() + 1, keep_removed=False)
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._randomized_timeout = config.election_tick
        self.lead_transferee: str | None = None
        self._uncommitted: deque[tuple[int, int]] = deque()
        self._uncommitted_size = 0
        self.reads = ReadIndexQueue()
        self._needs_flush = False
        self._outstanding = False
        self.lazy_commit = False
        """Set by the driver: True while nothing on this member waits for entries to apply
        (no reader, watcher or proposer). Its answers then tell the leader that a newer commit
        index may wait for the next Append (or the leader's :meth:`broadcast_commit`) instead
        of coming alone."""
        self._commit_all = False
        self._become_follower(self.term, None)
        self._prev_hs = HardState(self.term, self.vote, log.committed)
        self._durable_term = hs.term
        self._durable_vote = hs.vote
        """Term and vote of the last hard state the driver reported durable (advance)."""
        self._prev_ss = SoftState(None, Role.FOLLOWER, self.term)

    def __repr__(self) -> str:
        return (
            f"RaftCore({self.id!r}, {self.role.value}, term={self.term}, lead={self.lead}, "
            f"last={self.log.last_index()}, commit={self.log.committed}, "
            f"applied={self.log.applied})"
        )

    # -- inputs ------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance logical time by one tick."""
        if self.role is Role.LEADER:
            self._tick_leader()
            return
        self.election_elapsed += 1
        if self.election_elapsed >= self._randomized_timeout and self._promotable():
            self.election_elapsed = 0
            self._campaign(pre=self.cfg.pre_vote, transfer=False)

    def campaign(self) -> None:
        """Start an election now (with a pre-vote round if configured): for tests and
        bootstrap. Raises :class:`InvalidRequest` if this member is not a voter."""
        if self.role is Role.LEADER:
            return
        if not self._promotable():
            raise InvalidRequest(f"{self.id} is not a voter of {self.conf}; it cannot campaign")
        self._campaign(pre=self.cfg.pre_vote, transfer=False)

    def propose(self, data: bytes) -> int:
        """Append ``data`` to the log as the leader; returns its index. The entry is committed
        once it shows up in ``committed_entries`` with this index *and this term*.

        Raises :class:`NotLeader`, :class:`LeadershipTransferInProgress` or
        :class:`UncommittedLimitExceeded`.
        """
        self._check_proposable()
        size = len(data) + ENTRY_OVERHEAD
        limit = self.cfg.max_uncommitted_entries_size
        if limit and self._uncommitted_size and self._uncommitted_size + size > limit:
            raise UncommittedLimitExceeded(
                f"{self._uncommitted_size} bytes are uncommitted (limit {limit}); the leader "
                "may have lost its quorum, retry later"
            )
        log = self.log
        index = log.last_index() + 1
        log.append_one(Entry(index, self.term, EntryType.NORMAL, data))
        self._uncommitted.append((index, size))
        self._uncommitted_size += size
        self._needs_flush = True
        return index

    def propose_conf_change(
        self,
        change: ConfChangeType,
        member: str,
        address: str | None = None,
        *,
        own_address: str | None = None,
    ) -> int:
        """Propose a membership change of one member; returns the entry's index. The new
        configuration is in force as soon as the entry is appended.

        The new configuration keeps the peer addresses of the current one, except that
        ``address`` (``host:port``, if given) becomes ``member``'s, a removed member's is
        dropped, and ``own_address`` is recorded for this leader if it has none yet (a
        cluster bootstrapped without a peer list), so that every member can reach it.

        Raises :class:`NotLeader`, :class:`Busy` subclasses (an earlier change or the leader's
        first entry is not committed yet; a learner is not caught up) or
        :class:`InvalidRequest` (the change makes no sense for the current configuration).
        """
        self._check_proposable()
        log = self.log
        voters, learners = set(self.conf.voters), set(self.conf.learners)
        if change is ConfChangeType.ADD_VOTER and member in learners:
            change = ConfChangeType.PROMOTE_LEARNER
        if change is ConfChangeType.ADD_VOTER:
            if member in voters:
                raise InvalidRequest(f"{member} is already a voter")
            voters.add(member)
        elif change is ConfChangeType.ADD_LEARNER:
            if member in voters or member in learners:
                raise InvalidRequest(f"{member} is already a member")
            learners.add(member)
        elif change is ConfChangeType.PROMOTE_LEARNER:
            if member not in learners:
                raise InvalidRequest(f"{member} is not a learner")
            learners.discard(member)
            voters.add(member)
        else:
            if member not in voters and member not in learners:
                raise InvalidRequest(f"{member} is not a member")
            if voters == {member}:
                raise InvalidRequest(f"{member} is the last voter; it cannot be removed")
            voters.discard(member)
            learners.discard(member)
        if not self._committed_in_term():
            raise ConfChangeInProgress("the leader has not committed an entry of its term yet")
        if self._conf_index() > log.committed:
            raise ConfChangeInProgress("the previous membership change is not committed yet")
        if change is ConfChangeType.PROMOTE_LEARNER:
            pr = self.tracker.progress.get(member)
            match = pr.match if pr is not None else 0
            if match < log.committed:
                raise LearnerNotCaughtUp(
                    f"learner {member} holds entries up to {match}, the commit index is "
                    f"{log.committed}; retry once it has caught up"
                )
        members = voters | learners
        addresses = {m: a for m, a in self.conf.addresses if m in members}
        if address and member in members:
            addresses[member] = address
        if own_address and self.id not in addresses and self.id in voters:
            addresses[self.id] = own_address
        conf = ConfState(
            tuple(sorted(voters)), tuple(sorted(learners)), tuple(sorted(addresses.items()))
        )
        index = log.last_index() + 1
        self._append((Entry(index, self.term, EntryType.CONF_CHANGE, encode_conf_state(conf)),))
        self._needs_flush = True
        return index

    def read_index(self, ctx: bytes) -> None:
        """Start a linearizable read identified by ``ctx``. Once the leader confirmed it still
        leads (a quorum answered a heartbeat sent after the request, and it has committed an
        entry of its term) a :class:`ReadState` with ``ctx`` shows up in a Ready.

        A follower forwards the request to the leader. A read may be dropped silently when the
        leadership changes; the driver times it out and retries. Raises :class:`NotLeader`
        when no leader is known.
        """
        if self.role is Role.LEADER:
            self._leader_read(ctx, self.id)
        elif self.lead is not None:
            self.msgs.append(ReadIndexRequest(self.term, self.id, self.lead, ctx))
        else:
            raise NotLeader(None)

    def transfer_leadership(self, to: str) -> None:
        """Hand leadership to voter ``to``: proposals are refused meanwhile, ``to`` is caught
        up, then told to campaign at once. Abandoned after an election timeout. Transferring
        to oneself cancels a transfer."""
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        if to == self.id:
            self.lead_transferee = None
            return
        if to not in self.tracker.voter_set:
            raise InvalidRequest(f"{to} is not a voter; leadership can only go to a voter")
        if self.lead_transferee == to:
            return
        self.lead_transferee = to
        self.election_elapsed = 0
        pr = self.tracker.progress[to]
        if pr.match == self.log.last_index():
            self.msgs.append(TimeoutNow(self.term, self.id, to))
        else:
            pr.want_send = True
            self._needs_flush = True

    def compact(self, index: int) -> SnapshotMeta:
        """The application took a snapshot of its state machine at ``index`` (at most the
        applied index). Returns the metadata to store with it. Once the snapshot is durable
        the driver may drop log entries up to ``index`` from storage (a leader usually keeps
        some, so that slightly lagging members need no snapshot)."""
        log = self.log
        if index > log.applied:
            raise InvalidRequest(f"cannot snapshot at {index}: only {log.applied} is applied")
        base_index, conf = self._conf_base
        if index < base_index:
            raise CompactedError(f"index {index} is before the last snapshot ({base_index})")
        term = log.term(index)
        confs = self._confs
        keep = 0
        while keep < len(confs) and confs[keep][0] <= index:
            conf = confs[keep][1]
            keep += 1
        del confs[:keep]
        self._conf_base = (index, conf)
        return SnapshotMeta(index, term, conf)

    def report_snapshot(self, to: str, *, success: bool) -> None:
        """The driver finished (or gave up) streaming a snapshot to ``to``."""
        pr = self.tracker.progress.get(to)
        if self.role is not Role.LEADER or pr is None or pr.state is not ProgressState.SNAPSHOT:
            return
        if not success:
            pr.pending_snapshot = 0
        pr.become_probe()
        # Wait for the member's answer (or the next heartbeat answer) before probing.
        pr.probe_sent = True

    def holds_commit(self, index: int | None = None) -> bool:
        """On a leader: whether a lazy follower was not sent the commit index yet (up to
        ``index``, if given). The driver bounds how long that lasts with
        :meth:`broadcast_commit`."""
        if self.role is not Role.LEADER:
            return False
        return self.tracker.holds_commit(self.log.committed if index is None else index)

    def broadcast_commit(self) -> None:
        """On a leader: send the commit index to every member that lacks it, lazy ones too."""
        if self.role is Role.LEADER:
            self._commit_all = True
            self._needs_flush = True

    def report_unreachable(self, to: str) -> None:
        """The transport could not deliver to ``to``, or lost its connection to it.

        A leader stops pipelining to ``to`` and probes it instead. A follower whose leader
        this is stops holding the leader's lease and campaigns within
        ``leader_loss_ticks``: a leader process that crashed (its kernel closes its
        connections at once) is replaced in a tick or two, not an election timeout. A live
        leader loses nothing: pre-vote asks first, the members that still hear from it
        refuse while their lease holds, and its next heartbeat is followed as before.
        """
        if self.role is Role.LEADER:
            pr = self.tracker.progress.get(to)
            if pr is not None and pr.state is ProgressState.REPLICATE:
                pr.become_probe()
            return
        cfg = self.cfg
        if (
            self.role is Role.FOLLOWER
            and to == self.lead
            and cfg.leader_loss_ticks
            and cfg.check_quorum
            and cfg.pre_vote
        ):
            self.election_elapsed = max(self.election_elapsed, cfg.election_tick)
            soon = self.election_elapsed + 1 + self._rng.randrange(cfg.leader_loss_ticks)
            self._randomized_timeout = min(self._randomized_timeout, soon)

    def step(self, msg: Message) -> None:
        """Process one message from a peer. Stale, duplicated and reordered messages are
        handled (ignored or answered harmlessly)."""
        if msg.dst != self.id:
            return
        if msg.term > self.term:
            if isinstance(msg, VoteRequest):
                if not msg.transfer and self._in_lease():
                    return  # leader lease: we heard from a live leader recently
                if not msg.pre:
                    self._become_follower(msg.term, None)
            elif isinstance(msg, VoteResponse) and msg.pre and msg.granted:
                pass  # a granted pre-vote echoes the term we would campaign in
            elif isinstance(msg, (Append, Heartbeat, InstallSnapshot)):
                self._become_follower(msg.term, msg.src)
            else:
                self._become_follower(msg.term, None)
        elif msg.term < self.term:
            if isinstance(msg, (Append, Heartbeat)):
                # A deposed leader (or one on the wrong side of a healed partition) learns the
                # new term from the answer and steps down.
                self.msgs.append(AppendResponse(self.term, self.id, msg.src, 0, reject=True))
            elif isinstance(msg, VoteRequest) and msg.pre:
                self.msgs.append(VoteResponse(self.term, self.id, msg.src, False, True))
            return
        if isinstance(msg, VoteRequest):
            self._handle_vote_request(msg)
        elif self.role is Role.LEADER:
            self._step_leader(msg)
        elif self.role is Role.FOLLOWER:
            self._step_follower(msg)
        else:
            self._step_candidate(msg)

    # -- output ------------------------------------------------------------------------------------

    def has_ready(self) -> bool:
        """Whether :meth:`ready` has work (always False while a Ready is outstanding)."""
        if self._outstanding:
            return False
        if self._needs_flush:
            self._flush()
        log = self.log
        prev = self._prev_hs
        ss = self._prev_ss
        return bool(
            self.msgs
            or self.read_states
            or log.has_unpersisted()
            or log.has_next_committed()
            or self.term != prev.term
            or self.vote != prev.vote
            or log.committed != prev.commit
            or self.lead != ss.lead
            or self.role is not ss.role
        )

    def ready(self) -> Ready:
        """Take the pending work (see :class:`Ready`); call :meth:`advance` when done."""
        if self._outstanding:
            raise RuntimeError("advance() the previous Ready before asking for another")
        if self._needs_flush:
            self._flush()
        log = self.log
        snapshot, entries = log.take_unpersisted()
        committed = log.next_committed(self.cfg.max_committed_size_per_ready)
        prev = self._prev_hs
        hard = None
        must_sync = bool(entries) or snapshot is not None
        if self.term != prev.term or self.vote != prev.vote or log.committed != prev.commit:
            must_sync = must_sync or self.term != prev.term or self.vote != prev.vote
            hard = self._prev_hs = HardState(self.term, self.vote, log.committed)
        soft = None
        ss = self._prev_ss
        if self.lead != ss.lead or self.role is not ss.role or self.term != ss.term:
            soft = self._prev_ss = SoftState(self.lead, self.role, self.term)
        msgs = self.msgs
        early: list[Message] = []
        if (
            self.role is Role.LEADER
            and msgs
            and snapshot is None
            and self.term == self._durable_term
            and self.vote == self._durable_vote
        ):
            # This leader's term and vote are durable (an earlier Ready carried them), so its
            # Appends and Heartbeats may go out while this Ready's entries are persisted: it
            # counts itself for an entry only once advance() reports the entry durable.
            late: list[Message] = []
            for msg in msgs:
                (early if isinstance(msg, (Append, Heartbeat)) else late).append(msg)
            msgs = late
        rd = Ready(
            soft_state=soft,
            hard_state=hard,
            snapshot=snapshot,
            entries=entries,
            committed_entries=committed,
            messages=msgs,
            read_states=self.read_states,
            must_sync=must_sync,
            early_messages=early,
        )
        self.msgs = []
        self.read_states = []
        self._outstanding = True
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver has done everything ``rd`` asked for."""
        if not self._outstanding:
            raise RuntimeError("advance() called without an outstanding Ready")
        self._outstanding = False
        if rd.hard_state is not None:
            self._durable_term = rd.hard_state.term
            self._durable_vote = rd.hard_state.vote
        log = self.log
        if rd.snapshot is not None:
            log.stable_snapshot(rd.snapshot.index)
        if rd.entries:
            last = rd.entries[-1]
            log.stable_to(last.index, last.term)
        if rd.committed_entries:
            log.applied_to(rd.committed_entries[-1].index)
        if self.role is Role.LEADER:
            pr = self.tracker.progress.get(self.id)
            if pr is not None and pr.maybe_update(log.persisted):
                self._maybe_commit()

    # -- roles -------------------------------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.lead = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        election = self.cfg.election_tick
        self._randomized_timeout = election + self._rng.randrange(election)
        self.lead_transferee = None
        self.tracker.votes.clear()
        self._uncommitted.clear()
        self._uncommitted_size = 0
        self.reads.reset()
        self._commit_all = False

    def _become_follower(self, term: int, lead: str | None) -> None:
        self._reset(term)
        self.lead = lead
        self.role = Role.FOLLOWER
        self.tracker.prune()

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.lead = self.id
        log = self.log
        self.tracker.reset_progress(log.last_index() + 1, log.persisted)
        # The no-op lets the new leader commit (and so learn the commit index) at once (§8).
        log.append_one(Entry(log.last_index() + 1, self.term))
        self._needs_flush = True

    def _campaign(self, *, pre: bool, transfer: bool) -> None:
        if pre:
            self.role = Role.PRE_CANDIDATE
            self.lead = None
            self.tracker.votes.clear()
            term = self.term + 1
        else:
            self._reset(self.term + 1)
            self.role = Role.CANDIDATE
            self.vote = self.id
            term = self.term
        self.tracker.record_vote(self.id, True)
        if self._count_votes(pre):
            return
        log = self.log
        last_index, last_term = log.last_index(), log.last_term()
        for voter in self.tracker.voters:
            if voter != self.id:
                self.msgs.append(
                    VoteRequest(term, self.id, voter, last_index, last_term, pre, transfer)
                )

    def _count_votes(self, pre: bool) -> bool:
        result = self.tracker.tally()
        if result is VoteResult.WON:
            if pre:
                self._campaign(pre=False, transfer=False)
            else:
                self._become_leader()
            return True
        if result is VoteResult.LOST:
            self._become_follower(self.term, None)
            return True
        return False

    def _promotable(self) -> bool:
        return self.id in self.tracker.voter_set and self.log.snapshot is None

    def _in_lease(self) -> bool:
        return (
            self.cfg.check_quorum
            and self.lead is not None
            and self.election_elapsed < self.cfg.election_tick
        )

    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_tick:
            self.election_elapsed = 0
            if self.cfg.check_quorum and not self.tracker.quorum_active():
                self._become_follower(self.term, None)
                return
            self.lead_transferee = None  # a transfer gets one election timeout
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self.tracker.send_heartbeats(self.term, self.reads.seq, self.msgs)

    # -- handling messages -------------------------------------------------------------------------

    def _handle_vote_request(self, msg: VoteRequest) -> None:
        can_vote = (
            self.vote == msg.src
            or (self.vote is None and self.lead is None)
            or (msg.pre and msg.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(msg.last_index, msg.last_term):
            self.msgs.append(VoteResponse(msg.term, self.id, msg.src, True, msg.pre))
            if not msg.pre:
                self.election_elapsed = 0
                self.vote = msg.src
        else:
            self.msgs.append(VoteResponse(self.term, self.id, msg.src, False, msg.pre))

    def _step_follower(self, msg: Message) -> None:
        if isinstance(msg, Append):
            self.election_elapsed = 0
            self.lead = msg.src
            self._handle_append(msg)
        elif isinstance(msg, Heartbeat):
            self.election_elapsed = 0
            self.lead = msg.src
            log = self.log
            log.commit_to(min(msg.commit, log.last_index()))
            self.msgs.append(
                HeartbeatResponse(self.term, self.id, msg.src, msg.read_seq, self.lazy_commit)
            )
        elif isinstance(msg, InstallSnapshot):
            self.election_elapsed = 0
            self.lead = msg.src
            self._handle_snapshot(msg)
        elif isinstance(msg, TimeoutNow):
            if self._promotable():
                self._campaign(pre=False, transfer=True)
        elif isinstance(msg, ReadIndexResponse):
            self.read_states.append(ReadState(msg.ctx, msg.index))

    def _step_candidate(self, msg: Message) -> None:
        if isinstance(msg, (Append, Heartbeat, InstallSnapshot)):
            self._become_follower(self.term, msg.src)
            self._step_follower(msg)
        elif isinstance(msg, VoteResponse):
            pre = self.role is Role.PRE_CANDIDATE
            if msg.pre == pre:
                self.tracker.record_vote(msg.src, msg.granted)
                self._count_votes(pre)

    def _handle_append(self, msg: Append) -> None:
        log = self.log
        prev_index, prev_term, entries = msg.prev_index, msg.prev_term, msg.entries
        committed = log.committed
        if prev_index < committed:
            # Stale or reordered: what is committed here is known to match the leader's log,
            # so only the part after it can be new.
            skip = committed - prev_index
            if skip >= len(entries):
                self._answer_append(msg.src, committed)
                return
            prev_index, prev_term = committed, entries[skip - 1].term
            entries = entries[skip:]
        if log.match_term(prev_index, prev_term):
            last_new = prev_index + len(entries)
            conflict = log.find_conflict(entries)
            if conflict:
                if conflict <= log.committed:
                    raise AssertionError(f"entry {conflict} conflicts with a committed entry")
                self._append(entries[conflict - prev_index - 1 :])
            log.commit_to(min(msg.commit, last_new))
            if not msg.quiet:
                self._answer_append(msg.src, last_new)
            return
        hint_index, hint_term = log.find_conflict_by_term(
            min(prev_index, log.last_index()), prev_term
        )
        self.msgs.append(
            AppendResponse(
                self.term,
                self.id,
                msg.src,
                msg.prev_index,
                reject=True,
                hint_index=hint_index,
                hint_term=hint_term,
                lazy=self.lazy_commit,
            )
        )

    def _answer_append(self, to: str, index: int) -> None:
        self.msgs.append(AppendResponse(self.term, self.id, to, index, lazy=self.lazy_commit))

    def _handle_snapshot(self, msg: InstallSnapshot) -> None:
        log = self.log
        meta = msg.meta
        if meta.index <= log.committed:
            index = log.committed
        elif log.match_term(meta.index, meta.term):
            # Our log already holds the snapshot's entries: keep it, just commit them.
            log.commit_to(meta.index)
            index = meta.index
        else:
            log.restore(meta)
            self._conf_base = (meta.index, meta.conf)
            self._confs.clear()
            self._set_conf(meta.conf)
            index = meta.index
        self._answer_append(msg.src, index)

    def _step_leader(self, msg: Message) -> None:
        if isinstance(msg, AppendResponse):
            self._handle_append_response(msg)
        elif isinstance(msg, HeartbeatResponse):
            pr = self.tracker.progress.get(msg.src)
            if pr is None:
                return
            pr.recent_active = True
            pr.lazy = msg.lazy
            pr.probe_sent = False
            if pr.state is ProgressState.REPLICATE and pr.inflights.full():
                pr.inflights.free_first_one()  # a lost Append must not stall the pipeline
            if pr.match < self.log.last_index():
                pr.want_send = True
            self._needs_flush = True
            if msg.read_seq and self.reads.ack(msg.src, msg.read_seq):
                self._release_reads()
        elif isinstance(msg, ReadIndexRequest):
            self._leader_read(msg.ctx, msg.src)

    def _handle_append_response(self, msg: AppendResponse) -> None:
        pr = self.tracker.progress.get(msg.src)
        if pr is None:
            return
        pr.recent_active = True
        pr.lazy = msg.lazy
        self._needs_flush = True
        if msg.reject:
            hint_next = msg.index
            if pr.state is ProgressState.PROBE:
                hint_next = self.log.find_conflict_by_term(msg.hint_index, msg.hint_term)[0] + 1
            if pr.maybe_decr_to(msg.index, hint_next) and pr.state is ProgressState.REPLICATE:
                pr.become_probe()
            return
        if not pr.maybe_update(msg.index):
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT:
            if pr.match >= pr.pending_snapshot:
                pr.become_replicate()
        else:
            pr.inflights.free_le(msg.index)
        self._maybe_commit()
        if msg.src == self.lead_transferee and pr.match == self.log.last_index():
            self.msgs.append(TimeoutNow(self.term, self.id, msg.src))

    # -- leader machinery --------------------------------------------------------------------------

    def _check_proposable(self) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        if self.lead_transferee is not None:
            raise LeadershipTransferInProgress(
                f"leadership is moving to {self.lead_transferee}; retry there shortly"
            )

    def _committed_in_term(self) -> bool:
        log = self.log
        return log.term(log.committed) == self.term

    def _maybe_commit(self) -> None:
        log = self.log
        index = self.tracker.committed_index()
        # Figure 8: only an entry of the current term is committed by counting replicas.
        if index <= log.committed or log.term(index) != self.term:
            return
        first_in_term = log.term(log.committed) != self.term
        log.commit_to(index)
        self._needs_flush = True
        uncommitted = self._uncommitted
        while uncommitted and uncommitted[0][0] <= index:
            self._uncommitted_size -= uncommitted.popleft()[1]
        if first_in_term and self.reads.pending:
            pending, self.reads.pending = self.reads.pending, []
            for ctx, origin in pending:
                self._leader_read(ctx, origin)
        if index >= self._conf_index():
            self.tracker.prune()
            if self.id not in self.tracker.voter_set:
                self._step_down_removed()

    def _step_down_removed(self) -> None:
        """This leader's removal committed: let the most up-to-date voter take over at once
        instead of waiting for an election timeout."""
        progress = self.tracker.progress
        last = self.log.last_index()
        for voter in self.tracker.voters:
            pr = progress.get(voter)
            if pr is not None and pr.match == last:
                self.msgs.append(TimeoutNow(self.term, self.id, voter))
                break
        self._become_follower(self.term, None)

    def _flush(self) -> None:
        """Send what each member is missing (batched: proposals and acks only set a flag)."""
        self._needs_flush = False
        if self.role is not Role.LEADER:
            return
        if self.reads.round_due:
            self.reads.round_due = False
            self.tracker.send_heartbeats(self.term, self.reads.seq, self.msgs)
        self.tracker.send_appends(self.term, self.msgs, lazy_too=self._commit_all)
        self._commit_all = False

    def _leader_read(self, ctx: bytes, origin: str) -> None:
        if not self._committed_in_term():
            # Until then the leader does not know the commit index of the previous terms.
            self.reads.pending.append((ctx, origin))
            return
        self.reads.add(self.id, self.log.committed, ctx, origin)
        self._release_reads()
        self._needs_flush = True

    def _release_reads(self) -> None:
        for index, ctx, origin in self.reads.release(self.tracker):
            if origin == self.id:
                self.read_states.append(ReadState(ctx, index))
            else:
                self.msgs.append(ReadIndexResponse(self.term, self.id, origin, ctx, index))

    # -- the log and the configuration -------------------------------------------------------------

    def _append(self, entries: Sequence[Entry]) -> None:
        """Append (truncating on conflict), tracking the configuration the log implies."""
        first = entries[0].index
        confs = self._confs
        changed = False
        while confs and confs[-1][0] >= first:
            confs.pop()
            changed = True
        self.log.append(entries)
        for entry in entries:
            if entry.type is EntryType.CONF_CHANGE:
                confs.append((entry.index, decode_conf_state(entry.data)))
                changed = True
        if changed:
            self._set_conf(confs[-1][1] if confs else self._conf_base[1])

    def _set_conf(self, conf: ConfState) -> None:
        self.conf = conf
        leader = self.role is Role.LEADER
        self.tracker.set_conf(conf, self.log.last_index() + 1, keep_removed=leader)
        if leader:
            if self.lead_transferee is not None and self.lead_transferee not in conf.voters:
                self.lead_transferee = None
            self._needs_flush = True
            self._maybe_commit()  # the quorum may have changed

    def _conf_index(self) -> int:
        return self._confs[-1][0] if self._confs else self._conf_base[0]

    def _scan_confs(self, lo: int, last: int) -> list[tuple[int, ConfState]]:
        confs: list[tuple[int, ConfState]] = []
        storage = self.log.storage
        while lo <= last:
            chunk = storage.entries(lo, last + 1, 4 << 20)
            for entry in chunk:
                if entry.type is EntryType.CONF_CHANGE:
                    confs.append((entry.index, decode_conf_state(entry.data)))
            lo = chunk[-1].index + 1
        return confs
