"""A concurrent key-value workload over ``ControlPlane`` clients, a nemesis that breaks a
:class:`~.cluster.ProcessCluster` while it runs, and the checks of what was recorded.

The workload reads and writes three kinds of registers, all through the public API:

* ``flag:<name>``: a feature flag; ``set_feature_flag(name, b)`` is ``Put``, reading
  ``state.feature_flags.get(name)`` from ``get_cluster_state(consistent=True)`` is ``Get``;
* ``setting:<name>``: an extra setting of the index :data:`INDEX`, with a value unique to
  each write (so a read tells exactly which write it saw); ``update_index_settings`` with
  ``{name: v}`` is ``Put`` and with ``{name: None}`` is ``Delete``;
* ``lock:<name>``: a lock's holder; ``acquire_lock`` is ``Cas(key, None, holder)`` (a fresh
  holder name per attempt, False on ``LockHeldError``) and ``release_lock`` by the holder seen
  in a read is ``Cas(key, holder, None)`` (False on ``LockNotHeldError``).

One consistent read yields a ``Get`` of every key (the partitions are checked separately, so
sharing one interval is fine). A write whose outcome is unknown (timeout, lost connection,
unavailable) stays *pending*: it may or may not have taken effect. A read that failed is
dropped (it had no effect).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from controlplane.errors import ControlPlaneError, LockHeldError, LockNotHeldError
from controlplane.protocol import ControlPlane
from controlplane.testing.faultproxy import Fault
from controlplane.testing.linearizability import (
    Cas,
    Delete,
    Get,
    HistoryRecorder,
    KVInput,
    Operation,
    Put,
)
from controlplane.types import ClusterState

from .cluster import ProcessCluster

__all__ = [
    "FINAL_CLIENT",
    "INDEX",
    "ClientFactory",
    "Nemesis",
    "Workload",
    "final_read",
    "lost_acknowledged_writes",
    "wait_converged",
]

INDEX = "nemesis"
"""The index whose extra settings are registers."""
FLAGS = ("f0", "f1", "f2")
SETTINGS = ("s0", "s1", "s2", "s3")
LOCKS = ("l0",)
KEYS = (
    *(f"flag:{n}" for n in FLAGS),
    *(f"setting:{n}" for n in SETTINGS),
    *(f"lock:{n}" for n in LOCKS),
)
LOCK_TTL = 3600.0
"""Long enough never to expire during a test: the model has no expiry."""
FINAL_CLIENT = 1000
"""Client id of the final reads."""

ClientFactory = Callable[[int], Awaitable[ControlPlane]]
"""Makes a started client connected to every member, for the workload client of that number
(:data:`FINAL_CLIENT` for the final reads)."""


def read_keys(state: ClusterState) -> dict[str, Hashable]:
    """The value of every register in ``state`` (None: absent)."""
    values: dict[str, Hashable] = {}
    for name in FLAGS:
        values[f"flag:{name}"] = state.feature_flags.get(name)
    index = state.indices.get(INDEX)
    extra = index.settings.extra if index is not None else {}
    for name in SETTINGS:
        values[f"setting:{name}"] = extra.get(name)
    for name in LOCKS:
        lock = state.locks.get(name)
        values[f"lock:{name}"] = None if lock is None else lock.holder
    return values


@dataclass
class Workload:
    """``clients`` tasks, each with its own client, issuing random operations until
    ``duration`` seconds have passed; every operation is bounded by ``op_timeout``."""

    make_client: ClientFactory
    clients: int
    duration: float
    seed: int
    op_timeout: float = 3.0
    think: float = 0.02
    """Maximum random pause between two operations of one client (seconds)."""
    recorder: HistoryRecorder[KVInput, object] = field(default_factory=HistoryRecorder)
    counts: dict[str, int] = field(default_factory=dict)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def run(self) -> None:
        """Run every client to the end (clients are stopped on the way out)."""
        deadline = time.monotonic() + self.duration
        async with asyncio.TaskGroup() as tg:
            for c in range(self.clients):
                tg.create_task(self._client(c, deadline), name=f"workload-client-{c}")

    async def _client(self, c: int, deadline: float) -> None:
        rng = random.Random(f"{self.seed}-client-{c}")
        cp = await self.make_client(c)
        try:
            serial = 0
            while time.monotonic() < deadline:
                serial += 1
                roll = rng.random()
                if roll < 0.35:
                    ok = await self._read(cp, c)
                elif roll < 0.55:
                    ok = await self._flag(cp, c, rng)
                elif roll < 0.88:
                    ok = await self._setting(cp, c, rng, serial)
                else:
                    ok = await self._lock(cp, c, rng, serial)
                # Back off after a failure: fewer pending operations while a fault lasts.
                await asyncio.sleep(rng.uniform(0, self.think) if ok else rng.uniform(0.2, 0.5))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cp.stop(), 10)

    async def _attempt(self, token: int, call: Awaitable[Any], acked: object) -> bool:
        """Await ``call``; record ``acked`` as its output on success; leave it pending when
        the outcome is unknown. Lock conflicts are definite outcomes (False)."""
        try:
            async with asyncio.timeout(self.op_timeout):
                await call
        except (LockHeldError, LockNotHeldError):
            self.recorder.ret(token, False)
            self._count("cas failed")
            return True
        except (ControlPlaneError, OSError, TimeoutError) as exc:
            self._count(f"unknown: {type(exc).__name__}")
            return False
        self.recorder.ret(token, acked)
        return True

    async def _read(self, cp: ControlPlane, c: int) -> bool:
        tokens = {key: self.recorder.call(c, Get(key)) for key in KEYS}
        try:
            async with asyncio.timeout(self.op_timeout):
                state = await cp.get_cluster_state(consistent=True)
        except (ControlPlaneError, OSError, TimeoutError) as exc:
            self._count(f"read failed: {type(exc).__name__}")
            return False  # left pending, dropped from the history
        for key, value in read_keys(state).items():
            self.recorder.ret(tokens[key], value)
        self._count("read")
        return True

    async def _flag(self, cp: ControlPlane, c: int, rng: random.Random) -> bool:
        name, value = rng.choice(FLAGS), rng.random() < 0.5
        token = self.recorder.call(c, Put(f"flag:{name}", value))
        ok = await self._attempt(token, cp.set_feature_flag(name, value), None)
        if ok:
            self._count("write")
        return ok

    async def _setting(self, cp: ControlPlane, c: int, rng: random.Random, serial: int) -> bool:
        name = rng.choice(SETTINGS)
        key = f"setting:{name}"
        if rng.random() < 0.1:
            token = self.recorder.call(c, Delete(key))
            call = cp.update_index_settings(INDEX, {name: None})
        else:
            value = (c + 1) * 1_000_000 + serial  # unique to this write
            token = self.recorder.call(c, Put(key, value))
            call = cp.update_index_settings(INDEX, {name: value})
        ok = await self._attempt(token, call, None)
        if ok:
            self._count("write")
        return ok

    async def _lock(self, cp: ControlPlane, c: int, rng: random.Random, serial: int) -> bool:
        name = rng.choice(LOCKS)
        key = f"lock:{name}"
        read = self.recorder.call(c, Get(key))
        try:
            async with asyncio.timeout(self.op_timeout):
                state = await cp.get_cluster_state(consistent=True)
        except (ControlPlaneError, OSError, TimeoutError) as exc:
            self._count(f"read failed: {type(exc).__name__}")
            return False
        lock = state.locks.get(name)
        self.recorder.ret(read, None if lock is None else lock.holder)
        if lock is None or rng.random() < 0.3:
            holder = f"c{c}-{serial}"  # never reused: acquiring is a pure compare-and-set
            token = self.recorder.call(c, Cas(key, None, holder))
            ok = await self._attempt(token, cp.acquire_lock(name, holder, LOCK_TTL), True)
        else:
            token = self.recorder.call(c, Cas(key, lock.holder, None))
            ok = await self._attempt(token, cp.release_lock(name, lock.holder, lock.token), True)
        if ok:
            self._count("cas")
        return ok

    def history(self) -> list[Operation[KVInput, object]]:
        """The recorded operations; failed reads are left out (they had no effect)."""
        return [
            op for op in self.recorder.history() if not (op.pending and isinstance(op.input, Get))
        ]


async def final_read(
    make_client: ClientFactory,
    recorder: HistoryRecorder[KVInput, object],
    within: float = 60.0,
    op_timeout: float = 5.0,
) -> dict[str, Hashable]:
    """After the faults: read every register (consistent), retrying until it works, and
    record the reads in ``recorder``; the values."""
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while time.monotonic() < deadline:
        cp: ControlPlane | None = None
        try:
            async with asyncio.timeout(op_timeout):
                cp = await make_client(FINAL_CLIENT)
                tokens = {key: recorder.call(FINAL_CLIENT, Get(key)) for key in KEYS}
                state = await cp.get_cluster_state(consistent=True)
            values = read_keys(state)
            for key, value in values.items():
                recorder.ret(tokens[key], value)
            return values
        except (ControlPlaneError, OSError, TimeoutError) as exc:
            last = exc
            await asyncio.sleep(0.2)
        finally:
            if cp is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(cp.stop(), 10)
    raise AssertionError(f"the cluster did not serve a consistent read within {within}s: {last}")


def lost_acknowledged_writes(history: Sequence[Operation[KVInput, object]]) -> list[str]:
    """Acknowledged writes whose effect is missing from the final read, and not explained by
    a write that may have come after them.

    For each key, the final read (client :data:`FINAL_CLIENT`) saw a value ``v``. Some write of
    ``v`` (or the initial absence, for None) must be one that no acknowledged write of another
    value strictly follows in real time (called after it returned); otherwise an acknowledged
    write was lost. Puts, deletes and successful compare-and-sets are the writes.
    """
    problems: list[str] = []
    finals = {
        op.input.key: op.output
        for op in history
        if op.client_id == FINAL_CLIENT and isinstance(op.input, Get) and not op.pending
    }
    for key, final in finals.items():
        writes: list[_Write] = [(None, -math.inf, -math.inf, True)]
        for op in history:
            if op.input.key != key or op.client_id == FINAL_CLIENT:
                continue
            ret = math.inf if op.pending or op.ret is None else op.ret
            acked = not op.pending
            if isinstance(op.input, Put):
                writes.append((op.input.value, op.call, ret, acked))
            elif isinstance(op.input, Delete):
                writes.append((None, op.call, ret, acked))
            elif isinstance(op.input, Cas) and (op.pending or op.output is True):
                writes.append((op.input.new, op.call, ret, acked))
        candidates = [w for w in writes if w[0] == final]
        if not candidates:
            problems.append(f"{key}: the final value {final!r} was never written")
            continue

        if all(_overwritten(w, final, writes) for w in candidates):
            later = [a for a in writes if a[3] and a[0] != final and a[1] > candidates[-1][2]]
            problems.append(
                f"{key}: final value {final!r}, but the acknowledged write of {later[-1][0]!r} "
                f"(called at {later[-1][1]}) came after every write of it"
            )
    return problems


_Write = tuple[Hashable, float, float, bool]
"""A write's value, call time, return time (inf: pending) and whether it was acknowledged."""


