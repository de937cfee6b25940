"""Unit tests of the pure StateMachine (DESIGN 3): every command, every error, events, versions."""

from __future__ import annotations

import math

import pytest

from controlplane.commands import (
    AcquireLock,
    AllocateShard,
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
)
from controlplane.errors import (
    AlreadyExistsError,
    ConflictError,
    ControlPlaneError,
    InvalidRequestError,
    LockHeldError,
    LockNotHeldError,
    NotFoundError,
)
from controlplane.state import Outcome, StateMachine
from controlplane.types import (
    ClusterConfig,
    ClusterState,
    EventKind,
    Index,
    IndexSettings,
    Node,
    NodeRole,
    NodeStatus,
    ShardRouting,
    ShardState,
)

K = EventKind
T0 = 1_000.0
MASTER = frozenset({NodeRole.MASTER})


# --- helpers ----------------------------------------------------------------------------------


def ok(sm: StateMachine, cmd: Command) -> Outcome:
    """Apply a command that must succeed and change the state by exactly one version."""
    before = sm.state.version
    outcome = sm.apply(cmd)
    assert outcome.error is None, f"{cmd!r} failed: {outcome.error!r}"
    assert outcome.events, f"{cmd!r} changed nothing"
    assert outcome.version == before + 1 == sm.state.version
    assert all(e.version == outcome.version for e in outcome.events)
    return outcome


def noop(sm: StateMachine, cmd: Command) -> Outcome:
    """Apply a command that must succeed without changing anything."""
    before = sm.state
    outcome = sm.apply(cmd)
    assert outcome.error is None, f"{cmd!r} failed: {outcome.error!r}"
    assert outcome.events == ()
    assert outcome.version == before.version
    assert sm.state is before
    return outcome


def err(sm: StateMachine, cmd: Command, exc_type: type[ControlPlaneError]) -> ControlPlaneError:
    """Apply a command that must fail with exactly ``exc_type`` and leave the state alone."""
    before = sm.state
    outcome = sm.apply(cmd)
    assert type(outcome.error) is exc_type, f"{cmd!r}: expected {exc_type}, got {outcome!r}"
    assert outcome.value is None
    assert outcome.events == ()
    assert outcome.version == before.version
    assert sm.state is before
    assert str(outcome.error)
    return outcome.error


def events(outcome: Outcome) -> list[tuple[EventKind, str]]:
    return [(e.kind, e.key) for e in outcome.events]


def register(sm: StateMachine, *ids: str, zone: str = "", time: float = T0) -> None:
    for node_id in ids:
        ok(sm, RegisterNode(node=Node(id=node_id, zone=zone), time=time))


def create(sm: StateMachine, name: str, shards: int = 1, replicas: int = 1) -> Index:
    settings = IndexSettings(number_of_shards=shards, number_of_replicas=replicas)
    index: Index = ok(sm, CreateIndex(name=name, settings=settings, time=T0)).value
    return index


def start(sm: StateMachine, index: str) -> Index:
    """Report every initializing copy of ``index`` started."""
    for routing in sm.state.indices[index].routing:
        for copy in routing.copies:
            if copy.node_id is not None and copy.state is ShardState.INITIALIZING:
                ok(
                    sm,
                    UpdateShardState(
                        index=index,
                        shard=routing.shard,
                        node_id=copy.node_id,
                        state=ShardState.STARTED,
                        time=T0,
                    ),
                )
    return sm.state.indices[index]


def placed(routing: ShardRouting) -> dict[str, tuple[bool, ShardState]]:
    """node -> (primary, state) of the assigned copies of a shard."""
    return {c.node_id: (c.primary, c.state) for c in routing.copies if c.node_id is not None}


def cluster(*ids: str, manual: bool = False) -> StateMachine:
    sm = StateMachine()
    if manual:
        ok(sm, SetClusterConfig(config=ClusterConfig(auto_allocate=False), time=T0))
    register(sm, *ids)
    return sm


# --- versions, time, validation ------------------------------------------------------------


def test_new_state_machine_is_empty_at_version_zero() -> None:
    sm = StateMachine()
    assert sm.state == ClusterState()
    assert sm.state.version == 0
    assert sm.next_lock_expiry() is None


def test_each_mutation_produces_exactly_one_version_carried_by_all_its_events() -> None:
    sm = StateMachine()
    first = ok(sm, RegisterNode(node=Node(id="a"), time=T0))
    assert events(first) == [(K.NODE_JOINED, "a"), (K.RING_UPDATED, "")]
    second = ok(sm, SetFeatureFlag(name="f", enabled=True, time=T0))
    assert second.version == first.version + 1


def test_replicated_time_never_goes_backwards() -> None:
    sm = StateMachine()
    ok(sm, SetFeatureFlag(name="a", enabled=True, time=T0 + 10))
    ok(sm, SetFeatureFlag(name="b", enabled=True, time=T0))  # an older leader's clock
    assert sm.state.now == T0 + 10
    ok(sm, AcquireLock(key="k", holder="h", ttl=5, time=T0))
    assert sm.state.locks["k"].expires_at == T0 + 15  # measured from replicated time


def test_failed_and_noop_commands_do_not_advance_time() -> None:
    sm = StateMachine()
    ok(sm, SetFeatureFlag(name="a", enabled=True, time=T0))
    err(sm, DeleteIndex(name="missing", time=T0 + 50), NotFoundError)
    noop(sm, SetFeatureFlag(name="a", enabled=True, time=T0 + 60))
    assert sm.state.now == T0


