"""Conformance checks of cluster-wide state: health colours, the hash ring, configuration,
feature flags, state reads, and the one-version-per-mutation rule."""

from __future__ import annotations

import itertools

from ..errors import ConflictError, InvalidRequestError
from ..types import (
    ClusterConfig,
    EventKind,
    HealthStatus,
    Node,
    NodeRole,
    NodeStatus,
    ShardState,
)
from .conformance_harness import (
    BackendHarness,
    check,
    collect_until_marker,
    describe,
    expect_error,
    index_settings,
    next_event,
    nothing_written,
    register_data_nodes,
    require,
    require_equal,
    version_now,
    write_marker,
)

__all__: tuple[str, ...] = ()

AREA = "cluster"


@check(AREA)
async def check_health_colours(harness: BackendHarness) -> None:
    """Health is green with every copy started, yellow with every primary started but a
    replica not, red with a primary not started; counts as Elasticsearch defines them."""
    async with harness.open() as cp:
        empty = await cp.get_cluster_health()
        require_equal(empty.status, HealthStatus.GREEN, "health of an empty cluster")
        await register_data_nodes(cp, ["a", "b"])
        await cp.register_node(Node(id="m", roles=frozenset({NodeRole.MASTER})))
        index = await cp.create_index("colours", index_settings(2, 1))
        health = await cp.get_cluster_health()
        require_equal(
            (health.status, health.number_of_nodes, health.number_of_data_nodes),
            (HealthStatus.RED, 3, 2),
            "health with initializing primaries (status, nodes, data nodes)",
        )
        require_equal(
            (health.active_shards, health.initializing_shards, health.unassigned_shards),
            (0, 4, 0),
            "counts with every copy initializing (active, initializing, unassigned)",
        )
        for routing in index.routing:
            primary = routing.primary.node_id
            assert primary is not None
            await cp.update_shard_state("colours", routing.shard, primary, ShardState.STARTED)
        health = await cp.get_cluster_health()
        require_equal(
            (health.status, health.active_primary_shards, health.active_shards),
            (HealthStatus.YELLOW, 2, 2),
            "health with primaries started (status, active primaries, active)",
        )
        require_equal(
            health.indices["colours"].status, HealthStatus.YELLOW, "the index's own health"
        )
        for routing in index.routing:
            replica = routing.replicas[0].node_id
            assert replica is not None
            await cp.update_shard_state("colours", routing.shard, replica, ShardState.STARTED)
        health = await cp.get_cluster_health()
        require_equal(
            (health.status, health.active_shards, health.initializing_shards),
            (HealthStatus.GREEN, 4, 0),
            "health with every copy started",
        )
        await cp.update_node_status("b", NodeStatus.DOWN)
        health = await cp.get_cluster_health()
        require_equal(
            (health.status, health.active_primary_shards, health.unassigned_shards),
            (HealthStatus.YELLOW, 2, 2),
            "health after a node holding copies went DOWN (no other node for the replicas)",
        )
        last_write = await version_now(cp)
        require(
            health.version == last_write,
            f"health must be computed at the last write's version {last_write}: {health.version}",
        )


