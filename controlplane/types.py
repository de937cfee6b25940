"""The immutable domain types of the control plane.

Every value a backend accepts or returns is a frozen ``msgspec.Struct``. Nested ``dict`` fields
(attributes, settings, mappings) are part of the value: treat them as read-only.
"""

from __future__ import annotations

import bisect
import enum
import functools
import hashlib
from typing import Any

import immutables
import msgspec

__all__ = [
    "BackendHealth",
    "ClientSession",
    "ClusterConfig",
    "ClusterEvent",
    "ClusterHealth",
    "ClusterState",
    "EventKind",
    "HashRing",
    "HealthStatus",
    "Index",
    "IndexHealth",
    "IndexSettings",
    "Lock",
    "Node",
    "NodeResources",
    "NodeRole",
    "NodeStatus",
    "SessionResult",
    "ShardCopy",
    "ShardRouting",
    "ShardState",
]


class NodeRole(enum.StrEnum):
    """What a node does in the data system."""

    MASTER = "master"
    DATA = "data"
    COORDINATING = "coordinating"


class NodeStatus(enum.StrEnum):
    """A node's lifecycle status. Only ``ACTIVE`` data nodes receive new shard copies."""

    ACTIVE = "active"
    DRAINING = "draining"
    """Still serving, but receives no new copies (use before a planned removal)."""
    DOWN = "down"
    """Missed heart-beats for ``node_timeout`` (or marked down); its copies were re-placed."""


class ShardState(enum.StrEnum):
    """The state of one copy of a shard, as Elasticsearch names them."""

    UNASSIGNED = "unassigned"
    INITIALIZING = "initializing"
    STARTED = "started"
    RELOCATING = "relocating"


class HealthStatus(enum.StrEnum):
    """Cluster health colours with Elasticsearch's meaning."""

    GREEN = "green"
    """Every shard copy is started."""
    YELLOW = "yellow"
    """Every primary is started; some replica is not."""
    RED = "red"
    """Some primary is not started."""


class NodeResources(msgspec.Struct, frozen=True, gc=False, kw_only=True, omit_defaults=True):
    """Capacity a node reports about itself."""

    cpu_cores: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0
    disk_available_bytes: int = 0


class Node(msgspec.Struct, frozen=True, gc=False, kw_only=True, omit_defaults=True):
    """A member of the data system (not necessarily a Raft member)."""

    id: str
    address: str = ""
    roles: frozenset[NodeRole] = frozenset({NodeRole.DATA})
    status: NodeStatus = NodeStatus.ACTIVE
    zone: str = ""
    """Failure domain; copies of one shard go to distinct zones when there are enough."""
    attributes: dict[str, str] = {}
    resources: NodeResources = NodeResources()
    registered_version: int = 0
    """State version at which the node was registered (set by the control plane)."""

    @property
    def is_data(self) -> bool:
        """Whether the node holds shard copies."""
        return NodeRole.DATA in self.roles


class IndexSettings(msgspec.Struct, frozen=True, gc=False, kw_only=True, omit_defaults=True):
    """Settings of an index. ``number_of_shards`` is fixed at creation."""

    number_of_shards: int = 1
    number_of_replicas: int = 1
    extra: dict[str, str | int | float | bool] = {}
    """Free-form settings the data system interprets (refresh interval, codec, ...)."""


class ShardCopy(msgspec.Struct, frozen=True, gc=False, kw_only=True, omit_defaults=True):
    """One copy (primary or replica) of a shard and where it lives."""

    primary: bool
    node_id: str | None = None
    state: ShardState = ShardState.UNASSIGNED
    relocating_to: str | None = None
    """While ``state`` is RELOCATING: the node the copy moves to."""