BAD_COMMANDS: list[Command] = [
    RegisterNode(node=Node(id="Bad")),
    RegisterNode(node=Node(id="ok", zone="Bad Zone")),
    UnregisterNode(node_id=""),
    UpdateNodeStatus(node_id="a_b", status=NodeStatus.DOWN),
    MarkNodesDown(node_ids=("ok", "-x")),
    CreateIndex(name="UPPER"),
    CreateIndex(name="x" * 64),
    CreateIndex(name="ok", settings=IndexSettings(number_of_shards=0)),
    CreateIndex(name="ok", settings=IndexSettings(number_of_replicas=-1)),
    CreateIndex(name="ok", settings=IndexSettings(number_of_shards=2000)),
    DeleteIndex(name="a.b"),
    UpdateIndexSettings(name="ok", settings=IndexSettings(number_of_replicas=99)),
    AllocateShard(index="ok", shard=-1, node_id="a"),
    AllocateShard(index="ok", shard=0, node_id="a", from_node="B"),
    DeallocateShard(index="ok", shard=0, node_id="A"),
    UpdateShardState(index="ok", shard=0, node_id="a", state=ShardState.INITIALIZING),
    UpdateShardState(index="ok", shard=0, node_id="a", state=ShardState.RELOCATING),
    AcquireLock(key="", holder="h", ttl=1),
    AcquireLock(key="k", holder="", ttl=1),
    AcquireLock(key="k", holder="h", ttl=0),
    AcquireLock(key="k", holder="h", ttl=-5),
    AcquireLock(key="k", holder="h", ttl=math.nan),
    AcquireLock(key="k", holder="h", ttl=math.inf),
    AcquireLock(key="k\x00", holder="h", ttl=1),
    AcquireLock(key="k" * 254, holder="h", ttl=1),
    RenewLock(key="k", holder="h", token=1, ttl=0),
    ReleaseLock(key="", holder="h", token=1),
    UpdateHashRing(vnodes=0),
    UpdateHashRing(vnodes=5000),
    UpdateHashRing(replication_factor=17),
    UpdateHashRing(nodes=("a", "a")),
    UpdateHashRing(nodes=("Bad",)),
    SetClusterConfig(config=ClusterConfig(node_timeout=0)),
    SetClusterConfig(config=ClusterConfig(max_lock_ttl=-1)),
    SetClusterConfig(config=ClusterConfig(settings={"Bad Key": 1})),
    SetFeatureFlag(name="", enabled=True),
    SetFeatureFlag(name="Flag", enabled=True),
]


@pytest.mark.parametrize("cmd", BAD_COMMANDS, ids=lambda c: type(c).__name__)
def test_invalid_commands_are_returned_as_invalid_request_errors(cmd: Command) -> None:
    sm = cluster("a", "b")
    create(sm, "ok")
    err(sm, cmd, InvalidRequestError)


# --- nodes -------------------------------------------------------------------------------------


def test_register_node_sets_registered_version_and_joins_the_ring() -> None:
    sm = StateMachine()
    outcome = ok(sm, RegisterNode(node=Node(id="a", address="h:1"), time=T0))
    node = outcome.value
    assert node.registered_version == outcome.version == 1
    assert sm.state.nodes["a"] == node
    assert outcome.events[0].node == node
    assert sm.state.hash_ring.nodes == ("a",)
    assert sm.state.hash_ring.version == 1


def test_register_identical_node_again_is_a_noop() -> None:
    sm = cluster("a")
    assert noop(sm, RegisterNode(node=Node(id="a"), time=T0 + 5)).value == sm.state.nodes["a"]


def test_reregister_changed_node_updates_it_and_keeps_registered_version() -> None:
    sm = cluster("a", "b")
    outcome = ok(sm, RegisterNode(node=Node(id="a", address="new:1"), time=T0))
    assert events(outcome) == [(K.NODE_UPDATED, "a")]
    assert outcome.value.address == "new:1"
    assert outcome.value.registered_version == 1


def test_register_non_data_node_stays_out_of_the_ring() -> None:
    sm = cluster("a")
    outcome = ok(sm, RegisterNode(node=Node(id="m", roles=MASTER), time=T0))
    assert events(outcome) == [(K.NODE_JOINED, "m")]
    assert sm.state.hash_ring.nodes == ("a",)


def test_node_losing_the_data_role_gives_up_its_copies() -> None:
    sm = cluster("a", "b", "c")
    create(sm, "i", shards=1, replicas=1)
    holder = sm.state.indices["i"].routing[0].primary.node_id
    assert holder is not None
    ok(sm, RegisterNode(node=Node(id=holder, roles=MASTER), time=T0))
    routing = sm.state.indices["i"].routing[0]
    assert holder not in placed(routing)
    assert len(placed(routing)) == 2
    assert holder not in sm.state.hash_ring.nodes


