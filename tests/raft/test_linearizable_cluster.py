"""Linearizability of three raft members in one process under partitions and restarts.

Concurrent clients run operations against random members while a nemesis partitions one
member at a time (through ``RaftNode.message_filter``) or stops and restarts one. The history
is checked against a key-value model:

* a feature flag is a register: ``set_feature_flag(name, v)`` is ``Put(name, v)`` and a
  linearizable read ``get_cluster_state(consistent=True).feature_flags.get(name)`` is
  ``Get(name)``;
* a lock is a key holding its holder: ``acquire_lock`` is ``Cas(key, None, holder)`` (True
  when acquired, False on ``LockHeldError``), ``release_lock`` is ``Cas(key, holder, None)``
  (False on ``LockNotHeldError``), and a read of ``state.locks`` is ``Get(key)``. Holders are
  unique per acquisition and the TTL outlives the test, so the model needs no time.

A write whose outcome is unknown (a timeout, the member stopped under it) stays pending: it may
or may not have taken effect. A read that failed is left out (it had no effect). At the end
every member must hold the same state, and every acknowledged write of a unique key must be in
it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from controlplane.backends.raft.backend import RaftControlPlane
from controlplane.errors import ControlPlaneError, LockHeldError, LockNotHeldError
from controlplane.testing.linearizability import (
    Cas,
    Get,
    HistoryRecorder,
    KVInput,
    KVModel,
    Outcome,
    Put,
    check,
)
from controlplane.types import ClusterState

from .cluster_util import LocalCluster, assert_no_asyncio_errors

pytestmark = pytest.mark.anyio

LOAD_SECONDS = 12.0
CLIENTS = 6
OP_TIMEOUT = 2.0
"""Client-side deadline of one operation; past it the outcome is unknown."""
FLAGS = [f"flag-{i}" for i in range(6)]
LOCKS = ["lock-a", "lock-b"]
TTL = 3000.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield from assert_no_asyncio_errors(caplog)


class Workload:
    """The clients' shared bookkeeping: the history, the reads left out of it, the
    acknowledged writes of unique keys."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.history: HistoryRecorder[KVInput, object] = HistoryRecorder()
        self.left_out: set[int] = set()
        """Tokens of failed reads (the recorder numbers calls 0, 1, 2, ...)."""
        self.acked_unique: list[str] = []
        self.unknown_outcome = 0
        self.stats: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    async def write(
        self,
        client: int,
        op: KVInput,
        call: Callable[[], Awaitable[Any]],
        refusal: type[ControlPlaneError] | None = None,
    ) -> bool | None:
        """Run a write; True/False when its outcome is known (False: ``refusal`` raised), None
        when unknown (left pending in the history)."""
        token = self.history.call(client, op)
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                await call()
        except TimeoutError:
            self.count("write timed out")
        except ControlPlaneError as exc:
            if refusal is not None and isinstance(exc, refusal):
                self.history.ret(token, False)
                return False
            self.count(f"write failed: {type(exc).__name__}")
        else:
            self.history.ret(token, True if isinstance(op, Cas) else None)
            return True
        self.unknown_outcome += 1
        return None

    async def read(self, client: int, cp: RaftControlPlane, key: str) -> ClusterState | None:
        """A linearizable read of ``key`` (a flag or a lock) on ``cp``."""
        token = self.history.call(client, Get(key))
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                state = await cp.get_cluster_state(consistent=True)
        except (TimeoutError, ControlPlaneError) as exc:
            self.count(f"read failed: {type(exc).__name__}")
            self.left_out.add(token)
            return None
        self.history.ret(token, value_of(state, key))
        return state

    def operations(self) -> list[Any]:
        return [op for i, op in enumerate(self.history.history()) if i not in self.left_out]


def value_of(state: ClusterState, key: str) -> object:
    if key in LOCKS:
        lock = state.locks.get(key)
        return None if lock is None else lock.holder
    return state.feature_flags.get(key)


async def client(work: Workload, client_id: int, until: float, seed: int) -> None:
    rng = random.Random(seed)
    n = 0
    while time.monotonic() < until:
        members = list(work.cluster.members.values())
        if not members:
            await asyncio.sleep(0.01)
            continue
        n += 1
        await one_operation(work, client_id, rng.choice(members), rng, n)
        await asyncio.sleep(rng.uniform(0, 0.01))


