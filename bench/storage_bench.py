"""Throughput and latency of DiskStorage.save() with fsync, in a temporary directory.

Run: ``.venv/bin/python bench/storage_bench.py [--seconds 3] [--entry-size 200]``

Prints, for single-entry saves and for batches of 64 entries (group commit), the saves per
second, entries per second and p50/p99 latency of one ``save()``. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from controlplane.backends.raft.records import Entry, HardState
from controlplane.backends.raft.storage import DiskStorage


def run(directory: str, batch: int, entry_size: int, seconds: float, preallocate: bool) -> str:
    data = b"x" * entry_size
    latencies: list[float] = []
    with DiskStorage(directory, preallocate=preallocate) as storage:
        index = storage.last_index()
        # Warm up: create the first segment.
        storage.save(HardState(term=1, vote="m1"), [Entry(index + 1, 1, data=data)])
        index += 1
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            entries = [Entry(index + i + 1, 1, data=data) for i in range(batch)]
            t0 = time.perf_counter()
            storage.save(None, entries)
            latencies.append(time.perf_counter() - t0)
            index += batch
    total = sum(latencies)
    q = statistics.quantiles(latencies, n=100)
    return (
        f"batch={batch:>3} prealloc={'yes' if preallocate else 'no ':<3} "
        f"saves/s={len(latencies) / total:>8.0f} entries/s={len(latencies) * batch / total:>9.0f} "
        f"p50={q[49] * 1e3:.3f}ms p99={q[98] * 1e3:.3f}ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--entry-size", type=int, default=200)
    args = parser.parse_args()
    for batch in (1, 64):
        for preallocate in (True, False):
            with tempfile.TemporaryDirectory() as directory:
                print(run(directory, batch, args.entry_size, args.seconds, preallocate))


if __name__ == "__main__":
    main()
