"""Helpers for tests that run real Raft members (``RaftControlPlane``) inside one process.

A :class:`LocalCluster` owns the configurations of ``n`` members on 127.0.0.1 (fixed ports,
one data directory each, see ``local_cluster_configs``) and the member objects currently
running. Members can be stopped (gracefully or not), restarted on the same data directory,
and cut off from each other through :attr:`RaftNode.message_filter`, the node's test seam that
drops messages on the way in and out (a partition; the member keeps running).

Every wait is bounded; callers add their own ``anyio.fail_after`` around the whole test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import msgspec
import pytest

from controlplane.backends.raft.backend import RaftControlPlane, local_cluster_configs
from controlplane.backends.raft.core import ConfChangeType
from controlplane.backends.raft.hardstate import FsyncFn
from controlplane.backends.raft.node import PeerMessage
from controlplane.config import Config
from controlplane.errors import ControlPlaneError, UnavailableError
from controlplane.types import ClusterState

FAST: dict[str, Any] = {"heartbeat_interval": 0.03, "election_timeout": 0.3}
"""Timing for tests: heart-beat every 30 ms, elections after 0.3-0.6 s of silence."""


def assert_no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Body of an autouse fixture: fail on what asyncio only logs (never-retrieved task
    exceptions, failing callbacks) and on members stopping on an unexpected error."""
    yield
    errors = [
        r.getMessage()
        for r in caplog.records
        if (r.name == "asyncio" and r.levelno >= logging.ERROR)
        or (r.name == "controlplane.raft.node" and r.levelno >= logging.ERROR and r.exc_info)
    ]
    assert not errors, errors


def client_address(cp: RaftControlPlane) -> str:
    """``host:port`` of a running member's client API."""
    address = cp.client_address
    assert address is not None
    return f"{address[0]}:{address[1]}"


