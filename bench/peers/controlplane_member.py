"""A controlplane member that can also run proposers in its own process, for
``bench/service_bench.py`` (bench-only: never imported by controlplane).

It starts the member exactly as ``controlplane serve --config FILE`` does
(``open_control_plane(load_config(FILE))`` after ``tune_collector``: Raft node, client service
and ops HTTP; its logs go to stderr), then takes one JSON command per line on stdin and
answers one JSON object per line on stdout (the first line is ``{"started": true, ...}``):

- ``{"op": "status"}``: this member's id, leader and whether it leads;
- ``{"op": "throughput", "command": "set_feature_flag"|"create_index", "concurrency": C,
  "seconds": S}``: once this member leads (waits up to 15 s), C asyncio tasks call the
  member's own ``RaftControlPlane`` API for S seconds, each call awaited before the next (the
  way PySyncObj benchmarks itself: proposers inside the leader's process); commits, failures,
  latency percentiles, CPU and garbage-collector time;
- ``{"op": "sequential", "n": N}``: N ``set_feature_flag`` calls one after the other;
- ``{"op": "local_reads", "n": N}``: N ``await get_cluster_state()`` (the local replica);
- ``{"op": "quit"}``.

``--uvloop`` runs it on uvloop (if installed); ``--profile DIR`` writes a cProfile of each
throughput run there.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ (benchlib)

from benchlib import GcMeter, event_loop, pct, profiled, timed_closed_loop, timed_sequence

from controlplane.backends.raft.backend import RaftControlPlane
from controlplane.cli import tune_collector
from controlplane.config import load_config
from controlplane.errors import ControlPlaneError
from controlplane.factory import open_control_plane


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def until_leader(cp: RaftControlPlane, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while not cp.node.is_leader:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


_runs = iter(range(1_000_000))


async def throughput(
    cp: RaftControlPlane, command: str, concurrency: int, seconds: float, profile: Path | None
) -> dict[str, Any]:
    if not await until_leader(cp):
        return {"error": f"member {cp.node.id} is not the leader (leader: {cp.node.leader_id})"}
    run = next(_runs)

    async def call(w: int, i: int) -> None:
        if command == "create_index":
            await cp.create_index(f"in-leader-{os.getpid()}-{run}-{w}-{i}")
        else:  # one flag per worker, toggled: every write changes the state
            await cp.set_feature_flag(f"in-leader-{w}", bool(i & 1))

    cpu0 = time.process_time()
    label = f"member-{command}-{concurrency}"
    with GcMeter() as gcm, profiled(profile, label, sys.stderr):
        seen: dict[str, int] = {}
        latencies, failed, elapsed = await timed_closed_loop(
            call, concurrency, seconds, ControlPlaneError, seen
        )
    return {
        "ok": len(latencies),
        "failed": failed,
        "errors": seen,
        "elapsed": elapsed,
        "p50": pct(latencies, 50),
        "p99": pct(latencies, 99),
        "cores": (time.process_time() - cpu0) / elapsed,
        "gc": gcm.seconds,
        "gc_full": gcm.full,
    }


async def sequential(cp: RaftControlPlane, n: int) -> dict[str, Any]:
    if not await until_leader(cp):
        return {"error": "not the leader"}
    samples = await timed_sequence(
        lambda i: cp.set_feature_flag("in-leader-seq", bool(i & 1)), n, 0
    )
    return {"p50": pct(samples, 50), "p99": pct(samples, 99)}


async def local_reads(cp: RaftControlPlane, n: int) -> dict[str, Any]:
    samples = []
    clock = time.perf_counter
    gc.collect()
    for _ in range(n):
        t0 = clock()
        await cp.get_cluster_state()
        samples.append(clock() - t0)
    return {"p50": pct(samples, 50), "p99": pct(samples, 99)}


async def serve(args: argparse.Namespace, loop_name: str) -> None:
    config = load_config(args.config, None, {})
    tune_collector(config)  # as serve does
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    cp = await open_control_plane(config)
    assert isinstance(cp, RaftControlPlane)
    loop = asyncio.get_running_loop()
    try:
        reply({"started": True, "member": cp.node.id, "pid": os.getpid(), "loop": loop_name})
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "status":
                node = cp.node
                reply({"member": node.id, "leader": node.leader_id, "is_leader": node.is_leader})
            elif op == "throughput":
                reply(
                    await throughput(
                        cp,
                        cmd.get("command", "set_feature_flag"),
                        int(cmd["concurrency"]),
                        float(cmd["seconds"]),
                        args.profile,
                    )
                )
            elif op == "sequential":
                reply(await sequential(cp, int(cmd["n"])))
            elif op == "local_reads":
                reply(await local_reads(cp, int(cmd["n"])))
            elif op == "quit":
                reply({"bye": True})
                break
            else:
                reply({"error": f"unknown op {op!r}"})
    finally:
        await cp.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="the member's YAML configuration")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop if installed")
    parser.add_argument("--profile", type=Path, help="cProfile each throughput run here")
    args = parser.parse_args()
    uvloop, loop_name = event_loop(not args.uvloop)
    if uvloop is not None:
        uvloop.run(serve(args, loop_name))
    else:
        asyncio.run(serve(args, loop_name))


if __name__ == "__main__":
    main()
