"""The backends the conformance suite runs against: one harness per backend.

Adding a backend to the suite is adding one entry to ``HARNESSES`` (a factory of a fresh
:class:`~controlplane.testing.BackendHarness` per test); every check then runs against it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from controlplane.testing import BackendHarness, MemoryHarness
from controlplane.testing.client_harness import RaftClientHarness
from controlplane.testing.raft_harness import RaftHarness

HARNESSES: dict[str, Callable[[], BackendHarness]] = {
    "memory": MemoryHarness,
    "raft-single": lambda: RaftHarness(members=1),
    "raft-3-in-process": lambda: RaftHarness(members=3),
    "raft-client-3-in-process": lambda: RaftClientHarness(members=3),
}


@pytest.fixture(params=sorted(HARNESSES))
def harness(request: pytest.FixtureRequest) -> BackendHarness:
    """A fresh harness of each backend under test."""
    factory = HARNESSES[request.param]
    return factory()
