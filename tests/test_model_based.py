"""Model-based test: the memory backend against the pure StateMachine, step by step.

The rules live in :class:`controlplane.testing.model.ControlPlaneModel` so that other backends
reuse them with their own harness.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from controlplane.testing import MemoryHarness, VirtualClockHarness
from controlplane.testing.model import ControlPlaneModel


def memory_harness() -> VirtualClockHarness:
    # No background timer: the periodic duties run only when the model advances time.
    return MemoryHarness(background_maintenance=False)


class MemoryModel(ControlPlaneModel):
    make_harness = staticmethod(memory_harness)


MemoryModel.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestMemoryBackendAgainstModel = MemoryModel.TestCase
