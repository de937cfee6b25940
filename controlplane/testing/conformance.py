"""The conformance suite of the ``ControlPlane`` protocol, as public library code.

Every backend -- ours and yours -- must pass the same checks (DESIGN 7). A check is an ``async``
function of a :class:`~controlplane.testing.conformance_harness.BackendHarness` that raises
``AssertionError`` saying what the backend did wrong. To run them against your backend,
implement a harness (subclass :class:`HarnessBase` and implement ``open()``), then either
parametrize a pytest test over :data:`ALL_CHECKS`::

    @pytest.mark.anyio
    @pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.name)
    async def test_conformance(check: Check) -> None:
        await check(MyHarness())

or call :func:`run_checks` and look at the results.

What is not checked: performance, durability across restarts, behaviour under faults (other
suites cover those), and the exact content of error messages.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from . import (  # noqa: F401 (importing the area modules registers their checks)
    conformance_cluster,
    conformance_indices,
    conformance_locks,
    conformance_nodes,
    conformance_watch,
)
from .conformance_harness import (
    BackendHarness,
    Check,
    CheckNotApplicable,
    HarnessBase,
    registered_checks,
)

__all__ = ["ALL_CHECKS", "CheckResult", "HarnessBase", "get_check", "run_checks"]

ALL_CHECKS: tuple[Check, ...] = registered_checks()
"""Every conformance check, grouped by area (indices, nodes, shards, locks, watch, cluster)."""


def get_check(name: str) -> Check:
    """The check called ``name`` (``KeyError`` if there is none)."""
    for item in ALL_CHECKS:
        if item.name == name:
            return item
    raise KeyError(f"no conformance check is named {name!r}")


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``passed``, ``skipped`` (not applicable) or ``failed``."""

    check: Check
    outcome: str
    detail: str = ""
    seconds: float = 0.0


async def run_checks(
    harness: BackendHarness, checks: Iterable[Check] = ALL_CHECKS
) -> list[CheckResult]:
    """Run ``checks`` one after the other against ``harness``; never raises for a failed check.

    Errors other than ``AssertionError`` (a backend that crashed) are failures too.
    """
    results = []
    for item in checks:
        started = time.monotonic()
        try:
            await item(harness)
        except CheckNotApplicable as exc:
            outcome, detail = "skipped", str(exc)
        except Exception as exc:
            outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
        else:
            outcome, detail = "passed", ""
        results.append(CheckResult(item, outcome, detail, time.monotonic() - started))
    return results