def test_unregister_node() -> None:
    sm = cluster("a", "b", "c")
    create(sm, "i", shards=1, replicas=1)
    start(sm, "i")
    routing = sm.state.indices["i"].routing[0]
    primary, replica = routing.primary.node_id, routing.replicas[0].node_id
    assert primary is not None and replica is not None
    outcome = ok(sm, UnregisterNode(node_id=primary, time=T0))
    kinds = events(outcome)
    assert kinds[0] == (K.NODE_LEFT, primary)
    assert (K.SHARD_UNASSIGNED, "i") in kinds
    assert (K.SHARD_PROMOTED, "i") in kinds
    assert (K.SHARD_ALLOCATED, "i") in kinds
    assert kinds[-1] == (K.RING_UPDATED, "")
    assert primary not in sm.state.nodes
    after = sm.state.indices["i"].routing[0]
    assert after.primary.node_id == replica
    assert after.primary.state is ShardState.STARTED
    (spare,) = {"a", "b", "c"} - {primary, replica}
    assert placed(after)[spare] == (False, ShardState.INITIALIZING)
    err(sm, UnregisterNode(node_id=primary, time=T0), NotFoundError)


def test_update_node_status() -> None:
    sm = cluster("a", "b")
    err(sm, UpdateNodeStatus(node_id="ghost", status=NodeStatus.DOWN), NotFoundError)
    noop(sm, UpdateNodeStatus(node_id="a", status=NodeStatus.ACTIVE))
    draining = ok(sm, UpdateNodeStatus(node_id="b", status=NodeStatus.DRAINING, time=T0))
    assert events(draining) == [(K.NODE_UPDATED, "b")]
    assert draining.value.status is NodeStatus.DRAINING
    assert "b" in sm.state.hash_ring.nodes  # a draining node still serves its keys
    down = ok(sm, UpdateNodeStatus(node_id="b", status=NodeStatus.DOWN, time=T0))
    assert events(down) == [(K.NODE_DOWN, "b"), (K.RING_UPDATED, "")]
    assert sm.state.hash_ring.nodes == ("a",)


def test_draining_node_keeps_its_copies_but_gets_no_new_ones() -> None:
    sm = cluster("a", "b")
    create(sm, "old", shards=1, replicas=1)
    ok(sm, UpdateNodeStatus(node_id="b", status=NodeStatus.DRAINING, time=T0))
    assert "b" in placed(sm.state.indices["old"].routing[0])
    new = create(sm, "new", shards=2, replicas=1)
    for routing in new.routing:
        assert set(placed(routing)) == {"a"}


def test_node_back_to_active_receives_pending_copies() -> None:
    sm = cluster("a", "b")
    ok(sm, UpdateNodeStatus(node_id="b", status=NodeStatus.DOWN, time=T0))
    create(sm, "i", shards=2, replicas=1)
    outcome = ok(sm, UpdateNodeStatus(node_id="b", status=NodeStatus.ACTIVE, time=T0))
    assert events(outcome) == [
        (K.NODE_UPDATED, "b"),
        (K.SHARD_ALLOCATED, "i"),
        (K.SHARD_ALLOCATED, "i"),
        (K.RING_UPDATED, ""),
    ]
    for routing in sm.state.indices["i"].routing:
        assert set(placed(routing)) == {"a", "b"}


def test_mark_nodes_down_marks_only_live_known_nodes() -> None:
    sm = cluster("a", "b", "c")
    ok(sm, UpdateNodeStatus(node_id="c", status=NodeStatus.DOWN, time=T0))
    outcome = ok(sm, MarkNodesDown(node_ids=("b", "ghost", "c", "a"), time=T0))
    assert outcome.value == ("a", "b")
    assert [k for k in events(outcome) if k[0] is K.NODE_DOWN] == [
        (K.NODE_DOWN, "a"),
        (K.NODE_DOWN, "b"),
    ]
    noop(sm, MarkNodesDown(node_ids=("a", "ghost"), time=T0))


def test_node_down_promotes_started_replicas_and_replaces_missing_copies() -> None:
    sm = cluster("a", "b", "c")
    create(sm, "i", shards=3, replicas=1)
    before = start(sm, "i").routing
    victim = before[0].primary.node_id
    assert victim is not None
    outcome = ok(sm, MarkNodesDown(node_ids=(victim,), time=T0))
    assert (K.SHARD_PROMOTED, "i") in events(outcome)
    for old, new in zip(before, sm.state.indices["i"].routing, strict=True):
        assert victim not in placed(new)
        assert len(placed(new)) == 2  # re-placed on the two other nodes
        if old.primary.node_id == victim:
            assert new.primary.node_id == old.replicas[0].node_id
            assert new.primary.state is ShardState.STARTED
        else:
            assert new.primary == old.primary


def test_node_down_without_started_replica_leaves_the_primary_to_be_replaced() -> None:
    sm = cluster("a", "b")
    create(sm, "i", shards=1, replicas=1)  # both copies INITIALIZING
    primary = sm.state.indices["i"].routing[0].primary.node_id
    assert primary is not None
    outcome = ok(sm, MarkNodesDown(node_ids=(primary,), time=T0))
    assert (K.SHARD_PROMOTED, "i") not in events(outcome)
    routing = sm.state.indices["i"].routing[0]
    assert routing.primary.node_id is None
    assert routing.primary.state is ShardState.UNASSIGNED


# --- indices -----------------------------------------------------------------------------------


def test_create_index_places_copies_and_emits_one_event() -> None:
    sm = cluster("a", "b", "c")
    settings = IndexSettings(number_of_shards=2, number_of_replicas=1, extra={"codec": "lz4"})
    outcome = ok(
        sm, CreateIndex(name="i", settings=settings, mappings={"p": {"type": "text"}}, time=T0)
    )
    assert events(outcome) == [(K.INDEX_CREATED, "i")]
    index = outcome.value
    assert outcome.events[0].index == index == sm.state.indices["i"]
    assert index.created_version == index.updated_version == outcome.version
    assert index.mappings == {"p": {"type": "text"}}
    assert index.settings == settings
    for routing in index.routing:
        assert [c.primary for c in routing.copies] == [True, False]
        assert all(c.state is ShardState.INITIALIZING for c in routing.copies)
        assert len(placed(routing)) == 2


