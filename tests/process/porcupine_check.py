"""Porcupine (the Go linearizability checker) as a second opinion on recorded histories.

The Go program in ``tests/porcupine/`` reads a history written by
:func:`controlplane.testing.linearizability.to_porcupine_json` and checks it against the same
key-value model as :class:`~controlplane.testing.linearizability.KVModel`. :func:`build`
compiles it once into the test-peers cache outside the repository
(:mod:`controlplane.testing.gobuild`); it needs only ``go`` and the Go module proxy.
:func:`check_with_porcupine` runs it on a history.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.testing.gobuild import GoMissingError, build_go, cache_root, find_go
from controlplane.testing.linearizability import Operation, Outcome, to_porcupine_json

__all__ = [
    "PORCUPINE_SOURCE",
    "GoMissingError",
    "PorcupineResult",
    "build",
    "cache_root",
    "check_with_porcupine",
    "find_go",
    "porcupine_version",
]

PORCUPINE_SOURCE = Path(__file__).resolve().parent.parent / "porcupine"
"""The Go module (``go.mod``, ``go.sum``, ``main.go``)."""
_EXIT = {0: Outcome.OK, 1: Outcome.ILLEGAL, 2: Outcome.UNKNOWN}


@dataclass(frozen=True)
class PorcupineResult:
    """Porcupine's verdict on a history."""

    outcome: Outcome
    verdict: str
    """Its one-line verdict, e.g. ``linearizable (120 operations, 3 keys)``."""


def porcupine_version() -> str:
    """The Porcupine version ``go.mod`` pins."""
    text = (PORCUPINE_SOURCE / "go.mod").read_text("utf-8")
    match = re.search(r"github\.com/anishathalye/porcupine\s+(v\S+)", text)
    if match is None:
        raise RuntimeError(f"{PORCUPINE_SOURCE / 'go.mod'} does not require porcupine")
    return match.group(1)


def build() -> Path:
    """The checker binary, built first if the cache does not have it for these sources."""
    return build_go(PORCUPINE_SOURCE, f"porcupine-{porcupine_version()}-checker")


def check_with_porcupine(
    history: Sequence[Operation[Any, Any]] | Path,
    *,
    binary: Path | None = None,
    timeout: float = 60.0,
    visualize: Path | None = None,
) -> PorcupineResult:
    """Run Porcupine on ``history`` (operations, or a file written by ``to_porcupine_json``).

    ``timeout`` bounds the search (then the outcome is :attr:`Outcome.UNKNOWN`);
    ``visualize`` also writes Porcupine's HTML visualization there.
    """
    binary = binary or build()
    args = [str(binary), f"-timeout={timeout}s"]
    if visualize is not None:
        args.append(f"-visualize={visualize}")
    if isinstance(history, Path):
        args.append(str(history))
        stdin = None
    else:
        args.append("-")
        stdin = to_porcupine_json(history)
    done = subprocess.run(
        args,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout + 30.0,
        check=False,
    )
    verdict = done.stdout.strip()
    if done.returncode not in _EXIT:
        raise RuntimeError(
            f"porcupine failed (exit {done.returncode}): {verdict}\n{done.stderr.strip()}"
        )
    return PorcupineResult(_EXIT[done.returncode], verdict)