@check(AREA)
async def check_hash_ring(harness: BackendHarness) -> None:
    """The ring follows membership (data nodes that are not DOWN); ``owners()`` is the same on
    every call and every copy of the ring; ``update_hash_ring`` pins nodes, vnodes and the
    replication factor, and can return to following membership."""
    async with harness.open() as cp:
        ring = await cp.get_hash_ring()
        require(ring.follow_membership, f"a new ring follows membership: {ring}")
        require_equal(ring.owners("any-key"), (), "owners on an empty ring")
        await register_data_nodes(cp, ["a", "b", "c", "d"])
        await cp.register_node(Node(id="m", roles=frozenset({NodeRole.MASTER})))
        ring = await cp.get_hash_ring()
        require_equal(set(ring.nodes), {"a", "b", "c", "d"}, "ring members (data nodes)")
        keys = [f"repo-{i}" for i in range(50)]
        owners = {key: ring.owners(key) for key in keys}
        again = await cp.get_hash_ring()
        for key in keys:
            require_equal(ring.owners(key), owners[key], f"owners({key!r}) on a second call")
            require_equal(again.owners(key), owners[key], f"owners({key!r}) on a re-read ring")
            want = min(ring.replication_factor, 4)
            require(
                len(owners[key]) == want and len(set(owners[key])) == want,
                f"owners({key!r}) must be {want} distinct members: {owners[key]}",
            )
        require_equal(ring.owners("k", 2), ring.owners("k")[:2], "owners(key, n) is a prefix")
        await cp.update_node_status("c", NodeStatus.DOWN)
        await cp.unregister_node("d")
        ring = await cp.get_hash_ring()
        require_equal(set(ring.nodes), {"a", "b"}, "members after c went DOWN and d left")
        v0 = await version_now(cp)
        pinned = await cp.update_hash_ring(nodes=["x1", "x2", "x3"], vnodes=16)
        require_equal(
            (set(pinned.nodes), pinned.vnodes, pinned.follow_membership),
            ({"x1", "x2", "x3"}, 16, False),
            "a pinned ring (nodes, vnodes, follow_membership)",
        )
        await cp.register_node(Node(id="e"))
        require_equal(await cp.get_hash_ring(), pinned, "a pinned ring ignores membership")
        rf = await cp.update_hash_ring(replication_factor=2)
        require_equal(len(rf.owners("key")), 2, "owners with replication_factor=2")
        following = await cp.update_hash_ring(follow_membership=True)
        require_equal(set(following.nodes), {"a", "b", "e"}, "members when following again")
        async with cp.watch(since=v0, kinds={EventKind.RING_UPDATED}) as stream:
            for expected in (pinned, rf, following):
                event = await next_event(stream, harness.timeout, "a RING_UPDATED event")
                require_equal(
                    (event.version, event.ring),
                    (expected.version, expected),
                    "RING_UPDATED (version, ring) of update_hash_ring",
                )
        v1 = await version_now(cp)
        bad = [
            {"vnodes": 0},
            {"replication_factor": 0},
            {"nodes": ["x", "x"]},
            {"nodes": ["Bad_Node"]},
            {"nodes": ["x"], "follow_membership": True},
        ]
        for kwargs in bad:
            await expect_error(
                InvalidRequestError,
                cp.update_hash_ring(**kwargs),  # type: ignore[arg-type]
                f"update_hash_ring({kwargs})",
            )
        await nothing_written(cp, v1, "rejected ring updates", harness.timeout)


@check(AREA)
async def check_cluster_config(harness: BackendHarness) -> None:
    """``set_cluster_config`` replaces the configuration, compare-and-set on
    ``expected_version`` (``ConflictError`` when stale), rejects bad values
    (``InvalidRequestError``) and reports ``CONFIG_CHANGED``."""
    async with harness.open() as cp:
        initial = await cp.get_cluster_config()
        wanted = ClusterConfig(
            node_timeout=20.0,
            max_lock_ttl=600.0,
            auto_allocate=True,
            settings={"search.max_buckets": 1000, "codec": "lz4"},
        )
        stored = await cp.set_cluster_config(wanted, expected_version=initial.version)
        require_equal(
            (stored.node_timeout, stored.max_lock_ttl, stored.settings),
            (20.0, 600.0, wanted.settings),
            "the stored config",
        )
        require(stored.version > initial.version, f"config.version must move: {stored}")
        require_equal(await cp.get_cluster_config(), stored, "get_cluster_config")
        v0 = await version_now(cp)
        await expect_error(
            ConflictError,
            cp.set_cluster_config(
                ClusterConfig(node_timeout=5.0), expected_version=initial.version
            ),
            "set_cluster_config with a stale expected_version",
        )
        for bad in (
            ClusterConfig(node_timeout=0.0),
            ClusterConfig(node_timeout=-1.0),
            ClusterConfig(max_lock_ttl=0.0),
            ClusterConfig(settings={"Bad Key": 1}),
        ):
            await expect_error(
                InvalidRequestError, cp.set_cluster_config(bad), f"set_cluster_config({bad})"
            )
        await nothing_written(cp, v0, "rejected config changes", harness.timeout)
        require_equal(await cp.get_cluster_config(), stored, "the config after rejections")
        blind = await cp.set_cluster_config(ClusterConfig(node_timeout=30.0))
        require_equal(blind.node_timeout, 30.0, "an unconditional set")
        marker = await write_marker(cp)
        async with cp.watch(since=initial.version) as stream:
            events = await collect_until_marker(stream, marker, harness.timeout)
        changes = [e for e in events if e.kind is EventKind.CONFIG_CHANGED]
        require_equal(
            [(e.version, e.config) for e in changes],
            [(stored.version, stored), (blind.version, blind)],
            "CONFIG_CHANGED events (version, config)",
        )