def test_create_index_without_nodes_leaves_copies_unassigned() -> None:
    sm = StateMachine()
    index = create(sm, "i", shards=2, replicas=2)
    assert all(
        c.node_id is None and c.state is ShardState.UNASSIGNED
        for r in index.routing
        for c in r.copies
    )


def test_create_existing_index_fails() -> None:
    sm = StateMachine()
    create(sm, "i")
    err(sm, CreateIndex(name="i", time=T0), AlreadyExistsError)


def test_delete_index() -> None:
    sm = cluster("a", "b")
    index = create(sm, "i", shards=2, replicas=1)
    err(sm, DeleteIndex(name="missing"), NotFoundError)
    outcome = ok(sm, DeleteIndex(name="i", time=T0))
    assert events(outcome) == [(K.INDEX_DELETED, "i")]
    assert outcome.events[0].index == index
    assert "i" not in sm.state.indices
    # the deleted copies no longer count: a new index spreads over both nodes evenly
    ok(sm, RegisterNode(node=Node(id="c"), time=T0))
    new = create(sm, "j", shards=3, replicas=0)
    assert sorted(r.primary.node_id or "" for r in new.routing) == ["a", "b", "c"]


def test_update_index_settings_errors_and_noop() -> None:
    sm = cluster("a")
    create(sm, "i", shards=2, replicas=1)
    same = IndexSettings(number_of_shards=2, number_of_replicas=1)
    err(sm, UpdateIndexSettings(name="missing", settings=same), NotFoundError)
    err(
        sm,
        UpdateIndexSettings(name="i", settings=IndexSettings(number_of_shards=3)),
        InvalidRequestError,
    )
    noop(sm, UpdateIndexSettings(name="i", settings=same, time=T0))


def test_update_index_settings_patch_changes_only_the_keys_it_names() -> None:
    sm = cluster("a", "b")
    settings = IndexSettings(number_of_shards=2, number_of_replicas=1, extra={"a": 1, "b": "x"})
    ok(sm, CreateIndex(name="i", settings=settings, time=T0))
    patch = {"number_of_replicas": 0, "b": None, "c": True}
    outcome = ok(sm, UpdateIndexSettings(name="i", patch=patch, time=T0))
    assert outcome.value.settings == IndexSettings(
        number_of_shards=2, number_of_replicas=0, extra={"a": 1, "c": True}
    )
    assert all(len(r.copies) == 1 for r in outcome.value.routing)
    ok(sm, UpdateIndexSettings(name="i", patch={"replicas": 1}, time=T0))
    assert sm.state.indices["i"].settings.number_of_replicas == 1
    noop(sm, UpdateIndexSettings(name="i", patch={"shards": 2}, time=T0))
    err(sm, UpdateIndexSettings(name="i", patch={"number_of_shards": 3}), InvalidRequestError)
    err(sm, UpdateIndexSettings(name="i", patch={"replicas": -1}), InvalidRequestError)
    err(sm, UpdateIndexSettings(name="i", patch={"extra": 5}), InvalidRequestError)
    err(sm, UpdateIndexSettings(name="i"), InvalidRequestError)
    err(sm, UpdateIndexSettings(name="i", settings=settings, patch=patch), InvalidRequestError)
    err(sm, UpdateIndexSettings(name="missing", patch=patch), NotFoundError)


def test_update_index_settings_adds_and_places_replicas() -> None:
    sm = cluster("a", "b", "c")
    create(sm, "i", shards=2, replicas=0)
    settings = IndexSettings(number_of_shards=2, number_of_replicas=2, extra={"x": 1})
    outcome = ok(sm, UpdateIndexSettings(name="i", settings=settings, time=T0))
    assert events(outcome) == [(K.INDEX_UPDATED, "i")]
    index = outcome.value
    assert index.settings == settings
    assert index.updated_version == outcome.version
    for routing in index.routing:
        assert len(routing.copies) == 3
        assert set(placed(routing)) == {"a", "b", "c"}


def test_update_index_settings_drops_least_useful_replicas_first() -> None:
    sm = cluster("a", "b", "c", manual=True)
    create(sm, "i", shards=1, replicas=3)
    for node_id in ("a", "b", "c"):
        ok(sm, AllocateShard(index="i", shard=0, node_id=node_id, time=T0))
    ok(sm, UpdateShardState(index="i", shard=0, node_id="a", state=ShardState.STARTED))
    ok(sm, UpdateShardState(index="i", shard=0, node_id="b", state=ShardState.STARTED))
    # copies: a primary started, b replica started, c replica initializing, one unassigned
    two = IndexSettings(number_of_shards=1, number_of_replicas=2)
    ok(sm, UpdateIndexSettings(name="i", settings=two, time=T0))
    assert set(placed(sm.state.indices["i"].routing[0])) == {"a", "b", "c"}  # unassigned went
    one = IndexSettings(number_of_shards=1, number_of_replicas=1)
    ok(sm, UpdateIndexSettings(name="i", settings=one, time=T0))
    assert placed(sm.state.indices["i"].routing[0]) == {
        "a": (True, ShardState.STARTED),
        "b": (False, ShardState.STARTED),
    }  # then the initializing one
    zero = IndexSettings(number_of_shards=1, number_of_replicas=0)
    ok(sm, UpdateIndexSettings(name="i", settings=zero, time=T0))
    assert placed(sm.state.indices["i"].routing[0]) == {"a": (True, ShardState.STARTED)}


