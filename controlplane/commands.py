"""Commands of the shared state machine: a ``msgspec`` tagged union, encoded as msgpack arrays.

A backend validates a command with :func:`validate` before it proposes or writes it, so bad
input never reaches the replicated state; the state machine validates again when it applies.
Every command carries ``time``: the proposer's wall clock in seconds since the epoch (DESIGN 3.2).
Fields are only ever appended, with defaults.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import InvalidRequestError
from .types import ClusterConfig, ClusterState, IndexSettings, Node, NodeStatus, ShardState
from .validation import (
    check_flag_name,
    check_holder,
    check_lock_key,
    check_name,
    check_positive,
    coerce_settings,
)

__all__ = [
    "AcquireLock",
    "AllocateShard",
    "Command",
    "CreateIndex",
    "DeallocateShard",
    "DeleteIndex",
    "ExpireLocks",
    "MarkNodesDown",
    "RegisterNode",
    "ReleaseLock",
    "RenewLock",
    "RestoreState",
    "SetClusterConfig",
    "SetFeatureFlag",
    "UnregisterNode",
    "UpdateHashRing",
    "UpdateIndexSettings",
    "UpdateNodeStatus",
    "UpdateShardState",
    "validate",
]


class _Command(msgspec.Struct, frozen=True, kw_only=True, tag=True, array_like=True):
    time: float = 0.0


class RegisterNode(_Command, frozen=True):
    """Register a node, or update a registered one (re-registration is idempotent)."""

    node: Node


class UnregisterNode(_Command, frozen=True):
    """Remove a node; its shard copies are re-placed."""

    node_id: str


class UpdateNodeStatus(_Command, frozen=True):
    """Set a node's status (ACTIVE, DRAINING, DOWN)."""

    node_id: str
    status: NodeStatus


class MarkNodesDown(_Command, frozen=True):
    """Mark nodes whose heart-beats stopped as DOWN (proposed by the liveness checker)."""

    node_ids: tuple[str, ...]


class CreateIndex(_Command, frozen=True):
    """Create an index and allocate its shards."""

    name: str
    settings: IndexSettings = IndexSettings()
    mappings: dict[str, Any] = {}


class DeleteIndex(_Command, frozen=True):
    """Delete an index and its routing."""

    name: str


class UpdateIndexSettings(_Command, frozen=True):
    """Change an index's settings (replica count, extra settings; not the shard count)."""

    name: str
    settings: IndexSettings


class AllocateShard(_Command, frozen=True):
    """Place an unassigned copy of a shard on a node, or move (``from_node``) a started one."""

    index: str
    shard: int
    node_id: str
    from_node: str | None = None


class DeallocateShard(_Command, frozen=True):
    """Take a shard copy off a node; the allocator places it elsewhere."""

    index: str
    shard: int
    node_id: str


class UpdateShardState(_Command, frozen=True):
    """A data node reports a copy STARTED, or failed (UNASSIGNED)."""

    index: str
    shard: int
    node_id: str
    state: ShardState


class AcquireLock(_Command, frozen=True):
    """Take a lock for ``ttl`` seconds of replicated time."""

    key: str
    holder: str
    ttl: float


class RenewLock(_Command, frozen=True):
    """Extend a held lock by ``ttl`` seconds (default: its original TTL) from now."""

    key: str
    holder: str
    token: int
    ttl: float | None = None


class ReleaseLock(_Command, frozen=True):
    """Release a held lock."""

    key: str
    holder: str
    token: int


class ExpireLocks(_Command, frozen=True):
    """Release every lock whose TTL elapsed by this command's time (proposed by the leader)."""


class UpdateHashRing(_Command, frozen=True):
    """Change the hash ring; fields left ``None`` keep their value."""

    nodes: tuple[str, ...] | None = None
    vnodes: int | None = None
    replication_factor: int | None = None
    follow_membership: bool | None = None