@check(AREA)
async def check_feature_flags(harness: BackendHarness) -> None:
    """Feature flags: set, read, toggle; ``FLAG_CHANGED`` with ``enabled``; bad names are
    ``InvalidRequestError`` and write nothing."""
    async with harness.open() as cp:
        require_equal(await cp.get_feature_flags(), {}, "flags of a new cluster")
        v0 = await version_now(cp)
        await cp.set_feature_flag("new-search", True)
        await cp.set_feature_flag("beta_ui.v2", True)
        require_equal(
            await cp.get_feature_flags(),
            {"new-search": True, "beta_ui.v2": True},
            "flags after two sets",
        )
        await cp.set_feature_flag("new-search", False)
        require_equal(
            (await cp.get_feature_flags())["new-search"], False, "a flag turned off stays listed"
        )
        async with cp.watch(since=v0) as stream:
            events = [await next_event(stream, harness.timeout, f"flag {i}") for i in range(3)]
        require_equal(
            [(e.kind, e.key, e.enabled) for e in events],
            [
                (EventKind.FLAG_CHANGED, "new-search", True),
                (EventKind.FLAG_CHANGED, "beta_ui.v2", True),
                (EventKind.FLAG_CHANGED, "new-search", False),
            ],
            "FLAG_CHANGED events",
        )
        v1 = await version_now(cp)
        for bad in ("", "Upper", "has space", "-lead", "x" * 64):
            await expect_error(
                InvalidRequestError, cp.set_feature_flag(bad, True), f"flag name {bad!r}"
            )
        await nothing_written(cp, v1, "rejected flag names", harness.timeout)


@check(AREA)
async def check_cluster_state_reflects_writes(harness: BackendHarness) -> None:
    """After a write returns, ``get_cluster_state(consistent=True)`` and ``consistent=False``
    both show it; a state read earlier never changes (it is a snapshot)."""
    async with harness.open() as cp:
        before = await cp.get_cluster_state()
        index = await cp.create_index("visible", index_settings(1, 0))
        node = await cp.register_node(Node(id="visible-node"))
        lock = await cp.acquire_lock("visible/lock", "me", 60)
        await cp.set_feature_flag("visible-flag", True)
        config = await cp.set_cluster_config(ClusterConfig(node_timeout=42.0))
        for consistent in (True, False):
            state = await cp.get_cluster_state(consistent=consistent)
            what = f"get_cluster_state(consistent={consistent})"
            require(state.version >= config.version, f"{what}: version {state.version} is old")
            require_equal(state.indices.get("visible"), await cp.get_index("visible"), what)
            require_equal(state.indices["visible"].name, index.name, what)
            require_equal(state.nodes.get("visible-node"), node, f"{what}: the node")
            require_equal(state.locks.get("visible/lock"), lock, f"{what}: the lock")
            require_equal(state.feature_flags.get("visible-flag"), True, f"{what}: the flag")
            require_equal(state.config, config, f"{what}: the config")
        require(
            "visible" not in before.indices and not before.nodes,
            "a state read before the writes must not change afterwards",
        )


@check(AREA)
async def check_one_version_per_mutation(harness: BackendHarness) -> None:
    """Every mutation produces exactly one new version, carried by all its events and by the
    version fields of what it returns; a failed or no-op call produces none."""
    async with harness.open() as cp:
        v0 = await version_now(cp)
        returned: list[tuple[str, int]] = []
        node = await cp.register_node(Node(id="v-node"))
        returned.append(("register_node", node.registered_version))
        index = await cp.create_index("v-index", index_settings(1, 1))
        returned.append(("create_index", index.created_version))
        updated = await cp.update_index_settings("v-index", index_settings(1, 0))
        returned.append(("update_index_settings", updated.updated_version))
        config = await cp.set_cluster_config(ClusterConfig(node_timeout=15.0))
        returned.append(("set_cluster_config", config.version))
        ring = await cp.update_hash_ring(vnodes=32)
        returned.append(("update_hash_ring", ring.version))
        await cp.acquire_lock("v/lock", "me", 60)
        await cp.set_feature_flag("v-flag", True)
        await cp.set_feature_flag("v-flag", True)  # no change: no new version
        await expect_error(
            ConflictError,
            cp.allocate_shard("v-index", 0, "v-node"),
            "allocate to the node that holds the only copy (fails: no new version)",
        )
        marker = await write_marker(cp)
        async with cp.watch(since=v0) as stream:
            events = await collect_until_marker(stream, marker, harness.timeout)
        versions: list[int] = []
        for event in events:
            if not versions or versions[-1] != event.version:
                versions.append(event.version)
        require(
            all(a < b for a, b in itertools.pairwise(versions)),
            f"event versions must not go back: {describe(events)}",
        )
        require_equal(len(versions), 7, f"distinct versions of 7 mutations ({describe(events)})")
        for (what, version), produced in zip(returned, versions, strict=False):
            require_equal(version, produced, f"the version {what} returned")
        first = {
            EventKind.NODE_JOINED: node,
            EventKind.INDEX_CREATED: index,
            EventKind.INDEX_UPDATED: updated,
        }
        for event in events:
            if event.kind in first:
                value = first.pop(event.kind)
                carried = event.node if event.kind is EventKind.NODE_JOINED else event.index
                require_equal(carried, value, f"the value carried by {event.kind}")
        require(not first, f"missing events {sorted(first)} in {describe(events)}")
