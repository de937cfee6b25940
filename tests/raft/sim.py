"""Deterministic harnesses for the Raft core: no threads, no sockets, no wall clock.

- :class:`Checker` asserts Raft's safety properties incrementally, after every step.
- :class:`SimNode` is a tiny driver: it persists Readys to a ``MemoryStorage``, applies
  committed entries to a toy state machine and takes snapshots.
- :class:`Cluster` delivers messages synchronously in rounds, with ``cut``/``isolate``/``crash``
  and a message hook (the style of etcd's raft test network) for scenario tests.
- :class:`Simulation` runs one seeded random schedule in virtual time: a network that drops,
  duplicates, delays and reorders, partitions, crashes that lose unsynced writes, membership
  changes, snapshots; then heals everything and checks liveness.
"""

from __future__ import annotations

import contextlib
import heapq
import random
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from controlplane.backends.raft.core import (
    ConfChangeType,
    CoreConfig,
    RaftCore,
    RaftError,
    ReadState,
    Ready,
    Role,
)
from controlplane.backends.raft.memstorage import MemoryStorage
from controlplane.backends.raft.messages import Append, InstallSnapshot, Message
from controlplane.backends.raft.raftlog import CompactedError, StorageError
from controlplane.backends.raft.records import ConfState, Entry, EntryType, HardState, SnapshotMeta

_HEADER = struct.Struct(">QQB")
_SNAP_ENCODER = msgspec.msgpack.Encoder()
_SNAP_DECODER = msgspec.msgpack.Decoder(tuple[int, list[bytes]])


class InvariantViolation(AssertionError):
    pass


class Checker:
    """Election safety, log matching, leader completeness, state machine safety, monotonic
    apply, durable term/vote monotonicity and linearizable ReadIndex results."""

    def __init__(self) -> None:
        self.leaders: dict[int, str] = {}
        self.entries: dict[tuple[int, int], tuple[EntryType, bytes, int]] = {}
        self.applied: dict[int, Entry] = {}
        self.digests: dict[int, int] = {0: 0}
        self.commit_by_term: dict[int, int] = {}
        self.committed_terms: dict[int, int] = {0: 0}
        self.max_committed = 0
        self.max_applied = 0
        self.reads: dict[bytes, int] = {}
        self.reads_done = 0

    def fail(self, what: str) -> None:
        raise InvariantViolation(what)

    def on_step(self, node: str, core: RaftCore) -> None:
        """After any input to ``core``."""
        if core.role is not Role.LEADER:
            return
        term = core.term
        known = self.leaders.get(term)
        if known is None:
            self.leaders[term] = node
            self._check_leader_completeness(node, core)
        elif known != node:
            self.fail(f"election safety: {known} and {node} both lead term {term}")
        committed = core.log.committed
        if committed > self.commit_by_term.get(term, 0):
            self.commit_by_term[term] = committed
        if committed > self.max_committed:
            for index in range(self.max_committed + 1, committed + 1):
                with contextlib.suppress(StorageError):
                    self.committed_terms[index] = core.log.term(index)
            self.max_committed = committed

    def _check_leader_completeness(self, node: str, core: RaftCore) -> None:
        required = max((c for t, c in self.commit_by_term.items() if t < core.term), default=0)
        log = core.log
        first = log.first_index()
        if log.last_index() < required:
            self.fail(
                f"leader completeness: {node} leads term {core.term} with last index "
                f"{log.last_index()} but {required} was committed earlier"
            )
        for index in range(max(first - 1, 1), required + 1):
            want = self.committed_terms.get(index)
            if want is not None and log.term(index) != want:
                self.fail(
                    f"leader completeness: {node} (term {core.term}) has term "
                    f"{log.term(index)} at committed index {index}, expected {want}"
                )

    def on_persist(self, node: str, core: RaftCore, entries: Sequence[Entry]) -> None:
        """Log matching: an (index, term) pair always names the same entry after the same
        predecessor term — which by induction means identical prefixes."""
        prev_term: int | None
        try:
            prev_term = core.log.term(entries[0].index - 1)
        except StorageError:
            prev_term = None
        for entry in entries:
            key = (entry.index, entry.term)
            seen = self.entries.get(key)
            if seen is None:
                if prev_term is not None:
                    self.entries[key] = (entry.type, entry.data, prev_term)
            elif (
                seen[0] != entry.type
                or seen[1] != entry.data
                or (prev_term is not None and seen[2] != prev_term)
            ):
                self.fail(f"log matching: {node} holds a different entry at {key}")
            prev_term = entry.term

    def on_apply(self, node: str, entry: Entry, digest: int) -> None:
        seen = self.applied.get(entry.index)
        if seen is None:
            self.applied[entry.index] = entry
            self.digests[entry.index] = digest
            self.max_applied = max(self.max_applied, entry.index)
        elif seen != entry:
            self.fail(f"state machine safety: {node} applied {entry} where {seen} was applied")
        elif self.digests[entry.index] != digest:
            self.fail(f"state machine safety: {node}'s state differs at {entry.index}")

    def on_install(self, node: str, meta: SnapshotMeta, digest: int) -> None:
        want = self.digests.get(meta.index)
        if want is not None and want != digest:
            self.fail(f"state machine safety: {node} installed a bad snapshot at {meta.index}")

    def on_read_start(self, ctx: bytes) -> None:
        # Linearizability: the read must reflect every write acknowledged before it started.
        self.reads[ctx] = self.max_applied

    def on_read_done(self, node: str, rs: ReadState) -> None:
        floor = self.reads.get(rs.ctx)
        if floor is not None and rs.index < floor:
            self.fail(
                f"linearizability: read {rs.ctx!r} on {node} got index {rs.index}, but "
                f"{floor} was already applied when it started"
            )
        self.reads_done += 1


