"""Test support for controlplane users and backend authors.

* The conformance suite (:data:`ALL_CHECKS`, :func:`run_checks`) and the harness a backend
  provides to run it (:class:`BackendHarness`, :class:`HarnessBase`, :class:`MemoryHarness`).
* :class:`FakeClock`, to make lock TTLs and node timeouts instant and deterministic.

The model-based test machine (``controlplane.testing.model``, which needs hypothesis from the
``dev`` extra) and the linearizability checker (``controlplane.testing.linearizability``) are
imported from their own modules.
"""

from .conformance import ALL_CHECKS as ALL_CHECKS
from .conformance import CheckResult as CheckResult
from .conformance import get_check as get_check
from .conformance import run_checks as run_checks
from .conformance_harness import BackendHarness as BackendHarness
from .conformance_harness import Check as Check
from .conformance_harness import CheckNotApplicable as CheckNotApplicable
from .conformance_harness import FakeClock as FakeClock
from .conformance_harness import HarnessBase as HarnessBase
from .conformance_harness import MemoryHarness as MemoryHarness
from .conformance_harness import VirtualClockHarness as VirtualClockHarness

__all__ = (
    "ALL_CHECKS",
    "BackendHarness",
    "Check",
    "CheckNotApplicable",
    "CheckResult",
    "FakeClock",
    "HarnessBase",
    "MemoryHarness",
    "VirtualClockHarness",
    "get_check",
    "run_checks",
)
