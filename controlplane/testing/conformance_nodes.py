"""Conformance checks of nodes (registration, status, heart-beats, liveness) and shards
(automatic and manual allocation, moves, failures, re-allocation when a node goes down)."""

from __future__ import annotations

import math

from ..errors import ConflictError, InvalidRequestError, NotFoundError
from ..protocol import ControlPlane
from ..types import (
    ClusterConfig,
    EventKind,
    HealthStatus,
    Node,
    NodeRole,
    NodeStatus,
    ShardRouting,
    ShardState,
)
from .conformance_harness import (
    BackendHarness,
    check,
    collect_until_marker,
    describe,
    expect_error,
    index_settings,
    nothing_written,
    register_data_nodes,
    require,
    require_equal,
    start_all_copies,
    version_now,
    write_marker,
)

__all__: tuple[str, ...] = ()

NODES = "nodes"
SHARDS = "shards"


def _copy_on(routing: ShardRouting, node_id: str) -> str:
    for copy in routing.copies:
        if copy.node_id == node_id:
            return f"{'primary' if copy.primary else 'replica'}:{copy.state}"
    return "none"


def _check_routing_shape(routing: tuple[ShardRouting, ...], replicas: int, what: str) -> None:
    for shard in routing:
        primaries = [c for c in shard.copies if c.primary]
        require(len(primaries) == 1, f"{what}: shard {shard.shard} must have one primary: {shard}")
        require_equal(len(shard.copies), replicas + 1, f"{what}: copies of shard {shard.shard}")
        holders = [c.node_id for c in shard.copies if c.node_id is not None]
        require(
            len(holders) == len(set(holders)),
            f"{what}: two copies of shard {shard.shard} on one node: {shard}",
        )


async def _set_config(cp: ControlPlane, **changes: object) -> ClusterConfig:
    current = await cp.get_cluster_config()
    fields = {
        "node_timeout": current.node_timeout,
        "max_lock_ttl": current.max_lock_ttl,
        "auto_allocate": current.auto_allocate,
        "settings": current.settings,
        **changes,
    }
    config = ClusterConfig(**fields)  # type: ignore[arg-type]
    return await cp.set_cluster_config(config, expected_version=current.version)


async def _status(cp: ControlPlane, node_id: str) -> NodeStatus:
    return (await cp.get_node(node_id)).status


@check(NODES)
async def check_register_node_idempotent(harness: BackendHarness) -> None:
    """``register_node`` stores the node; registering it again unchanged writes nothing;
    registering it changed updates it (``NODE_UPDATED``) and keeps ``registered_version``."""
    async with harness.open() as cp:
        v0 = await version_now(cp)
        node = Node(
            id="node-1",
            address="10.0.0.1:9300",
            zone="zone-a",
            roles=frozenset({NodeRole.DATA, NodeRole.MASTER}),
            attributes={"rack": "r1"},
        )
        stored = await cp.register_node(node)
        require_equal(
            (stored.id, stored.address, stored.zone, stored.roles, stored.attributes),
            (node.id, node.address, node.zone, node.roles, node.attributes),
            "the stored node",
        )
        require_equal(stored.status, NodeStatus.ACTIVE, "status of a new node")
        require(stored.registered_version > v0, f"registered_version must be set: {stored}")
        v1 = await version_now(cp)
        require_equal(await cp.register_node(node), stored, "registering the same node again")
        await nothing_written(cp, v1, "re-registering an identical node", harness.timeout)
        require_equal(await cp.get_node("node-1"), stored, "get_node")
        await cp.register_node(Node(id="node-0"))
        require_equal(
            [n.id for n in await cp.list_nodes()], ["node-0", "node-1"], "list_nodes (by id)"
        )
        moved = await cp.register_node(Node(id="node-1", address="10.0.0.2:9300", zone="zone-a"))
        require_equal(moved.address, "10.0.0.2:9300", "address after re-registration")
        require_equal(
            moved.registered_version, stored.registered_version, "registered_version kept"
        )
        marker = await write_marker(cp)
        async with cp.watch(since=v0) as stream:
            everything = await collect_until_marker(stream, marker, harness.timeout)
        node_kinds = {EventKind.NODE_JOINED, EventKind.NODE_UPDATED, EventKind.NODE_LEFT}
        events = [e for e in everything if e.kind in node_kinds]
        require_equal(
            [(e.kind, e.key) for e in events],
            [
                (EventKind.NODE_JOINED, "node-1"),
                (EventKind.NODE_JOINED, "node-0"),
                (EventKind.NODE_UPDATED, "node-1"),
            ],
            "node events",
        )
        require_equal(events[0].version, stored.registered_version, "NODE_JOINED version")
        require_equal(events[0].node, stored, "the NODE_JOINED event's node")