def _digest(prev: int, entry: Entry) -> int:
    header = _HEADER.pack(entry.index, entry.term, int(entry.type))
    return zlib.crc32(entry.data, zlib.crc32(header, prev))


class SimNode:
    """A minimal driver around one core, following the duties documented on ``Ready``."""

    def __init__(
        self,
        id: str,
        storage: MemoryStorage,
        config: CoreConfig,
        checker: Checker,
        seed: object,
    ) -> None:
        self.id = id
        self.storage = storage
        self.config = config
        self.checker = checker
        self.seed = seed
        self.incarnation = 0
        self.core: RaftCore | None = None
        self.pending: Ready | None = None
        self.early: list[tuple[Message, bytes | None]] = []
        """The pending Ready's early messages (a leader's Appends and Heartbeats), to put
        on the wire at once: before its writes are durable."""
        self.staged_snapshots: dict[tuple[int, int], bytes] = {}
        self.reads: list[ReadState] = []
        self.durable_term = 0
        self.durable_vote: str | None = None
        self.applied = 0
        self.digest = 0
        self.data: list[bytes] = []
        self.history: dict[int, tuple[int, int]] = {}
        self.start()

    @property
    def up(self) -> bool:
        return self.core is not None

    def must_core(self) -> RaftCore:
        assert self.core is not None, f"{self.id} is down"
        return self.core

    def start(self) -> None:
        self.incarnation += 1
        self.core = RaftCore(
            self.id,
            self.storage,
            self.config,
            random.Random(f"{self.seed}/{self.id}/{self.incarnation}"),
        )
        meta = self.storage.snapshot_meta()
        self._restore(meta, self.storage.snapshot_data())

    def _restore(self, meta: SnapshotMeta, data: bytes) -> None:
        if data:
            self.digest, self.data = _SNAP_DECODER.decode(data)
        else:
            self.digest, self.data = 0, []
        self.applied = meta.index
        self.history = {meta.index: (self.digest, len(self.data))}

    def crash(self, rng: random.Random | None = None) -> None:
        self.core = None
        self.pending = None
        self.early = []
        self.staged_snapshots.clear()
        self.storage.crash(rng)

    def take_ready(self) -> Ready | None:
        """Take a Ready and stage its writes (not yet durable); its early messages wait in
        :attr:`early` (see :meth:`take_early`) to be sent before the writes are synced."""
        core = self.core
        if core is None or self.pending is not None or not core.has_ready():
            return None
        rd = core.ready()
        if rd.snapshot is not None:
            key = (rd.snapshot.index, rd.snapshot.term)
            self.storage.apply_snapshot(rd.snapshot, self.staged_snapshots[key])
        if rd.entries:
            self.checker.on_persist(self.id, core, rd.entries)
            self.storage.append(rd.entries)
        if rd.hard_state is not None:
            self.storage.set_hard_state(rd.hard_state)
        self.pending = rd
        self.early.extend((m, None) for m in rd.early_messages)
        return rd

    def take_early(self) -> list[tuple[Message, bytes | None]]:
        out, self.early = self.early, []
        return out

    def finish_ready(self) -> list[tuple[Message, bytes | None]]:
        """Sync, then send, apply and advance. Returns the messages to put on the wire."""
        rd, core = self.pending, self.core
        assert rd is not None and core is not None
        self.pending = None
        self.storage.sync()
        self._check_durable()
        if rd.snapshot is not None:
            meta = rd.snapshot
            for key in [k for k in self.staged_snapshots if k[0] <= meta.index]:
                del self.staged_snapshots[key]
            self._restore(meta, self.storage.snapshot_data())
            self.checker.on_install(self.id, meta, self.digest)
        out: list[tuple[Message, bytes | None]] = []
        for msg in rd.messages:
            if isinstance(msg, InstallSnapshot):
                # Send the newest snapshot we have (the one the core named, or a later one).
                newest = msgspec.structs.replace(msg, meta=self.storage.snapshot_meta())
                out.append((newest, self.storage.snapshot_data()))
            else:
                out.append((msg, None))
        for entry in rd.committed_entries:
            self._apply(entry)
        for rs in rd.read_states:
            self.checker.on_read_done(self.id, rs)
            self.reads.append(rs)
        core.advance(rd)
        self.checker.on_step(self.id, core)  # a leader may commit on its own persistence
        return out

    def _check_durable(self) -> None:
        hard = self.storage.hard_state()
        if hard.term < self.durable_term or (
            hard.term == self.durable_term
            and self.durable_vote is not None
            and hard.vote != self.durable_vote
        ):
            raise InvariantViolation(
                f"{self.id}: durable term/vote went from {self.durable_term}/"
                f"{self.durable_vote} to {hard.term}/{hard.vote}"
            )
        self.durable_term, self.durable_vote = hard.term, hard.vote

    def _apply(self, entry: Entry) -> None:
        if entry.index != self.applied + 1:
            raise InvariantViolation(
                f"{self.id}: applied index went from {self.applied} to {entry.index}"
            )
        self.applied = entry.index
        self.digest = _digest(self.digest, entry)
        if entry.type is EntryType.NORMAL and entry.data:
            self.data.append(entry.data)
        self.history[entry.index] = (self.digest, len(self.data))
        self.checker.on_apply(self.id, entry, self.digest)

    def deliver(self, msg: Message, payload: bytes | None) -> None:
        core = self.must_core()
        if isinstance(msg, InstallSnapshot) and payload is not None:
            self.staged_snapshots[(msg.meta.index, msg.meta.term)] = payload
        core.step(msg)
        self.checker.on_step(self.id, core)

    def snapshot(self, keep: int = 0) -> SnapshotMeta | None:
        """Snapshot the state machine ``keep`` entries behind the applied index and compact."""
        core = self.must_core()
        index = self.applied - keep
        if index <= self.storage.snapshot_meta().index or index not in self.history:
            return None
        try:
            meta = core.compact(index)
        except CompactedError:
            return None  # a snapshot from the leader is being installed
        digest, length = self.history[index]
        self.storage.compact(meta, _SNAP_ENCODER.encode((digest, self.data[:length])))
        self.storage.sync()
        self.history = {i: v for i, v in self.history.items() if i >= index}
        return meta