class ShardRouting(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """All copies of one shard: exactly one primary and ``number_of_replicas`` replicas."""

    shard: int
    copies: tuple[ShardCopy, ...]

    @property
    def primary(self) -> ShardCopy:
        """The primary copy."""
        return next(c for c in self.copies if c.primary)

    @property
    def replicas(self) -> tuple[ShardCopy, ...]:
        """The replica copies."""
        return tuple(c for c in self.copies if not c.primary)


class Index(msgspec.Struct, frozen=True, gc=False, kw_only=True, omit_defaults=True):
    """An index: its settings, mappings and routing table."""

    name: str
    settings: IndexSettings = IndexSettings()
    mappings: dict[str, Any] = {}
    routing: tuple[ShardRouting, ...] = ()
    created_version: int = 0
    updated_version: int = 0


class Lock(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """A held lock. ``token`` is a fencing token: it grows with every acquisition of the key.

    Pass the token to the resource the lock protects, and have it reject writes that carry a
    smaller token than one it has seen: a holder that lost its lock cannot then do damage.
    """

    key: str
    holder: str
    token: int
    ttl: float
    acquired_at: float
    expires_at: float
    """Replicated time (seconds since the epoch) at which the lock expires unless renewed."""


@functools.lru_cache(maxsize=16)
def _ring_points(nodes: tuple[str, ...], vnodes: int) -> tuple[list[int], list[str]]:
    points = sorted((_hash64(f"{node}#{i}"), node) for node in nodes for i in range(vnodes))
    return [p for p, _ in points], [n for _, n in points]


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """A consistent-hash ring: ``vnodes`` points per node, keys owned by the next points.

    Every node computes :meth:`owners` identically (BLAKE2b-64 of ``"<node>#<i>"`` and of the key).
    """

    nodes: tuple[str, ...] = ()
    vnodes: int = 64
    replication_factor: int = 3
    follow_membership: bool = True
    """When true, ``nodes`` is kept equal to the data nodes that are not DOWN."""
    version: int = 0
    """State version of the last change to the ring."""

    def owners(self, key: str | bytes, n: int | None = None) -> tuple[str, ...]:
        """The ``n`` (default: ``replication_factor``) distinct nodes owning ``key``, in order."""
        want = min(self.replication_factor if n is None else n, len(self.nodes))
        if want <= 0:
            return ()
        points, owners = _ring_points(self.nodes, self.vnodes)
        raw = key.decode() if isinstance(key, bytes) else key
        i = bisect.bisect_right(points, _hash64(raw))
        found: list[str] = []
        for step in range(len(points)):
            node = owners[(i + step) % len(points)]
            if node not in found:
                found.append(node)
                if len(found) == want:
                    break
        return tuple(found)


class ClusterConfig(msgspec.Struct, frozen=True, gc=False, kw_only=True, omit_defaults=True):
    """Cluster-wide configuration, replicated like everything else."""

    node_timeout: float = 10.0
    """Seconds without a heart-beat after which a node is marked DOWN."""
    max_lock_ttl: float = 3600.0
    """Upper bound on a lock's TTL, in seconds."""
    auto_allocate: bool = True
    """Whether the control plane places unassigned shard copies by itself."""
    settings: dict[str, str | int | float | bool] = {}
    """Free-form settings of the data system."""
    session_ttl: float = 3600.0
    """Seconds after its last write that a client's retry-deduplication session is dropped."""
    version: int = 0
    """State version of the last change (set by the control plane; used for compare-and-set)."""


class SessionResult(msgspec.Struct, frozen=True, gc=False, kw_only=True, array_like=True):
    """The recorded outcome of one client request, returned again if the request is retried."""

    version: int
    value: bytes = b""
    """The command's value, msgpack-encoded (see ``controlplane.codec.encode_value``)."""


class ClientSession(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """A client's recent writes, so that a retried request is applied at most once.

    ``results`` holds the outcome of each request the client has not yet acknowledged
    receiving; every sequence number up to ``acked`` has been acknowledged and is refused.
    """

    client_id: str
    acked: int = 0
    results: dict[int, SessionResult] = {}
    last_seen: float = 0.0
    """Replicated time of the client's last write."""


class ClusterState(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """The whole cluster state at one ``version``. Taking it is O(1); it never changes."""

    version: int = 0
    now: float = 0.0
    """Replicated time: the largest command timestamp applied so far (seconds since the epoch)."""
    nodes: immutables.Map[str, Node] = immutables.Map()
    indices: immutables.Map[str, Index] = immutables.Map()
    locks: immutables.Map[str, Lock] = immutables.Map()
    hash_ring: HashRing = HashRing()
    config: ClusterConfig = ClusterConfig()
    feature_flags: immutables.Map[str, bool] = immutables.Map()
    sessions: immutables.Map[str, ClientSession] = immutables.Map()
    """Retry-deduplication sessions of network clients (internal bookkeeping)."""


class EventKind(enum.StrEnum):
    """What a :class:`ClusterEvent` reports."""

    NODE_JOINED = "node_joined"
    NODE_LEFT = "node_left"
    NODE_UPDATED = "node_updated"
    NODE_DOWN = "node_down"
    INDEX_CREATED = "index_created"
    INDEX_UPDATED = "index_updated"
    INDEX_DELETED = "index_deleted"
    SHARD_ALLOCATED = "shard_allocated"
    SHARD_STARTED = "shard_started"
    SHARD_RELOCATED = "shard_relocated"
    SHARD_PROMOTED = "shard_promoted"
    SHARD_UNASSIGNED = "shard_unassigned"
    LOCK_ACQUIRED = "lock_acquired"
    LOCK_RENEWED = "lock_renewed"
    LOCK_RELEASED = "lock_released"
    LOCK_EXPIRED = "lock_expired"
    RING_UPDATED = "ring_updated"
    CONFIG_CHANGED = "config_changed"
    FLAG_CHANGED = "flag_changed"
    STATE_RESTORED = "state_restored"
    """The whole state was replaced (import or restore): re-read it."""


class ClusterEvent(msgspec.Struct, frozen=True, gc=False, kw_only=True, omit_defaults=True):
    """One change to the cluster state. All events of one mutation share its ``version``.

    ``key`` names what changed (node id, index name, lock key, flag name; empty for the ring
    and the configuration); the field matching the kind carries the new value (for deletions
    and releases: the last value).
    """

    version: int
    kind: EventKind
    key: str = ""
    node: Node | None = None
    index: Index | None = None
    shard: int | None = None
    copy: ShardCopy | None = None
    lock: Lock | None = None
    ring: HashRing | None = None
    config: ClusterConfig | None = None
    enabled: bool | None = None


class IndexHealth(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """Health of one index."""

    status: HealthStatus
    active_primary_shards: int
    active_shards: int
    initializing_shards: int
    relocating_shards: int
    unassigned_shards: int


class ClusterHealth(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """Cluster health with Elasticsearch's colours and counts."""

    status: HealthStatus
    version: int
    number_of_nodes: int
    number_of_data_nodes: int
    active_primary_shards: int
    active_shards: int
    initializing_shards: int
    relocating_shards: int
    unassigned_shards: int
    indices: dict[str, IndexHealth] = {}


class BackendHealth(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """Health of a backend instance (not of the data cluster): can it serve?"""

    healthy: bool
    backend: str
    role: str = ""
    """``leader``, ``follower``, ``client``, ``standalone``, ... as the backend defines it."""
    leader: str | None = None
    version: int = 0
    detail: str = ""