async def one_operation(
    work: Workload, client_id: int, cp: RaftControlPlane, rng: random.Random, n: int
) -> None:
    dice = rng.random()
    if dice < 0.3:
        name, value = rng.choice(FLAGS), rng.random() < 0.5
        await work.write(client_id, Put(name, value), lambda: cp.set_feature_flag(name, value))
    elif dice < 0.6:
        await work.read(client_id, cp, rng.choice(FLAGS))
    elif dice < 0.7:
        unique = f"unique-{client_id}-{n}"
        if await work.write(
            client_id, Put(unique, True), lambda: cp.set_feature_flag(unique, True)
        ):
            work.acked_unique.append(unique)
    else:
        await lock_step(work, client_id, cp, rng.choice(LOCKS), f"c{client_id}-{n}")


async def lock_step(
    work: Workload, client_id: int, cp: RaftControlPlane, key: str, holder: str
) -> None:
    """Read the lock; release it if held (by whichever client: a client whose acquisition had
    an unknown outcome may hold it without knowing), else try to acquire it."""
    state = await work.read(client_id, cp, key)
    if state is None:
        return
    lock = state.locks.get(key)
    if lock is not None:
        held_by, token = lock.holder, lock.token
        work.count("release")
        await work.write(
            client_id,
            Cas(key, held_by, None),
            lambda: cp.release_lock(key, held_by, token),
            LockNotHeldError,
        )
        return
    work.count("acquire")
    await work.write(
        client_id,
        Cas(key, None, holder),
        lambda: cp.acquire_lock(key, holder, ttl=TTL),
        LockHeldError,
    )


async def nemesis(cluster: LocalCluster, until: float, seed: int, log: list[str]) -> None:
    """One fault at a time: partition a member (often the leader), or stop one (gracefully
    or abruptly) and restart it."""
    rng = random.Random(seed)
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(0.3, 1.0))
        leaders = cluster.leaders()
        victim = rng.choice(leaders if leaders and rng.random() < 0.5 else cluster.ids)
        fault = rng.choice(["partition", "partition", "restart", "kill"])
        log.append(f"{fault} {victim}")
        if fault == "partition":
            cluster.isolate(victim)
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            cluster.heal()
        else:
            await cluster.stop(victim, transfer=fault == "restart")
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            await cluster.start(victim)


@pytest.mark.parametrize("seed", [1, 2])
async def test_histories_under_partitions_and_restarts_are_linearizable(
    tmp_path: Path, seed: int
) -> None:
    faults: list[str] = []
    with anyio.fail_after(150):
        async with LocalCluster(tmp_path, snapshot_entries=300) as cluster:
            await cluster.start_all()
            await cluster.wait_leader()
            work = Workload(cluster)
            until = time.monotonic() + LOAD_SECONDS
            async with anyio.create_task_group() as tg:
                for c in range(CLIENTS):
                    tg.start_soon(client, work, c, until, seed * 100 + c)
                tg.start_soon(nemesis, cluster, until - 1.0, seed, faults)

            # Heal everything, then read every key on every member through the history.
            cluster.heal()
            for member in cluster.ids:
                if member not in cluster.members:
                    await cluster.start(member)
            await cluster.wait_ready(20)
            final = await cluster.wait_converged(30)
            for i, cp in enumerate(cluster.members.values()):
                for key in FLAGS + LOCKS:
                    state = await work.read(CLIENTS + i, cp, key)
                    assert state is not None, f"final read of {key} failed"

            operations = work.operations()
            completed = [op for op in operations if not op.pending]
            assert len(completed) > 300, (len(completed), work.stats)
            assert len(faults) >= 3, faults

            started = time.monotonic()
            result = await asyncio.to_thread(check, operations, KVModel(), 60)
            checked_in = time.monotonic() - started
            assert result.outcome is Outcome.OK, (
                f"{result.explanation}\nfaults: {faults}\nstats: {work.stats}"
            )
            print(
                f"{len(operations)} operations ({len(operations) - len(completed)} pending), "
                f"faults {faults}, stats {work.stats}, checked in {checked_in:.1f} s"
            )

            # No acknowledged write is lost, on any member.
            for name in work.acked_unique:
                assert final.feature_flags.get(name) is True, name
            assert len(work.acked_unique) > 20
            for cp in cluster.members.values():
                assert await cp.get_cluster_state(consistent=True) == final
