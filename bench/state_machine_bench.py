"""Micro-benchmark of the shared state machine (issue: foundation).

Builds a state of 1,000 data nodes in 3 zones and 10,000 indices of 5 shards with 1 replica,
then measures, on that state, commands applied per second for node status updates and lock
commands, create_index with allocation, and the latency of taking the state snapshot; and,
on a state of its own, ``--joins`` nodes joining with their events kept by a watch hub (the
cost of a join and the memory the ring events hold).

Run: .venv/bin/python bench/state_machine_bench.py [--nodes 1000] [--indices 10000] [--joins 15000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence

from controlplane.backends.memory import MemoryControlPlane
from controlplane.commands import (
    AcquireLock,
    Command,
    CreateIndex,
    RegisterNode,
    ReleaseLock,
    RenewLock,
    UpdateNodeStatus,
)
from controlplane.state import StateMachine
from controlplane.types import EventKind, IndexSettings, Node, NodeStatus
from controlplane.watch import WatchHub

SIMPLE = "target 100,000/s"
CREATE = "target 5,000/s"


def per_s(sm: StateMachine, commands: Sequence[Command]) -> str:
    """Commands applied per second, formatted."""
    return f"{rate(sm, commands):,.0f}/s"


def rate(sm: StateMachine, commands: Sequence[Command]) -> float:
    """Commands applied per second (each must succeed)."""
    gc.collect()
    start = time.perf_counter()
    for cmd in commands:
        out = sm.apply(cmd)
        if out.error is not None:
            raise out.error
    return len(commands) / (time.perf_counter() - start)


def latency_us(fn: Callable[[], object], n: int = 100_000) -> tuple[float, float]:
    """(p50, p99) latency in microseconds of ``fn()``, timed in batches of 100 calls."""
    samples = []
    for _ in range(n // 100):
        start = time.perf_counter_ns()
        for _ in range(100):
            fn()
        samples.append((time.perf_counter_ns() - start) / 100 / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


READ = "target < 10 us"


async def call_latency(fn: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(p50, p99) latency in microseconds of ``await fn()``, timed in batches of 100 calls."""
    samples = []
    for _ in range(1000):
        start = time.perf_counter_ns()
        for _ in range(100):
            await fn()
        samples.append((time.perf_counter_ns() - start) / 100 / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def joins_with_history(n: int) -> tuple[float, int]:
    """``n`` nodes joining an empty cluster, their events published to a watch hub of the
    default retention as a backend does: (µs per join over the last 1,000, ring entries the
    history holds at the end: the memory the RING_UPDATED events keep, 8 bytes each)."""
    sm, hub = StateMachine(), WatchHub()
    last = min(1000, n)
    gc.collect()
    start = time.perf_counter()
    for i in range(n):
        if i == n - last:
            start = time.perf_counter()
        out = sm.apply(RegisterNode(node=Node(id=f"join-{i:05d}", zone=f"zone-{i % 3}")))
        hub.publish(out.version, out.events)
    per_join = (time.perf_counter() - start) / last * 1e6

    async def ring_entries() -> int:
        held = 0
        async with hub.watch(since=hub.oldest - 1, kinds={EventKind.RING_UPDATED}) as events:
            async for event in events:
                held += len(event.ring.nodes) if event.ring else 0
                if event.version == hub.head:
                    break
        return held

    return per_join, asyncio.run(ring_entries())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--indices", type=int, default=10_000)
    parser.add_argument("--joins", type=int, default=15_000, help="nodes joining, with a hub")
    args = parser.parse_args()
    settings = IndexSettings(number_of_shards=5, number_of_replicas=1)
    sm = StateMachine()
    t = 1.0
    rows: list[tuple[str, str, str]] = []

    nodes = [
        RegisterNode(node=Node(id=f"node-{i:04d}", zone=f"zone-{i % 3}"), time=t)
        for i in range(args.nodes)
    ]
    rows.append(("register_node (empty cluster)", per_s(sm, nodes), ""))
    per_join, held = joins_with_history(args.joins)
    rows.append(
        (
            f"register_node, last 1,000 of {args.joins:,} joins, with a watch hub",
            f"{per_join:.1f} us each",
            f"the history then holds {held:,} ring entries ({held * 8 / 2**20:.1f} MiB)",
        )
    )

    creates = [
        CreateIndex(name=f"index-{i:05d}", settings=settings, time=t) for i in range(args.indices)
    ]
    rows.append((f"create_index 5x1 (to {args.indices} indices)", per_s(sm, creates), CREATE))

    more = [CreateIndex(name=f"extra-{i:05d}", settings=settings, time=t) for i in range(5000)]
    rows.append(("create_index 5x1 on the full state", per_s(sm, more), CREATE))

    status = []
    for i in range(50_000):
        node_id = f"node-{i % args.nodes:04d}"
        want = NodeStatus.DRAINING if (i // args.nodes) % 2 == 0 else NodeStatus.ACTIVE
        status.append(UpdateNodeStatus(node_id=node_id, status=want, time=t))
    rows.append(("update_node_status (active <-> draining)", per_s(sm, status), SIMPLE))

    n = 30_000
    acquire = [AcquireLock(key=f"lock/{i}", holder="bench", ttl=30.0, time=t) for i in range(n)]
    version = sm.state.version
    rows.append(("acquire_lock", per_s(sm, acquire), SIMPLE))
    tokens = [version + 1 + i for i in range(n)]
    renew = [RenewLock(key=f"lock/{i}", holder="bench", token=tokens[i], time=t) for i in range(n)]
    rows.append(("renew_lock", per_s(sm, renew), SIMPLE))
    release = [
        ReleaseLock(key=f"lock/{i}", holder="bench", token=tokens[i], time=t) for i in range(n)
    ]
    rows.append(("release_lock", per_s(sm, release), SIMPLE))

    p50, p99 = latency_us(lambda: sm.state)
    rows.append(("StateMachine.state", f"p50 {p50:.3f} us, p99 {p99:.3f} us", "O(1)"))

    full = MemoryControlPlane.from_state(sm.state)
    empty = MemoryControlPlane()
    for label, backend in (("full state", full), ("empty state", empty)):
        p50, p99 = asyncio.run(call_latency(backend.get_cluster_state))
        rows.append((f"get_cluster_state(), {label}", f"p50 {p50:.3f} us, p99 {p99:.3f} us", READ))

    async def heartbeats() -> float:
        await full.start()
        ids = [f"node-{i:04d}" for i in range(args.nodes)]
        start = time.perf_counter()
        for i in range(100_000):
            await full.heartbeat(ids[i % len(ids)])
        elapsed = time.perf_counter() - start
        await full.stop()
        return 100_000 / elapsed

    rows.append(("memory heartbeat() (soft state)", f"{asyncio.run(heartbeats()):,.0f}/s", SIMPLE))

    state = sm.state
    print(f"state: {len(state.nodes)} nodes, {len(state.indices)} indices, version {state.version}")
    width = max(len(r[0]) for r in rows)
    print(f"{'operation':<{width}}  {'result':<32}  note")
    for name, result, note in rows:
        print(f"{name:<{width}}  {result:<32}  {note}")


if __name__ == "__main__":
    main()
