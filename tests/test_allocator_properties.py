"""Property tests of shard allocation (DESIGN 3.3), driven through the StateMachine.

Placement is tested where it happens: the StateMachine applies commands and the allocator
decides. Checked: the shape of every routing table, distinct nodes and zones, balance, minimal
movement, recovery from a node going DOWN, eligibility, determinism, and snapshot round trips.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.codec import decode_state, encode_state, state_from_json, state_to_json
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
    SetClusterConfig,
    UnregisterNode,
    UpdateHashRing,
    UpdateIndexSettings,
    UpdateNodeStatus,
    UpdateShardState,
)
from controlplane.state import StateMachine
from controlplane.types import (
    ClusterConfig,
    ClusterState,
    IndexSettings,
    Node,
    NodeRole,
    NodeStatus,
    ShardCopy,
    ShardRouting,
    ShardState,
)

# No example database: it would write a .hypothesis/ directory into the tree.
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

T0 = 1_700_000_000.0
NODE_IDS = [f"n{i}" for i in range(12)]
INDEX_NAMES = [f"idx-{i}" for i in range(5)]
ZONES = ["za", "zb", "zc", "zd"]


# --- helpers ------------------------------------------------------------------------------------


def apply_ok(sm: StateMachine, cmd: Command) -> None:
    outcome = sm.apply(cmd)
    assert outcome.error is None, f"{cmd!r}: {outcome.error!r}"


def eligible(node: Node) -> bool:
    return node.is_data and node.status is NodeStatus.ACTIVE


def holders(shard: ShardRouting) -> list[str]:
    out = []
    for copy in shard.copies:
        if copy.node_id is not None:
            out.append(copy.node_id)
        if copy.relocating_to is not None:
            out.append(copy.relocating_to)
    return out


def loads(state: ClusterState) -> Counter[str]:
    """Copies per eligible node (relocation targets included)."""
    count: Counter[str] = Counter({n.id: 0 for n in state.nodes.values() if eligible(n)})
    for index in state.indices.values():
        for shard in index.routing:
            for node_id in holders(shard):
                if node_id in count:
                    count[node_id] += 1
    return count


def started_copies(state: ClusterState) -> set[tuple[str, int, str, bool]]:
    """(index, shard, node, primary) of every STARTED copy."""
    return {
        (index.name, shard.shard, copy.node_id, copy.primary)
        for index in state.indices.values()
        for shard in index.routing
        for copy in shard.copies
        if copy.state is ShardState.STARTED and copy.node_id is not None
    }


def check_invariants(state: ClusterState) -> None:
    """What must hold after any command."""
    for index in state.indices.values():
        want = index.settings.number_of_replicas + 1
        assert len(index.routing) == index.settings.number_of_shards
        for pos, shard in enumerate(index.routing):
            assert shard.shard == pos
            assert sum(c.primary for c in shard.copies) == 1, shard
            assert len(shard.copies) == want, shard
            nodes = holders(shard)
            assert len(nodes) == len(set(nodes)), f"two copies on one node: {shard}"
            for copy in shard.copies:
                check_copy(state, copy)


def check_copy(state: ClusterState, copy: ShardCopy) -> None:
    if copy.node_id is None:
        assert copy.state is ShardState.UNASSIGNED and copy.relocating_to is None, copy
        return
    assert copy.state is not ShardState.UNASSIGNED, copy
    assert (copy.state is ShardState.RELOCATING) == (copy.relocating_to is not None), copy
    for node_id in (copy.node_id, copy.relocating_to):
        if node_id is None:
            continue
        node = state.nodes.get(node_id)
        assert node is not None, f"copy on unregistered node: {copy}"
        assert node.is_data and node.status is not NodeStatus.DOWN, f"{copy} on {node}"


def new_placements(before: ClusterState, after: ClusterState) -> set[tuple[str, int, str]]:
    """(index, shard, node) holding a copy after but not before."""

    def placements(state: ClusterState) -> set[tuple[str, int, str]]:
        return {
            (index.name, shard.shard, node_id)
            for index in state.indices.values()
            for shard in index.routing
            for node_id in holders(shard)
        }

    return placements(after) - placements(before)


# --- strategies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexSpec:
    name: str
    shards: int
    replicas: int

    def command(self, time: float = T0) -> CreateIndex:
        settings = IndexSettings(number_of_shards=self.shards, number_of_replicas=self.replicas)
        return CreateIndex(name=self.name, settings=settings, time=time)


def index_specs(max_replicas: int = 3) -> st.SearchStrategy[list[IndexSpec]]:
    spec = st.builds(
        IndexSpec,
        name=st.just(""),
        shards=st.integers(1, 5),
        replicas=st.integers(0, max_replicas),
    )
    return st.lists(spec, min_size=1, max_size=4).map(
        lambda specs: [IndexSpec(INDEX_NAMES[i], s.shards, s.replicas) for i, s in enumerate(specs)]
    )


node_status = st.sampled_from([NodeStatus.ACTIVE] * 3 + [NodeStatus.DRAINING, NodeStatus.DOWN])
roles = st.sampled_from(
    [frozenset({NodeRole.DATA})] * 3
    + [frozenset({NodeRole.MASTER}), frozenset({NodeRole.DATA, NodeRole.MASTER})]
)


@st.composite
def mixed_nodes(draw: st.DrawFn) -> list[Node]:
    """Nodes of every kind: data or not, ACTIVE/DRAINING/DOWN, with or without zones."""
    count = draw(st.integers(1, 10))
    return [
        Node(
            id=NODE_IDS[i],
            roles=draw(roles),
            status=draw(node_status),
            zone=draw(st.sampled_from(["", *ZONES])),
        )
        for i in range(count)
    ]


def plain_nodes(count: int, zones: list[str] | None = None) -> list[Node]:
    return [Node(id=NODE_IDS[i], zone=zones[i] if zones is not None else "") for i in range(count)]


def build(nodes: list[Node], specs: list[IndexSpec]) -> StateMachine:
    sm = StateMachine()
    for node in nodes:
        apply_ok(sm, RegisterNode(node=node, time=T0))
    for spec in specs:
        apply_ok(sm, spec.command())
    return sm


# --- fresh allocation -----------------------------------------------------------------------


@PROPERTY
@given(nodes=mixed_nodes(), specs=index_specs())
def test_every_shard_gets_one_primary_and_its_replicas_on_distinct_eligible_nodes(
    nodes: list[Node], specs: list[IndexSpec]
) -> None:
    sm = build(nodes, specs)
    state = sm.state
    check_invariants(state)
    n_eligible = sum(eligible(n) for n in nodes)
    for index in state.indices.values():
        for shard in index.routing:
            placed = [c for c in shard.copies if c.node_id is not None]
            # every copy that can be placed is placed, and only on eligible nodes
            assert len(placed) == min(len(shard.copies), n_eligible), shard
            for copy in placed:
                assert eligible(state.nodes[copy.node_id or ""]), copy
                assert copy.state is ShardState.INITIALIZING
            if n_eligible:
                assert shard.primary.node_id is not None, "the primary is placed first"


@PROPERTY
@given(
    zone_of=st.lists(st.sampled_from(ZONES), min_size=1, max_size=10),
    specs=index_specs(),
)
def test_copies_of_a_shard_spread_over_distinct_zones(
    zone_of: list[str], specs: list[IndexSpec]
) -> None:
    sm = build(plain_nodes(len(zone_of), zone_of), specs)
    zones = set(zone_of)
    for index in sm.state.indices.values():
        for shard in index.routing:
            used = [sm.state.nodes[n].zone for n in holders(shard)]
            # as many distinct zones as possible: all distinct when there are enough zones
            assert len(set(used)) == min(len(used), len(zones)), (shard, used)
            if len(zones) >= len(shard.copies):
                assert len(set(used)) == len(used)


@PROPERTY
@given(count=st.integers(1, 12), specs=index_specs())
def test_copy_counts_per_node_within_one_without_zones(count: int, specs: list[IndexSpec]) -> None:
    load = loads(build(plain_nodes(count), specs).state)
    assert max(load.values()) - min(load.values()) <= 1, load


@PROPERTY
@given(
    n_zones=st.integers(1, 4),
    per_zone=st.integers(1, 3),
    specs=index_specs(),
)
def test_copy_counts_per_node_within_one_with_balanced_zones(
    n_zones: int, per_zone: int, specs: list[IndexSpec]
) -> None:
    zone_of = [ZONES[i % n_zones] for i in range(n_zones * per_zone)]
    load = loads(build(plain_nodes(len(zone_of), zone_of), specs).state)
    assert max(load.values()) - min(load.values()) <= 1, (zone_of, load)


# --- minimal movement and recovery ---------------------------------------------------------


@st.composite
def started_cluster(draw: st.DrawFn) -> StateMachine:
    """ACTIVE data nodes (some with zones), indices, and a random subset of copies started."""
    count = draw(st.integers(1, 8))
    zoned = draw(st.booleans())
    zones = [draw(st.sampled_from(ZONES)) for _ in range(count)] if zoned else None
    sm = build(plain_nodes(count, zones), draw(index_specs()))
    for index in sm.state.indices.values():
        for shard in index.routing:
            for copy in shard.copies:
                if copy.node_id is not None and draw(st.booleans()):
                    apply_ok(
                        sm,
                        UpdateShardState(
                            index=index.name,
                            shard=shard.shard,
                            node_id=copy.node_id,
                            state=ShardState.STARTED,
                            time=T0,
                        ),
                    )
    return sm


@PROPERTY
@given(sm=started_cluster(), new_nodes=st.integers(1, 3), more=index_specs())
def test_new_nodes_and_new_indices_never_move_started_copies(
    sm: StateMachine, new_nodes: int, more: list[IndexSpec]
) -> None:
    started = started_copies(sm.state)
    first_free = len(sm.state.nodes)
    for i in range(first_free, min(first_free + new_nodes, len(NODE_IDS))):
        apply_ok(sm, RegisterNode(node=Node(id=NODE_IDS[i]), time=T0))
        assert started_copies(sm.state) == started
    for spec in more:
        name = f"more-{spec.name}"
        apply_ok(sm, CreateIndex(name=name, settings=spec.command().settings, time=T0))
        assert started_copies(sm.state) == started
    check_invariants(sm.state)


@PROPERTY
@given(sm=started_cluster(), data=st.data())
def test_node_down_promotes_started_replicas_and_replaces_missing_copies(
    sm: StateMachine, data: st.DataObject
) -> None:
    before = sm.state
    victim = data.draw(st.sampled_from(sorted(before.nodes)))
    apply_ok(sm, MarkNodesDown(node_ids=(victim,), time=T0))
    after = sm.state
    check_invariants(after)
    remaining = [n for n in after.nodes.values() if eligible(n)]
    for name, index in after.indices.items():
        for old, new in zip(before.indices[name].routing, index.routing, strict=True):
            assert victim not in holders(new)
            assert len(holders(new)) == min(len(new.copies), len(remaining)), new
            survivors = [
                c.node_id
                for c in old.copies
                if not c.primary and c.state is ShardState.STARTED and c.node_id != victim
            ]
            if old.primary.node_id == victim:
                if survivors:  # a started replica took over
                    assert new.primary.node_id in survivors, (old, new)
                    assert new.primary.state is ShardState.STARTED
            else:
                assert new.primary == old.primary  # untouched
            # started copies elsewhere stay where they are
            kept = {(c.node_id) for c in old.copies if c.state is ShardState.STARTED} - {victim}
            assert kept <= {c.node_id for c in new.copies if c.state is ShardState.STARTED}


# --- random command sequences ---------------------------------------------------------------


@st.composite
def command_for(draw: st.DrawFn, state: ClusterState, time: float) -> Command:
    """A command that mostly makes sense in ``state`` (and sometimes does not)."""
    copies = [
        (index.name, shard.shard, copy)
        for index in state.indices.values()
        for shard in index.routing
        for copy in shard.copies
        if copy.node_id is not None
    ]
    node_id = draw(st.sampled_from(NODE_IDS[:8]))
    index_name = draw(st.sampled_from(INDEX_NAMES[:4]))
    kind = draw(st.integers(0, 15))
    match kind:
        case 0 | 1:
            return RegisterNode(
                node=Node(
                    id=node_id,
                    zone=draw(st.sampled_from(["", *ZONES[:3]])),
                    roles=draw(roles),
                    status=draw(node_status),
                ),
                time=time,
            )
        case 2:
            return UnregisterNode(node_id=node_id, time=time)
        case 3:
            return UpdateNodeStatus(node_id=node_id, status=draw(node_status), time=time)
        case 4:
            return MarkNodesDown(node_ids=(node_id,), time=time)
        case 5 | 6:
            settings = IndexSettings(
                number_of_shards=draw(st.integers(1, 3)),
                number_of_replicas=draw(st.integers(0, 2)),
            )
            return CreateIndex(name=index_name, settings=settings, time=time)
        case 7:
            return DeleteIndex(name=index_name, time=time)
        case 8:
            index = state.indices.get(index_name)
            shards = index.settings.number_of_shards if index else 1
            settings = IndexSettings(
                number_of_shards=shards, number_of_replicas=draw(st.integers(0, 3))
            )
            return UpdateIndexSettings(name=index_name, settings=settings, time=time)
        case 9 | 10 if copies:
            name, shard, copy = draw(st.sampled_from(copies))
            report = draw(st.sampled_from([ShardState.STARTED] * 3 + [ShardState.UNASSIGNED]))
            target = copy.relocating_to if copy.relocating_to and draw(st.booleans()) else None
            return UpdateShardState(
                index=name,
                shard=shard,
                node_id=target or copy.node_id or "",
                state=report,
                time=time,
            )
        case 11 if copies:
            name, shard, copy = draw(st.sampled_from(copies))
            return AllocateShard(
                index=name, shard=shard, node_id=node_id, from_node=copy.node_id, time=time
            )
        case 12 if copies:
            name, shard, copy = draw(st.sampled_from(copies))
            return DeallocateShard(index=name, shard=shard, node_id=copy.node_id or "", time=time)
        case 13:
            auto = draw(st.booleans())
            return SetClusterConfig(config=ClusterConfig(auto_allocate=auto), time=time)
        case 14:
            return AcquireLock(key=f"lock-{node_id}", holder="h", ttl=3, time=time)
        case 15:
            return UpdateHashRing(vnodes=draw(st.integers(1, 8)), time=time)
    return AllocateShard(
        index=index_name, shard=draw(st.integers(0, 2)), node_id=node_id, time=time
    )


@st.composite
def command_sequences(draw: st.DrawFn) -> list[Command]:
    sm = StateMachine()
    time = T0
    commands: list[Command] = []
    for _ in range(draw(st.integers(1, 40))):
        time += draw(st.sampled_from([0.0, 0.5, 1.0, 4.0]))
        cmd = draw(command_for(sm.state, time))
        if draw(st.integers(0, 9)) == 0:
            cmd = ExpireLocks(time=time)
        sm.apply(cmd)
        commands.append(cmd)
    return commands


@PROPERTY
@given(commands=command_sequences())
def test_invariants_hold_and_ineligible_nodes_never_receive_copies(
    commands: list[Command],
) -> None:
    sm = StateMachine()
    for cmd in commands:
        before = sm.state
        outcome = sm.apply(cmd)
        after = sm.state
        check_invariants(after)
        for name, shard, node_id in new_placements(before, after):
            node = after.nodes[node_id]
            assert eligible(node), f"{cmd!r} placed {name}[{shard}] on {node}"
        if outcome.error is not None:
            assert after is before


@PROPERTY
@given(commands=command_sequences())
def test_two_state_machines_fed_the_same_commands_agree(commands: list[Command]) -> None:
    one, two = StateMachine(), StateMachine()
    for cmd in commands:
        a, b = one.apply(cmd), two.apply(cmd)
        assert (a.version, a.value, type(a.error), a.events) == (
            b.version,
            b.value,
            type(b.error),
            b.events,
        )
    assert one.state == two.state


@PROPERTY
@given(prefix=command_sequences(), suffix=command_sequences())
def test_snapshot_round_trip_and_a_restored_machine_continues_identically(
    prefix: list[Command], suffix: list[Command]
) -> None:
    original = StateMachine()
    for cmd in prefix:
        original.apply(cmd)
    state = original.state
    assert decode_state(encode_state(state)) == state
    assert state_from_json(state_to_json(state)) == state
    assert state_from_json(state_to_json(state).decode()) == state
    restored = StateMachine(decode_state(encode_state(state)))
    imported = StateMachine(state_from_json(state_to_json(state)))
    assert restored.next_lock_expiry() == original.next_lock_expiry()
    for cmd in suffix:
        a, b, c = original.apply(cmd), restored.apply(cmd), imported.apply(cmd)
        assert (a.version, a.value, type(a.error), a.events) == (
            b.version,
            b.value,
            type(b.error),
            b.events,
        ), cmd
        assert (a.version, a.value, type(a.error), a.events) == (
            c.version,
            c.value,
            type(c.error),
            c.events,
        ), cmd
    assert original.state == restored.state == imported.state
