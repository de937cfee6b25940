"""The conformance harness of a :class:`RaftClient` of three ``controlplane serve`` processes.

Each :meth:`~ProcessClientHarness.open` starts a fresh :class:`~.cluster.ProcessCluster` (its
own data directories, ports picked at run time), waits until it is ready and yields a started
:class:`~controlplane.backends.raft.client.RaftClient` of the members' client ports (the same
client the in-process harness makes, :class:`~controlplane.testing.client_harness.ClientSet`).

Time is the equivalent of the in-process harness's shared fake clock: the members run with
``--test-clock-file``, reading the control plane's wall clock from a file that this harness's
:class:`~controlplane.testing.file_clock.SharedFakeClock` writes (the client stamps its
commands with that clock too). :meth:`~ProcessClientHarness.advance_time` moves the clock
and waits until every member ran its periodic duties at the new time, as the in-process
harness does by calling them (see :func:`~controlplane.testing.file_clock.follow_clock`).

Every process is killed when the block exits and, whatever happens, by :meth:`kill_all` (the
conformance fixture calls it at teardown).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio

from controlplane.config import Config
from controlplane.protocol import ControlPlane
from controlplane.testing import HarnessBase
from controlplane.testing.client_harness import ClientSet
from controlplane.testing.file_clock import SharedFakeClock, ack_path, read_clock_file

from .cluster import ProcessCluster

__all__ = ["ProcessClientHarness"]


class ProcessClientHarness(HarnessBase):
    """Fresh clusters of ``members`` member processes, used through a network client."""

    virtual_time = True
    timeout = 30.0

    def __init__(self, members: int = 3, *, start: float = 1_700_000_000.0) -> None:
        self.members = members
        self.name = f"raft-client-{members}-processes"
        self._base = Path(tempfile.mkdtemp(prefix="cp-conformance-processes-"))
        self.clock = SharedFakeClock(self._base / "clock", start)
        self._clients = ClientSet()
        self._clusters: list[ProcessCluster] = []
        self._open: list[ProcessCluster] = []

    def now(self) -> float:
        """The fake clock."""
        return self.clock()

    @asynccontextmanager
    async def _open_cm(self, watch_retention: int | None) -> AsyncIterator[ControlPlane]:
        cluster = ProcessCluster(
            self._base / f"cluster{len(self._clusters) + 1}",
            self.members,
            cluster_id=f"conformance-{len(self._clusters) + 1}",
            settings={} if watch_retention is None else {"watch_retention": watch_retention},
            serve_args=["--test-clock-file", str(self.clock.path)],
        )
        self._clusters.append(cluster)
        failed = True
        try:
            await cluster.start()
            await cluster.wait_ready(self.timeout)
            self._open.append(cluster)
            async with self._clients.open(
                cluster.client_addresses(),
                cluster_id=cluster.cluster_id,
                clock=self.clock,
                watch_retention=watch_retention or Config().watch_retention,
                request_timeout=self.timeout,
            ) as client:
                yield client
            cluster.check_exits()
            failed = False
        finally:
            with contextlib.suppress(ValueError):
                self._open.remove(cluster)
            await cluster.close()
            if failed:
                print(cluster.logs_tail(40))  # pytest shows it with the failure
            else:
                shutil.rmtree(cluster.base, ignore_errors=True)

    def open(
        self, *, watch_retention: int | None = None
    ) -> AbstractAsyncContextManager[ControlPlane]:
        """A fresh cluster of member processes, ready, and a started client of it."""
        return self._open_cm(watch_retention)

    async def advance_time(self, seconds: float) -> None:
        """Move the shared clock, wait until every running member ran its periodic duties at
        the new time (only the leader acts), then let each client's replica catch up with what
        was written: what the in-process harness does with its members' ``run_maintenance``."""
        self.clock.advance(seconds)
        now = self.clock()
        pending = [
            ack_path(self.clock.path, cluster.cluster_id, member.id)
            for cluster in self._open
            for member in cluster.members
            if member.live
        ]
        with anyio.move_on_after(self.timeout):
            while pending:
                pending = [p for p in pending if (read_clock_file(p) or 0.0) < now]
                if pending:
                    await anyio.sleep(0.002)
        if pending:
            raise AssertionError(
                f"members did not run their duties at the test clock's {now} within "
                f"{self.timeout} s: {[p.name for p in pending]}"
            )
        await self._clients.catch_up()

    def kill_all(self) -> None:
        """SIGKILL every member process this harness started (idempotent, synchronous)."""
        for cluster in self._clusters:
            cluster.kill_all()

    def remove_files(self) -> None:
        """Remove the clock file and what is left of the clusters' directories."""
        shutil.rmtree(self._base, ignore_errors=True)