@check(NODES)
async def check_node_errors(harness: BackendHarness) -> None:
    """Invalid node ids are ``InvalidRequestError``, unknown ones ``NotFoundError``; neither
    writes anything."""
    async with harness.open() as cp:
        await cp.register_node(Node(id="known"))
        v0 = await version_now(cp)
        for bad in ("", "Upper", "under_score", "-lead", "trail-", "dot.ted", "x" * 64):
            await expect_error(
                InvalidRequestError, cp.register_node(Node(id=bad)), f"register {bad!r}"
            )
        await expect_error(
            InvalidRequestError, cp.register_node(Node(id="ok", zone="Bad Zone")), "bad zone"
        )
        await expect_error(InvalidRequestError, cp.get_node("Bad"), "get_node('Bad')")
        await expect_error(InvalidRequestError, cp.heartbeat("Bad"), "heartbeat('Bad')")
        await expect_error(NotFoundError, cp.get_node("ghost"), "get_node of an unknown node")
        await expect_error(NotFoundError, cp.unregister_node("ghost"), "unregister unknown")
        await expect_error(
            NotFoundError,
            cp.update_node_status("ghost", NodeStatus.DRAINING),
            "update_node_status of an unknown node",
        )
        await expect_error(NotFoundError, cp.heartbeat("ghost"), "heartbeat of an unknown node")
        await nothing_written(cp, v0, "rejected node requests", harness.timeout)


@check(NODES)
async def check_unregister_node(harness: BackendHarness) -> None:
    """``unregister_node`` removes the node (``NODE_LEFT``) and re-places its copies; a lost
    primary is replaced by promoting a started replica."""
    async with harness.open() as cp:
        await register_data_nodes(cp, ["a", "b", "c"])
        await cp.create_index("logs", index_settings(1, 1))
        before = (await start_all_copies(cp, "logs")).routing[0]
        primary = before.primary.node_id
        replica = before.replicas[0].node_id
        assert primary is not None and replica is not None
        spare = ({"a", "b", "c"} - {primary, replica}).pop()
        v0 = await version_now(cp)
        await cp.unregister_node(primary)
        await expect_error(NotFoundError, cp.get_node(primary), "get_node after unregister")
        require(primary not in [n.id for n in await cp.list_nodes()], "list_nodes after unregister")
        after = (await cp.get_shard_routing("logs"))[0]
        _check_routing_shape((after,), 1, "after unregistering the primary's node")
        require_equal(
            (after.primary.node_id, after.primary.state),
            (replica, ShardState.STARTED),
            "the promoted primary (the started replica)",
        )
        require_equal(
            (after.replicas[0].node_id, after.replicas[0].state),
            (spare, ShardState.INITIALIZING),
            "the re-placed replica",
        )
        marker = await write_marker(cp)
        async with cp.watch(since=v0) as stream:
            events = await collect_until_marker(stream, marker, harness.timeout)
        kinds = {(e.kind, e.key) for e in events}
        require(
            (EventKind.NODE_LEFT, primary) in kinds and (EventKind.SHARD_PROMOTED, "logs") in kinds,
            f"unregistering must report NODE_LEFT and SHARD_PROMOTED: {describe(events)}",
        )


@check(NODES)
async def check_update_node_status_draining(harness: BackendHarness) -> None:
    """A DRAINING node receives no new copies; back to ACTIVE it does."""
    async with harness.open() as cp:
        await register_data_nodes(cp, ["a", "b"])
        draining = await cp.update_node_status("b", NodeStatus.DRAINING)
        require_equal(draining.status, NodeStatus.DRAINING, "status after update_node_status")
        index = await cp.create_index("drain", index_settings(2, 1))
        for shard in index.routing:
            require_equal(_copy_on(shard, "b"), "none", f"copy of shard {shard.shard} on b")
            require_equal(shard.primary.node_id, "a", f"primary of shard {shard.shard}")
        await cp.update_node_status("b", NodeStatus.ACTIVE)
        for shard in await cp.get_shard_routing("drain"):
            require_equal(_copy_on(shard, "b"), "replica:initializing", f"shard {shard.shard} on b")