class Cluster:
    """Synchronous delivery in rounds, for scenario tests (like etcd's raft test network)."""

    def __init__(
        self,
        voters: Sequence[str],
        *,
        learners: Sequence[str] = (),
        spares: Sequence[str] = (),
        config: CoreConfig | None = None,
        seed: int = 0,
        logs: Mapping[str, Sequence[int]] | None = None,
        terms: Mapping[str, int] | None = None,
    ) -> None:
        """``logs`` pre-seeds members' durable logs with one entry per listed term (entry
        ``i`` of term ``t`` carries ``b"i/t"``, so equal (index, term) pairs are equal
        entries), and ``terms`` their durable current term."""
        self.config = config or CoreConfig()
        self.checker = Checker()
        conf = ConfState(tuple(voters), tuple(learners))
        self.nodes: dict[str, SimNode] = {}
        for member in (*voters, *learners, *spares):
            storage = MemoryStorage(conf if member not in spares else None)
            log = (logs or {}).get(member, ())
            if log:
                storage.append(
                    [Entry(i, t, EntryType.NORMAL, b"%d/%d" % (i, t)) for i, t in enumerate(log, 1)]
                )
            term = (terms or {}).get(member, max(log, default=0))
            if term:
                storage.set_hard_state(HardState(term=term))
            storage.sync()
            self.nodes[member] = SimNode(member, storage, self.config, self.checker, seed)
        self.cut_links: set[tuple[str, str]] = set()
        self.hook: Callable[[Message], bool] | None = None
        """Return False to drop a message."""
        self.unreliable: random.Random | None = None
        """When set, each round's messages are delivered in a random order."""
        self.delivered: list[Message] = []
        self.sent: list[Message] = []
        self.held: set[str] = set()
        """Members whose persistence is held: their Ready is taken (its early messages go
        out) but its writes are neither synced nor acknowledged until :meth:`release`."""

    def count(
        self,
        kind: type[Message],
        *,
        src: str | None = None,
        dst: str | None = None,
        delivered: bool = False,
        where: Callable[[Any], bool] | None = None,
    ) -> int:
        """How many messages of a kind were sent (or delivered), optionally filtered."""
        pool = self.delivered if delivered else self.sent
        return sum(
            1
            for m in pool
            if isinstance(m, kind)
            and (src is None or m.src == src)
            and (dst is None or m.dst == dst)
            and (where is None or where(m))
        )

    def run_until(self, done: Callable[[], bool], max_ticks: int = 200) -> int:
        """Tick every live member until ``done()``; returns the ticks it took."""
        for ticks in range(max_ticks + 1):
            if done():
                return ticks
            self.tick()
        raise AssertionError(f"condition not reached within {max_ticks} ticks")

    def core(self, member: str) -> RaftCore:
        return self.nodes[member].must_core()

    def up(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.up]

    def settle(self, max_rounds: int = 1000) -> None:
        """Process Readys and deliver messages until the cluster is quiet."""
        for _ in range(max_rounds):
            queue: list[tuple[Message, bytes | None, str]] = []
            for node in self.up():
                while node.take_ready() is not None:
                    queue.extend((m, p, node.id) for m, p in node.take_early())
                    if node.id in self.held:
                        break
                    queue.extend((m, p, node.id) for m, p in node.finish_ready())
            if not queue:
                return
            if self.unreliable is not None:
                self.unreliable.shuffle(queue)
            for msg, payload, src in queue:
                self._deliver(msg, payload, src)
        raise AssertionError("the cluster did not settle")

    def _deliver(self, msg: Message, payload: bytes | None, src: str) -> None:
        self.sent.append(msg)
        dst = self.nodes.get(msg.dst)
        ok = (
            dst is not None
            and dst.up
            and (src, msg.dst) not in self.cut_links
            and (self.hook is None or self.hook(msg))
        )
        if ok:
            assert dst is not None
            self.delivered.append(msg)
            dst.deliver(msg, payload)
        if isinstance(msg, InstallSnapshot) and self.nodes[src].up:
            self.nodes[src].must_core().report_snapshot(msg.dst, success=ok)

    def tick(self, members: Iterable[str] | None = None, n: int = 1) -> None:
        chosen = list(members) if members is not None else [x.id for x in self.up()]
        for _ in range(n):
            for member in chosen:
                node = self.nodes[member]
                if node.up:
                    node.must_core().tick()
                    self.checker.on_step(member, node.must_core())
            self.settle()

    def campaign(self, member: str) -> None:
        self.core(member).campaign()
        self.checker.on_step(member, self.core(member))
        self.settle()

    def propose(self, member: str, data: bytes) -> int:
        index = self.core(member).propose(data)
        self.settle()
        return index

    def conf_change(self, member: str, change: ConfChangeType, target: str) -> int:
        index = self.core(member).propose_conf_change(change, target)
        self.settle()
        return index

    def leader(self) -> str | None:
        leaders = [n for n in self.up() if n.must_core().role is Role.LEADER]
        if not leaders:
            return None
        return max(leaders, key=lambda n: n.must_core().term).id

    def cut(self, a: str, b: str) -> None:
        self.cut_links |= {(a, b), (b, a)}

    def isolate(self, member: str) -> None:
        for other in self.nodes:
            if other != member:
                self.cut(member, other)

    def heal(self) -> None:
        self.cut_links.clear()
        self.hook = None

    def crash(self, member: str) -> None:
        self.nodes[member].crash()

    def hold(self, member: str) -> None:
        """Stop completing ``member``'s persists (see :attr:`held`)."""
        self.held.add(member)

    def release(self, member: str) -> None:
        """Sync and acknowledge ``member``'s pending Ready, send what it held, settle."""
        self.held.discard(member)
        node = self.nodes[member]
        if node.pending is not None:
            for msg, payload in node.finish_ready():
                self._deliver(msg, payload, member)
        self.settle()

    def restart(self, member: str) -> None:
        self.nodes[member].start()

    def data(self, member: str) -> list[bytes]:
        return self.nodes[member].data