def _overwritten(write: _Write, value: Hashable, writes: Sequence[_Write]) -> bool:
    """Whether an acknowledged write of another value was called after ``write`` returned."""
    return any(a[3] and a[0] != value and a[1] > write[2] for a in writes)


async def wait_converged(cluster: ProcessCluster, within: float = 30.0) -> int:
    """Wait until every member's replica (``/v1/state``) is the same: same version, same
    state; that version."""
    deadline = time.monotonic() + within
    while True:
        states = [await cluster.state(i) for i in range(cluster.n)]
        if all(s is not None for s in states):
            texts = {json.dumps(s, sort_keys=True) for s in states}
            if len(texts) == 1 and states[0] is not None:
                return int(states[0]["version"])
        if time.monotonic() > deadline:
            versions = {
                m.id: None if s is None else s.get("version")
                for m, s in zip(cluster.members, states, strict=True)
            }
            raise AssertionError(
                f"the members' replicas did not converge within {within}s: versions {versions}"
            )
        await asyncio.sleep(0.1)


class FaultKind(enum.Enum):
    KILL = "kill"
    PAUSE = "pause"
    PARTITION = "partition"
    PARTITION_DROP = "partition (drop)"
    ONE_WAY_OUT = "one-way: cannot send"
    ONE_WAY_IN = "one-way: cannot receive"
    DELAY = "delay"