class LocalCluster:
    """``n`` members in this process; use as ``async with LocalCluster(tmp_path) as c:``.

    ``members`` maps each member id to its running ``RaftControlPlane`` (absent while it is
    stopped). Leaving the ``async with`` block stops every member still running.
    """

    def __init__(self, base: Path, n: int = 3, *, joining: int = 0, **raft: Any) -> None:
        settings = {**FAST, **raft}
        configs = local_cluster_configs(base, n + joining, **settings)
        initial = tuple(p for p in configs[0].raft.peers[:n])
        self.configs: dict[str, Config] = {}
        for i, config in enumerate(configs):
            if i < n:  # bootstraps the cluster of the first n members
                raft_config = msgspec.structs.replace(config.raft, peers=initial)
            else:  # joins it later (add it with change_membership)
                raft_config = msgspec.structs.replace(config.raft, bootstrap=False)
            self.configs[config.raft.node_id] = msgspec.structs.replace(config, raft=raft_config)
        self.ids = list(self.configs)[:n]
        """The initial members (started by :meth:`start_all`)."""
        self.joining = list(self.configs)[n:]
        """Members that are not part of the initial configuration."""
        self.members: dict[str, RaftControlPlane] = {}
        self._cut: set[str] = set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        t: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_all()

    # --- life cycle --------------------------------------------------------------------------

    def reconfigure(self, member: str, **raft: Any) -> None:
        """Change settings of ``member`` (for its next start)."""
        config = self.configs[member]
        self.configs[member] = msgspec.structs.replace(
            config, raft=msgspec.structs.replace(config.raft, **raft)
        )

    def address(self, member: str) -> tuple[str, int]:
        """The peer address of ``member``."""
        raft = self.configs[member].raft
        return raft.listen_host, raft.listen_port

    async def start(self, member: str, *, fsync: FsyncFn | None = None) -> RaftControlPlane:
        """Start (or restart, on its data directory) ``member``."""
        assert member not in self.members, f"{member} is running"
        cp = RaftControlPlane(self.configs[member], fsync=fsync)
        await cp.start()
        self.members[member] = cp
        self._apply_filter(member)
        return cp

    async def start_all(self, within: float = 10.0) -> None:
        """Start every member and wait until each one knows the leader."""
        for member in self.ids:
            await self.start(member)
        await self.wait_ready(within)

    async def wait_ready(self, within: float = 10.0) -> None:
        """Wait until every running member knows a leader and has applied what it committed."""
        with anyio.fail_after(within):
            async with anyio.create_task_group() as tg:
                for cp in self.members.values():
                    tg.start_soon(cp.wait_ready, within)

    async def stop(self, member: str, *, transfer: bool = True) -> None:
        """Stop ``member``: gracefully (leadership transfer), or abruptly (no transfer, no
        goodbye: its peers only notice that it went silent)."""
        cp = self.members.pop(member)
        if not transfer:
            await cp.node.stop(transfer=False)
        await cp.stop()

    async def stop_all(self) -> None:
        """Stop every running member (abruptly: there is no one left to hand over to)."""
        for member in list(self.members):
            with contextlib.suppress(ControlPlaneError):
                await self.stop(member, transfer=False)

    # --- partitions ----------------------------------------------------------------------------

    def isolate(self, *members: str) -> None:
        """Cut each of ``members`` off from every other member (both directions)."""
        self._cut.update(members)
        for member in self.members:
            self._apply_filter(member)

    def heal(self) -> None:
        """Undo every partition."""
        self._cut.clear()
        for member in self.members:
            self._apply_filter(member)

    def _apply_filter(self, member: str) -> None:
        cp = self.members.get(member)
        if cp is None:
            return
        cut = self._cut

        def deliver(msg: PeerMessage) -> bool:
            return msg.src not in cut and msg.dst not in cut

        cp.node.message_filter = deliver if cut else None

    # --- queries -------------------------------------------------------------------------------

    def leaders(self) -> list[str]:
        """Running members that believe they lead."""
        return [m for m, cp in self.members.items() if cp.node.is_leader]

    async def wait_leader(
        self, among: Collection[str] | None = None, within: float = 10.0, poll: float = 0.01
    ) -> RaftControlPlane:
        """Wait until one member of ``among`` (default: every running member that is not cut
        off) leads and every other one of them follows it; return the leader."""
        with anyio.fail_after(within):
            while True:
                group = [
                    self.members[m]
                    for m in (among if among is not None else self.members)
                    if m in self.members and m not in self._cut
                ]
                leaders = [cp for cp in group if cp.node.is_leader]
                if len(leaders) == 1:
                    leader = leaders[0].node.id
                    if all(cp.node.leader_id == leader for cp in group):
                        return leaders[0]
                await asyncio.sleep(poll)

    async def start_and_kill_a_follower(self) -> tuple[RaftControlPlane, str]:
        """Start every member, wait for a leader, stop one follower abruptly; return the
        leader and the stopped member's id."""
        await self.start_all()
        leader = await self.wait_leader()
        down = next(m for m in self.ids if m != leader.node.id)
        await self.stop(down, transfer=False)
        return leader, down

    def follower(self) -> RaftControlPlane:
        """A running member that does not lead."""
        return next(cp for cp in self.members.values() if not cp.node.is_leader)

    async def states(self) -> dict[str, ClusterState]:
        """A linearizable read of the state on every running member."""
        return {m: await cp.get_cluster_state(consistent=True) for m, cp in self.members.items()}

    async def wait_converged(self, within: float = 15.0) -> ClusterState:
        """Wait until every running member holds the same state (with no writes going on)."""
        with anyio.fail_after(within):
            while True:
                states = await self.states()
                distinct = {s.version for s in states.values()}
                if len(distinct) == 1:
                    first, *rest = states.values()
                    assert all(s == first for s in rest), "same version, different states"
                    return first
                await asyncio.sleep(0.02)

    async def change_membership(
        self, change: ConfChangeType, member: str, within: float = 15.0
    ) -> RaftControlPlane:
        """Make a membership change on whoever leads, retrying while it cannot be made yet
        (an earlier change or the leader's first entry not committed, a learner not caught
        up, a leader change). Returns the leader that made it."""
        with anyio.fail_after(within):
            while True:
                leader = await self.wait_leader(among=[m for m in self.members if m != member])
                try:
                    await leader.node.change_membership(change, member)
                    return leader
                except UnavailableError:  # includes NotLeaderError
                    await asyncio.sleep(0.05)

    async def wait_for(
        self, condition: Callable[[], bool], within: float = 10.0, poll: float = 0.01
    ) -> None:
        """Poll ``condition`` until it holds."""
        with anyio.fail_after(within):
            while not condition():  # noqa: ASYNC110 - polls state that has no event
                await asyncio.sleep(poll)