# --- shards ------------------------------------------------------------------------------------


def test_allocate_shard_errors() -> None:
    sm = cluster("a", "b", "c", manual=True)
    ok(sm, RegisterNode(node=Node(id="m", roles=MASTER), time=T0))
    ok(sm, RegisterNode(node=Node(id="d", status=NodeStatus.DRAINING), time=T0))
    create(sm, "i", shards=1, replicas=1)
    ok(sm, AllocateShard(index="i", shard=0, node_id="a", time=T0))
    err(sm, AllocateShard(index="missing", shard=0, node_id="a"), NotFoundError)
    err(sm, AllocateShard(index="i", shard=1, node_id="b"), NotFoundError)
    err(sm, AllocateShard(index="i", shard=0, node_id="ghost"), NotFoundError)
    err(sm, AllocateShard(index="i", shard=0, node_id="m"), ConflictError)
    err(sm, AllocateShard(index="i", shard=0, node_id="d"), ConflictError)
    err(sm, AllocateShard(index="i", shard=0, node_id="a"), ConflictError)
    err(sm, AllocateShard(index="i", shard=0, node_id="b", from_node="c"), NotFoundError)
    err(sm, AllocateShard(index="i", shard=0, node_id="b", from_node="a"), ConflictError)
    ok(sm, AllocateShard(index="i", shard=0, node_id="b", time=T0))
    err(sm, AllocateShard(index="i", shard=0, node_id="c"), ConflictError)


def test_allocate_shard_fills_the_primary_first() -> None:
    sm = cluster("a", "b", manual=True)
    create(sm, "i", shards=1, replicas=1)
    outcome = ok(sm, AllocateShard(index="i", shard=0, node_id="b", time=T0))
    assert events(outcome) == [(K.SHARD_ALLOCATED, "i")]
    assert outcome.events[0].shard == 0
    assert outcome.events[0].copy is not None and outcome.events[0].copy.node_id == "b"
    assert placed(outcome.value) == {"b": (True, ShardState.INITIALIZING)}
    assert outcome.value == sm.state.indices["i"].routing[0]
    assert sm.state.indices["i"].updated_version == outcome.version


def test_move_a_started_copy_through_relocating() -> None:
    sm = cluster("a", "b", "c", manual=True)
    create(sm, "i", shards=1, replicas=0)
    ok(sm, AllocateShard(index="i", shard=0, node_id="a", time=T0))
    start(sm, "i")
    moving = ok(sm, AllocateShard(index="i", shard=0, node_id="b", from_node="a", time=T0))
    assert events(moving) == [(K.SHARD_RELOCATED, "i")]
    (copy,) = moving.value.copies
    assert (copy.node_id, copy.state, copy.relocating_to) == ("a", ShardState.RELOCATING, "b")
    err(sm, AllocateShard(index="i", shard=0, node_id="b"), ConflictError)  # b is a holder
    err(
        sm,
        UpdateShardState(index="i", shard=0, node_id="a", state=ShardState.STARTED),
        ConflictError,
    )
    done = ok(sm, UpdateShardState(index="i", shard=0, node_id="b", state=ShardState.STARTED))
    assert events(done) == [(K.SHARD_STARTED, "i")]
    assert placed(done.value) == {"b": (True, ShardState.STARTED)}
    # a is free again: it may receive a new copy of the shard
    ok(sm, UpdateIndexSettings(name="i", settings=IndexSettings(number_of_replicas=1)))
    ok(sm, AllocateShard(index="i", shard=0, node_id="a", time=T0))


def test_relocation_target_down_cancels_the_move() -> None:
    sm = cluster("a", "b", manual=True)
    create(sm, "i", shards=1, replicas=0)
    ok(sm, AllocateShard(index="i", shard=0, node_id="a", time=T0))
    start(sm, "i")
    ok(sm, AllocateShard(index="i", shard=0, node_id="b", from_node="a", time=T0))
    ok(sm, MarkNodesDown(node_ids=("b",), time=T0))
    (copy,) = sm.state.indices["i"].routing[0].copies
    assert (copy.node_id, copy.state, copy.relocating_to) == ("a", ShardState.STARTED, None)


def test_relocation_source_down_loses_the_copy() -> None:
    sm = cluster("a", "b", manual=True)
    create(sm, "i", shards=1, replicas=0)
    ok(sm, AllocateShard(index="i", shard=0, node_id="a", time=T0))
    start(sm, "i")
    ok(sm, AllocateShard(index="i", shard=0, node_id="b", from_node="a", time=T0))
    ok(sm, MarkNodesDown(node_ids=("a",), time=T0))
    (copy,) = sm.state.indices["i"].routing[0].copies
    assert (copy.node_id, copy.state, copy.relocating_to) == (None, ShardState.UNASSIGNED, None)


