"""The shared, deterministic state machine (DESIGN 3): commands in, new state and events out.

:meth:`StateMachine.apply` is pure in the sense that matters for replication: the same state
and the same command give the same result, the same events and the same next state on every
replica. It does no I/O and reads no clock: time comes from the commands (DESIGN 3.2). Domain
errors are returned as values in :class:`Outcome`, never raised out of ``apply``.

The state is a frozen :class:`~controlplane.types.ClusterState` built on persistent maps, so
taking it is O(1) and a reader's copy never changes under it.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from typing import Any, NamedTuple

import immutables
import msgspec

from .allocator import Placement, ShardKey, eligible
from .codec import encode_value
from .commands import (
    AcquireLock,
    AllocateShard,
    ClientCommand,
    Command,
    CreateIndex,
    DeallocateShard,
    DeleteIndex,
    ExpireLocks,
    MarkNodesDown,
    RegisterNode,
    ReleaseLock,
    RenewLock,
    RestoreState,
    SetClusterConfig,
    SetFeatureFlag,
    UnregisterNode,
    UpdateHashRing,
    UpdateIndexSettings,
    UpdateNodeStatus,
    UpdateShardState,
    validate,
)
from .errors import (
    AlreadyExistsError,
    ConflictError,
    ControlPlaneError,
    InvalidRequestError,
    LockHeldError,
    LockNotHeldError,
    NotFoundError,
)
from .types import (
    ClientSession,
    ClusterEvent,
    ClusterState,
    EventKind,
    Index,
    Lock,
    Node,
    NodeStatus,
    SessionResult,
    ShardCopy,
    ShardRouting,
    ShardState,
)
from .validation import coerce_settings, merge_settings

__all__ = ["Outcome", "StateMachine"]

_replace = msgspec.structs.replace


class Outcome(NamedTuple):
    """What applying one command did."""

    version: int
    """The state version after the command (unchanged when it changed nothing)."""
    value: Any
    """The command's result: the stored node, index, lock, routing, ... or None."""
    error: ControlPlaneError | None
    """A domain error (not found, exists, conflict, ...); the state is then unchanged."""
    events: tuple[ClusterEvent, ...]
    """One or more events, all carrying ``version``, when the state changed."""

    def unwrap(self) -> Any:
        """The value, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.value


def _in_ring(node: Node) -> bool:
    return node.is_data and node.status is not NodeStatus.DOWN


def _ring_members(nodes: immutables.Map[str, Node]) -> tuple[str, ...]:
    return tuple(sorted(n.id for n in nodes.values() if _in_ring(n)))


class StateMachine:
    """Holds the current :class:`ClusterState` and applies commands to it."""

    _state: ClusterState

    def __init__(self, state: ClusterState | None = None) -> None:
        self._handlers: dict[type[Any], Callable[[Any], Any]] = {
            RegisterNode: self._register_node,
            UnregisterNode: self._unregister_node,
            UpdateNodeStatus: self._update_node_status,
            MarkNodesDown: self._mark_nodes_down,
            CreateIndex: self._create_index,
            DeleteIndex: self._delete_index,
            UpdateIndexSettings: self._update_index_settings,
            AllocateShard: self._allocate_shard,
            DeallocateShard: self._deallocate_shard,
            UpdateShardState: self._update_shard_state,
            AcquireLock: self._acquire_lock,
            RenewLock: self._renew_lock,
            ReleaseLock: self._release_lock,
            ExpireLocks: self._expire_locks,
            UpdateHashRing: self._update_hash_ring,
            SetClusterConfig: self._set_cluster_config,
            SetFeatureFlag: self._set_feature_flag,
            RestoreState: self._restore_state,
            ClientCommand: self._client_command,
        }
        self._load(state or ClusterState())

    MAX_SESSION_RESULTS = 4096
    """Unacknowledged results kept per client; older ones are dropped (and refused)."""

    @property
    def state(self) -> ClusterState:
        """The current state: O(1), immutable."""
        return self._state

    def next_lock_expiry(self) -> float | None:
        """Replicated time at which the next lock expires, if any lock is held."""
        return self._next_expiry(self._state.locks)

    def _next_expiry(self, locks: immutables.Map[str, Lock]) -> float | None:
        heap = self._expiry
        while heap:
            expires_at, key, token = heap[0]
            lock = locks.get(key)
            if lock is not None and lock.token == token and lock.expires_at == expires_at:
                return expires_at
            heapq.heappop(heap)  # released, renewed or already expired
        return None

    def apply(self, command: Command) -> Outcome:
        """Apply one command; return its outcome. Never raises for domain errors."""
        state = self._state
        self._now = max(state.now, command.time)
        self._version = state.version + 1
        self._events: list[ClusterEvent] = []
        self._changes: dict[str, Any] = {}
        try:
            validate(command)
            value = self._handlers[type(command)](command)
        except ControlPlaneError as exc:
            # Handlers check every precondition before they change anything.
            return Outcome(state.version, None, exc, ())
        if not self._events:
            return Outcome(state.version, value, None, ())
        self._state = _replace(state, version=self._version, now=self._now, **self._changes)
        return Outcome(self._version, value, None, tuple(self._events))

    # --- helpers -----------------------------------------------------------------------------

    def _load(self, state: ClusterState) -> None:
        self._state = state
        self._placement = Placement(state.nodes, state.indices.values())
        self._unassigned: set[str] = {
            idx.name for idx in state.indices.values() if _has_unassigned(idx)
        }
        self._expiry: list[tuple[float, str, int]] = [
            (lock.expires_at, lock.key, lock.token) for lock in state.locks.values()
        ]
        heapq.heapify(self._expiry)
        self._members: list[str] = list(_ring_members(state.nodes))
        # At least one entry per session, at or before its last_seen (see _expire_sessions).
        self._session_expiry = [(s.last_seen, s.client_id) for s in state.sessions.values()]
        heapq.heapify(self._session_expiry)

    def _emit(self, kind: EventKind, key: str = "", **fields: Any) -> None:
        self._events.append(ClusterEvent(version=self._version, kind=kind, key=key, **fields))

    def _get(self, field: str) -> Any:
        """A field of the state as this command has changed it so far."""
        return self._changes.get(field, getattr(self._state, field))

    def _node(self, node_id: str) -> Node:
        node: Node | None = self._get("nodes").get(node_id)
        if node is None:
            raise NotFoundError(f"node {node_id!r} is not registered")
        return node

    def _index(self, name: str) -> Index:
        index: Index | None = self._get("indices").get(name)
        if index is None:
            raise NotFoundError(f"index {name!r} does not exist")
        return index

    def _routing(self, index: Index, shard: int) -> ShardRouting:
        if shard >= len(index.routing):
            raise NotFoundError(
                f"index {index.name!r} has {len(index.routing)} shards; there is no shard {shard}"
            )
        return index.routing[shard]

    def _put_node(self, node: Node) -> None:
        self._changes["nodes"] = self._get("nodes").set(node.id, node)
        self._placement.node_changed(node)
        self._ring_member(node.id, _in_ring(node))

    def _ring_member(self, node_id: str, member: bool) -> None:
        """Keep ``self._members`` (sorted ids of the nodes in the ring) current: O(log n)
        to find, a memmove to insert, instead of sorting every node on each change."""
        members = self._members
        pos = bisect.bisect_left(members, node_id)
        present = pos < len(members) and members[pos] == node_id
        if member and not present:
            members.insert(pos, node_id)
        elif present and not member:
            del members[pos]

    def _put_index(self, index: Index) -> None:
        self._changes["indices"] = self._get("indices").set(index.name, index)
        if _has_unassigned(index):
            self._unassigned.add(index.name)
        else:
            self._unassigned.discard(index.name)

    def _put_lock(self, lock: Lock) -> None:
        self._changes["locks"] = self._get("locks").set(lock.key, lock)
        heapq.heappush(self._expiry, (lock.expires_at, lock.key, lock.token))

    def _refresh_ring(self) -> None:
        ring = self._get("hash_ring")
        if not ring.follow_membership:
            return
        members = tuple(self._members)
        # Lengths first: tuples compare item by item even when their lengths differ.
        if len(members) != len(ring.nodes) or members != ring.nodes:
            ring = _replace(ring, nodes=members, version=self._version)
            self._changes["hash_ring"] = ring
            self._emit(EventKind.RING_UPDATED, ring=ring)

    # --- allocation ----------------------------------------------------------------------------

    def _place(self, index: Index, exclude: str | None = None, emit: bool = True) -> Index:
        """Index with its unassigned copies placed (when auto-allocation is on)."""
        if not self._get("config").auto_allocate:
            return index
        routing = index.routing
        placed = tuple(
            self._place_shard(index.name, shard, exclude, emit) if _unassigned(shard) else shard
            for shard in routing
        )
        if all(new is old for new, old in zip(placed, routing, strict=True)):
            return index
        return _replace(index, routing=placed, updated_version=self._version)

    def _place_shard(
        self, name: str, shard: ShardRouting, exclude: str | None, emit: bool
    ) -> ShardRouting:
        """``shard`` with as many of its unassigned copies placed as nodes allow (the same
        object when none could be)."""
        placement = self._placement
        holders = _holders(shard)
        zones = {z for z in map(placement.zone_of, holders) if z}
        key: ShardKey = (name, shard.shard)
        copies = list(shard.copies)
        changed = False
        for i, copy in enumerate(copies):
            if copy.node_id is not None:
                continue
            node_id = placement.choose(holders, zones, exclude)
            if node_id is None:
                break
            placed = ShardCopy(primary=copy.primary, node_id=node_id, state=ShardState.INITIALIZING)
            copies[i] = placed
            holders.add(node_id)
            if zone := placement.zone_of(node_id):
                zones.add(zone)
            placement.add(node_id, key)
            changed = True
            if emit:
                self._emit(EventKind.SHARD_ALLOCATED, name, shard=shard.shard, copy=placed)
        return ShardRouting(shard=shard.shard, copies=tuple(copies)) if changed else shard

    def _place_pending(self) -> None:
        """Place unassigned copies of every index that has some (after a node became eligible)."""
        indices = self._get("indices")
        for name in sorted(self._unassigned):
            index = indices[name]
            placed = self._place(index)
            if placed is not index:
                self._put_index(placed)

    def _release_copy(self, index: Index, shard: int, node_id: str) -> tuple[Index, bool]:
        """Index with the copy on ``node_id`` unassigned (a started replica promoted if needed).

        Returns the new index and whether ``node_id`` held a copy of the shard at all.
        """
        placement = self._placement
        key: ShardKey = (index.name, shard)
        routing = index.routing[shard]
        copies = list(routing.copies)
        touched = False
        lost_primary = False
        for i, copy in enumerate(copies):
            if copy.relocating_to == node_id:  # target lost: the relocation is cancelled
                copies[i] = _replace(copy, state=ShardState.STARTED, relocating_to=None)
                placement.remove(node_id, key)
                touched = True
            elif copy.node_id == node_id:
                if copy.relocating_to is not None:
                    placement.remove(copy.relocating_to, key)
                placement.remove(node_id, key)
                lost_primary = copy.primary
                copies[i] = ShardCopy(primary=copy.primary)
                touched = True
                self._emit(EventKind.SHARD_UNASSIGNED, index.name, shard=shard, copy=copy)
        if not touched:
            return index, False
        if lost_primary:
            nodes = self._get("nodes")
            started = [
                i
                for i, c in enumerate(copies)
                if not c.primary
                and c.state in (ShardState.STARTED, ShardState.RELOCATING)
                and c.node_id in nodes
                and nodes[c.node_id].status is not NodeStatus.DOWN
            ]
            if started:
                best = min(started, key=lambda i: copies[i].node_id or "")
                old = next(i for i, c in enumerate(copies) if c.primary)
                copies[best] = _replace(copies[best], primary=True)
                copies[old] = _replace(copies[old], primary=False)
                self._emit(EventKind.SHARD_PROMOTED, index.name, shard=shard, copy=copies[best])
        copies.sort(key=lambda c: not c.primary)
        new_routing = ShardRouting(shard=shard, copies=tuple(copies))
        all_routing = (*index.routing[:shard], new_routing, *index.routing[shard + 1 :])
        return _replace(index, routing=all_routing, updated_version=self._version), True

    def _evacuate(self, node_id: str) -> None:
        """Unassign every copy on ``node_id`` and place the copies elsewhere."""
        held = sorted(self._placement.held.get(node_id, ()))
        indices = self._get("indices")
        by_index: dict[str, Index] = {}
        for name, shard in held:
            index = by_index.get(name) or indices[name]
            by_index[name], _ = self._release_copy(index, shard, node_id)
        for name in sorted(by_index):
            self._put_index(self._place(by_index[name]))

    # --- nodes -----------------------------------------------------------------------------

    def _register_node(self, cmd: RegisterNode) -> Node:
        old: Node | None = self._get("nodes").get(cmd.node.id)
        if old is None:
            node = _replace(cmd.node, registered_version=self._version)
        else:
            node = _replace(cmd.node, registered_version=old.registered_version)
            if node == old:
                return old
        self._put_node(node)
        self._emit(
            EventKind.NODE_JOINED if old is None else EventKind.NODE_UPDATED, node.id, node=node
        )
        self._after_node_change(old, node)
        return node

    def _after_node_change(self, old: Node | None, node: Node) -> None:
        if (
            node.status is NodeStatus.DOWN and (old is None or old.status is not NodeStatus.DOWN)
        ) or (not node.is_data and old is not None and old.is_data):
            self._evacuate(node.id)
        if eligible(node) and (old is None or not eligible(old)):
            self._place_pending()
        if old is None or _in_ring(old) != _in_ring(node):
            self._refresh_ring()

    def _unregister_node(self, cmd: UnregisterNode) -> None:
        node = self._node(cmd.node_id)
        self._changes["nodes"] = self._get("nodes").delete(node.id)
        self._emit(EventKind.NODE_LEFT, node.id, node=node)
        self._placement.node_changed(_replace(node, status=NodeStatus.DOWN))  # no new copies
        self._ring_member(node.id, False)
        self._evacuate(node.id)
        self._placement.node_removed(node.id)
        self._refresh_ring()

    def _update_node_status(self, cmd: UpdateNodeStatus) -> Node:
        old = self._node(cmd.node_id)
        if old.status is cmd.status:
            return old
        node = _replace(old, status=cmd.status)
        self._put_node(node)
        kind = EventKind.NODE_DOWN if cmd.status is NodeStatus.DOWN else EventKind.NODE_UPDATED
        self._emit(kind, node.id, node=node)
        self._after_node_change(old, node)
        return node

    def _mark_nodes_down(self, cmd: MarkNodesDown) -> tuple[str, ...]:
        nodes = self._get("nodes")
        marked = tuple(
            sorted(
                {i for i in cmd.node_ids if i in nodes and nodes[i].status is not NodeStatus.DOWN}
            )
        )
        for node_id in marked:
            self._update_node_status(UpdateNodeStatus(node_id=node_id, status=NodeStatus.DOWN))
        return marked

    # --- indices ---------------------------------------------------------------------------

    def _create_index(self, cmd: CreateIndex) -> Index:
        if cmd.name in self._get("indices"):
            raise AlreadyExistsError(f"index {cmd.name!r} already exists")
        settings = coerce_settings(cmd.settings)
        copies = (ShardCopy(primary=True),) + (
            ShardCopy(primary=False),
        ) * settings.number_of_replicas
        routing = tuple(
            ShardRouting(shard=s, copies=copies) for s in range(settings.number_of_shards)
        )
        if self._get("config").auto_allocate:  # placed here: the index is built once
            routing = tuple(self._place_shard(cmd.name, shard, None, False) for shard in routing)
        index = Index(
            name=cmd.name,
            settings=settings,
            mappings=cmd.mappings,
            routing=routing,
            created_version=self._version,
            updated_version=self._version,
        )
        self._put_index(index)
        self._emit(EventKind.INDEX_CREATED, index.name, index=index)
        return index

    def _delete_index(self, cmd: DeleteIndex) -> None:
        index = self._index(cmd.name)
        for shard in index.routing:
            for node_id in _holders(shard):
                self._placement.remove(node_id, (index.name, shard.shard))
        self._changes["indices"] = self._get("indices").delete(index.name)
        self._unassigned.discard(index.name)
        self._emit(EventKind.INDEX_DELETED, index.name, index=index)

    def _update_index_settings(self, cmd: UpdateIndexSettings) -> Index:
        index = self._index(cmd.name)
        if cmd.settings is not None:
            settings = coerce_settings(cmd.settings)
        else:
            settings = merge_settings(index.settings, cmd.patch or {})
        if settings.number_of_shards != index.settings.number_of_shards:
            raise InvalidRequestError(
                f"number_of_shards of index {index.name!r} is fixed at "
                f"{index.settings.number_of_shards}; create a new index to change it"
            )
        if settings == index.settings:
            return index
        want = settings.number_of_replicas
        routing = []
        for shard in index.routing:
            copies = list(shard.copies)
            while len(copies) - 1 < want:
                copies.append(ShardCopy(primary=False))
            while len(copies) - 1 > want:
                # Drop the least useful replica: unassigned, then initializing, then started.
                rank = {ShardState.UNASSIGNED: 0, ShardState.INITIALIZING: 1}
                victim = max(
                    (i for i, c in enumerate(copies) if not c.primary),
                    key=lambda i: (-rank.get(copies[i].state, 2), copies[i].node_id or ""),
                )
                for node_id in (copies[victim].node_id, copies[victim].relocating_to):
                    if node_id is not None:
                        self._placement.remove(node_id, (index.name, shard.shard))
                del copies[victim]
            routing.append(ShardRouting(shard=shard.shard, copies=tuple(copies)))
        index = _replace(
            index, settings=settings, routing=tuple(routing), updated_version=self._version
        )
        index = self._place(index, emit=False)
        self._put_index(index)
        self._emit(EventKind.INDEX_UPDATED, index.name, index=index)
        return index

    # --- shards ----------------------------------------------------------------------------

    def _allocate_shard(self, cmd: AllocateShard) -> ShardRouting:
        index = self._index(cmd.index)
        shard = self._routing(index, cmd.shard)
        node = self._node(cmd.node_id)
        if not eligible(node):
            raise ConflictError(
                f"node {node.id!r} cannot receive shard copies (roles "
                f"{sorted(node.roles)}, status {node.status})"
            )
        if node.id in _holders(shard):
            raise ConflictError(
                f"node {node.id!r} already holds a copy of {index.name}[{shard.shard}]"
            )
        copies = list(shard.copies)
        key = (index.name, shard.shard)
        if cmd.from_node is None:
            free = [i for i, c in enumerate(copies) if c.node_id is None]
            if not free:
                raise ConflictError(
                    f"{index.name}[{shard.shard}] has no unassigned copy; "
                    "pass from_node to move one"
                )
            copies[free[0]] = ShardCopy(
                primary=copies[free[0]].primary, node_id=node.id, state=ShardState.INITIALIZING
            )
            event, copy = EventKind.SHARD_ALLOCATED, copies[free[0]]
        else:
            pos = next((i for i, c in enumerate(copies) if c.node_id == cmd.from_node), None)
            if pos is None:
                raise NotFoundError(
                    f"node {cmd.from_node!r} holds no copy of {index.name}[{shard.shard}]"
                )
            if copies[pos].state is not ShardState.STARTED:
                raise ConflictError(
                    "only a STARTED copy can move; "
                    f"the copy on {cmd.from_node!r} is {copies[pos].state}"
                )
            copies[pos] = _replace(copies[pos], state=ShardState.RELOCATING, relocating_to=node.id)
            event, copy = EventKind.SHARD_RELOCATED, copies[pos]
        self._placement.add(node.id, key)
        return self._put_shard(
            index, ShardRouting(shard=shard.shard, copies=tuple(copies)), event, copy
        )

    def _put_shard(
        self, index: Index, shard: ShardRouting, event: EventKind, copy: ShardCopy
    ) -> ShardRouting:
        routing = (*index.routing[: shard.shard], shard, *index.routing[shard.shard + 1 :])
        self._put_index(_replace(index, routing=routing, updated_version=self._version))
        self._emit(event, index.name, shard=shard.shard, copy=copy)
        return shard

    def _deallocate_shard(self, cmd: DeallocateShard) -> ShardRouting:
        index = self._index(cmd.index)
        shard = self._routing(index, cmd.shard)
        if all(c.node_id != cmd.node_id for c in shard.copies):
            raise NotFoundError(
                f"node {cmd.node_id!r} holds no copy of {index.name}[{shard.shard}]"
            )
        index, _ = self._release_copy(index, shard.shard, cmd.node_id)
        index = self._place(index, exclude=cmd.node_id)
        self._put_index(index)
        return index.routing[shard.shard]

    def _update_shard_state(self, cmd: UpdateShardState) -> ShardRouting:
        index = self._index(cmd.index)
        shard = self._routing(index, cmd.shard)
        copies = list(shard.copies)
        if cmd.state is ShardState.UNASSIGNED:  # the data node reports the copy failed
            if all(c.node_id != cmd.node_id for c in copies):
                raise NotFoundError(
                    f"node {cmd.node_id!r} holds no copy of {index.name}[{shard.shard}]"
                )
            index, _ = self._release_copy(index, shard.shard, cmd.node_id)
            index = self._place(index, exclude=cmd.node_id)
            self._put_index(index)
            return index.routing[shard.shard]
        for i, copy in enumerate(copies):
            if copy.relocating_to == cmd.node_id:  # relocation finished: the copy moved
                self._placement.remove(copy.node_id or "", (index.name, shard.shard))
                copies[i] = ShardCopy(
                    primary=copy.primary, node_id=cmd.node_id, state=ShardState.STARTED
                )
                new = ShardRouting(shard=shard.shard, copies=tuple(copies))
                return self._put_shard(index, new, EventKind.SHARD_STARTED, copies[i])
            if copy.node_id == cmd.node_id:
                if copy.state is ShardState.STARTED:
                    return shard
                if copy.state is not ShardState.INITIALIZING:
                    raise ConflictError(
                        f"the copy of {index.name}[{shard.shard}] on {cmd.node_id!r} is "
                        f"{copy.state}; only an INITIALIZING copy can start"
                    )
                copies[i] = _replace(copy, state=ShardState.STARTED)
                new = ShardRouting(shard=shard.shard, copies=tuple(copies))
                return self._put_shard(index, new, EventKind.SHARD_STARTED, copies[i])
        raise NotFoundError(f"node {cmd.node_id!r} holds no copy of {index.name}[{shard.shard}]")

    # --- locks -----------------------------------------------------------------------------

    def _acquire_lock(self, cmd: AcquireLock) -> Lock:
        limit = self._get("config").max_lock_ttl
        if cmd.ttl > limit:
            raise InvalidRequestError(f"lock ttl {cmd.ttl} exceeds config.max_lock_ttl ({limit})")
        old = self._get("locks").get(cmd.key)
        if old is not None:
            if old.expires_at > self._now:
                raise LockHeldError(
                    f"lock {cmd.key!r} is held by {old.holder!r} (token {old.token}) "
                    f"for {old.expires_at - self._now:.3f} more seconds"
                )
            self._emit(EventKind.LOCK_EXPIRED, cmd.key, lock=old)
        lock = Lock(
            key=cmd.key,
            holder=cmd.holder,
            token=self._version,
            ttl=cmd.ttl,
            acquired_at=self._now,
            expires_at=self._now + cmd.ttl,
        )
        self._put_lock(lock)
        self._emit(EventKind.LOCK_ACQUIRED, cmd.key, lock=lock)
        return lock

    def _held_lock(self, key: str, holder: str, token: int) -> Lock:
        lock: Lock | None = self._get("locks").get(key)
        if lock is None or lock.holder != holder or lock.token != token:
            raise LockNotHeldError(
                f"lock {key!r} is not held by {holder!r} with token {token}"
                + (f" (holder {lock.holder!r}, token {lock.token})" if lock else " (it is free)")
            )
        if lock.expires_at <= self._now:
            raise LockNotHeldError(f"lock {key!r} held by {holder!r} expired; acquire it again")
        return lock

    def _renew_lock(self, cmd: RenewLock) -> Lock:
        lock = self._held_lock(cmd.key, cmd.holder, cmd.token)
        ttl = lock.ttl if cmd.ttl is None else cmd.ttl
        limit = self._get("config").max_lock_ttl
        if ttl > limit:
            raise InvalidRequestError(f"lock ttl {ttl} exceeds config.max_lock_ttl ({limit})")
        lock = _replace(lock, ttl=ttl, expires_at=self._now + ttl)
        self._put_lock(lock)
        self._emit(EventKind.LOCK_RENEWED, cmd.key, lock=lock)
        return lock

    def _release_lock(self, cmd: ReleaseLock) -> None:
        lock = self._held_lock(cmd.key, cmd.holder, cmd.token)
        self._changes["locks"] = self._get("locks").delete(lock.key)
        self._emit(EventKind.LOCK_RELEASED, lock.key, lock=lock)

    def _expire_locks(self, cmd: ExpireLocks) -> tuple[str, ...]:
        expired: list[str] = []
        while (due := self._next_expiry(self._get("locks"))) is not None and due <= self._now:
            _, key, _ = heapq.heappop(self._expiry)
            locks = self._get("locks")
            lock = locks[key]
            self._changes["locks"] = locks.delete(key)
            self._emit(EventKind.LOCK_EXPIRED, key, lock=lock)
            expired.append(key)
        return tuple(expired)

    # --- client sessions --------------------------------------------------------------------

    def _client_command(self, cmd: ClientCommand) -> SessionResult:
        sessions = self._get("sessions")
        session: ClientSession = sessions.get(cmd.client_id) or ClientSession(
            client_id=cmd.client_id
        )
        if cmd.seq <= session.acked:
            raise ConflictError(
                f"request {cmd.seq} of client {cmd.client_id!r} was already acknowledged; "
                "its result is no longer kept"
            )
        recorded = session.results.get(cmd.seq)
        if recorded is not None:
            return recorded  # a retry: the recorded result, nothing is applied again
        value = self._handlers[type(cmd.command)](cmd.command)
        if not self._events:  # it changed nothing: there is nothing to apply twice
            return SessionResult(version=self._state.version, value=encode_value(value))
        result = SessionResult(version=self._version, value=encode_value(value))
        acked = max(session.acked, cmd.ack)
        # A new dict: the previous state keeps its own.
        if acked > session.acked:  # every kept seq is above session.acked: some may go now
            results = {seq: kept for seq, kept in session.results.items() if seq > acked}
        else:
            results = session.results.copy()
        results[cmd.seq] = result
        while len(results) > self.MAX_SESSION_RESULTS:
            acked = min(results)
            del results[acked]
        session = ClientSession(
            client_id=cmd.client_id, acked=acked, results=results, last_seen=self._now
        )
        # Read the table again: RestoreState replaced it with the restored state's sessions,
        # which must survive (the caller's own session is then added to them).
        sessions = self._get("sessions")
        if cmd.client_id not in sessions:  # a known session has its entry in the heap already
            heapq.heappush(self._session_expiry, (self._now, cmd.client_id))
        self._changes["sessions"] = sessions.set(cmd.client_id, session)
        self._expire_sessions()
        return result

    def _expire_sessions(self, limit: int = 64) -> None:
        """Drop up to ``limit`` sessions idle for longer than ``config.session_ttl``.

        ``_session_expiry`` holds at least one ``(time, client_id)`` entry per session with
        ``time <= last_seen`` (one per session, not one per write: a write does not push). An
        entry whose session was seen since is pushed again with the session's ``last_seen``,
        so sessions are dropped in ``(last_seen, client_id)`` order whatever the heap's history
        (a replica restored from a snapshot drops the same sessions as one that applied the log).
        """
        deadline = self._now - self._get("config").session_ttl
        heap = self._session_expiry
        while heap and heap[0][0] < deadline and limit > 0:
            seen, client_id = heapq.heappop(heap)
            sessions = self._get("sessions")
            session = sessions.get(client_id)
            if session is None:
                continue  # dropped already (or unregistered by a restore)
            if session.last_seen != seen:
                heapq.heappush(heap, (session.last_seen, client_id))
                continue
            self._changes["sessions"] = sessions.delete(client_id)
            limit -= 1

    # --- ring, configuration, flags, restore ---------------------------------------------------

    def _update_hash_ring(self, cmd: UpdateHashRing) -> Any:
        ring = self._get("hash_ring")
        follow = cmd.follow_membership
        if cmd.nodes is not None and follow:
            raise InvalidRequestError("set nodes or follow_membership=True, not both")
        if cmd.nodes is not None:
            follow = False
        new = _replace(
            ring,
            nodes=tuple(cmd.nodes) if cmd.nodes is not None else ring.nodes,
            vnodes=cmd.vnodes or ring.vnodes,
            replication_factor=cmd.replication_factor or ring.replication_factor,
            follow_membership=ring.follow_membership if follow is None else follow,
        )
        if new.follow_membership:
            new = _replace(new, nodes=tuple(self._members))
        if new == ring:
            return ring
        new = _replace(new, version=self._version)
        self._changes["hash_ring"] = new
        self._emit(EventKind.RING_UPDATED, ring=new)
        return new

    def _set_cluster_config(self, cmd: SetClusterConfig) -> Any:
        old = self._get("config")
        if cmd.expected_version is not None and cmd.expected_version != old.version:
            raise ConflictError(
                f"cluster config is at version {old.version}, not {cmd.expected_version}; "
                "re-read it and retry"
            )
        config = _replace(cmd.config, version=self._version)
        self._changes["config"] = config
        self._emit(EventKind.CONFIG_CHANGED, config=config)
        if config.auto_allocate and not old.auto_allocate:
            self._place_pending()
        return config

    def _set_feature_flag(self, cmd: SetFeatureFlag) -> None:
        flags = self._get("feature_flags")
        if flags.get(cmd.name) is cmd.enabled:
            return
        self._changes["feature_flags"] = flags.set(cmd.name, cmd.enabled)
        self._emit(EventKind.FLAG_CHANGED, cmd.name, enabled=cmd.enabled)

    def _restore_state(self, cmd: RestoreState) -> None:
        self._version = max(self._version, cmd.state.version + 1)
        self._now = max(self._now, cmd.state.now)
        restored = _replace(cmd.state, version=self._version, now=self._now)
        self._load(restored)
        self._changes = {
            f: getattr(restored, f)
            for f in restored.__struct_fields__
            if f not in ("version", "now")
        }
        self._emit(EventKind.STATE_RESTORED)


def _holders(shard: ShardRouting) -> set[str]:
    out: set[str] = set()
    for copy in shard.copies:
        if copy.node_id is not None:
            out.add(copy.node_id)
        if copy.relocating_to is not None:
            out.add(copy.relocating_to)
    return out


def _unassigned(shard: ShardRouting) -> bool:
    # A loop, not any() over a generator: ~3x faster here, on every index write.
    for copy in shard.copies:  # noqa: SIM110
        if copy.node_id is None:
            return True
    return False


def _has_unassigned(index: Index) -> bool:
    return any(map(_unassigned, index.routing))