class SetClusterConfig(_Command, frozen=True):
    """Replace the cluster configuration, if its version is still ``expected_version``."""

    config: ClusterConfig
    expected_version: int | None = None


class SetFeatureFlag(_Command, frozen=True):
    """Turn a feature flag on or off."""

    name: str
    enabled: bool


class RestoreState(_Command, frozen=True):
    """Replace the whole state (import from another backend, restore of a backup)."""

    state: ClusterState


Command = (
    RegisterNode
    | UnregisterNode
    | UpdateNodeStatus
    | MarkNodesDown
    | CreateIndex
    | DeleteIndex
    | UpdateIndexSettings
    | AllocateShard
    | DeallocateShard
    | UpdateShardState
    | AcquireLock
    | RenewLock
    | ReleaseLock
    | ExpireLocks
    | UpdateHashRing
    | SetClusterConfig
    | SetFeatureFlag
    | RestoreState
)


def _shard(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"shard must be a non-negative integer, got {value!r}")
    return value


def validate(command: Command) -> Command:
    """Check what can be checked without the state; raise ``InvalidRequestError`` if bad."""
    match command:
        case RegisterNode(node=node):
            check_name("node", node.id)
            if node.zone:
                check_name("zone", node.zone)
        case UnregisterNode(node_id=node_id) | UpdateNodeStatus(node_id=node_id):
            check_name("node", node_id)
        case MarkNodesDown(node_ids=ids):
            for node_id in ids:
                check_name("node", node_id)
        case CreateIndex(name=name, settings=settings):
            check_name("index", name)
            coerce_settings(settings)
        case UpdateIndexSettings(name=name, settings=settings):
            check_name("index", name)
            coerce_settings(settings)
        case DeleteIndex(name=name):
            check_name("index", name)
        case AllocateShard(index=index, shard=shard, node_id=node_id, from_node=from_node):
            check_name("index", index)
            _shard(shard)
            check_name("node", node_id)
            if from_node is not None:
                check_name("node", from_node)
        case DeallocateShard(index=index, shard=shard, node_id=node_id):
            check_name("index", index)
            _shard(shard)
            check_name("node", node_id)
        case UpdateShardState(index=index, shard=shard, node_id=node_id, state=state):
            check_name("index", index)
            _shard(shard)
            check_name("node", node_id)
            if state not in (ShardState.STARTED, ShardState.UNASSIGNED):
                raise InvalidRequestError(
                    f"a data node may report a copy STARTED or failed (UNASSIGNED), not {state}"
                )
        case AcquireLock(key=key, holder=holder, ttl=ttl):
            check_lock_key(key)
            check_holder(holder)
            check_positive("lock ttl", ttl)
        case RenewLock(key=key, holder=holder, ttl=ttl):
            check_lock_key(key)
            check_holder(holder)
            if ttl is not None:
                check_positive("lock ttl", ttl)
        case ReleaseLock(key=key, holder=holder):
            check_lock_key(key)
            check_holder(holder)
        case UpdateHashRing(nodes=nodes, vnodes=vnodes, replication_factor=rf):
            for node_id in nodes or ():
                check_name("node", node_id)
            if nodes is not None and len(set(nodes)) != len(nodes):
                raise InvalidRequestError("hash ring nodes must be distinct")
            if vnodes is not None and not 1 <= vnodes <= 4096:
                raise InvalidRequestError(f"vnodes must be from 1 to 4096, got {vnodes}")
            if rf is not None and not 1 <= rf <= 16:
                raise InvalidRequestError(f"replication_factor must be from 1 to 16, got {rf}")
        case SetClusterConfig(config=config):
            check_positive("config.node_timeout", config.node_timeout)
            check_positive("config.max_lock_ttl", config.max_lock_ttl)
            for key in config.settings:
                check_flag_name(key)
        case SetFeatureFlag(name=name):
            check_flag_name(name)
        case ExpireLocks() | RestoreState():
            pass
    return command