def test_deallocate_shard() -> None:
    sm = cluster("a", "b", "c")
    create(sm, "i", shards=1, replicas=1)
    start(sm, "i")
    routing = sm.state.indices["i"].routing[0]
    primary, replica = routing.primary.node_id, routing.replicas[0].node_id
    assert primary is not None and replica is not None
    (spare,) = {"a", "b", "c"} - {primary, replica}
    err(sm, DeallocateShard(index="i", shard=0, node_id=spare), NotFoundError)
    err(sm, DeallocateShard(index="missing", shard=0, node_id=spare), NotFoundError)
    err(sm, DeallocateShard(index="i", shard=3, node_id=spare), NotFoundError)
    outcome = ok(sm, DeallocateShard(index="i", shard=0, node_id=primary, time=T0))
    assert events(outcome) == [
        (K.SHARD_UNASSIGNED, "i"),
        (K.SHARD_PROMOTED, "i"),
        (K.SHARD_ALLOCATED, "i"),
    ]
    assert placed(outcome.value) == {
        replica: (True, ShardState.STARTED),
        spare: (False, ShardState.INITIALIZING),
    }  # placed elsewhere than the node it was taken off


def test_deallocate_with_auto_allocation_off_leaves_the_copy_unassigned() -> None:
    sm = cluster("a", "b", manual=True)
    create(sm, "i", shards=1, replicas=1)
    ok(sm, AllocateShard(index="i", shard=0, node_id="a", time=T0))
    ok(sm, AllocateShard(index="i", shard=0, node_id="b", time=T0))
    outcome = ok(sm, DeallocateShard(index="i", shard=0, node_id="b", time=T0))
    assert events(outcome) == [(K.SHARD_UNASSIGNED, "i")]
    assert placed(outcome.value) == {"a": (True, ShardState.INITIALIZING)}


def test_update_shard_state() -> None:
    sm = cluster("a", "b", "c")
    create(sm, "i", shards=1, replicas=1)
    routing = sm.state.indices["i"].routing[0]
    primary, replica = routing.primary.node_id, routing.replicas[0].node_id
    assert primary is not None and replica is not None
    (spare,) = {"a", "b", "c"} - {primary, replica}
    started = UpdateShardState(index="i", shard=0, node_id=primary, state=ShardState.STARTED)
    outcome = ok(sm, started)
    assert events(outcome) == [(K.SHARD_STARTED, "i")]
    assert outcome.events[0].copy is not None
    assert outcome.events[0].copy.state is ShardState.STARTED
    noop(sm, started)  # reported twice
    up = ShardState.STARTED
    err(sm, UpdateShardState(index="missing", shard=0, node_id=primary, state=up), NotFoundError)
    err(sm, UpdateShardState(index="i", shard=9, node_id=primary, state=up), NotFoundError)
    err(sm, UpdateShardState(index="i", shard=0, node_id=spare, state=up), NotFoundError)
    err(
        sm,
        UpdateShardState(index="i", shard=0, node_id=spare, state=ShardState.UNASSIGNED),
        NotFoundError,
    )
    failed = ok(
        sm, UpdateShardState(index="i", shard=0, node_id=replica, state=ShardState.UNASSIGNED)
    )
    assert events(failed) == [(K.SHARD_UNASSIGNED, "i"), (K.SHARD_ALLOCATED, "i")]
    assert placed(failed.value) == {
        primary: (True, ShardState.STARTED),
        spare: (False, ShardState.INITIALIZING),
    }  # not back on the node that reported the failure


# --- locks -------------------------------------------------------------------------------------


def test_acquire_lock() -> None:
    sm = StateMachine()
    outcome = ok(sm, AcquireLock(key="k", holder="h", ttl=5, time=T0))
    lock = outcome.value
    assert events(outcome) == [(K.LOCK_ACQUIRED, "k")]
    assert outcome.events[0].lock == lock == sm.state.locks["k"]
    assert (lock.key, lock.holder, lock.ttl) == ("k", "h", 5)
    assert (lock.acquired_at, lock.expires_at) == (T0, T0 + 5)
    assert lock.token == outcome.version
    assert sm.next_lock_expiry() == T0 + 5
    err(sm, AcquireLock(key="k", holder="other", ttl=5, time=T0 + 4.9), LockHeldError)
    err(sm, AcquireLock(key="k", holder="h", ttl=5, time=T0 + 1), LockHeldError)


def test_acquire_lock_ttl_is_bounded_by_config() -> None:
    sm = StateMachine()
    ok(sm, SetClusterConfig(config=ClusterConfig(max_lock_ttl=10), time=T0))
    err(sm, AcquireLock(key="k", holder="h", ttl=10.5, time=T0), InvalidRequestError)
    lock = ok(sm, AcquireLock(key="k", holder="h", ttl=10, time=T0)).value
    err(sm, RenewLock(key="k", holder="h", token=lock.token, ttl=11, time=T0), InvalidRequestError)


def test_acquire_an_expired_lock_that_was_not_reaped_yet() -> None:
    sm = StateMachine()
    old = ok(sm, AcquireLock(key="k", holder="h", ttl=5, time=T0)).value
    outcome = ok(sm, AcquireLock(key="k", holder="other", ttl=5, time=T0 + 5))
    assert events(outcome) == [(K.LOCK_EXPIRED, "k"), (K.LOCK_ACQUIRED, "k")]
    assert outcome.events[0].lock == old
    assert outcome.value.token > old.token
    assert sm.next_lock_expiry() == T0 + 10