@check(NODES)
async def check_heartbeat_keeps_node_active(harness: BackendHarness) -> None:
    """Nodes that heart-beat stay ACTIVE past ``node_timeout``; one that stops becomes DOWN
    (``NODE_DOWN``) without any client action, while the others stay ACTIVE."""
    timeout = 2.0
    async with harness.open() as cp:
        await _set_config(cp, node_timeout=timeout)
        await register_data_nodes(cp, ["beating", "silent"])
        for _ in range(6):  # 3 s, longer than node_timeout
            await cp.heartbeat("beating")
            await cp.heartbeat("silent")
            await harness.advance_time(timeout / 4)
        for node_id in ("beating", "silent"):
            require_equal(await _status(cp, node_id), NodeStatus.ACTIVE, f"{node_id} status")
        v0 = await version_now(cp)
        rounds = math.ceil(harness.timeout / (timeout / 4)) + 8
        for _ in range(rounds):
            await cp.heartbeat("beating")
            await harness.advance_time(timeout / 4)
            if await _status(cp, "silent") is NodeStatus.DOWN:
                break
        require_equal(await _status(cp, "silent"), NodeStatus.DOWN, "the silent node's status")
        require_equal(await _status(cp, "beating"), NodeStatus.ACTIVE, "the beating node")
        marker = await write_marker(cp)
        async with cp.watch(since=v0) as stream:
            events = await collect_until_marker(stream, marker, harness.timeout)
        require(
            [(e.kind, e.key) for e in events if e.kind is EventKind.NODE_DOWN]
            == [(EventKind.NODE_DOWN, "silent")],
            f"exactly one NODE_DOWN, for the silent node: {describe(events)}",
        )


@check(NODES)
async def check_new_node_gets_a_full_timeout(harness: BackendHarness) -> None:
    """Registering is a sign of life: a node registered long after the control plane started
    is not marked DOWN before ``node_timeout`` passes without a heart-beat."""
    node_timeout = 2.0
    async with harness.open() as cp:
        await _set_config(cp, node_timeout=node_timeout)
        await harness.advance_time(node_timeout * 3)  # the control plane has run for a while
        await register_data_nodes(cp, ["late"])
        await harness.advance_time(node_timeout / 2)
        require_equal(
            await _status(cp, "late"),
            NodeStatus.ACTIVE,
            f"status of a node registered {node_timeout / 2} s ago (node_timeout {node_timeout})",
        )
        await cp.heartbeat("late")
        await harness.advance_time(node_timeout / 2)
        require_equal(await _status(cp, "late"), NodeStatus.ACTIVE, "status after a heart-beat")


@check(NODES)
async def check_heartbeat_revives_down_node(harness: BackendHarness) -> None:
    """A heart-beat from a DOWN node brings it back ACTIVE; an ACTIVE node's heart-beat
    writes nothing."""
    async with harness.open() as cp:
        await register_data_nodes(cp, ["phoenix"])
        await cp.heartbeat("phoenix")
        v0 = await version_now(cp)
        await cp.heartbeat("phoenix")
        await nothing_written(cp, v0, "a heart-beat of an ACTIVE node", harness.timeout)
        down = await cp.update_node_status("phoenix", NodeStatus.DOWN)
        require_equal(down.status, NodeStatus.DOWN, "status after marking DOWN")
        await cp.heartbeat("phoenix")

        async def active() -> bool:
            return await _status(cp, "phoenix") is NodeStatus.ACTIVE

        await harness.wait_for(active, timeout=harness.timeout, what="the node back ACTIVE")


