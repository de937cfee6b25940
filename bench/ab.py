"""Compare checkouts of controlplane on two phases of the service benchmark, taking turns.

    git worktree add /tmp/old HEAD~1
    .venv/bin/python bench/ab.py /tmp/old . --pairs 4                # one-client create_index
    .venv/bin/python bench/ab.py /tmp/old . --pairs 3 --throughput   # 64 callers, create_index

This machine's speed moves the service benchmark's figures from one hour to the next as much
as a change does, so two full runs far apart compare badly. Here each checkout gets a fresh
three-member cluster (``controlplane serve`` processes, fsync on, as in
``service_bench.py``) in turn, ``--pairs`` times, and the table shows every run beside the
median per checkout. The members and the load generator of a run both import that
checkout's code (``PYTHONPATH``), and so does its ``bench/service_bench.py``.

- latency: ``--nodes`` nodes registered, then ``-n`` create_index through one client, each
  awaited before the next; p50 and p90. ``--write-only``: that client holds no replica.
- ``--throughput``: ``--nodes`` nodes and 1,000 indices first, then 64 callers over 4
  write-only clients for ``--seconds``; writes/s and each process's CPU per write.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    # Imported here, in the child, once sys.path leads to the checkout being measured.
    import msgspec  # noqa: PLC0415
    import service_bench as sb  # noqa: PLC0415

    from controlplane.backends.raft.client import connect  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as base:
        cluster = sb.Members(Path(base) / "ab", fsync=True)
        await cluster.start()
        try:
            lead = await sb.stable(cluster)
            address = cluster.members[lead].client_address
            one = await connect([address], cluster_id=sb.CLUSTER_ID)
            config = await one.get_cluster_config()
            await one.set_cluster_config(msgspec.structs.replace(config, node_timeout=3600.0))
            await sb.sequential(sb.our_call([one], "register_node", "n"), args.nodes, 10)
            if not args.throughput:
                if args.write_only:
                    await one.stop()
                    one = await connect([address], cluster_id=sb.CLUSTER_ID, replica=False)
                call = sb.our_call([one], "create_index", "x")
                times = sorted(await sb.sequential(call, args.n, 100))
                await one.stop()
                return {"p50": times[len(times) // 2], "p90": times[len(times) * 9 // 10]}
            await sb.sequential(sb.our_call([one], "create_index", "s"), 1000, 10)
            await one.stop()
            writers = [
                await connect([address], cluster_id=sb.CLUSTER_ID, replica=False) for _ in range(4)
            ]
            await sb.stable(cluster, writers[0])
            t = await sb.closed_loop(
                sb.our_call(writers, "create_index", "t"), 64, args.seconds, cluster.pids()
            )
            for writer in writers:
                await writer.stop()
            return {"rate": t.value, "per_write": sb.per_write(t)}
        finally:
            await cluster.close()


def _run(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement of ``root`` in a child process that imports only that checkout."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    child = [sys.executable, __file__, "--child", str(root), *sys.argv[1:]]
    done = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{root}: the run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("roots", nargs="*", type=Path, help="checkouts to compare")
    parser.add_argument("--pairs", type=int, default=4, help="runs of each checkout")
    parser.add_argument("--throughput", action="store_true", help="64 callers, not 1 client")
    parser.add_argument("--write-only", action="store_true", help="the one client holds no replica")
    parser.add_argument("-n", type=int, default=1000, help="sequential writes per run")
    parser.add_argument("--nodes", type=int, default=1000, help="nodes registered first")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run length")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        sys.path[:0] = [str(args.child / "bench"), str(args.child)]
        print(json.dumps(asyncio.run(_measure(args))))
        return
    roots = [root.resolve() for root in args.roots]
    if len(roots) < 2:
        parser.error("give at least two checkouts")
    key = "rate" if args.throughput else "p50"
    runs: list[list[float]] = [[] for _ in roots]
    for pair in range(1, args.pairs + 1):
        for root, values in zip(roots, runs, strict=True):
            result = _run(root, args)
            values.append(result[key])
            if args.throughput:
                shown = f"{result['rate']:,.0f} writes/s ({result['per_write']})"
            else:
                shown = f"p50 {result['p50'] * 1e3:.3f} ms, p90 {result['p90'] * 1e3:.3f} ms"
            print(f"run {pair}  {root}: {shown}", flush=True)
    first = statistics.median(runs[0])
    unit = "writes/s" if args.throughput else "ms, p50"
    print(f"\n| checkout | each run ({unit}) | median | vs {roots[0].name} |")
    print("|---|---|---|---|")
    for root, values in zip(roots, runs, strict=True):
        median = statistics.median(values)
        each = " / ".join(_shown(v, args.throughput) for v in values)
        print(f"| {root} | {each} | {_shown(median, args.throughput)} | {median / first:.3f} |")


def _shown(value: float, throughput: bool) -> str:
    return f"{value:,.0f}" if throughput else f"{value * 1e3:.3f}"


if __name__ == "__main__":
    main()