# -- the randomized simulation ----------------------------------------------------------------

TICK = 10
"""Virtual time units per tick."""


@dataclass
class SimParams:
    seed: int
    voters: int = 3
    spares: int = 0
    chaos_ticks: int = 150
    heal_ticks: int = 400
    drop: float = 0.05
    dup: float = 0.02
    max_delay: int = 15
    crash_rate: float = 0.01
    partition_rate: float = 0.01
    propose_rate: float = 0.5
    conf_rate: float = 0.0
    read_rate: float = 0.1
    transfer_rate: float = 0.005
    snapshot_every: int = 0
    max_size_per_msg: int = 256
    max_inflight_msgs: int = 4
    crash_after_send: float = 0.0
    crash_before_persist: float = 0.0
    """Crash right after a Ready's early messages went out, before its writes are synced (a
    leader that sent entries it then loses)."""
    nemesis: bool = False
    """Crash leaders at the worst moments: right after winning, and while an entry of an
    older term sits on a majority without one of the leader's own (Figure 8)."""
    pre_vote: bool = True
    check_quorum: bool = True
    lazy_rate: float = 0.0
    """Per tick, the chance that one member flips ``lazy_commit`` (a driver whose readers come
    and go): leaders then hold back commit-only Appends to the lazy ones."""
    report_crashes: bool = False
    """Tell the live members (within a tick) that a member crashed, as a transport whose
    connections to it closed does: followers of a crashed leader campaign early."""
    false_report_rate: float = 0.0
    """Per tick, the chance that one member is told another (often its leader) is
    unreachable though it is not: a connection lost to a live member."""

    @classmethod
    def from_seed(cls, seed: int) -> SimParams:
        """A random mix: most seeds run the recommended settings with every kind of fault,
        membership changes and snapshots; some run without pre-vote/check-quorum; one in ten
        is a Figure 8 hunt (five voters, one entry per message, leaders crashed at the worst
        moments)."""
        rng = random.Random(f"params/{seed}")
        # Drawn apart, so that adding it left every seed's other parameters as they were.
        lazy_rate = random.Random(f"lazy/{seed}").choice((0.0, 0.05, 0.3))
        reports = random.Random(f"reports/{seed}")
        report_crashes = reports.random() < 0.7
        false_report_rate = reports.choice((0.0, 0.0, 0.02, 0.1))
        if rng.random() < 0.1:
            return cls(
                seed=seed,
                voters=5,
                chaos_ticks=rng.randrange(300, 500),
                drop=0.1,
                dup=0.02,
                max_delay=rng.choice((5, 15)),
                crash_rate=0.1,
                partition_rate=0.0,
                propose_rate=1.0,
                read_rate=0.1,
                transfer_rate=0.0,
                max_size_per_msg=1,
                max_inflight_msgs=2,
                nemesis=True,
                check_quorum=rng.random() < 0.5,
                lazy_rate=lazy_rate,
                report_crashes=report_crashes,
                false_report_rate=false_report_rate,
            )
        safe_mode = rng.random() < 0.85
        return cls(
            seed=seed,
            voters=rng.choice((3, 3, 5)),
            spares=rng.choice((0, 0, 1, 2)),
            chaos_ticks=rng.randrange(200, 500),
            drop=rng.choice((0.0, 0.02, 0.1, 0.3)),
            dup=rng.choice((0.0, 0.02, 0.1)),
            max_delay=rng.choice((3, 10, 25)),
            crash_rate=rng.choice((0.0, 0.02, 0.05)),
            partition_rate=rng.choice((0.0, 0.02, 0.05)),
            propose_rate=rng.choice((0.2, 0.5, 1.0)),
            conf_rate=rng.choice((0.0, 0.03, 0.1)) if safe_mode else 0.0,
            read_rate=rng.choice((0.0, 0.1, 0.3)),
            transfer_rate=rng.choice((0.0, 0.005, 0.02)),
            snapshot_every=rng.choice((0, 0, 5, 20)),
            max_size_per_msg=rng.choice((1, 100, 1000)),
            max_inflight_msgs=rng.choice((1, 4, 64)),
            crash_after_send=rng.choice((0.0, 0.0, 0.002, 0.01)),
            crash_before_persist=rng.choice((0.0, 0.0, 0.005, 0.02)),
            nemesis=rng.random() < 0.2,
            pre_vote=safe_mode or rng.random() < 0.5,
            check_quorum=safe_mode or rng.random() < 0.5,
            lazy_rate=lazy_rate,
            report_crashes=report_crashes,
            false_report_rate=false_report_rate,
        )


