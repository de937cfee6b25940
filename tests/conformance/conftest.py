"""The backends the conformance suite runs against: one harness per backend.

Adding a backend to the suite is adding one entry to ``HARNESSES`` (a factory of a fresh
:class:`~controlplane.testing.BackendHarness` per test); every check then runs against it.
The ``k8s`` harness runs against one real etcd + kube-apiserver shared by the session (built
from their Go modules on a machine's first run: right after collection, like tests/k8s, so the
build does not count against a test's timeout).
A harness with a ``kill_all()`` method (one that starts processes) has it called at teardown,
whatever happened in the test, and ``remove_files()`` after that if it has one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import pytest
from process.harness import ProcessClientHarness  # tests/ is on sys.path (tests/conftest.py)

from controlplane.testing import BackendHarness, MemoryHarness
from controlplane.testing.client_harness import RaftClientHarness
from controlplane.testing.k8s_harness import K8sHarness
from controlplane.testing.raft_harness import RaftHarness

HARNESSES: dict[str, Callable[[], BackendHarness]] = {
    "memory": MemoryHarness,
    "raft-single": lambda: RaftHarness(members=1),
    "raft-3-in-process": lambda: RaftHarness(members=3),
    "raft-client-3-in-process": lambda: RaftClientHarness(members=3),
    "raft-client-3-processes": lambda: ProcessClientHarness(members=3),
    "k8s": K8sHarness,
}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build etcd and kube-apiserver (if not cached) when a k8s check was collected."""
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("harness") == "k8s":
            from controlplane.testing.k8s_env import build_binaries  # noqa: PLC0415

            try:
                build_binaries()
            except Exception as exc:  # no Go, a failed build: the k8s checks fail, not all
                print(f"\nbuilding etcd and kube-apiserver failed: {exc}", file=sys.stderr)
            return


@pytest.fixture(params=sorted(HARNESSES))
def harness(request: pytest.FixtureRequest) -> Iterator[BackendHarness]:
    """A fresh harness of each backend under test; its processes are killed at teardown."""
    factory = HARNESSES[request.param]
    made = factory()
    try:
        yield made
    finally:
        for cleanup in ("kill_all", "remove_files"):
            method = getattr(made, cleanup, None)
            if method is not None:
                method()
