"""The conformance harness of the raft client: a :class:`RaftClient` of members in this process.

The members run on loopback with short Raft timing and a shared :class:`FakeClock` for the
control plane's own time; the client stamps its commands with the same clock. Every check
then talks to the cluster over the client protocol only: writes, the replica's reads, watches.
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
    from ..backends.raft.client import RaftClient

__all__ = ["RaftClientHarness"]


class RaftClientHarness(HarnessBase):
    """Fresh clusters of ``members`` members in this process, used through a network client."""

    virtual_time = True
    timeout = 20.0

    def __init__(
        self,
        members: int = 3,
        *,
        heartbeat_interval: float = 0.05,
        election_timeout: float = 0.5,
        start: float = 1_700_000_000.0,
    ) -> None:
        self.members = members
        self.name = f"raft-client-{members}-in-process"
        self.clock = FakeClock(start)
        self._timing = {
            "heartbeat_interval": heartbeat_interval,
            "election_timeout": election_timeout,
        }
        self._members: list[RaftControlPlane] = []
        self._clients: list[RaftClient] = []

    def now(self) -> float:
        """The fake clock."""
        return self.clock()

    @asynccontextmanager
    async def _open_cm(self, watch_retention: int | None) -> AsyncIterator[ControlPlane]:
        from ..backends.raft.backend import (  # noqa: PLC0415 (optional backend)
            RaftControlPlane,
            local_cluster_configs,
        )
        from ..backends.raft.client import RaftClient  # noqa: PLC0415

        base = tempfile.mkdtemp(prefix="cp-conformance-client-")
        configs = local_cluster_configs(base, self.members, **self._timing)
        if watch_retention is not None:
            configs = [msgspec.structs.replace(c, watch_retention=watch_retention) for c in configs]
        cluster = [RaftControlPlane(config, clock=self.clock) for config in configs]
        client: RaftClient | None = None
        try:
            for cp in cluster:
                await cp.start()
            with anyio.fail_after(self.timeout):
                for cp in cluster:
                    await cp.wait_ready()
            addresses = []
            for cp in cluster:
                address = cp.client_address
                assert address is not None
                addresses.append(f"{address[0]}:{address[1]}")
            client = RaftClient(
                addresses,
                cluster_id=configs[0].raft.cluster_id,
                clock=self.clock,
                watch_retention=configs[0].watch_retention,
                request_timeout=self.timeout,
            )
            await client.start()
            self._members.extend(cluster)
            self._clients.append(client)
            yield client
        finally:
            if client is not None:
                with contextlib.suppress(ValueError):
                    self._clients.remove(client)
                await client.stop()
            for cp in cluster:
                with contextlib.suppress(ValueError):
                    self._members.remove(cp)
            for cp in cluster:
                await cp.stop()
            shutil.rmtree(base, ignore_errors=True)

    def open(
        self, *, watch_retention: int | None = None
    ) -> AbstractAsyncContextManager[ControlPlane]:
        """A fresh started cluster and a started client of it."""
        return self._open_cm(watch_retention)

    async def advance_time(self, seconds: float) -> None:
        """Move the fake clock, run the members' periodic duties (only the leader acts), then
        let each client's replica catch up with what they wrote."""
        self.clock.advance(seconds)
        for cp in list(self._members):
            with contextlib.suppress(ClosedError):
                await cp.run_maintenance()
        for client in list(self._clients):
            with contextlib.suppress(ClosedError):
                await client.get_cluster_state(consistent=True)
