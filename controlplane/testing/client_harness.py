"""The conformance harness of the raft client: a :class:`RaftClient` of members in this process.

The members run on loopback with short Raft timing and a shared :class:`FakeClock` for the
control plane's own time; the client stamps its commands with the same clock. Every check
then talks to the cluster over the client protocol only: writes, the replica's reads, watches.

:class:`ClientSet` opens and tracks the clients; a harness of member *processes* (the
``raft-client-3-processes`` harness of the test suite) uses it too.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from ..errors import ClosedError
from ..protocol import ControlPlane
from .raft_harness import RaftHarness

if TYPE_CHECKING:
    from ..backends.raft.client import RaftClient

__all__ = ["ClientSet", "RaftClientHarness"]


class ClientSet:
    """The started clients of a harness, so that moving time can let each catch up."""

    def __init__(self) -> None:
        self.clients: list[RaftClient] = []

    @asynccontextmanager
    async def open(
        self,
        addresses: Sequence[str],
        *,
        cluster_id: str,
        clock: Callable[[], float],
        watch_retention: int,
        request_timeout: float,
    ) -> AsyncIterator[RaftClient]:
        """A started client of the members at ``addresses``; stopped when the block exits."""
        from ..backends.raft.client import RaftClient  # noqa: PLC0415 (optional backend)

        client = RaftClient(
            addresses,
            cluster_id=cluster_id,
            clock=clock,
            watch_retention=watch_retention,
            request_timeout=request_timeout,
        )
        try:
            await client.start()
            self.clients.append(client)
            yield client
        finally:
            with contextlib.suppress(ValueError):
                self.clients.remove(client)
            await client.stop()

    async def catch_up(self) -> None:
        """Let each client's replica catch up with what the members wrote meanwhile."""
        for client in list(self.clients):
            with contextlib.suppress(ClosedError):
                await client.get_cluster_state(consistent=True)


class RaftClientHarness(RaftHarness):
    """Fresh clusters of ``members`` members in this process, used through a network client."""

    def __init__(self, members: int = 3, **options: float) -> None:
        super().__init__(members, **options)
        self.name = f"raft-client-{members}-in-process"
        self._clients = ClientSet()

    @asynccontextmanager
    async def _open_cm(self, watch_retention: int | None) -> AsyncIterator[ControlPlane]:
        async with self.cluster(watch_retention) as cluster:
            addresses = []
            for cp in cluster:
                address = cp.client_address
                assert address is not None
                addresses.append(f"{address[0]}:{address[1]}")
            async with self._clients.open(
                addresses,
                cluster_id=cluster[0].config.raft.cluster_id,
                clock=self.clock,
                watch_retention=cluster[0].config.watch_retention,
                request_timeout=self.timeout,
            ) as client:
                yield client

    def open(
        self, *, watch_retention: int | None = None
    ) -> AbstractAsyncContextManager[ControlPlane]:
        """A fresh started cluster and a started client of it."""
        return self._open_cm(watch_retention)

    async def advance_time(self, seconds: float) -> None:
        """Move the fake clock, run the members' periodic duties (only the leader acts), then
        let each client's replica catch up with what they wrote."""
        await super().advance_time(seconds)
        await self._clients.catch_up()
