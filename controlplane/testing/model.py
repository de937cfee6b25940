"""Model-based testing of a backend against the pure state machine (DESIGN 7).

:class:`ControlPlaneModel` is a hypothesis ``RuleBasedStateMachine`` that drives a backend
(through its :class:`~controlplane.testing.VirtualClockHarness`) and a
:class:`~controlplane.state.StateMachine` side by side. Every rule feeds the model the command
the backend must have built -- stamped with the same fake clock -- and compares the result
(the value, or the class of the error), the events the backend's watch delivers (version,
kind, key) and, after every step, the whole cluster state.

Use it for a backend by subclassing it and setting ``make_harness``::

    class MemoryModel(ControlPlaneModel):
        make_harness = staticmethod(lambda: MemoryHarness(background_maintenance=False))

    TestMemory = MemoryModel.TestCase

The harness must have a fake clock it can read (``now()``) and must run the periodic duties
only from ``advance_time`` (no background timer), so that the model knows when nodes are marked
DOWN and locks expire. Liveness: a node is marked DOWN by the first run of the duties at which
its last sign of life -- a heart-beat or its registration; for a node never heard from, the
backend's start -- is more than ``node_timeout`` old (as :class:`~controlplane.liveness.Liveness`
decides). Needs hypothesis (the ``dev`` extra).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import anyio
import anyio.from_thread
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ..commands import (
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
    SetClusterConfig,
    SetFeatureFlag,
    UnregisterNode,
    UpdateHashRing,
    UpdateIndexSettings,
    UpdateNodeStatus,
    UpdateShardState,
)
from ..errors import ControlPlaneError, InvalidRequestError, NotFoundError
from ..health import cluster_health
from ..liveness import Liveness
from ..protocol import ControlPlane
from ..state import Outcome, StateMachine
from ..types import (
    ClusterConfig,
    ClusterEvent,
    ClusterState,
    IndexSettings,
    Node,
    NodeRole,
    NodeStatus,
    ShardState,
)
from ..validation import check_lock_key, check_name
from ..watch import EventStream
from .conformance_harness import VirtualClockHarness

__all__ = ["ControlPlaneModel"]

NODE_IDS = ("n1", "n2", "n3", "n4", "Bad_Node")
INDEX_NAMES = ("i1", "i2", "i3", "Bad.Index")
LOCK_KEYS = ("locks/a", "locks/b", "")
HOLDERS = ("h1", "h2")
FLAGS = ("f1", "f2", "Bad Flag")
ZONES = ("", "za", "zb")
STATUSES = (NodeStatus.ACTIVE, NodeStatus.DRAINING, NodeStatus.DOWN)
ROLE_SETS = (
    frozenset({NodeRole.DATA}),
    frozenset({NodeRole.DATA, NodeRole.MASTER}),
    frozenset({NodeRole.MASTER}),
)

Result = tuple[Any, type[BaseException] | None]


class ControlPlaneModel(RuleBasedStateMachine):
    """Drive a backend and the pure :class:`StateMachine` with the same operations; compare."""

    make_harness: ClassVar[Callable[[], VirtualClockHarness]]
    """A fresh harness per example (set by the subclass)."""
    event_timeout: ClassVar[float] = 5.0
    """Seconds to wait for an expected event before the step fails."""

    def __init__(self) -> None:
        super().__init__()
        self._exit = contextlib.ExitStack()
        self.portal = self._exit.enter_context(
            anyio.from_thread.start_blocking_portal(backend="asyncio")
        )
        self.harness = type(self).make_harness()
        self.cp: ControlPlane = self._exit.enter_context(
            self.portal.wrap_async_context_manager(self.harness.open())
        )
        initial: ClusterState = self.portal.call(self.cp.get_cluster_state, True)
        self.model = StateMachine(initial)
        self.liveness = Liveness(self.harness.now())
        self.stream: EventStream = self.portal.call(self._open_stream, initial.version)

    async def _open_stream(self, since: int) -> EventStream:
        return self.cp.watch(since=since)

    def teardown(self) -> None:
        try:
            if hasattr(self, "stream"):
                state: ClusterState = self.portal.call(self.cp.get_cluster_state, True)
                if state.version == self.model.state.version:  # else: already reported
                    # One last write: an extra event of the last step would come before it.
                    self.set_feature_flag(name="model-end", enabled=True)
                self.portal.call(self.stream.aclose)
        finally:
            self._exit.close()

    # --- the comparison machinery -------------------------------------------------------------

    def _call(self, call: Callable[[], Awaitable[Any]]) -> Result:
        async def run() -> Result:
            try:
                return await call(), None
            except ControlPlaneError as exc:
                return None, type(exc)

        return self.portal.call(run)

    def _mutate(self, command: Command, call: Callable[[], Awaitable[Any]]) -> Outcome:
        expected = self.model.apply(command)
        value, error = self._call(call)
        expected_error = type(expected.error) if expected.error is not None else None
        assert error is expected_error, (
            f"{command!r}: backend raised {error}, model says {expected.error!r}"
        )
        assert value == expected.value, f"{command!r}: backend {value!r}, model {expected.value!r}"
        self._expect_events(command, expected)
        return expected

    def _expect_events(self, command: Command | str, expected: Outcome) -> None:
        if not expected.events:
            return
        # A write that did not happen has no events to wait for: fail at once, not by timeout.
        state: ClusterState = self.portal.call(self.cp.get_cluster_state, True)
        assert state.version >= expected.version, (
            f"{command!r}: the model moved to version {expected.version} with events "
            f"{[(e.kind, e.key) for e in expected.events]}; the backend is at {state.version}"
        )

        async def read(count: int) -> list[ClusterEvent]:
            got: list[ClusterEvent] = []
            with anyio.move_on_after(self.event_timeout):
                while len(got) < count:
                    got.append(await self.stream.__anext__())
            return got

        got = self.portal.call(read, len(expected.events))
        assert [(e.version, e.kind, e.key) for e in got] == [
            (e.version, e.kind, e.key) for e in expected.events
        ], f"{command!r}: watched events {got!r}, model events {expected.events!r}"

    def _read(self, what: str, call: Callable[[], Awaitable[Any]], expected: Result) -> None:
        actual = self._call(call)
        assert actual == expected, f"{what}: backend {actual!r}, model {expected!r}"

    @property
    def now(self) -> float:
        return self.harness.now()

    # --- nodes ---------------------------------------------------------------------------------

    @rule(
        node_id=st.sampled_from(NODE_IDS),
        zone=st.sampled_from(ZONES),
        roles=st.sampled_from(ROLE_SETS),
        status=st.sampled_from(STATUSES),
        address=st.sampled_from(("", "10.0.0.1:9300")),
    )
    def register_node(
        self, node_id: str, zone: str, roles: frozenset[NodeRole], status: NodeStatus, address: str
    ) -> None:
        node = Node(id=node_id, zone=zone, roles=roles, status=status, address=address)
        command = RegisterNode(node=node, time=self.now)
        if self._mutate(command, lambda: self.cp.register_node(node)).error is None:
            # Registering is a sign of life: a new node gets a full node_timeout from now.
            self.liveness.beat(node_id, self.now)

    @rule(node_id=st.sampled_from(NODE_IDS))
    def unregister_node(self, node_id: str) -> None:
        command = UnregisterNode(node_id=node_id, time=self.now)
        known = node_id in self.model.state.nodes
        self._mutate(command, lambda: self.cp.unregister_node(node_id))
        if known:
            self.liveness.forget(node_id)

    @rule(node_id=st.sampled_from(NODE_IDS), status=st.sampled_from(STATUSES))
    def update_node_status(self, node_id: str, status: NodeStatus) -> None:
        self._mutate(
            UpdateNodeStatus(node_id=node_id, status=status, time=self.now),
            lambda: self.cp.update_node_status(node_id, status),
        )

    @rule(node_id=st.sampled_from(NODE_IDS))
    def heartbeat(self, node_id: str) -> None:
        try:
            check_name("node", node_id)
        except InvalidRequestError:
            expected: Outcome = Outcome(self.model.state.version, None, InvalidRequestError(""), ())
        else:
            node = self.model.state.nodes.get(node_id)
            if node is None:
                expected = Outcome(self.model.state.version, None, NotFoundError(""), ())
            else:
                self.liveness.beat(node_id, self.now)
                expected = Outcome(self.model.state.version, None, None, ())
                if node.status is NodeStatus.DOWN:
                    revive = UpdateNodeStatus(
                        node_id=node_id, status=NodeStatus.ACTIVE, time=self.now
                    )
                    expected = self.model.apply(revive)._replace(value=None)
        value, error = self._call(lambda: self.cp.heartbeat(node_id))
        want = type(expected.error) if expected.error is not None else None
        assert (value, error) == (None, want), f"heartbeat({node_id!r}): {error}, model {want}"
        self._expect_events(f"heartbeat({node_id!r})", expected)

    # --- indices -------------------------------------------------------------------------------

    @rule(
        name=st.sampled_from(INDEX_NAMES),
        shards=st.integers(0, 3),
        replicas=st.integers(0, 2),
    )
    def create_index(self, name: str, shards: int, replicas: int) -> None:
        settings = IndexSettings(number_of_shards=shards, number_of_replicas=replicas)
        mappings = {"properties": {"f": {"type": "keyword"}}}
        self._mutate(
            CreateIndex(name=name, settings=settings, mappings=mappings, time=self.now),
            lambda: self.cp.create_index(name, settings, mappings),
        )

    @rule(name=st.sampled_from(INDEX_NAMES))
    def delete_index(self, name: str) -> None:
        self._mutate(DeleteIndex(name=name, time=self.now), lambda: self.cp.delete_index(name))

    @rule(
        name=st.sampled_from(INDEX_NAMES),
        replicas=st.integers(-1, 3),
        keep_shards=st.booleans(),
        extra=st.sampled_from(({}, {"refresh_interval": "5s"}, {"refresh_interval": None})),
        as_patch=st.booleans(),
    )
    def update_index_settings(
        self,
        name: str,
        replicas: int,
        keep_shards: bool,
        extra: dict[str, Any],
        as_patch: bool,
    ) -> None:
        index = self.model.state.indices.get(name)
        shards = index.settings.number_of_shards if index is not None else 1
        if not keep_shards:
            shards += 1
        if as_patch:  # a mapping changes only the keys it names
            patch: dict[str, Any] = {"number_of_replicas": replicas, **extra}
            if not keep_shards:
                patch["number_of_shards"] = shards
            self._mutate(
                UpdateIndexSettings(name=name, patch=patch, time=self.now),
                lambda: self.cp.update_index_settings(name, patch),
            )
            return
        settings = IndexSettings(
            number_of_shards=shards,
            number_of_replicas=replicas,
            extra={k: v for k, v in extra.items() if v is not None},
        )
        self._mutate(
            UpdateIndexSettings(name=name, settings=settings, time=self.now),
            lambda: self.cp.update_index_settings(name, settings),
        )

    # --- shards --------------------------------------------------------------------------------

    def _copies(self) -> list[tuple[str, int, str | None, str | None]]:
        return [
            (index.name, shard.shard, copy.node_id, copy.relocating_to)
            for index in self.model.state.indices.values()
            for shard in index.routing
            for copy in shard.copies
        ]

    @precondition(lambda self: bool(self.model.state.indices))
    @rule(data=st.data(), node_id=st.sampled_from(NODE_IDS), move=st.booleans())
    def allocate_shard(self, data: st.DataObject, node_id: str, move: bool) -> None:
        index, shard, holder, _ = data.draw(st.sampled_from(self._copies()))
        source = holder if move else None
        self._mutate(
            AllocateShard(
                index=index, shard=shard, node_id=node_id, from_node=source, time=self.now
            ),
            lambda: self.cp.allocate_shard(index, shard, node_id, from_node=source),
        )

    @precondition(lambda self: bool(self.model.state.indices))
    @rule(data=st.data(), node_id=st.sampled_from(NODE_IDS))
    def deallocate_shard(self, data: st.DataObject, node_id: str) -> None:
        index, shard, holder, _ = data.draw(st.sampled_from(self._copies()))
        target = holder or node_id
        self._mutate(
            DeallocateShard(index=index, shard=shard, node_id=target, time=self.now),
            lambda: self.cp.deallocate_shard(index, shard, target),
        )

    @precondition(lambda self: bool(self.model.state.indices))
    @rule(
        data=st.data(),
        state=st.sampled_from(
            (ShardState.STARTED, ShardState.STARTED, ShardState.UNASSIGNED, ShardState.INITIALIZING)
        ),
        to_target=st.booleans(),
    )
    def update_shard_state(self, data: st.DataObject, state: ShardState, to_target: bool) -> None:
        index, shard, holder, target = data.draw(st.sampled_from(self._copies()))
        node_id = (target if to_target and target else holder) or "n1"
        self._mutate(
            UpdateShardState(index=index, shard=shard, node_id=node_id, state=state, time=self.now),
            lambda: self.cp.update_shard_state(index, shard, node_id, state),
        )

    # --- locks ---------------------------------------------------------------------------------

    @rule(
        key=st.sampled_from(LOCK_KEYS),
        holder=st.sampled_from(HOLDERS),
        ttl=st.sampled_from((1.0, 2.5, 5.0, 0.0, 10_000.0)),
    )
    def acquire_lock(self, key: str, holder: str, ttl: float) -> None:
        self._mutate(
            AcquireLock(key=key, holder=holder, ttl=ttl, time=self.now),
            lambda: self.cp.acquire_lock(key, holder, ttl),
        )

    def _token(self, key: str, right: bool) -> int:
        lock = self.model.state.locks.get(key)
        token = lock.token if lock is not None else 1
        return token if right else token + 1

    @rule(
        key=st.sampled_from(LOCK_KEYS),
        holder=st.sampled_from(HOLDERS),
        right_token=st.booleans(),
        ttl=st.sampled_from((None, 1.0, 4.0)),
    )
    def renew_lock(self, key: str, holder: str, right_token: bool, ttl: float | None) -> None:
        token = self._token(key, right_token)
        self._mutate(
            RenewLock(key=key, holder=holder, token=token, ttl=ttl, time=self.now),
            lambda: self.cp.renew_lock(key, holder, token, ttl),
        )

    @rule(key=st.sampled_from(LOCK_KEYS), holder=st.sampled_from(HOLDERS), right=st.booleans())
    def release_lock(self, key: str, holder: str, right: bool) -> None:
        token = self._token(key, right)
        self._mutate(
            ReleaseLock(key=key, holder=holder, token=token, time=self.now),
            lambda: self.cp.release_lock(key, holder, token),
        )

    @rule(key=st.sampled_from(LOCK_KEYS))
    def get_lock(self, key: str) -> None:
        try:
            check_lock_key(key)
        except InvalidRequestError:
            expected: Result = (None, InvalidRequestError)
        else:
            state = self.model.state
            lock = state.locks.get(key)
            if lock is None or lock.expires_at <= max(state.now, self.now):
                expected = (None, NotFoundError)
            else:
                expected = (lock, None)
        self._read(f"get_lock({key!r})", lambda: self.cp.get_lock(key), expected)

    # --- time ----------------------------------------------------------------------------------

    @rule(seconds=st.sampled_from((0.5, 1.0, 3.0, 7.0, 12.0)))
    def advance_time(self, seconds: float) -> None:
        """Let time pass; the backend marks silent nodes DOWN and reaps expired locks."""
        self.portal.call(self.harness.advance_time, seconds)
        now = self.now
        down = self.liveness.expired(self.model.state, now)
        if down:
            outcome = self.model.apply(MarkNodesDown(node_ids=tuple(down), time=now))
            self._expect_events(f"marking {down} DOWN", outcome)
        due = self.model.next_lock_expiry()
        if due is not None and due <= now:
            self._expect_events("lock expiry", self.model.apply(ExpireLocks(time=now)))

    # --- ring, configuration, flags ------------------------------------------------------------

    @rule(
        nodes=st.sampled_from((None, ("n1", "n2"), ("x", "x"), ("n3",))),
        vnodes=st.sampled_from((None, 8, 0)),
        replication_factor=st.sampled_from((None, 1, 2)),
        follow=st.sampled_from((None, True, False)),
    )
    def update_hash_ring(
        self,
        nodes: tuple[str, ...] | None,
        vnodes: int | None,
        replication_factor: int | None,
        follow: bool | None,
    ) -> None:
        self._mutate(
            UpdateHashRing(
                nodes=nodes,
                vnodes=vnodes,
                replication_factor=replication_factor,
                follow_membership=follow,
                time=self.now,
            ),
            lambda: self.cp.update_hash_ring(
                nodes=nodes,
                vnodes=vnodes,
                replication_factor=replication_factor,
                follow_membership=follow,
            ),
        )

    @rule(
        node_timeout=st.sampled_from((5.0, 10.0, 30.0, -1.0)),
        max_lock_ttl=st.sampled_from((60.0, 3600.0)),
        auto_allocate=st.booleans(),
        expected=st.sampled_from(("none", "current", "stale")),
    )
    def set_cluster_config(
        self, node_timeout: float, max_lock_ttl: float, auto_allocate: bool, expected: str
    ) -> None:
        config = ClusterConfig(
            node_timeout=node_timeout, max_lock_ttl=max_lock_ttl, auto_allocate=auto_allocate
        )
        current = self.model.state.config.version
        version = {"none": None, "current": current, "stale": current - 1}[expected]
        self._mutate(
            SetClusterConfig(config=config, expected_version=version, time=self.now),
            lambda: self.cp.set_cluster_config(config, expected_version=version),
        )

    @rule(name=st.sampled_from(FLAGS), enabled=st.booleans())
    def set_feature_flag(self, name: str, enabled: bool) -> None:
        self._mutate(
            SetFeatureFlag(name=name, enabled=enabled, time=self.now),
            lambda: self.cp.set_feature_flag(name, enabled),
        )

    # --- reads ---------------------------------------------------------------------------------

    @rule(name=st.sampled_from(INDEX_NAMES), node_id=st.sampled_from(NODE_IDS))
    def read_one(self, name: str, node_id: str) -> None:
        state = self.model.state
        self._read(
            f"get_index({name!r})",
            lambda: self.cp.get_index(name),
            _lookup("index", name, state.indices.get(name)),
        )
        self._read(
            f"get_node({node_id!r})",
            lambda: self.cp.get_node(node_id),
            _lookup("node", node_id, state.nodes.get(node_id)),
        )

    @invariant()
    def backend_state_equals_model(self) -> None:
        state: ClusterState = self.portal.call(self.cp.get_cluster_state, True)
        model = self.model.state
        assert state == model, (
            f"backend state at version {state.version} differs from the model at version "
            f"{model.version} in {_differences(state, model)}"
        )
        local: ClusterState = self.portal.call(self.cp.get_cluster_state, False)
        assert local.version == model.version, "consistent=False must reflect completed writes"

    @invariant()
    def derived_reads_agree(self) -> None:
        model = self.model.state

        async def reads() -> tuple[Any, ...]:
            return (
                await self.cp.get_cluster_health(),
                await self.cp.list_nodes(),
                await self.cp.list_indices(),
                await self.cp.get_hash_ring(),
                await self.cp.get_cluster_config(),
                await self.cp.get_feature_flags(),
            )

        health, nodes, indices, ring, config, flags = self.portal.call(reads)
        assert health == cluster_health(model)
        assert nodes == [model.nodes[k] for k in sorted(model.nodes.keys())]
        assert indices == [model.indices[k] for k in sorted(model.indices.keys())]
        assert ring == model.hash_ring
        assert config == model.config
        assert flags == dict(model.feature_flags.items())
        assert ring.owners("some-key") == model.hash_ring.owners("some-key")


def _differences(actual: ClusterState, expected: ClusterState) -> str:
    """The fields where two states differ, with both values (shortened)."""
    out = []
    for field in actual.__struct_fields__:
        a, b = getattr(actual, field), getattr(expected, field)
        if a != b:
            out.append(f"{field}: backend {str(a)[:300]} / model {str(b)[:300]}")
    return "; ".join(out)


def _lookup(kind: str, name: str, found: Any) -> Result:
    """What a getter must return for ``name``: the value, or the error class."""
    try:
        check_name(kind, name)
    except InvalidRequestError:
        return None, InvalidRequestError
    return (found, None) if found is not None else (None, NotFoundError)
