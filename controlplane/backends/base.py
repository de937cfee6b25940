"""The part of ``ControlPlane`` shared by backends built on the replicated state machine.

The memory backend, the Raft member and the Raft client all turn each call into one
:mod:`~controlplane.commands` command and read from a local :class:`ClusterState`. This base
class does that translation once; a backend supplies how a command is executed
(:meth:`_execute`), how the local state is read, heart-beats and watches.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Self

from .. import commands as c
from ..errors import NotFoundError
from ..health import cluster_health
from ..locking import hold_lock
from ..types import (
    BackendHealth,
    ClusterConfig,
    ClusterHealth,
    ClusterState,
    EventKind,
    HashRing,
    Index,
    IndexSettings,
    Lock,
    Node,
    NodeStatus,
    ShardRouting,
    ShardState,
)
from ..validation import check_lock_key, check_name, coerce_settings
from ..watch import EventStream

__all__ = ["CommandBackend"]


class CommandBackend(abc.ABC):
    """Implements the ``ControlPlane`` operations in terms of commands and a local state."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock: Callable[[], float] = clock or time.time

    # --- what a backend provides -----------------------------------------------------------

    @abc.abstractmethod
    async def _execute(self, command: c.Command) -> Any:
        """Commit ``command`` (already validated and time-stamped); return its value or raise."""

    @abc.abstractmethod
    def _local_state(self) -> ClusterState:
        """The newest state this instance has applied (O(1))."""

    @abc.abstractmethod
    async def _linearizable_state(self) -> ClusterState:
        """A state that reflects every write completed before this call started."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the backend."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the backend."""

    @abc.abstractmethod
    async def health(self) -> BackendHealth:
        """This instance's health."""

    @abc.abstractmethod
    async def heartbeat(self, node_id: str) -> None:
        """Report a node alive."""

    @abc.abstractmethod
    def watch(
        self, since: int | None = None, kinds: Collection[EventKind] | None = None
    ) -> EventStream:
        """Stream events."""

    # --- shared implementation -------------------------------------------------------------

    async def _run(self, command: c.Command) -> Any:
        c.validate(command)
        return await self._execute(command)

    def _stamp(self) -> float:
        return self._clock()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def is_healthy(self) -> bool:
        """Whether this instance can serve requests now."""
        return (await self.health()).healthy

    async def create_index(
        self,
        name: str,
        settings: IndexSettings | Mapping[str, Any] | None = None,
        mappings: Mapping[str, Any] | None = None,
    ) -> Index:
        """Create an index and allocate its shards."""
        raw = dict(settings) if isinstance(settings, Mapping) else settings
        command = c.CreateIndex(
            name=name,
            settings=coerce_settings(raw),
            mappings=dict(mappings or {}),
            time=self._stamp(),
        )
        index: Index = await self._run(command)
        return index

    async def get_index(self, name: str) -> Index:
        """The index named ``name``."""
        check_name("index", name)
        index = self._local_state().indices.get(name)
        if index is None:
            raise NotFoundError(f"index {name!r} does not exist")
        return index

    async def list_indices(self) -> list[Index]:
        """Every index, sorted by name."""
        indices = self._local_state().indices
        return [indices[name] for name in sorted(indices.keys())]

    async def delete_index(self, name: str) -> None:
        """Delete an index."""
        await self._run(c.DeleteIndex(name=name, time=self._stamp()))

    async def update_index_settings(
        self, name: str, settings: IndexSettings | Mapping[str, Any]
    ) -> Index:
        """Change replicas or extra settings."""
        if isinstance(settings, Mapping):
            command = c.UpdateIndexSettings(name=name, patch=dict(settings), time=self._stamp())
        else:
            command = c.UpdateIndexSettings(
                name=name, settings=coerce_settings(settings), time=self._stamp()
            )
        index: Index = await self._run(command)
        return index

    async def get_cluster_state(self, consistent: bool = False) -> ClusterState:
        """The whole state at one version."""
        if consistent:
            return await self._linearizable_state()
        return self._local_state()

    async def get_cluster_health(self) -> ClusterHealth:
        """Green, yellow or red with counts."""
        return cluster_health(self._local_state())

    async def register_node(self, node: Node) -> Node:
        """Register or update a node."""
        stored: Node = await self._run(c.RegisterNode(node=node, time=self._stamp()))
        return stored

    async def unregister_node(self, node_id: str) -> None:
        """Remove a node."""
        await self._run(c.UnregisterNode(node_id=node_id, time=self._stamp()))

    async def get_node(self, node_id: str) -> Node:
        """The node ``node_id``."""
        check_name("node", node_id)
        node = self._local_state().nodes.get(node_id)
        if node is None:
            raise NotFoundError(f"node {node_id!r} is not registered")
        return node

    async def list_nodes(self) -> list[Node]:
        """Every node, sorted by id."""
        nodes = self._local_state().nodes
        return [nodes[node_id] for node_id in sorted(nodes.keys())]

    async def update_node_status(self, node_id: str, status: NodeStatus) -> Node:
        """Set a node's status."""
        command = c.UpdateNodeStatus(node_id=node_id, status=NodeStatus(status), time=self._stamp())
        node: Node = await self._run(command)
        return node

    async def allocate_shard(
        self, index: str, shard: int, node_id: str, *, from_node: str | None = None
    ) -> ShardRouting:
        """Place or move a shard copy."""
        command = c.AllocateShard(
            index=index, shard=shard, node_id=node_id, from_node=from_node, time=self._stamp()
        )
        routing: ShardRouting = await self._run(command)
        return routing

    async def deallocate_shard(self, index: str, shard: int, node_id: str) -> ShardRouting:
        """Take a copy off a node."""
        command = c.DeallocateShard(index=index, shard=shard, node_id=node_id, time=self._stamp())
        routing: ShardRouting = await self._run(command)
        return routing

    async def get_shard_routing(self, index: str) -> tuple[ShardRouting, ...]:
        """The routing table of an index."""
        return (await self.get_index(index)).routing

    async def update_shard_state(
        self, index: str, shard: int, node_id: str, state: ShardState
    ) -> ShardRouting:
        """Report a copy STARTED or failed."""
        command = c.UpdateShardState(
            index=index, shard=shard, node_id=node_id, state=ShardState(state), time=self._stamp()
        )
        routing: ShardRouting = await self._run(command)
        return routing

    async def acquire_lock(self, key: str, holder: str, ttl: float) -> Lock:
        """Take a lock."""
        lock: Lock = await self._run(
            c.AcquireLock(key=key, holder=holder, ttl=ttl, time=self._stamp())
        )
        return lock

    async def renew_lock(self, key: str, holder: str, token: int, ttl: float | None = None) -> Lock:
        """Extend a held lock."""
        command = c.RenewLock(key=key, holder=holder, token=token, ttl=ttl, time=self._stamp())
        lock: Lock = await self._run(command)
        return lock

    async def release_lock(self, key: str, holder: str, token: int) -> None:
        """Release a held lock."""
        await self._run(c.ReleaseLock(key=key, holder=holder, token=token, time=self._stamp()))

    async def get_lock(self, key: str) -> Lock:
        """The current holder of ``key``."""
        check_lock_key(key)
        state = self._local_state()
        lock = state.locks.get(key)
        if lock is None or lock.expires_at <= max(state.now, self._clock()):
            raise NotFoundError(f"lock {key!r} is not held")
        return lock

    def lock(
        self, key: str, *, ttl: float, holder: str | None = None, wait: float | None = None
    ) -> AbstractAsyncContextManager[Lock]:
        """Hold ``key`` for the duration of an ``async with`` block, renewing it meanwhile."""
        return hold_lock(self, key, ttl=ttl, holder=holder, wait=wait)

    async def get_hash_ring(self) -> HashRing:
        """The current hash ring."""
        return self._local_state().hash_ring

    async def update_hash_ring(
        self,
        *,
        nodes: Collection[str] | None = None,
        vnodes: int | None = None,
        replication_factor: int | None = None,
        follow_membership: bool | None = None,
    ) -> HashRing:
        """Change the ring."""
        command = c.UpdateHashRing(
            nodes=None if nodes is None else tuple(nodes),
            vnodes=vnodes,
            replication_factor=replication_factor,
            follow_membership=follow_membership,
            time=self._stamp(),
        )
        ring: HashRing = await self._run(command)
        return ring

    async def get_cluster_config(self) -> ClusterConfig:
        """The cluster configuration."""
        return self._local_state().config

    async def set_cluster_config(
        self, config: ClusterConfig, *, expected_version: int | None = None
    ) -> ClusterConfig:
        """Replace the configuration (compare-and-set on ``expected_version``)."""
        command = c.SetClusterConfig(
            config=config, expected_version=expected_version, time=self._stamp()
        )
        stored: ClusterConfig = await self._run(command)
        return stored

    async def get_feature_flags(self) -> dict[str, bool]:
        """Every feature flag that was set."""
        return dict(self._local_state().feature_flags.items())

    async def set_feature_flag(self, name: str, enabled: bool) -> None:
        """Turn a feature flag on or off."""
        await self._run(c.SetFeatureFlag(name=name, enabled=bool(enabled), time=self._stamp()))

    async def restore_state(self, state: ClusterState) -> None:
        """Replace the whole state (import from another backend, restore of a backup)."""
        await self._run(c.RestoreState(state=state, time=self._stamp()))