@check(SHARDS)
async def check_down_node_shards_reallocated(harness: BackendHarness) -> None:
    """When a node stops heart-beating and goes DOWN, a started replica of each primary it held
    is promoted and the missing copies are re-placed on the other nodes (health yellow)."""
    node_timeout = 2.0
    async with harness.open() as cp:
        await _set_config(cp, node_timeout=node_timeout)
        nodes = ["a", "b", "c"]
        await register_data_nodes(cp, nodes)
        await cp.create_index("orders", index_settings(3, 1))
        before = (await start_all_copies(cp, "orders")).routing
        victim = before[0].primary.node_id
        assert victim is not None
        alive = [n for n in nodes if n != victim]
        rounds = math.ceil(harness.timeout / (node_timeout / 4)) + 8
        for _ in range(rounds):
            for node_id in alive:
                await cp.heartbeat(node_id)
            await harness.advance_time(node_timeout / 4)
            if await _status(cp, victim) is NodeStatus.DOWN:
                break
        require_equal(await _status(cp, victim), NodeStatus.DOWN, "the silent node's status")
        after = await cp.get_shard_routing("orders")
        _check_routing_shape(after, 1, "after the node went down")
        for old, new in zip(before, after, strict=True):
            require(
                all(c.node_id != victim for c in new.copies),
                f"shard {new.shard} still has a copy on the DOWN node: {new}",
            )
            require(
                all(c.node_id in alive for c in new.copies),
                f"every copy of shard {new.shard} must be re-placed on {alive}: {new}",
            )
            if old.primary.node_id == victim:
                require_equal(
                    (new.primary.node_id, new.primary.state),
                    (old.replicas[0].node_id, ShardState.STARTED),
                    f"shard {new.shard}: the started replica promoted to primary",
                )
            else:
                require_equal(new.primary, old.primary, f"shard {new.shard}: untouched primary")
        health = await cp.get_cluster_health()
        require_equal(health.status, HealthStatus.YELLOW, "health with re-placed replicas")
        await cp.heartbeat(victim)

        async def back() -> bool:
            return await _status(cp, victim) is NodeStatus.ACTIVE

        await harness.wait_for(back, timeout=harness.timeout, what="the node back ACTIVE")


@check(SHARDS)
async def check_auto_allocation(harness: BackendHarness) -> None:
    """Creating an index places one primary and the replicas of every shard on distinct data
    nodes (never on non-data nodes); reporting the copies STARTED makes the cluster green."""
    async with harness.open() as cp:
        await register_data_nodes(cp, ["a", "b", "c"])
        await cp.register_node(Node(id="master-only", roles=frozenset({NodeRole.MASTER})))
        index = await cp.create_index("auto", index_settings(3, 1))
        _check_routing_shape(index.routing, 1, "a new index")
        for shard in index.routing:
            for copy in shard.copies:
                require(
                    copy.node_id in {"a", "b", "c"} and copy.state is ShardState.INITIALIZING,
                    f"shard {shard.shard}: every copy must be INITIALIZING on a data node: {shard}",
                )
        require_equal(await cp.get_shard_routing("auto"), index.routing, "get_shard_routing")
        started = await start_all_copies(cp, "auto")
        require(
            all(c.state is ShardState.STARTED for s in started.routing for c in s.copies),
            f"every copy must be STARTED: {started.routing}",
        )
        require_equal((await cp.get_cluster_health()).status, HealthStatus.GREEN, "health")


