"""Real ``controlplane serve`` clusters under faults: clients write and read concurrently
through :class:`~controlplane.backends.raft.client.RaftClient` while a nemesis SIGKILLs and
restarts, SIGSTOPs and SIGCONTs, partitions (blackhole, drop, one way) and slows members,
never more than a minority at a time. Afterwards, with every fault healed and nothing done by
hand but restarting the killed processes:

* the cluster serves again by itself (every member ready, a consistent read succeeds);
* the recorded history, final reads included, is linearizable per
  :func:`controlplane.testing.linearizability.check` and per Porcupine;
* every acknowledged write is present in the final state, unless a write that may have come
  after it replaced it;
* every member's replica reaches the same version and the same registers.

The run is seeded: the seed is printed, and ``NEMESIS_SEED=<seed>`` replays the same choices
(the timing of real processes still varies). ``NEMESIS_SECONDS`` changes how long the faults
last (default 20 s per cluster).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from controlplane.backends.raft.client import RaftClient, connect
from controlplane.errors import ControlPlaneError
from controlplane.testing.linearizability import (
    Cas,
    Get,
    KVModel,
    Operation,
    Outcome,
    Put,
    check,
    to_porcupine_json,
)

from .cluster import ProcessCluster
from .nemesis import (
    FINAL_CLIENT,
    INDEX,
    Nemesis,
    Workload,
    final_read,
    lost_acknowledged_writes,
    wait_converged,
)
from .porcupine_check import check_with_porcupine

pytestmark = pytest.mark.anyio

Make = Callable[..., ProcessCluster]
CLUSTER_ID = "nemesis"
OP_TIMEOUTS = (0.8, 4.0)
"""Seconds a client keeps retrying one request before its outcome is unknown: half the
clients give up soon (so that some writes stay pending), the others ride out most faults."""
CHECK_TIMEOUT = 120.0


def _seconds() -> float:
    return float(os.environ.get("NEMESIS_SECONDS") or 20.0)


def _seed() -> int:
    return int(os.environ.get("NEMESIS_SEED") or random.randrange(2**32))


async def _client(cluster: ProcessCluster, number: int = 1) -> RaftClient:
    timeout = OP_TIMEOUTS[number % 2]
    return await connect(
        cluster.client_addresses(),
        cluster_id=CLUSTER_ID,
        request_timeout=timeout,
        attempt_timeout=1.0,
        connect_timeout=1.0,
        start_timeout=max(OP_TIMEOUTS),
        backoff_max=0.5,
    )


async def _create_index(cluster: ProcessCluster) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            client = await _client(cluster)
            try:
                await client.create_index(INDEX)
                return
            finally:
                await client.stop()
        except ControlPlaneError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize(("members", "clients"), [(3, 6), (5, 8)], ids=["3-members", "5-members"])
async def test_cluster_under_nemesis(
    process_cluster: Make, porcupine: Path, tmp_path: Path, members: int, clients: int
) -> None:
    seed, seconds = _seed(), _seconds()
    print(f"nemesis seed: {seed} (replay with NEMESIS_SEED={seed}); {seconds} s of faults")
    with anyio.fail_after(seconds + 150):
        async with process_cluster(members, cluster_id=CLUSTER_ID) as cluster:
            await cluster.wait_ready(30)
            await _create_index(cluster)

            workload = Workload(
                lambda c: _client(cluster, c),
                clients,
                seconds,
                seed,
                op_timeout=max(OP_TIMEOUTS) + 1,
            )
            nemesis = Nemesis(cluster, seed)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(workload.run())
                    tg.create_task(nemesis.run(seconds))
            finally:
                print("nemesis:", *nemesis.events, sep="\n  ")
                print("operations:", dict(sorted(workload.counts.items())))

            # Healed: the cluster must serve again on its own.
            assert cluster.healed
            await cluster.wait_ready(60)
            final = await final_read(lambda c: _client(cluster, c), workload.recorder)
            print("final values:", final)
            version = await wait_converged(cluster, 30)
            print(f"converged at version {version}")
            cluster.check_exits()

    history = workload.history()
    path = tmp_path / "history.json"
    to_porcupine_json(history, path)
    print(f"history: {len(history)} operations, in {path}")
    acked_writes = sum(1 for o in history if not isinstance(o.input, Get) and not o.pending)
    pending = sum(1 for o in history if o.pending)
    print(f"{acked_writes} acknowledged writes, {pending} with unknown outcome")
    assert acked_writes >= 50, "too few writes went through for the test to mean anything"
    rounds = sum("start:" in e for e in nemesis.events)
    assert rounds >= max(1, int(seconds // 6)), f"only {rounds} rounds of faults"

    ours = await asyncio.to_thread(check, history, KVModel(), CHECK_TIMEOUT)
    theirs = await asyncio.to_thread(
        check_with_porcupine,
        path,
        binary=porcupine,
        timeout=CHECK_TIMEOUT,
        visualize=tmp_path / "history.html",
    )
    print(f"checker: {ours.outcome}; porcupine: {theirs.verdict}")
    assert ours.outcome is Outcome.OK, ours.explanation
    assert theirs.outcome is Outcome.OK, f"{theirs.verdict}; see {tmp_path / 'history.html'}"
    lost = lost_acknowledged_writes(history)
    assert not lost, lost


# --- the acknowledged-writes check itself ----------------------------------------------------


def _op(
    client: int, input: Put | Get | Cas, output: object, call: float, ret: float | None
) -> Operation[Put | Get | Cas, object]:
    if ret is None:
        return Operation(client_id=client, input=input, call=call)
    return Operation(client_id=client, input=input, output=output, call=call, ret=ret)


def test_lost_acknowledged_write_is_reported() -> None:
    history = [
        _op(1, Put("setting:s0", 1), None, 0, 1),
        _op(1, Put("setting:s0", 2), None, 2, 3),
        _op(FINAL_CLIENT, Get("setting:s0"), 1, 10, 11),
    ]
    assert lost_acknowledged_writes(history) == [
        "setting:s0: final value 1, but the acknowledged write of 2 (called at 2) came after "
        "every write of it"
    ]
    history[-1] = _op(FINAL_CLIENT, Get("setting:s0"), None, 10, 11)
    assert "setting:s0: final value None" in lost_acknowledged_writes(history)[0]
    history[-1] = _op(FINAL_CLIENT, Get("setting:s0"), 7, 10, 11)
    assert lost_acknowledged_writes(history) == ["setting:s0: the final value 7 was never written"]


def test_overwritten_or_pending_writes_are_not_lost() -> None:
    history = [
        _op(1, Put("setting:s0", 1), None, 0, 5),
        _op(2, Put("setting:s0", 2), None, 1, 4),  # concurrent: either may be last
        _op(3, Put("setting:s0", 3), None, 6, None),  # pending: may or may not have applied
        _op(FINAL_CLIENT, Get("setting:s0"), 1, 10, 11),
    ]
    assert lost_acknowledged_writes(history) == []
    history[-1] = _op(FINAL_CLIENT, Get("setting:s0"), 3, 10, 11)
    assert lost_acknowledged_writes(history) == []
    history[-1] = _op(FINAL_CLIENT, Get("setting:s0"), 2, 10, 11)
    assert lost_acknowledged_writes(history) == []
    locks = [
        _op(1, Cas("lock:l0", None, "a"), True, 0, 1),
        _op(2, Cas("lock:l0", None, "b"), False, 2, 3),
        _op(FINAL_CLIENT, Get("lock:l0"), "a", 10, 11),
    ]
    assert lost_acknowledged_writes(locks) == []
    locks[-1] = _op(FINAL_CLIENT, Get("lock:l0"), None, 10, 11)
    assert lost_acknowledged_writes(locks) != []
