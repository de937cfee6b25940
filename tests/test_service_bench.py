"""Smoke test of ``bench/service_bench.py``: the quick run completes and prints its table.

It asserts nothing about timing (the benchmark's figures depend on the machine); it only keeps
the script working as the code it drives changes. Three ``controlplane serve`` processes, the
bench member script and the load generator; ~20-30 s on two cores.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_run_prints_the_table(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "service_bench.py"),
            "--quick",
            "--no-etcd",
            "--no-pysyncobj",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| metric" in done.stdout
    rows = (
        "create_index, one write-only client",
        "one client with a replica",
        "failover: SIGKILL leader",
        "SIGSTOP leader",
        "watch delivery",
    )
    for row in rows:
        assert row in done.stdout
    assert list(tmp_path.iterdir()) == []  # its data directories are removed


@pytest.mark.slow
def test_ab_compares_two_checkouts() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "ab.py"),
            str(ROOT),
            str(ROOT),
            "--pairs",
            "1",
            "-n",
            "150",
            "--nodes",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(f"| {ROOT} |")]
    assert len(rows) == 2  # one per checkout given, each with its run and median
    assert all(row.endswith(" |") and "1.000" in rows[0] for row in rows)
