"""A fake wall clock shared between a test and member *processes*, through a file.

The in-process harnesses hand one :class:`~controlplane.testing.FakeClock` to every member and
client, so lock TTLs, node timeouts and session expiry only move when a check says so. Member
processes get the equivalent with ``controlplane serve --test-clock-file PATH``: their clock is
a :class:`FileClock` that reads the time from ``PATH``, and the test's clock is a
:class:`SharedFakeClock` that writes ``PATH`` every time it moves. Only the control plane's own
wall clock is replaced; Raft's elections and heart-beats keep running on real (monotonic) time.

The in-process harnesses also run every member's periodic duties (``run_maintenance``: mark
silent nodes DOWN, expire locks) right after moving the clock. A member process does the same
with :func:`follow_clock`: it notices the file change, runs its duties, then writes the time
it acted on to its acknowledgement file (:func:`ack_path`), which the harness waits for.

Never use it outside tests: a member whose clock stands still never expires a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Protocol

from .conformance_harness import FakeClock

__all__ = [
    "FileClock",
    "Maintained",
    "SharedFakeClock",
    "ack_path",
    "follow_clock",
    "read_clock_file",
    "write_clock_file",
]

_log = logging.getLogger("controlplane.testing.file_clock")


def write_clock_file(path: str | os.PathLike[str], now: float) -> None:
    """Write ``now`` to ``path`` atomically (a reader sees the old or the new time, whole)."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(repr(float(now)), "ascii")
    os.replace(temporary, target)


def read_clock_file(path: str | os.PathLike[str]) -> float | None:
    """The time written to ``path``; None if it is missing or being replaced."""
    try:
        return float(Path(path).read_text("ascii"))
    except (OSError, ValueError):
        return None


def ack_path(clock_file: str | os.PathLike[str], cluster_id: str, member_id: str) -> Path:
    """Where member ``member_id`` of ``cluster_id`` acknowledges the clock times it acted on."""
    clock = Path(clock_file)
    return clock.with_name(f"{clock.name}.{cluster_id}.{member_id}.ack")


class Maintained(Protocol):
    """A backend with periodic duties (the raft and memory backends)."""

    async def run_maintenance(self) -> None:
        """Run the duties now (mark silent nodes DOWN, expire locks); the leader acts."""


async def follow_clock(
    backend: Maintained, clock: FileClock, ack: str | os.PathLike[str], poll: float = 0.002
) -> None:
    """Forever: when ``clock`` moves, run ``backend``'s duties, then write the new time to
    ``ack``. The equivalent, in a member process, of the in-process harness calling
    ``run_maintenance()`` on every member after it moved its fake clock."""
    acted = clock()
    write_clock_file(ack, acted)
    while True:
        await asyncio.sleep(poll)
        now = clock()
        if now == acted:
            continue
        acted = now
        try:
            await backend.run_maintenance()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # its own duties loop tries again later
            _log.warning("periodic duties at the test clock's %s failed: %s", now, exc)
        with contextlib.suppress(OSError):
            write_clock_file(ack, now)


class FileClock:
    """A wall clock read from a file that a test writes (seconds since the epoch, as text).

    Exact: every call looks at the file (one ``stat``) and reads it again when it was replaced,
    so a command sent after the test moved the clock is stamped with the new time. The clock
    never goes backwards and keeps its last time while the file is missing or unreadable. The
    file must exist when the clock is made.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._seen = self._identity()
        self._now = float(self.path.read_text("ascii"))

    def _identity(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_ino, st.st_mtime_ns, st.st_size

    def __call__(self) -> float:
        try:
            seen = self._identity()
            if seen != self._seen:
                self._now = max(self._now, float(self.path.read_text("ascii")))
                self._seen = seen
        except (OSError, ValueError):
            pass  # being replaced: keep the last time read
        return self._now


class SharedFakeClock(FakeClock):
    """A :class:`FakeClock` that publishes its time to ``path`` for :class:`FileClock` readers."""

    def __init__(self, path: str | os.PathLike[str], start: float = 1_700_000_000.0) -> None:
        super().__init__(start)
        self.path = Path(path)
        write_clock_file(self.path, start)

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (>= 0) and publish it."""
        super().advance(seconds)
        write_clock_file(self.path, self())
