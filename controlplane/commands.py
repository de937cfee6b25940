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
    merge_settings,
)

__all__ = [
    "AcquireLock",
    "AllocateShard",
    "ClientCommand",
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


class _Command(msgspec.Struct, frozen=True, gc=False, kw_only=True, tag=True, array_like=True):
    time: float = 0.0

    def check(self) -> None:
        """Raise ``InvalidRequestError`` if a field is invalid (without looking at the state)."""


class RegisterNode(_Command, frozen=True):
    """Register a node, or update a registered one (re-registration is idempotent)."""

    node: Node

    def check(self) -> None:
        check_name("node", self.node.id)
        if self.node.zone:
            check_name("zone", self.node.zone)


class UnregisterNode(_Command, frozen=True):
    """Remove a node; its shard copies are re-placed."""

    node_id: str

    def check(self) -> None:
        check_name("node", self.node_id)


class UpdateNodeStatus(_Command, frozen=True):
    """Set a node's status (ACTIVE, DRAINING, DOWN)."""

    node_id: str
    status: NodeStatus

    def check(self) -> None:
        check_name("node", self.node_id)


class MarkNodesDown(_Command, frozen=True):
    """Mark nodes whose heart-beats stopped as DOWN (proposed by the liveness checker)."""

    node_ids: tuple[str, ...]

    def check(self) -> None:
        for node_id in self.node_ids:
            check_name("node", node_id)


class CreateIndex(_Command, frozen=True):
    """Create an index and allocate its shards."""

    name: str
    settings: IndexSettings = IndexSettings()
    mappings: dict[str, Any] = {}

    def check(self) -> None:
        check_name("index", self.name)
        coerce_settings(self.settings)


class DeleteIndex(_Command, frozen=True):
    """Delete an index and its routing."""

    name: str

    def check(self) -> None:
        check_name("index", self.name)


class UpdateIndexSettings(_Command, frozen=True):
    """Change an index's settings (replica count, extra settings; not the shard count).

    Either ``settings`` replaces them all, or ``patch`` changes only the keys it names.
    """

    name: str
    settings: IndexSettings | None = None
    patch: dict[str, Any] | None = None

    def check(self) -> None:
        check_name("index", self.name)
        if (self.settings is None) == (self.patch is None):
            raise InvalidRequestError("give either settings or a patch of settings")
        if self.settings is not None:
            coerce_settings(self.settings)
        else:
            merge_settings(IndexSettings(), self.patch or {})


class AllocateShard(_Command, frozen=True):
    """Place an unassigned copy of a shard on a node, or move (``from_node``) a started one."""

    index: str
    shard: int
    node_id: str
    from_node: str | None = None

    def check(self) -> None:
        _check_copy(self.index, self.shard, self.node_id)
        if self.from_node is not None:
            check_name("node", self.from_node)


class DeallocateShard(_Command, frozen=True):
    """Take a shard copy off a node; the allocator places it elsewhere."""

    index: str
    shard: int
    node_id: str

    def check(self) -> None:
        _check_copy(self.index, self.shard, self.node_id)


class UpdateShardState(_Command, frozen=True):
    """A data node reports a copy STARTED, or failed (UNASSIGNED)."""

    index: str
    shard: int
    node_id: str
    state: ShardState

    def check(self) -> None:
        _check_copy(self.index, self.shard, self.node_id)
        if self.state not in (ShardState.STARTED, ShardState.UNASSIGNED):
            raise InvalidRequestError(
                f"a data node may report a copy STARTED or failed (UNASSIGNED), not {self.state}"
            )


class AcquireLock(_Command, frozen=True):
    """Take a lock for ``ttl`` seconds of replicated time."""

    key: str
    holder: str
    ttl: float

    def check(self) -> None:
        check_lock_key(self.key)
        check_holder(self.holder)
        check_positive("lock ttl", self.ttl)


class RenewLock(_Command, frozen=True):
    """Extend a held lock by ``ttl`` seconds (default: its original TTL) from now."""

    key: str
    holder: str
    token: int
    ttl: float | None = None

    def check(self) -> None:
        check_lock_key(self.key)
        check_holder(self.holder)
        if self.ttl is not None:
            check_positive("lock ttl", self.ttl)


class ReleaseLock(_Command, frozen=True):
    """Release a held lock."""

    key: str
    holder: str
    token: int

    def check(self) -> None:
        check_lock_key(self.key)
        check_holder(self.holder)


class ExpireLocks(_Command, frozen=True):
    """Release every lock whose TTL elapsed by this command's time (proposed by the leader)."""


class UpdateHashRing(_Command, frozen=True):
    """Change the hash ring; fields left ``None`` keep their value."""

    nodes: tuple[str, ...] | None = None
    vnodes: int | None = None
    replication_factor: int | None = None
    follow_membership: bool | None = None

    def check(self) -> None:
        nodes, vnodes, rf = self.nodes, self.vnodes, self.replication_factor
        for node_id in nodes or ():
            check_name("node", node_id)
        if nodes is not None and len(set(nodes)) != len(nodes):
            raise InvalidRequestError("hash ring nodes must be distinct")
        if vnodes is not None and not 1 <= vnodes <= 4096:
            raise InvalidRequestError(f"vnodes must be from 1 to 4096, got {vnodes}")
        if rf is not None and not 1 <= rf <= 16:
            raise InvalidRequestError(f"replication_factor must be from 1 to 16, got {rf}")


class SetClusterConfig(_Command, frozen=True):
    """Replace the cluster configuration, if its version is still ``expected_version``."""

    config: ClusterConfig
    expected_version: int | None = None

    def check(self) -> None:
        check_positive("config.node_timeout", self.config.node_timeout)
        check_positive("config.max_lock_ttl", self.config.max_lock_ttl)
        for key in self.config.settings:
            check_flag_name(key)


class SetFeatureFlag(_Command, frozen=True):
    """Turn a feature flag on or off."""

    name: str
    enabled: bool

    def check(self) -> None:
        check_flag_name(self.name)


class RestoreState(_Command, frozen=True):
    """Replace the whole state (import from another backend, restore of a backup)."""

    state: ClusterState


class ClientCommand(_Command, frozen=True):
    """``command`` sent by network client ``client_id`` as its request ``seq``.

    Applied at most once however often it is retried: a repeat returns the recorded result.
    ``ack``: the client received the results of every request up to this one.
    """

    client_id: str
    seq: int
    command: Command
    ack: int = 0

    def check(self) -> None:
        check_holder(self.client_id)
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 1:
            raise InvalidRequestError(f"request seq must be a positive integer, got {self.seq!r}")
        if not 0 <= self.ack < self.seq:
            raise InvalidRequestError(f"ack must be from 0 to seq - 1, got {self.ack!r}")
        if isinstance(self.command, ClientCommand):
            raise InvalidRequestError("a client command cannot wrap another one")
        self.command.check()


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
    | ClientCommand
)


def _check_copy(index: str, shard: int, node_id: str) -> None:
    check_name("index", index)
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise InvalidRequestError(f"shard must be a non-negative integer, got {shard!r}")
    check_name("node", node_id)


def validate(command: Command) -> Command:
    """Check what can be checked without the state; raise ``InvalidRequestError`` if bad."""
    command.check()
    return command