@check(SHARDS)
async def check_manual_allocation_and_moves(harness: BackendHarness) -> None:
    """``allocate_shard``/``deallocate_shard``/``update_shard_state`` with auto-allocation off:
    placement, every conflict and not-found case, and a move through RELOCATING."""
    async with harness.open() as cp:
        await _set_config(cp, auto_allocate=False)
        await register_data_nodes(cp, ["a", "b", "c", "d"])
        await cp.update_node_status("d", NodeStatus.DRAINING)
        await cp.register_node(Node(id="m", roles=frozenset({NodeRole.MASTER})))
        index = await cp.create_index("manual", index_settings(2, 1))
        require(
            all(c.node_id is None for s in index.routing for c in s.copies),
            f"with auto_allocate off every copy stays unassigned: {index.routing}",
        )
        routing = await cp.allocate_shard("manual", 0, "a")
        require_equal(_copy_on(routing, "a"), "primary:initializing", "copy placed on a")
        v0 = await version_now(cp)
        conflicts = [
            ("a", None, "a node that holds a copy"),
            ("d", None, "a DRAINING node"),
            ("m", None, "a node without the data role"),
        ]
        for node_id, source, what in conflicts:
            await expect_error(
                ConflictError,
                cp.allocate_shard("manual", 0, node_id, from_node=source),
                f"allocate to {what}",
            )
        await expect_error(
            ConflictError,
            cp.allocate_shard("manual", 0, "b", from_node="a"),
            "move a copy that is not STARTED",
        )
        missing = [
            ("nope", 0, "b", None, "an unknown index"),
            ("manual", 7, "b", None, "a shard out of range"),
            ("manual", 0, "ghost", None, "an unknown node"),
            ("manual", 0, "b", "c", "a move from a node without a copy"),
        ]
        for index_name, shard, node_id, source, what in missing:
            await expect_error(
                NotFoundError,
                cp.allocate_shard(index_name, shard, node_id, from_node=source),
                f"allocate: {what}",
            )
        await expect_error(
            InvalidRequestError, cp.allocate_shard("manual", -1, "b"), "a negative shard"
        )
        await expect_error(InvalidRequestError, cp.allocate_shard("Bad", 0, "b"), "a bad name")
        await nothing_written(cp, v0, "rejected allocations", harness.timeout)
        await cp.allocate_shard("manual", 0, "b")
        await expect_error(
            ConflictError, cp.allocate_shard("manual", 0, "c"), "a shard without unassigned copy"
        )
        for node_id in ("a", "b"):
            started = await cp.update_shard_state("manual", 0, node_id, ShardState.STARTED)
            require(_copy_on(started, node_id).endswith("started"), f"copy on {node_id} started")
        moving = await cp.allocate_shard("manual", 0, "c", from_node="a")
        moved_copy = next(c for c in moving.copies if c.node_id == "a")
        require_equal(
            (moved_copy.state, moved_copy.relocating_to),
            (ShardState.RELOCATING, "c"),
            "the copy being moved",
        )
        require_equal((await cp.get_cluster_health()).relocating_shards, 1, "relocating count")
        moved = await cp.update_shard_state("manual", 0, "c", ShardState.STARTED)
        require_equal(_copy_on(moved, "c"), "primary:started", "the moved copy on c")
        require_equal(_copy_on(moved, "a"), "none", "the old location after the move")
        freed = await cp.deallocate_shard("manual", 0, "b")
        require_equal(_copy_on(freed, "b"), "none", "b after deallocate")
        require(
            any(c.node_id is None and not c.primary for c in freed.copies),
            f"deallocated replica must be unassigned (auto_allocate off): {freed}",
        )
        await expect_error(NotFoundError, cp.deallocate_shard("manual", 0, "b"), "deallocate twice")
        await expect_error(
            NotFoundError,
            cp.update_shard_state("manual", 0, "b", ShardState.STARTED),
            "start a copy the node does not hold",
        )
        await expect_error(
            InvalidRequestError,
            cp.update_shard_state("manual", 0, "c", ShardState.INITIALIZING),
            "report INITIALIZING",
        )
        _check_routing_shape(await cp.get_shard_routing("manual"), 1, "the manual index")


@check(SHARDS)
async def check_shard_failure_replaced(harness: BackendHarness) -> None:
    """A copy reported failed (UNASSIGNED) is re-placed on another node; a failed primary is
    replaced by its started replica."""
    async with harness.open() as cp:
        await register_data_nodes(cp, ["a", "b", "c"])
        await cp.create_index("fragile", index_settings(1, 1))
        shard = (await start_all_copies(cp, "fragile")).routing[0]
        primary, replica = shard.primary.node_id, shard.replicas[0].node_id
        assert primary is not None and replica is not None
        spare = ({"a", "b", "c"} - {primary, replica}).pop()
        after = await cp.update_shard_state("fragile", 0, primary, ShardState.UNASSIGNED)
        require_equal(
            (after.primary.node_id, after.primary.state),
            (replica, ShardState.STARTED),
            "primary after the primary failed",
        )
        require_equal(
            (after.replicas[0].node_id, after.replicas[0].state),
            (spare, ShardState.INITIALIZING),
            "the failed copy re-placed on the spare node",
        )
        health = await cp.get_cluster_health()
        require_equal(
            (health.status, health.initializing_shards, health.active_primary_shards),
            (HealthStatus.YELLOW, 1, 1),
            "health (status, initializing, active primaries)",
        )