def test_renew_lock() -> None:
    sm = StateMachine()
    lock = ok(sm, AcquireLock(key="k", holder="h", ttl=5, time=T0)).value
    err(sm, RenewLock(key="k", holder="x", token=lock.token, time=T0), LockNotHeldError)
    err(sm, RenewLock(key="k", holder="h", token=lock.token + 1, time=T0), LockNotHeldError)
    err(sm, RenewLock(key="free", holder="h", token=lock.token, time=T0), LockNotHeldError)
    outcome = ok(sm, RenewLock(key="k", holder="h", token=lock.token, time=T0 + 3))
    assert events(outcome) == [(K.LOCK_RENEWED, "k")]
    renewed = outcome.value
    assert (renewed.token, renewed.ttl, renewed.acquired_at) == (lock.token, 5, T0)
    assert renewed.expires_at == T0 + 8
    longer = ok(sm, RenewLock(key="k", holder="h", token=lock.token, ttl=20, time=T0 + 4)).value
    assert (longer.ttl, longer.expires_at) == (20, T0 + 24)
    assert sm.next_lock_expiry() == T0 + 24
    err(sm, RenewLock(key="k", holder="h", token=lock.token, time=T0 + 24), LockNotHeldError)


def test_release_lock() -> None:
    sm = StateMachine()
    lock = ok(sm, AcquireLock(key="k", holder="h", ttl=5, time=T0)).value
    err(sm, ReleaseLock(key="k", holder="x", token=lock.token), LockNotHeldError)
    err(sm, ReleaseLock(key="k", holder="h", token=lock.token - 1), LockNotHeldError)
    outcome = ok(sm, ReleaseLock(key="k", holder="h", token=lock.token, time=T0))
    assert events(outcome) == [(K.LOCK_RELEASED, "k")]
    assert outcome.events[0].lock == lock
    assert "k" not in sm.state.locks
    assert sm.next_lock_expiry() is None
    err(sm, ReleaseLock(key="k", holder="h", token=lock.token), LockNotHeldError)
    again = ok(sm, AcquireLock(key="k", holder="h", ttl=5, time=T0)).value
    assert again.token > lock.token


def test_release_after_expiry_fails() -> None:
    sm = StateMachine()
    lock = ok(sm, AcquireLock(key="k", holder="h", ttl=5, time=T0)).value
    err(sm, ReleaseLock(key="k", holder="h", token=lock.token, time=T0 + 5), LockNotHeldError)


def test_expire_locks_reaps_only_due_locks_in_order() -> None:
    sm = StateMachine()
    ok(sm, AcquireLock(key="b", holder="h", ttl=5, time=T0))
    ok(sm, AcquireLock(key="a", holder="h", ttl=5, time=T0))
    ok(sm, AcquireLock(key="c", holder="h", ttl=9, time=T0))
    noop(sm, ExpireLocks(time=T0 + 4.99))
    outcome = ok(sm, ExpireLocks(time=T0 + 5))
    assert outcome.value == ("a", "b")
    assert events(outcome) == [(K.LOCK_EXPIRED, "a"), (K.LOCK_EXPIRED, "b")]
    assert set(sm.state.locks) == {"c"}
    assert sm.next_lock_expiry() == T0 + 9


def test_expire_locks_skips_renewed_and_reacquired_locks() -> None:
    sm = StateMachine()
    a = ok(sm, AcquireLock(key="a", holder="h", ttl=5, time=T0)).value
    ok(sm, RenewLock(key="a", holder="h", token=a.token, time=T0 + 3))  # now due at T0 + 8
    b = ok(sm, AcquireLock(key="b", holder="h", ttl=5, time=T0)).value
    ok(sm, ReleaseLock(key="b", holder="h", token=b.token, time=T0))
    ok(sm, AcquireLock(key="b", holder="h", ttl=7, time=T0))  # now is T0 + 3: due at T0 + 10
    noop(sm, ExpireLocks(time=T0 + 7))
    assert ok(sm, ExpireLocks(time=T0 + 8)).value == ("a",)
    assert ok(sm, ExpireLocks(time=T0 + 10)).value == ("b",)


def test_expire_locks_after_a_renewal_that_kept_the_same_expiry() -> None:
    """A renewal at the very time of acquisition gives the same ``expires_at``; expiring the
    lock later must still work and return an error-free outcome (regression: KeyError)."""
    sm = StateMachine()
    lock = ok(sm, AcquireLock(key="k", holder="h", ttl=5, time=T0)).value
    ok(sm, RenewLock(key="k", holder="h", token=lock.token, time=T0))
    outcome = ok(sm, ExpireLocks(time=T0 + 5))
    assert outcome.value == ("k",)
    assert events(outcome) == [(K.LOCK_EXPIRED, "k")]
    assert sm.next_lock_expiry() is None


# --- hash ring, configuration, flags ----------------------------------------------------------


def test_ring_follows_membership() -> None:
    sm = cluster("b", "a")
    before = sm.state.hash_ring
    assert before.nodes == ("a", "b")
    assert before.follow_membership
    ok(sm, UnregisterNode(node_id="b", time=T0))
    after = sm.state.hash_ring
    assert after.nodes == ("a",)


