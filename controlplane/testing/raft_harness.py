"""The conformance harness of the raft backend: one member, or three members in one process.

Members run on loopback with short Raft timing and a shared :class:`FakeClock` for the
control plane's own time (lock TTLs, node timeouts), so those checks stay instant; Raft's
elections and heart-beats run on real time. With three members the checks talk to a follower,
the harder case: its writes are forwarded and it serves reads from its own replica.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import msgspec

from ..errors import ClosedError
from ..protocol import ControlPlane
from .conformance_harness import FakeClock, HarnessBase

if TYPE_CHECKING:
    from ..backends.raft.backend import RaftControlPlane

__all__ = ["RaftHarness"]


class RaftHarness(HarnessBase):
    """Fresh Raft clusters of ``members`` members in this process, with a fake clock."""

    virtual_time = True
    timeout = 20.0

    def __init__(
        self,
        members: int = 1,
        *,
        heartbeat_interval: float = 0.05,
        election_timeout: float = 0.5,
        start: float = 1_700_000_000.0,
    ) -> None:
        self.members = members
        self.name = "raft-single" if members == 1 else f"raft-{members}-in-process"
        self.clock = FakeClock(start)
        self._timing = {
            "heartbeat_interval": heartbeat_interval,
            "election_timeout": election_timeout,
        }
        self._open: list[RaftControlPlane] = []

    def now(self) -> float:
        """The fake clock."""
        return self.clock()

    @asynccontextmanager
    async def cluster(
        self, watch_retention: int | None = None
    ) -> AsyncIterator[list[RaftControlPlane]]:
        """Started, ready members of a fresh cluster; stopped and removed on exit."""
        from ..backends.raft.backend import (  # noqa: PLC0415 (optional backend)
            RaftControlPlane,
            local_cluster_configs,
        )

        base = tempfile.mkdtemp(prefix="cp-conformance-")
        configs = local_cluster_configs(base, self.members, **self._timing)
        if watch_retention is not None:
            configs = [msgspec.structs.replace(c, watch_retention=watch_retention) for c in configs]
        cluster = [RaftControlPlane(config, clock=self.clock) for config in configs]
        try:
            for cp in cluster:
                await cp.start()
            with anyio.fail_after(self.timeout):
                for cp in cluster:
                    await cp.wait_ready()
            self._open.extend(cluster)
            yield cluster
        finally:
            for cp in cluster:
                with contextlib.suppress(ValueError):
                    self._open.remove(cp)
            for cp in cluster:
                await cp.stop()
            shutil.rmtree(base, ignore_errors=True)

    @asynccontextmanager
    async def _open_cm(self, watch_retention: int | None) -> AsyncIterator[ControlPlane]:
        async with self.cluster(watch_retention) as cluster:
            yield next((cp for cp in cluster if not cp.node.is_leader), cluster[0])

    def open(
        self, *, watch_retention: int | None = None
    ) -> AbstractAsyncContextManager[ControlPlane]:
        """A fresh started cluster; the returned backend is a follower when there are several."""
        return self._open_cm(watch_retention)

    async def advance_time(self, seconds: float) -> None:
        """Move the fake clock, then run the periodic duties (only the leader acts)."""
        self.clock.advance(seconds)
        for cp in list(self._open):
            with contextlib.suppress(ClosedError):
                await cp.run_maintenance()
