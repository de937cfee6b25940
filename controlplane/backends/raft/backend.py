"""The raft backend of ``ControlPlane`` for a process that is a Raft member.

Writes are proposed to the Raft log and return once committed and applied on this member, so a
read that follows sees them. ``get_cluster_state()`` reads this member's replica (it may lag
the leader by a few entries on a follower); ``consistent=True`` goes through ReadIndex.

The leader also runs the periodic duties: it keeps node heart-beats as soft state (members
forward the heart-beats they receive to it), marks silent nodes DOWN and reaps expired locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import msgspec

from ... import commands as c
from ...codec import decode_command, decode_state, encode_command, encode_state
from ...config import Config, Peer, RaftConfig
from ...errors import ClosedError, InvalidRequestError, NotFoundError, OperationTimeoutError
from ...liveness import Liveness, track_liveness
from ...state import Outcome, StateMachine
from ...types import BackendHealth, ClusterState, EventKind, NodeStatus
from ...validation import check_name
from ...watch import EventStream, WatchHub
from ..base import CommandBackend
from .commandlog import CommandLog
from .hardstate import FsyncFn, IdentityMismatchError, load_identity
from .join import join_cluster
from .node import NodeOptions, RaftNode
from .ops_http import OpsServer
from .records import ConfState
from .service import ClientService
from .storage import DiskStorage
from .tls import client_context, server_context

__all__ = ["ControlPlaneFsm", "RaftControlPlane", "free_port", "local_cluster_configs"]

_log = logging.getLogger("controlplane.raft")
_heartbeats = msgspec.msgpack.Decoder(list[str])


class ControlPlaneFsm:
    """The shared state machine as a Raft :class:`~.node.Fsm`, publishing events to a hub."""

    def __init__(self, hub: WatchHub) -> None:
        self.machine = StateMachine()
        self.hub = hub
        self.commands = CommandLog(hub.retention)
        """The recent state-changing commands, streamed to network clients' replicas."""
        self.on_applied: Callable[[c.Command], None] | None = None
        """Called after each command applied without error (soft-state bookkeeping)."""

    def apply(self, index: int, data: bytes) -> Outcome:
        """Decode and apply one command; publish its events."""
        try:
            command = decode_command(data)
        except InvalidRequestError as exc:  # cannot happen for entries we proposed ourselves
            _log.error("entry %d is not a command: %s", index, exc)
            return Outcome(self.machine.state.version, None, exc, ())
        outcome = self.machine.apply(command)
        if outcome.events:
            self.hub.publish(outcome.version, outcome.events)
            self.commands.append(outcome.version, data)
        if outcome.error is None and self.on_applied is not None:
            self.on_applied(command)
        return outcome

    def snapshot(self) -> Callable[[], bytes]:
        """Capture the (immutable) state; serializing it may then run in a thread."""
        state = self.machine.state
        return lambda: encode_state(state)

    def restore(self, data: bytes) -> None:
        """Replace the state with a snapshot's; watchers behind it get ``CompactedError``."""
        state = decode_state(data)
        self.machine = StateMachine(state)
        self.commands.reset(state.version)
        if state.version > self.hub.head:
            self.hub.reset(state.version)


