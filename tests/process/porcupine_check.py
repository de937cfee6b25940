"""Porcupine (the Go linearizability checker) as a second opinion on recorded histories.

The Go program in ``tests/porcupine/`` reads a history written by
:func:`controlplane.testing.linearizability.to_porcupine_json` and checks it against the same
key-value model as :class:`~controlplane.testing.linearizability.KVModel`. :func:`build`
compiles it once into a cache directory outside the repository,
``~/.cache/controlplane-test-peers/porcupine-<version>-<hash>/`` (``$XDG_CACHE_HOME`` is
honoured, ``CONTROLPLANE_TEST_PEERS_CACHE`` overrides the root), keyed by the hash of the Go
sources, ``go.mod`` and ``go.sum``; it needs only ``go`` and the Go module proxy.
:func:`check_with_porcupine` runs it on a history.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.testing.linearizability import Operation, Outcome, to_porcupine_json

__all__ = [
    "GO_FALLBACKS",
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
GO_FALLBACKS = ("/usr/local/go/bin/go", "/usr/lib/go/bin/go", "~/go/bin/go", "~/sdk/go/bin/go")
"""Where ``go`` is looked for when it is not on ``PATH`` (nor in ``$GOROOT/bin``)."""
BUILD_TIMEOUT = 600.0
_EXIT = {0: Outcome.OK, 1: Outcome.ILLEGAL, 2: Outcome.UNKNOWN}


class GoMissingError(RuntimeError):
    """No ``go`` command: the Porcupine checker cannot be built."""


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


def find_go() -> str:
    """The ``go`` command; :class:`GoMissingError` (with what to do) if there is none."""
    found = shutil.which("go")
    if found:
        return found
    candidates = [os.path.expanduser(p) for p in GO_FALLBACKS]
    if os.environ.get("GOROOT"):
        candidates.insert(0, os.path.join(os.environ["GOROOT"], "bin", "go"))
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise GoMissingError(
        "the Go toolchain ('go') was not found on PATH, in $GOROOT/bin or in "
        f"{', '.join(GO_FALLBACKS)}: it is needed to build the Porcupine linearizability "
        f"checker from {PORCUPINE_SOURCE} (install Go 1.21 or later; the build fetches "
        "github.com/anishathalye/porcupine through the Go module proxy)"
    )


def cache_root() -> Path:
    """Where test peers built from Go modules are cached."""
    if override := os.environ.get("CONTROLPLANE_TEST_PEERS_CACHE"):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "controlplane-test-peers"


def _source_hash() -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update(name.encode() + b"\0" + (PORCUPINE_SOURCE / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build() -> Path:
    """The checker binary, built first if the cache does not have it for these sources."""
    directory = cache_root() / f"porcupine-{porcupine_version()}-{_source_hash()}"
    binary = directory / "porcupine"
    if binary.is_file():
        return binary
    go = find_go()
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory / ".lock"):
        if binary.is_file():  # built by someone else meanwhile
            return binary
        env = {
            **os.environ,
            "GOFLAGS": "-mod=mod",
            "CGO_ENABLED": "0",
            "GOWORK": "off",
            "GOTOOLCHAIN": "local",  # build with the installed Go; never fetch another
        }
        fd, partial = tempfile.mkstemp(prefix=".porcupine-", dir=directory)
        os.close(fd)
        try:
            done = subprocess.run(
                [go, "build", "-trimpath", "-o", partial, "."],
                cwd=PORCUPINE_SOURCE,
                env=env,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"building the Porcupine checker failed ({go} build in {PORCUPINE_SOURCE}, "
                    f"exit {done.returncode}):\n{done.stdout}{done.stderr}"
                )
            os.chmod(partial, 0o755)
            os.replace(partial, binary)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
    return binary


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
