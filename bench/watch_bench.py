"""Micro-benchmarks of controlplane.watch.WatchHub.

Run: ``python bench/watch_bench.py [--events N] [--uvloop]``. Three measurements, each for several
numbers of attached watchers:

* publish: single-event versions published in a tight loop while the watchers wait (they are
  woken once, then stay runnable: the publisher never yields);
* throughput: the publisher yields every ``--batch`` publishes and every watcher reads every
  event; reported as published versions per second until the last watcher is done;
* latency: one event at a time, from ``publish`` to the moment each watcher holds it
  (p50/p99/max over all watcher deliveries).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from controlplane.types import ClusterEvent, EventKind
from controlplane.watch import WatchHub


def _events(n: int) -> list[list[ClusterEvent]]:
    return [
        [ClusterEvent(version=v, kind=EventKind.FLAG_CHANGED, key="f")] for v in range(1, n + 1)
    ]


async def bench_publish(watchers: int, n: int) -> float:
    """Versions published per second with ``watchers`` idle watchers attached."""
    hub = WatchHub(retention=10_000)
    batches = _events(n)
    streams = [hub.watch() for _ in range(watchers)]
    tasks = [asyncio.create_task(anext(s)) for s in streams]
    await asyncio.sleep(0)  # let every watcher reach its wait
    publish = hub.publish
    start = time.perf_counter()
    for v, batch in enumerate(batches, 1):
        publish(v, batch)
    elapsed = time.perf_counter() - start
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return n / elapsed


async def bench_throughput(watchers: int, n: int, batch: int) -> float:
    """Versions per second when every watcher reads every event (publisher yields per batch)."""
    hub = WatchHub(retention=max(10_000, 2 * batch))
    batches = _events(n)

    async def consume() -> None:
        async with hub.watch(since=0) as stream:
            async for event in stream:
                if event.version == n:
                    return

    start = time.perf_counter()
    tasks = [asyncio.create_task(consume()) for _ in range(watchers)]
    await asyncio.sleep(0)
    for v, events in enumerate(batches, 1):
        hub.publish(v, events)
        if v % batch == 0:
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return n / (time.perf_counter() - start)


async def bench_latency(watchers: int, rounds: int) -> tuple[float, float, float]:
    """(p50, p99, max) microseconds from publish to delivery, over every watcher delivery."""
    hub = WatchHub()
    samples: list[float] = []
    sent = 0.0
    done = asyncio.Event()
    remaining = 0

    async def consume() -> None:
        nonlocal remaining
        async with hub.watch() as stream:
            async for _ in stream:
                samples.append(time.perf_counter() - sent)
                remaining -= 1
                if remaining == 0:
                    done.set()

    tasks = [asyncio.create_task(consume()) for _ in range(watchers)]
    await asyncio.sleep(0)
    for v, events in enumerate(_events(rounds), 1):
        done.clear()
        remaining = watchers
        sent = time.perf_counter()
        hub.publish(v, events)
        await done.wait()
    hub.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    samples.sort()
    q = statistics.quantiles(samples, n=100)
    return q[49] * 1e6, q[98] * 1e6, samples[-1] * 1e6


async def main(args: argparse.Namespace) -> None:
    counts = [int(x) for x in args.watchers.split(",")]
    await bench_publish(0, args.events)  # warm-up
    print(f"publish, {args.events:,} single-event versions, watchers idle:")
    for w in counts:
        print(f"  {w:>5} watchers: {await bench_publish(w, args.events):>12,.0f} versions/s")
    print(f"throughput, every watcher reads every event (publisher yields every {args.batch}):")
    for w in counts:
        rate = await bench_throughput(w, args.events // 4, args.batch)
        print(
            f"  {w:>5} watchers: {rate:>12,.0f} versions/s ({rate * max(w, 1):,.0f} deliveries/s)"
        )
    print(f"latency, publish -> watcher holds the event, {args.rounds:,} rounds:")
    for w in counts:
        if w == 0:
            continue
        p50, p99, top = await bench_latency(w, args.rounds)
        print(f"  {w:>5} watchers: p50 {p50:7.1f} us   p99 {p99:7.1f} us   max {top:8.1f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--watchers", default="0,1,10,100,1000")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (if installed)")
    ns = parser.parse_args()
    if ns.uvloop:
        uvloop = importlib.import_module("uvloop")  # optional extra
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main(ns))