@dataclass(order=True)
class _Event:
    time: int
    seq: int
    kind: str = field(compare=False)
    node: str = field(compare=False, default="")
    incarnation: int = field(compare=False, default=0)
    msg: Message | None = field(compare=False, default=None)
    payload: bytes | None = field(compare=False, default=None)
    src: str = field(compare=False, default="")
    src_incarnation: int = field(compare=False, default=0)


class Simulation:
    """One seeded random schedule; :meth:`run` raises on any violated property."""

    def __init__(self, params: SimParams) -> None:
        self.p = params
        self.rng = random.Random(params.seed)
        self.report_rng = random.Random(f"reports/{params.seed}")
        """Apart from ``rng``: seeds without reports keep the schedules they had."""
        self.checker = Checker()
        self.config = CoreConfig(
            election_tick=10,
            heartbeat_tick=1,
            pre_vote=params.pre_vote,
            check_quorum=params.check_quorum,
            max_size_per_msg=params.max_size_per_msg,
            max_inflight_msgs=params.max_inflight_msgs,
            max_uncommitted_entries_size=4096,
        )
        voters = [f"n{i}" for i in range(1, params.voters + 1)]
        spares = [f"s{i}" for i in range(1, params.spares + 1)]
        conf = ConfState(tuple(voters))
        self.nodes = {
            m: SimNode(
                m,
                MemoryStorage(conf if m in voters else None),
                self.config,
                self.checker,
                params.seed,
            )
            for m in (*voters, *spares)
        }
        self.now = 0
        self.seq = 0
        self.events: list[_Event] = []
        self.blocked: set[tuple[str, str]] = set()
        self.partition_id = 0
        self.nemesis_terms: set[int] = set()
        self.drop = params.drop
        self.dup = params.dup
        self.max_delay = params.max_delay
        self.proposed = 0
        self.read_seq = 0
        self.stats: dict[str, int] = {"msgs": 0, "dropped": 0, "crashes": 0, "snapshots": 0}
        for member in self.nodes:
            self._schedule(self.rng.randrange(TICK), "tick", member)

    # -- plumbing -----------------------------------------------------------------------------

    def _schedule(self, delay: int, kind: str, node: str = "", **kw: object) -> None:
        self.seq += 1
        ev = _Event(self.now + delay, self.seq, kind, node, **kw)  # type: ignore[arg-type]
        heapq.heappush(self.events, ev)

    def _pump(self, node: SimNode) -> None:
        rd = node.take_ready()
        if rd is None:
            return
        early = node.take_early()
        for msg, payload in early:
            self._send(node, msg, payload)
        if early and self.rng.random() < self.p.crash_before_persist:
            # The leader's entries are on the wire, not on its disk: the crash loses them here.
            self.stats["crashes_before_persist"] = self.stats.get("crashes_before_persist", 0) + 1
            self._crash(node, 1, 3 * TICK)
            return
        delay = self.rng.choice((0, 0, 1, 3, 8))
        if delay == 0:
            self._finish(node)
        else:
            self._schedule(delay, "persist", node.id, incarnation=node.incarnation)

    def _finish(self, node: SimNode) -> None:
        for msg, payload in node.finish_ready():
            self._send(node, msg, payload)
        if self.drop and self.rng.random() < self.p.crash_after_send:
            # Crash right after acting on durable state: whatever was promised must survive.
            self._crash(node, 1, 3 * TICK)
            return
        every = self.p.snapshot_every
        if (
            every
            and node.applied - node.storage.snapshot_meta().index >= every
            and node.snapshot(keep=self.rng.randrange(4)) is not None
        ):
            self.stats["snapshots"] += 1
        self._pump(node)

    def _send(self, node: SimNode, msg: Message, payload: bytes | None) -> None:
        self.stats["msgs"] += 1
        copies = 2 if self.rng.random() < self.dup else 1
        drop = self.drop
        if (
            self.p.nemesis
            and drop
            and isinstance(msg, Append)
            and any(e.term == msg.term for e in msg.entries)
        ):
            drop = 0.5  # the nemesis is especially bad at delivering the leader's own entries
        for _ in range(copies):
            lost = (node.id, msg.dst) in self.blocked or self.rng.random() < drop
            delay = self.rng.randint(1, self.max_delay)
            self._schedule(
                delay,
                "lost" if lost else "deliver",
                msg.dst,
                msg=msg,
                payload=payload,
                src=node.id,
                src_incarnation=node.incarnation,
            )

    def _crash(self, node: SimNode, restart_min: int, restart_max: int) -> None:
        """Crash ``node`` (losing unsynced writes); restart it in ``[restart_min, restart_max)``."""
        self.stats["crashes"] += 1
        node.crash(self.rng)
        self._schedule(self.rng.randrange(restart_min, restart_max), "restart", node.id)
        if self.p.report_crashes:
            for other in self.nodes:
                if other != node.id:
                    delay = self.report_rng.randrange(1, TICK)
                    self._schedule(delay, "unreachable", other, src=node.id)

    def _after(self, node: SimNode) -> None:
        if node.core is not None:
            self.checker.on_step(node.id, node.core)
        self._pump(node)

    def leaders(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.core is not None and n.core.role is Role.LEADER]

    # -- events ---------------------------------------------------------------------------------

    def _handle(self, ev: _Event) -> None:
        kind = ev.kind
        if kind == "tick":
            self._schedule(TICK, "tick", ev.node)
            node = self.nodes[ev.node]
            if node.core is not None:
                node.core.tick()
                self._after(node)
        elif kind in ("deliver", "lost"):
            assert ev.msg is not None
            node = self.nodes[ev.msg.dst]
            ok = kind == "deliver" and node.core is not None
            if ok:
                node.deliver(ev.msg, ev.payload)
                self._pump(node)
            else:
                self.stats["dropped"] += 1
            if isinstance(ev.msg, InstallSnapshot):
                sender = self.nodes[ev.src]
                if sender.core is not None and sender.incarnation == ev.src_incarnation:
                    sender.core.report_snapshot(ev.msg.dst, success=ok)
                    self._after(sender)
        elif kind == "persist":
            node = self.nodes[ev.node]
            if node.core is not None and node.incarnation == ev.incarnation and node.pending:
                self._finish(node)
        elif kind == "unreachable":
            node = self.nodes[ev.node]
            if node.core is not None:
                node.core.report_unreachable(ev.src)
                self._after(node)
        elif kind == "restart":
            node = self.nodes[ev.node]
            if node.core is None:
                node.start()
                self._after(node)
        elif kind == "heal" and ev.incarnation == self.partition_id:
            self.blocked.clear()

    def _chaos(self) -> None:
        """Once per tick: faults and client requests."""
        p, rng = self.p, self.rng
        members = list(self.nodes)
        if p.nemesis:
            self._nemesis(rng)
        leaders = [n.id for n in self.leaders()]
        if rng.random() < p.crash_rate:
            # Leaders are picked more often: their crashes make the interesting histories.
            victim = self.nodes[rng.choice(leaders if leaders and rng.random() < 0.5 else members)]
            if victim.core is not None:
                self._crash(victim, TICK, 40 * TICK)
        if rng.random() < p.partition_rate:
            self.partition_id += 1
            kind = rng.random()
            if kind < 0.7:
                if kind < 0.35 and leaders:
                    side = {rng.choice(leaders)}
                else:
                    side = set(rng.sample(members, rng.randrange(1, len(members))))
                self.blocked = {
                    (a, b) for a in members for b in members if (a in side) != (b in side)
                }
            else:  # one-way cuts
                self.blocked = set()
                for _ in range(rng.randrange(1, 4)):
                    a, b = rng.sample(members, 2)
                    self.blocked.add((a, b))
            self._schedule(
                rng.randrange(5 * TICK, 60 * TICK), "heal", incarnation=self.partition_id
            )
        if p.false_report_rate and self.report_rng.random() < p.false_report_rate:
            node = self.nodes[self.report_rng.choice(members)]
            if node.core is not None:
                lead = node.core.lead
                about = lead if lead and self.report_rng.random() < 0.7 else None
                about = about or self.report_rng.choice([m for m in members if m != node.id])
                node.core.report_unreachable(about)
                self._after(node)
        if p.lazy_rate and rng.random() < p.lazy_rate:
            node = self.nodes[rng.choice(members)]
            if node.core is not None:
                node.core.lazy_commit = not node.core.lazy_commit
        self._client(rng)

    def _nemesis(self, rng: random.Random) -> None:
        for node in self.leaders():
            core = node.must_core()
            fresh = core.term not in self.nemesis_terms
            self.nemesis_terms.add(core.term)
            index = core.tracker.committed_index()
            # A quorum holds an entry of an older term but not yet one of this term.
            log = core.log
            window = index >= log.first_index() and log.term(index) != core.term
            if (fresh and rng.random() < 0.2) or (window and rng.random() < 0.5):
                self._crash(node, TICK, 20 * TICK)

    def _client(self, rng: random.Random, *, faults: bool = True) -> None:
        p = self.p
        up = [n for n in self.nodes.values() if n.core is not None]
        if not up:
            return
        if faults and rng.random() < p.propose_rate:
            leaders = self.leaders()
            node = rng.choice(leaders) if leaders and rng.random() < 0.9 else rng.choice(up)
            self.proposed += 1
            self._try(node, lambda c: c.propose(f"{p.seed}:{self.proposed}".encode()))
        if rng.random() < p.read_rate:
            node = rng.choice(up)
            self.read_seq += 1
            ctx = f"r{self.read_seq}".encode()
            self.checker.on_read_start(ctx)
            self._try(node, lambda c: c.read_index(ctx))
        if faults and rng.random() < p.conf_rate:
            leaders = self.leaders()
            if leaders:
                self._conf_change(rng.choice(leaders), rng)
        if faults and rng.random() < p.transfer_rate:
            leaders = self.leaders()
            if leaders:
                leader = leaders[0]
                target = rng.choice(leader.must_core().conf.voters)
                self._try(leader, lambda c: c.transfer_leadership(target))

    def _conf_change(self, leader: SimNode, rng: random.Random) -> None:
        conf = leader.must_core().conf
        voters, learners = conf.voters, conf.learners
        others = [m for m in self.nodes if m not in voters and m not in learners]
        options: list[tuple[ConfChangeType, str]] = []
        for m in others:
            options += [(ConfChangeType.ADD_LEARNER, m), (ConfChangeType.ADD_VOTER, m)]
        for m in learners:
            options += [(ConfChangeType.PROMOTE_LEARNER, m), (ConfChangeType.REMOVE, m)]
        if len(voters) > 2:
            options += [(ConfChangeType.REMOVE, m) for m in voters]
        if options:
            change, member = rng.choice(options)
            self._try(leader, lambda c: c.propose_conf_change(change, member))

    def _try(self, node: SimNode, action: Callable[[RaftCore], object]) -> None:
        if node.core is None:
            return  # crashed meanwhile
        with contextlib.suppress(RaftError):
            action(node.core)
        self._after(node)

    def _run_until(self, end: int, per_tick: Callable[[], None]) -> None:
        next_tick = self.now
        events = self.events
        while events and events[0].time <= end:
            ev = heapq.heappop(events)
            while next_tick <= ev.time:
                self.now = next_tick
                per_tick()
                next_tick += TICK
            self.now = ev.time
            self._handle(ev)
        self.now = max(self.now, end)

    # -- the whole run --------------------------------------------------------------------------

    def run(self) -> None:
        p = self.p
        self._run_until(p.chaos_ticks * TICK, self._chaos)
        # Heal every fault, then the cluster must converge by itself.
        self.blocked.clear()
        self.drop = self.dup = 0.0
        self.max_delay = 3
        for node in self.nodes.values():
            if node.core is None:
                node.start()
                self._after(node)
        heal_start = self.now
        deadline = heal_start + p.heal_ticks * TICK
        marker: tuple[int, bytes] | None = None
        marker_term = -1
        while self.now < deadline:
            self._run_until(self.now + TICK, lambda: self._client(self.rng, faults=False))
            leaders = self.leaders()
            if not leaders:
                continue
            leader = max(leaders, key=lambda n: n.must_core().term)
            core = leader.must_core()
            applied = self.checker.applied.get(marker[0]) if marker else None
            if marker is None or (applied is None and marker_term != core.term):
                # Propose a marker (again, if its leader lost office before committing it).
                if core.log.term(core.log.committed) == core.term:
                    data = f"{p.seed}:final:{core.term}".encode()
                    try:
                        marker = (core.propose(data), data)
                        marker_term = core.term
                    except RaftError:
                        pass
                    self._after(leader)
                continue
            if applied is not None and applied.data != marker[1]:
                marker = None  # another entry took its index; propose again
                continue
            if applied is not None and self._converged(leader, marker[0]):
                self.stats["heal_ticks"] = (self.now - heal_start) // TICK
                return
        raise AssertionError(self._liveness_report(heal_start, marker))

    def _converged(self, leader: SimNode, marker: int) -> bool:
        core = leader.must_core()
        if core.log.committed < marker:
            return False
        members = (*core.conf.voters, *core.conf.learners)
        target = core.log.committed
        return all(
            self.nodes[m].core is not None and self.nodes[m].applied >= target for m in members
        )

    def _liveness_report(self, heal_start: int, marker: tuple[int, bytes] | None) -> str:
        lines = [f"no convergence {self.p.heal_ticks} ticks after healing (marker {marker}):"]
        for node in self.nodes.values():
            lines.append(f"  {node.core!r} applied={node.applied}")
            if node.core is not None and node.core.role is Role.LEADER:
                for m, pr in node.core.tracker.progress.items():
                    lines.append(f"    {m}: {pr!r}")
        return "\n".join(lines)


def run_seed(seed: int) -> Simulation:
    sim = Simulation(SimParams.from_seed(seed))
    sim.run()
    return sim