class RaftControlPlane(CommandBackend):
    """A Raft member serving the ``ControlPlane`` protocol in its own process.

    With no peers configured it is a single-member cluster: the embedded default, with a data
    directory and nothing else to run.

    ``fsync`` replaces ``os.fdatasync``/``os.fsync`` for this member's storage (fault
    injection in tests; see :class:`~.storage.DiskStorage`).
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        clock: Callable[[], float] | None = None,
        fsync: FsyncFn | None = None,
    ):
        super().__init__(clock)
        self.config = config or Config(mode="raft")
        self._fsync = fsync
        self._hub = WatchHub(self.config.watch_retention)
        self._fsm = ControlPlaneFsm(self._hub)
        self._liveness = Liveness(self._clock())
        self._fsm.on_applied = lambda cmd: track_liveness(
            # A network client's write arrives wrapped in its session (ClientCommand).
            self._liveness,
            cmd.command if isinstance(cmd, c.ClientCommand) else cmd,
            self._clock,
        )
        self._node: RaftNode | None = None
        self._duties: asyncio.Task[None] | None = None
        self._stopped = False
        self._ops: OpsServer | None = None
        self._service: ClientService | None = None

    @property
    def node(self) -> RaftNode:
        """The Raft member (for operations: membership, leadership transfer, status)."""
        if self._node is None:
            raise ClosedError("the raft backend is not started")
        return self._node

    @property
    def fsm(self) -> ControlPlaneFsm:
        """The replicated state machine (read it; only the Raft node applies to it)."""
        return self._fsm

    @property
    def client_address(self) -> tuple[str, int] | None:
        """Where the client API is served (the port picked when ``raft.client_port`` is 0);
        None when not serving."""
        service = self._service
        return service.address if service is not None else None

    @property
    def http_address(self) -> tuple[str, int] | None:
        """Where ``/healthz``, ``/readyz``, ``/metrics`` and ``/v1/state`` are served (the port
        picked when ``raft.http_port`` is 0); None when not serving."""
        ops = self._ops
        return (ops.host, ops.port) if ops is not None and ops.serving else None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the data directory (bootstrapping it if new) and start the member.

        With ``raft.join`` set, a member that is not in the cluster's configuration yet then
        joins it through its leader and returns once it is a voter (see :mod:`.join`).
        Otherwise it returns without waiting for a leader; see :meth:`wait_ready`.
        """
        if self._stopped:
            raise ClosedError("this RaftControlPlane was stopped; create a new one")
        if self._node is not None:
            return
        raft = self.config.raft
        storage = await asyncio.to_thread(_open_storage, raft, self._fsync)
        tls = raft.tls
        self._node = node = self._make_node(storage)
        ops = OpsServer(self, raft.http_host, raft.http_port)
        service = ClientService(
            self,
            raft.client_host,
            raft.client_port,
            ssl_context=server_context(tls) if tls else None,
            max_frame_bytes=raft.max_frame_bytes,
        )
        try:
            await node.start()
            await ops.start()
            await service.start()
            if raft.join:
                await join_cluster(node, raft)
        except BaseException:
            self._node = None  # not started: start() may be tried again
            await node.stop(transfer=False)
            await ops.close()
            await service.close()
            raise
        self._ops = ops
        self._service = service
        self._duties = asyncio.get_running_loop().create_task(
            self._duties_loop(), name=f"raft-duties-{raft.node_id}"
        )

    def _make_node(self, storage: DiskStorage) -> RaftNode:
        raft = self.config.raft
        tls = raft.tls
        return RaftNode(
            raft.node_id,
            raft.cluster_id,
            storage,
            self._fsm,
            options=NodeOptions(
                heartbeat_interval=raft.heartbeat_interval,
                election_timeout=raft.election_timeout,
                campaign_on_leader_loss=raft.campaign_on_leader_loss,
                snapshot_entries=raft.snapshot_entries,
                snapshot_bytes=raft.snapshot_bytes,
                snapshot_log_ratio=raft.snapshot_log_ratio,
                lazy_commit_delay=raft.lazy_commit_delay,
            ),
            host=raft.listen_host,
            port=raft.listen_port,
            peers={p.id: (p.host, p.port) for p in raft.peers if p.id != raft.node_id},
            server_ssl=server_context(tls) if tls else None,
            client_ssl=client_context(tls) if tls else None,
            on_role_change=self._role_changed,
            on_notice=self._heartbeats_received,
            consumers=self._consumed,
            advertise_address=raft.advertise_address,
        )

    def _consumed(self) -> bool:
        """Whether anything reads this member's applied commands as they come."""
        service = self._service
        return self._hub.watching or (service is not None and service.subscriptions > 0)

    async def wait_ready(self, within: float = 30.0) -> None:
        """Wait until a leader is known and this member applied everything committed so far."""
        node = self.node
        try:
            await node.read_index(within=within)
        except OperationTimeoutError:
            raise OperationTimeoutError(
                f"member {node.id} found no leader within {within} s: is a quorum of the "
                f"members {list(node.conf.voters)} running and reachable?"
            ) from None

    async def stop(self) -> None:
        """Transfer leadership if leading, stop the member, end watches. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._service is not None:  # first: clients move to other members meanwhile
            await self._service.close()
        if self._ops is not None:
            await self._ops.close()
        if self._duties is not None:
            self._duties.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._duties
        if self._node is not None:
            await self._node.stop()
        self._hub.close()

    async def health(self) -> BackendHealth:
        """Healthy while a leader is known and the member has not failed."""
        node = self._node
        if node is None or self._stopped:
            return BackendHealth(healthy=False, backend="raft", detail="not running")
        failure = node.failure
        return BackendHealth(
            healthy=failure is None and node.leader_id is not None,
            backend="raft",
            role=node.role,
            leader=node.leader_id,
            version=self._fsm.machine.state.version,
            detail=(
                f"member {node.id}, term {node.term}, commit {node.commit_index}, "
                f"applied {node.applied_index}" + (f", failed: {failure}" if failure else "")
            ),
        )

    # --- the CommandBackend primitives -----------------------------------------------------

    async def _execute(self, command: c.Command) -> Any:
        outcome: Outcome = await self.node.propose(encode_command(command))
        return outcome.unwrap()

    def _local_state(self) -> ClusterState:
        return self._fsm.machine.state

    async def _linearizable_state(self) -> ClusterState:
        await self.node.read_index()
        return self._fsm.machine.state

    async def heartbeat(self, node_id: str) -> None:
        """Record the heart-beat on the leader; a DOWN node is brought back ACTIVE."""
        check_name("node", node_id)
        node = self._fsm.machine.state.nodes.get(node_id)
        if node is None:
            raise NotFoundError(f"node {node_id!r} is not registered; register it first")
        await self.node.notify_leader(msgspec.msgpack.encode([node_id]))
        if node.status is NodeStatus.DOWN:
            await self._run(
                c.UpdateNodeStatus(node_id=node_id, status=NodeStatus.ACTIVE, time=self._stamp())
            )

    def watch(
        self, since: int | None = None, kinds: Collection[EventKind] | None = None
    ) -> EventStream:
        """Events applied on this member with version > ``since``, in order, exactly once."""
        return self._hub.watch(since, kinds)

    # --- leader duties -----------------------------------------------------------------------

    def _role_changed(self, leader: str | None, is_leader: bool) -> None:
        if is_leader:
            self._liveness.reset(self._clock())  # every node gets a full timeout
        _log.info("member %s: leader is now %s", self.config.raft.node_id, leader)

    def _heartbeats_received(self, payload: bytes) -> None:
        now = self._clock()
        for node_id in _heartbeats.decode(payload):
            self._liveness.beat(node_id, now)

    async def run_maintenance(self) -> None:
        """On the leader: mark silent nodes DOWN and reap expired locks."""
        node = self.node
        if not node.is_leader:
            return
        now = self._clock()
        state = self._fsm.machine.state
        down = self._liveness.expired(state, now)
        if down:
            await self._run(c.MarkNodesDown(node_ids=tuple(down), time=now))
        due = self._fsm.machine.next_lock_expiry()
        if due is not None and due <= now:
            await self._run(c.ExpireLocks(time=now))

    async def _duties_loop(self) -> None:
        while True:
            timeout = self._fsm.machine.state.config.node_timeout
            await asyncio.sleep(min(0.5, timeout / 4))
            try:
                await self.run_maintenance()
            except ClosedError:
                return
            except Exception as exc:  # the next round retries
                _log.warning("periodic duties failed: %s", exc)


def _open_storage(raft: RaftConfig, fsync: FsyncFn | None = None) -> DiskStorage:
    path = Path(raft.data_dir)
    # Refuse another member's (or cluster's) directory before opening it: opening recovers,
    # which may cut a torn tail or delete obsolete segments, i.e. write to it.
    found = load_identity(path / "identity")
    if found is not None and (found.cluster_id, found.member_id) != (
        raft.cluster_id,
        raft.node_id,
    ):
        raise IdentityMismatchError(
            f"{path} belongs to member {found.member_id!r} of cluster {found.cluster_id!r}, "
            f"not to member {raft.node_id!r} of cluster {raft.cluster_id!r}. Point this "
            f"member at its own data directory, or move this one aside to start afresh."
        )
    path.mkdir(parents=True, exist_ok=True)
    storage = DiskStorage(path, sync=raft.fsync, fsync=fsync)
    try:
        if storage.identity() is None:
            if raft.bootstrap:
                voters = tuple(sorted({p.id for p in raft.peers} | {raft.node_id}))
                addresses = tuple(sorted((p.id, p.address) for p in raft.peers))
                storage.write_identity(
                    raft.cluster_id, raft.node_id, ConfState(voters=voters, addresses=addresses)
                )
            else:
                storage.write_identity(raft.cluster_id, raft.node_id, None)
        else:
            storage.check_identity(raft.cluster_id, raft.node_id)
    except BaseException:
        storage.close()
        raise
    return storage


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tests and local clusters)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free a moment ago: the sockets are held open
    together (asking :func:`free_port` repeatedly may hand out the same port twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def local_cluster_configs(
    base_dir: str | os.PathLike[str], members: int = 3, **raft: Any
) -> list[Config]:
    """Configurations of a cluster of ``members`` on 127.0.0.1 with free ports (tests, demos)."""
    ids = [f"cp-{i + 1}" for i in range(members)]
    free = _free_ports(3 * members)
    ports = {i: (free[3 * n], free[3 * n + 1], free[3 * n + 2]) for n, i in enumerate(ids)}
    peers = tuple(Peer(id=i, address=f"127.0.0.1:{ports[i][0]}") for i in ids)
    return [
        Config(
            mode="raft",
            raft=RaftConfig(
                node_id=i,
                data_dir=str(Path(base_dir) / i),
                listen_port=ports[i][0],
                client_port=ports[i][1],
                http_port=ports[i][2],
                peers=peers,
                **raft,
            ),
        )
        for i in ids
    ]
