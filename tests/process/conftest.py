"""Fixtures of the process tests: every process a test starts is killed when it ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .cluster import ProcessCluster
from .porcupine_check import GoMissingError, build


@pytest.fixture
def anyio_backend() -> str:
    """asyncio only: the harness's proxies and the clients share the test's event loop."""
    return "asyncio"


@pytest.fixture
def process_cluster(tmp_path: Path) -> Iterator[Callable[..., ProcessCluster]]:
    """A factory of :class:`ProcessCluster` under ``tmp_path``: ``make(n, **options)``.

    Use the cluster as ``async with make(3) as cluster:``. Whatever happens in the test, the
    teardown SIGKILLs every member's process group and prints the end of every member's log
    (pytest shows it when the test failed).
    """
    made: list[ProcessCluster] = []

    def make(n: int = 3, **options: Any) -> ProcessCluster:
        cluster = ProcessCluster(tmp_path / f"cluster{len(made) + 1}", n, **options)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.kill_all()
            print(cluster.logs_tail(40))


@pytest.fixture(scope="session")
def porcupine() -> Path:
    """The Porcupine checker binary, built from ``tests/porcupine`` on first use (cached
    outside the repository). Fails, not skips, when Go is missing: CI has Go."""
    try:
        return build()
    except GoMissingError as exc:
        pytest.fail(f"cannot build the Porcupine checker: {exc}", pytrace=False)