@dataclass
class Nemesis:
    """Random faults, one round at a time: pick a minority of members (the leader half the
    time), break them for 1-3 s, heal, rest 0.5-1.5 s. Every round is logged in
    :attr:`events` (seconds since start)."""

    cluster: ProcessCluster
    seed: int
    kinds: Sequence[FaultKind] = tuple(FaultKind)
    hold: tuple[float, float] = (1.0, 3.0)
    rest: tuple[float, float] = (0.5, 1.5)
    events: list[str] = field(default_factory=list)
    _start: float = 0.0
    _killed: set[int] = field(default_factory=set)
    _paused: set[int] = field(default_factory=set)

    def _log(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self._start:7.2f}s {text}")

    def _targets(self, rng: random.Random) -> list[int]:
        n = self.cluster.n
        size = rng.randint(1, max(1, (n - 1) // 2))  # a minority
        leader = self.cluster.leader()
        pool = list(range(n))
        rng.shuffle(pool)
        if leader is not None and rng.random() < 0.5:
            pool.remove(leader)
            pool.insert(0, leader)
        return sorted(pool[:size])

    async def run(self, duration: float) -> None:
        """Break and heal the cluster for ``duration`` seconds; healed on return."""
        rng = random.Random(f"{self.seed}-nemesis")
        self._start = time.monotonic()
        end = self._start + duration
        try:
            while time.monotonic() + self.hold[0] < end:
                targets = self._targets(rng)
                kinds = [rng.choice(self.kinds) for _ in targets]
                names = ", ".join(
                    f"{k.value} {self.cluster.members[t].id}"
                    for t, k in zip(targets, kinds, strict=True)
                )
                self._log(f"start: {names}")
                for target, kind in zip(targets, kinds, strict=True):
                    await self._apply(target, kind, targets, rng)
                await asyncio.sleep(min(rng.uniform(*self.hold), max(0.0, end - time.monotonic())))
                await self.heal()
                self._log("healed")
                await asyncio.sleep(min(rng.uniform(*self.rest), max(0.0, end - time.monotonic())))
        finally:
            await self.heal()

    async def _apply(
        self, target: int, kind: FaultKind, group: list[int], rng: random.Random
    ) -> None:
        cluster = self.cluster
        others = [i for i in range(cluster.n) if i not in group]
        if kind is FaultKind.KILL:
            await cluster.kill(target)
            self._killed.add(target)
        elif kind is FaultKind.PAUSE:
            cluster.pause(target)
            self._paused.add(target)
        elif kind in (FaultKind.PARTITION, FaultKind.PARTITION_DROP):
            fault = Fault.DROP if kind is FaultKind.PARTITION_DROP else Fault.BLACKHOLE
            for other in others:
                cluster.cut(target, other, fault)
                cluster.cut(other, target, fault)
        elif kind is FaultKind.ONE_WAY_OUT:
            for other in others:
                cluster.cut(target, other)
        elif kind is FaultKind.ONE_WAY_IN:
            for other in others:
                cluster.cut(other, target)
        elif kind is FaultKind.DELAY:
            delay = rng.uniform(50, 300)
            for other in others:
                cluster.slow(target, other, delay)
                cluster.slow(other, target, delay)

    async def heal(self) -> None:
        """Resume paused members, restart killed ones, pass every link."""
        for i in sorted(self._paused):
            self.cluster.resume(i)
        self._paused.clear()
        for i in sorted(self._killed):
            await self.cluster.start_member(i)
        self._killed.clear()
        self.cluster.heal()
