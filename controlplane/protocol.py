"""The ``ControlPlane`` protocol: the one interface coordination and data nodes program against.

Every backend (memory, raft member, raft client, k8s) implements it; ``controlplane.testing``
checks that they behave the same. Errors come from :mod:`controlplane.errors` only.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from .types import (
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
from .watch import EventStream

__all__ = ["ControlPlane"]


@runtime_checkable
class ControlPlane(Protocol):
    """A strongly consistent control plane for a distributed data system.

    Every mutation produces exactly one new state ``version``; every method that mutates
    returns only after the change is committed (and, for Raft, applied), so a read that
    follows sees it. Writes are linearizable; ``get_cluster_state(consistent=False)`` and the
    other getters read the local replica or cache and may lag behind by a few versions.
    """

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the backend; returns once it can serve requests."""

    async def stop(self) -> None:
        """Stop the backend: end watches with ``ClosedError``, release resources. Idempotent."""

    async def __aenter__(self) -> Self:
        """Start, and stop on exit."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the backend."""

    async def is_healthy(self) -> bool:
        """Whether this instance can serve requests now."""

    async def health(self) -> BackendHealth:
        """This instance's health: role, leader, applied version."""

    # --- indices ------------------------------------------------------------------------------
    async def create_index(
        self,
        name: str,
        settings: IndexSettings | Mapping[str, Any] | None = None,
        mappings: Mapping[str, Any] | None = None,
    ) -> Index:
        """Create an index and allocate its shards; ``AlreadyExistsError`` if the name is taken."""

    async def get_index(self, name: str) -> Index:
        """The index named ``name``; ``NotFoundError`` if there is none."""

    async def list_indices(self) -> list[Index]:
        """Every index, sorted by name."""

    async def delete_index(self, name: str) -> None:
        """Delete an index; ``NotFoundError`` if there is none."""

    async def update_index_settings(
        self, name: str, settings: IndexSettings | Mapping[str, Any]
    ) -> Index:
        """Change replicas or extra settings (the shard count is fixed at creation).

        ``IndexSettings`` replaces the settings; a mapping changes only the keys it names
        (``None`` removes an extra setting).
        """

    # --- cluster ------------------------------------------------------------------------------
    async def get_cluster_state(self, consistent: bool = False) -> ClusterState:
        """The whole state at one version: local (fast) or linearizable (``consistent=True``)."""

    async def get_cluster_health(self) -> ClusterHealth:
        """Green, yellow or red with shard counts, as Elasticsearch defines them."""

    # --- nodes --------------------------------------------------------------------------------
    async def register_node(self, node: Node) -> Node:
        """Register a node, or update it if registered (idempotent); returns the stored node."""

    async def unregister_node(self, node_id: str) -> None:
        """Remove a node; its shard copies are re-placed. ``NotFoundError`` if unknown."""

    async def get_node(self, node_id: str) -> Node:
        """The node ``node_id``; ``NotFoundError`` if unknown."""

    async def list_nodes(self) -> list[Node]:
        """Every registered node, sorted by id."""

    async def update_node_status(self, node_id: str, status: NodeStatus) -> Node:
        """Set a node's status (DRAINING before a planned removal, ACTIVE, DOWN)."""

    async def heartbeat(self, node_id: str) -> None:
        """Report ``node_id`` alive. Cheap: only DOWN -> ACTIVE transitions are written."""

    # --- shards -------------------------------------------------------------------------------
    async def allocate_shard(
        self, index: str, shard: int, node_id: str, *, from_node: str | None = None
    ) -> ShardRouting:
        """Place an unassigned copy of a shard on ``node_id``, or move the copy on ``from_node``."""

    async def deallocate_shard(self, index: str, shard: int, node_id: str) -> ShardRouting:
        """Take the copy off ``node_id``; the allocator places it elsewhere."""

    async def get_shard_routing(self, index: str) -> tuple[ShardRouting, ...]:
        """The routing table of an index: one entry per shard."""

    async def update_shard_state(
        self, index: str, shard: int, node_id: str, state: ShardState
    ) -> ShardRouting:
        """A data node reports its copy STARTED, or failed (UNASSIGNED)."""

    # --- locks --------------------------------------------------------------------------------
    async def acquire_lock(self, key: str, holder: str, ttl: float) -> Lock:
        """Take ``key`` for ``ttl`` seconds; ``LockHeldError`` if someone holds it."""

    async def renew_lock(self, key: str, holder: str, token: int, ttl: float | None = None) -> Lock:
        """Extend a held lock; ``LockNotHeldError`` if it expired or was taken by someone else."""

    async def release_lock(self, key: str, holder: str, token: int) -> None:
        """Release a held lock; ``LockNotHeldError`` if it is not held with this token."""

    async def get_lock(self, key: str) -> Lock:
        """The current holder of ``key``; ``NotFoundError`` if it is free."""

    def lock(
        self, key: str, *, ttl: float, holder: str | None = None, wait: float | None = None
    ) -> AbstractAsyncContextManager[Lock]:
        """Hold ``key`` for the duration of an ``async with`` block, renewing it meanwhile.

        If the lock is lost (renewal failed), the block is cancelled and ``LockLostError`` is
        raised from the ``async with``. ``wait`` retries while the lock is held by someone else.
        """

    # --- hash ring ----------------------------------------------------------------------------
    async def get_hash_ring(self) -> HashRing:
        """The current hash ring; ``ring.owners(key)`` is computed locally."""

    async def update_hash_ring(
        self,
        *,
        nodes: Collection[str] | None = None,
        vnodes: int | None = None,
        replication_factor: int | None = None,
        follow_membership: bool | None = None,
    ) -> HashRing:
        """Change the ring; setting ``nodes`` turns off ``follow_membership``."""

    # --- configuration ------------------------------------------------------------------------
    async def get_cluster_config(self) -> ClusterConfig:
        """The cluster configuration."""

    async def set_cluster_config(
        self, config: ClusterConfig, *, expected_version: int | None = None
    ) -> ClusterConfig:
        """Replace the configuration; ``ConflictError`` unless it is at ``expected_version``."""

    async def get_feature_flags(self) -> dict[str, bool]:
        """Every feature flag that was set."""

    async def set_feature_flag(self, name: str, enabled: bool) -> None:
        """Turn a feature flag on or off."""

    # --- watch --------------------------------------------------------------------------------
    def watch(
        self, since: int | None = None, kinds: Collection[EventKind] | None = None
    ) -> EventStream:
        """Events with version > ``since`` (default: from now on), in order, exactly once.

        ``CompactedError`` if ``since`` is older than the retained history; ``LaggedError``
        (with the version to resume from) if the consumer falls behind.
        """
