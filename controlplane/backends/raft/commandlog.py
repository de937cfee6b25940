"""The recent committed commands of a member, by the state version each produced.

Network clients keep an exact replica of the cluster state by applying the same commands in
the same order (apply is deterministic); a member serves them from this bounded log, or from a
snapshot of the state when a client asks for commands older than the log keeps.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Sequence

__all__ = ["CommandLog"]


class CommandLog:
    """The last ``retention`` state-changing commands, as ``(version, encoded command)``."""

    def __init__(self, retention: int, version: int = 0) -> None:
        self.retention = retention
        self._versions: list[int] = []
        self._commands: list[bytes] = []
        self._base = version
        """Version before the oldest retained command: history from here on is complete."""
        self._changed = asyncio.Event()
        self._waiting = 0

    @property
    def head(self) -> int:
        """Version produced by the newest command (or the base when empty)."""
        return self._versions[-1] if self._versions else self._base

    @property
    def base(self) -> int:
        """``since(v)`` answers for every ``v >= base``."""
        return self._base

    def append(self, version: int, command: bytes) -> None:
        """Record the command that produced ``version``."""
        self._versions.append(version)
        self._commands.append(command)
        if len(self._versions) > 2 * self.retention:
            cut = len(self._versions) - self.retention
            self._base = self._versions[cut - 1]
            del self._versions[:cut]
            del self._commands[:cut]
        self._wake()

    def reset(self, version: int) -> None:
        """Forget everything: the state was replaced by a snapshot at ``version``."""
        self._versions.clear()
        self._commands.clear()
        self._base = version
        self._wake()

    def since(self, version: int, limit: int = 1024) -> Sequence[tuple[int, bytes]] | None:
        """Up to ``limit`` commands after ``version``, or None if some were dropped already."""
        if version < self._base:
            return None
        start = bisect.bisect_right(self._versions, version)
        end = min(len(self._versions), start + limit)
        return list(zip(self._versions[start:end], self._commands[start:end], strict=True))

    async def wait_beyond(self, version: int) -> None:
        """Return once the log holds a command after ``version`` (or was reset)."""
        while self.head <= version:
            self._waiting += 1
            try:
                await self._changed.wait()
            finally:
                self._waiting -= 1

    def _wake(self) -> None:
        if self._waiting:  # a fresh event only when one was waited on (appends are hot)
            self._changed.set()  # wakes every waiter; later waiters wait on a fresh event
            self._changed = asyncio.Event()