def test_update_hash_ring() -> None:
    sm = cluster("a", "b")
    pinned = ok(sm, UpdateHashRing(nodes=("x", "y"), vnodes=8, time=T0))
    assert events(pinned) == [(K.RING_UPDATED, "")]
    ring = pinned.value
    assert (ring.nodes, ring.vnodes, ring.follow_membership) == (("x", "y"), 8, False)
    assert ring.version == pinned.version
    assert pinned.events[0].ring == ring
    ok(sm, RegisterNode(node=Node(id="c"), time=T0))
    assert sm.state.hash_ring == ring  # pinned: membership changes do not move it
    noop(sm, UpdateHashRing(vnodes=8, time=T0))
    err(sm, UpdateHashRing(nodes=("x",), follow_membership=True), InvalidRequestError)
    rf = ok(sm, UpdateHashRing(replication_factor=2, time=T0)).value
    assert (rf.replication_factor, rf.nodes) == (2, ("x", "y"))
    following = ok(sm, UpdateHashRing(follow_membership=True, time=T0)).value
    assert (following.nodes, following.follow_membership) == (("a", "b", "c"), True)


def test_set_cluster_config_compare_and_set() -> None:
    sm = StateMachine()
    first = ok(sm, SetClusterConfig(config=ClusterConfig(node_timeout=5), expected_version=0))
    assert events(first) == [(K.CONFIG_CHANGED, "")]
    assert first.value.version == first.version
    assert first.events[0].config == first.value == sm.state.config
    err(
        sm,
        SetClusterConfig(config=ClusterConfig(node_timeout=6), expected_version=0),
        ConflictError,
    )
    second = ok(sm, SetClusterConfig(config=ClusterConfig(node_timeout=6), expected_version=1))
    assert second.value.node_timeout == 6
    assert ok(sm, SetClusterConfig(config=ClusterConfig(node_timeout=7))).value.version == 3


def test_turning_auto_allocation_back_on_places_pending_copies() -> None:
    sm = cluster("a", "b", manual=True)
    create(sm, "i", shards=1, replicas=1)
    outcome = ok(sm, SetClusterConfig(config=ClusterConfig(auto_allocate=True), time=T0))
    assert events(outcome) == [
        (K.CONFIG_CHANGED, ""),
        (K.SHARD_ALLOCATED, "i"),
        (K.SHARD_ALLOCATED, "i"),
    ]
    assert set(placed(sm.state.indices["i"].routing[0])) == {"a", "b"}


def test_feature_flags() -> None:
    sm = StateMachine()
    on = ok(sm, SetFeatureFlag(name="beta_ui.v2", enabled=True, time=T0))
    assert events(on) == [(K.FLAG_CHANGED, "beta_ui.v2")]
    assert on.events[0].enabled is True
    noop(sm, SetFeatureFlag(name="beta_ui.v2", enabled=True))
    off = ok(sm, SetFeatureFlag(name="beta_ui.v2", enabled=False))
    assert off.events[0].enabled is False
    assert dict(sm.state.feature_flags) == {"beta_ui.v2": False}


# --- restore -----------------------------------------------------------------------------------


def test_restore_state_replaces_everything_with_a_newer_version() -> None:
    source = cluster("a", "b")
    create(source, "i", shards=2, replicas=1)
    ok(source, AcquireLock(key="k", holder="h", ttl=50, time=T0))
    sm = StateMachine()
    ok(sm, SetFeatureFlag(name="gone", enabled=True, time=T0 + 100))
    outcome = sm.apply(RestoreState(state=source.state, time=T0))
    assert outcome.error is None
    assert events(outcome) == [(K.STATE_RESTORED, "")]
    assert outcome.events[0].version == outcome.version == sm.state.version
    assert outcome.version == source.state.version + 1
    assert sm.state.now == T0 + 100  # time never goes back
    assert sm.state.indices == source.state.indices
    assert sm.state.nodes == source.state.nodes
    assert "gone" not in sm.state.feature_flags
    assert sm.next_lock_expiry() == T0 + 50
    # Derived data was rebuilt: placement continues from the restored copies.
    ok(sm, RegisterNode(node=Node(id="c"), time=T0))
    new = create(sm, "j", shards=1, replicas=0)
    assert new.routing[0].primary.node_id == "c"


def test_restore_an_older_state_still_moves_the_version_forward() -> None:
    sm = StateMachine()
    for i in range(5):
        ok(sm, SetFeatureFlag(name=f"f{i}", enabled=True, time=T0))
    outcome = sm.apply(RestoreState(state=ClusterState(version=2), time=T0))
    assert outcome.version == sm.state.version == 6
    assert dict(sm.state.feature_flags) == {}


def test_outcome_unwrap() -> None:
    sm = StateMachine()
    assert sm.apply(SetFeatureFlag(name="f", enabled=True)).unwrap() is None
    with pytest.raises(NotFoundError):
        sm.apply(DeleteIndex(name="missing")).unwrap()


def test_ring_members_stay_sorted_through_joins_leaves_and_status_changes() -> None:
    sm = StateMachine()
    ids = [f"n{(i * 37) % 101:03d}" for i in range(101)]
    for node_id in ids:
        sm.apply(RegisterNode(node=Node(id=node_id), time=1.0))
    assert sm.state.hash_ring.nodes == tuple(sorted(ids))
    sm.apply(UpdateNodeStatus(node_id="n050", status=NodeStatus.DOWN, time=1.0))
    sm.apply(UnregisterNode(node_id="n007", time=1.0))
    sm.apply(UpdateNodeStatus(node_id="n050", status=NodeStatus.ACTIVE, time=1.0))
    sm.apply(UpdateNodeStatus(node_id="n020", status=NodeStatus.DOWN, time=1.0))
    want = tuple(sorted(set(ids) - {"n007", "n020"}))
    assert sm.state.hash_ring.nodes == want
    assert StateMachine(sm.state).state.hash_ring.nodes == want
