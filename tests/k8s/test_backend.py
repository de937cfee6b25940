"""K8sControlPlane beyond the conformance suite, on the real API server: two replicas of one
control plane agree on versions and events, only the leader does the duties and a standby
takes them over, hand-made resources are skipped, adopted or marked invalid without a crash, the
backend runs with the least-privilege service account of deploy/rbac.yaml, and an API server
restart mid-watch loses and doubles no event."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from kubernetes_asyncio import client as k8s

from controlplane.backends.k8s import crds
from controlplane.backends.k8s.backend import K8sControlPlane
from controlplane.config import Config, K8sConfig
from controlplane.errors import OperationTimeoutError, PermissionDeniedError, UnavailableError
from controlplane.testing.conformance_harness import (
    collect_until_marker,
    index_settings,
    next_event,
    write_marker,
)
from controlplane.testing.k8s_env import KubeEnv
from controlplane.testing.k8s_harness import K8sHarness
from controlplane.types import ClusterEvent, EventKind, Node
from k8s.test_rbac import apply_rbac

pytestmark = pytest.mark.anyio

FAST = {"lease_duration": 3.0, "renew_deadline": 2.0, "retry_period": 0.3}


@pytest.fixture
async def harness(kube_env: KubeEnv) -> AsyncIterator[K8sHarness]:
    made = K8sHarness(kube_env)
    await made.install_crds()
    yield made


def brief(events: list[ClusterEvent]) -> list[tuple[int, str, str]]:
    return [(e.version, e.kind.value, e.key) for e in events]


def replica(harness: K8sHarness, namespace: str, identity: str) -> K8sControlPlane:
    config = Config(mode="k8s", k8s=K8sConfig(namespace=namespace, **FAST))
    return K8sControlPlane(
        config,
        configuration=harness.env.configuration(),
        clock=harness.clock,
        identity=identity,
    )


async def test_two_replicas_agree_on_state_versions_and_events(
    harness: K8sHarness, namespace: str
) -> None:
    async with (
        replica(harness, namespace, "a") as a,
        replica(harness, namespace, "b") as b,
        asyncio.timeout(60),
    ):
        v0 = (await a.get_cluster_state(consistent=True)).version
        await a.register_node(Node(id="n1"))
        await b.register_node(Node(id="n2"))
        index = await a.create_index("shared", index_settings(2, 1))
        lock = await b.acquire_lock("shared/lock", "b-holder", 30)
        await a.set_feature_flag("shared-flag", True)
        # read-your-writes on the other replica: a linearizable read sees every write
        seen_by_b = await b.get_cluster_state(consistent=True)
        seen_by_a = await a.get_cluster_state(consistent=True)
        assert seen_by_a.version == seen_by_b.version
        assert seen_by_b.indices["shared"] == index
        assert set(seen_by_b.nodes) == set(seen_by_a.nodes) == {"n1", "n2"}
        assert seen_by_a.locks["shared/lock"].token == lock.token
        assert seen_by_a.feature_flags == seen_by_b.feature_flags
        assert seen_by_a.hash_ring == seen_by_b.hash_ring
        marker = await write_marker(b)
        async with a.watch(since=v0) as on_a, b.watch(since=v0) as on_b:
            events_a = await collect_until_marker(on_a, marker, 20)
            events_b = await collect_until_marker(on_b, marker, 20)
        assert brief(events_a) == brief(events_b)
        kinds = [e.kind for e in events_a]
        for kind in (
            EventKind.NODE_JOINED,
            EventKind.INDEX_CREATED,
            EventKind.LOCK_ACQUIRED,
            EventKind.FLAG_CHANGED,
            EventKind.RING_UPDATED,
        ):
            assert kind in kinds, brief(events_a)


async def until(predicate: Callable[[], bool], within: float, what: str) -> None:
    """Wait (bounded) until ``predicate()`` holds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.01)


LATE = "arrived after the state moved"


async def test_concurrent_writers_of_every_kind_every_replica_sees_each_change_once(
    harness: K8sHarness, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas write nodes, indices, locks and flags (four kinds, four informers) at the
    same time while both watch; a third replica starts in the middle, listing objects of every
    kind. Every watcher sees every change exactly once, in one order, the same on every
    replica, and no replica applies a change after its state moved past it (the warning that
    says a watcher missed events)."""
    caplog.set_level(logging.WARNING, logger="controlplane.k8s")
    rounds = 6
    async with (
        replica(harness, namespace, "a") as a,
        replica(harness, namespace, "b") as b,
        asyncio.timeout(120),
    ):
        v0 = (await a.get_cluster_state(consistent=True)).version
        async with a.watch(since=v0) as on_a, b.watch(since=v0) as on_b:
            third_watching = asyncio.Event()

            async def write(cp: K8sControlPlane, tag: str) -> None:
                for i in range(rounds):
                    if i == rounds // 2:  # the rest once the third replica watches
                        await third_watching.wait()
                    await cp.register_node(Node(id=f"{tag}-n{i}"))
                    await cp.create_index(f"{tag}-i{i}", index_settings(1, 0))
                    await cp.acquire_lock(f"{tag}/l{i}", tag, 60)
                    await cp.set_feature_flag(f"{tag}-f{i}", True)

            late: list[ClusterEvent] = []
            late_start: list[int] = []

            async def third() -> None:
                def written() -> bool:
                    state = a._local_state()
                    return len(state.indices) >= 2 and len(state.locks) >= 2

                await until(written, 60, "the first writes of both")
                async with replica(harness, namespace, "c") as c:
                    late_start.append(c._local_state().version)
                    async with c.watch() as on_c:
                        third_watching.set()
                        await until(
                            lambda: len(a._local_state().feature_flags) >= 2 * rounds,
                            60,
                            "all writes (a flag ends each round)",
                        )
                        marker = await write_marker(a)
                        late.extend(await collect_until_marker(on_c, marker, 30))

            async with asyncio.TaskGroup() as tg:
                tg.create_task(write(a, "a"))
                tg.create_task(write(b, "b"))
                tg.create_task(third())
            marker = await write_marker(a)
            events_a = await collect_until_marker(on_a, marker, 30)
            events_b = await collect_until_marker(on_b, marker, 30)
        assert brief(events_a) == brief(events_b)
        versions = [e.version for e in events_a]
        assert versions == sorted(versions)
        for kind, keys in (
            (EventKind.NODE_JOINED, [f"{t}-n{i}" for t in "ab" for i in range(rounds)]),
            (EventKind.INDEX_CREATED, [f"{t}-i{i}" for t in "ab" for i in range(rounds)]),
            (EventKind.LOCK_ACQUIRED, [f"{t}/l{i}" for t in "ab" for i in range(rounds)]),
            (EventKind.FLAG_CHANGED, [f"{t}-f{i}" for t in "ab" for i in range(rounds)]),
        ):
            seen = sorted(e.key for e in events_a if e.kind is kind and "marker" not in e.key)
            assert seen == sorted(keys), (kind, brief(events_a))
        # the third replica's watch is exactly the suffix after the version it started at
        start = late_start[0]
        marker_at = next(i for i, e in enumerate(events_a) if "marker" in e.key)
        expected = [e for e in events_a[:marker_at] if e.version > start]
        assert brief(late) == brief(expected)
        assert expected, "the third replica started before the last writes"
    assert not [r.getMessage() for r in caplog.records if LATE in r.getMessage()]


async def test_progress_beacons_are_no_state_and_give_way(
    harness: K8sHarness, namespace: str
) -> None:
    """A write marks the kinds it did not write through one beacon object per kind (labelled,
    never in the state, no events); one deleted by hand is made again; an index or node that
    wants a beacon's (generated) name gets it."""
    beacon = "controlplane.dev/progress-beacon=true"
    async with replica(harness, namespace, "a") as cp, harness.env.api_client() as api:
        custom = k8s.CustomObjectsApi(api)

        async def beacons(plural: str) -> list[str]:
            listed = await custom.list_namespaced_custom_object(
                crds.GROUP, crds.VERSION, namespace, plural, label_selector=beacon
            )
            return [item["metadata"]["name"] for item in listed["items"]]

        v0 = (await cp.get_cluster_state(consistent=True)).version
        await cp.set_feature_flag("beacon-flag", True)  # marks indices, nodes and leases
        await cp.create_index("beacon-index", index_settings(1, 0))  # marks clusters too
        leases = await k8s.CoordinationV1Api(api).list_namespaced_lease(
            namespace, label_selector=beacon
        )
        assert len(leases.items) == 1
        assert leases.items[0].metadata.labels["controlplane.dev/lease-type"] == "progress"
        names = {plural: await beacons(plural) for plural in ("indices", "clusternodes")}
        assert all(len(found) == 1 for found in names.values()), names
        assert len(await beacons("clusters")) == 1
        state = await cp.get_cluster_state(consistent=True)
        assert set(state.indices) == {"beacon-index"} and not state.nodes and not state.locks
        marker = await write_marker(cp)
        async with cp.watch(since=v0) as stream:
            events = await collect_until_marker(stream, marker, 20)
        assert {e.kind for e in events} <= {
            EventKind.FLAG_CHANGED,
            EventKind.INDEX_CREATED,
            EventKind.SHARD_ALLOCATED,
        }, brief(events)

        # deleted by hand: the next write makes another
        await custom.delete_namespaced_custom_object(
            crds.GROUP, crds.VERSION, namespace, "indices", names["indices"][0]
        )
        await cp.set_feature_flag("beacon-flag-2", True)
        again = await beacons("indices")
        assert len(again) == 1 and again != names["indices"]

        # an index and a node named like a beacon: the beacons give way
        index = await cp.create_index(again[0], index_settings(1, 0))
        assert index.name == again[0]
        node = await cp.register_node(Node(id=names["clusternodes"][0]))
        assert node.id == names["clusternodes"][0]
        await cp.set_feature_flag("beacon-flag-3", True)
        state = await cp.get_cluster_state(consistent=True)
        assert set(state.indices) == {"beacon-index", again[0]}
        assert set(state.nodes) == {node.id}
        for plural in ("indices", "clusternodes"):
            found = await beacons(plural)
            assert len(found) == 1 and found[0] not in (again[0], node.id), found


async def test_only_the_leader_reaps_and_a_standby_takes_over(
    harness: K8sHarness, namespace: str
) -> None:
    async with replica(harness, namespace, "first") as first, asyncio.timeout(60):
        await first.elector.wait_leading()
        async with replica(harness, namespace, "second") as second:
            await asyncio.sleep(1.0)  # several retry periods: the standby stays a standby
            assert not second.elector.is_leader
            lock = await second.acquire_lock("reap/me", "x", 1)
            harness.clock.advance(5)
            await second.run_maintenance()  # a standby does nothing
            assert (await second.get_cluster_state(consistent=True)).locks.get("reap/me") == lock
            v = (await second.get_cluster_state(consistent=True)).version
            await first.stop()  # releases the election Lease
            await second.elector.wait_leading()
            async with second.watch(since=v, kinds={EventKind.LOCK_EXPIRED}) as stream:
                await second.run_maintenance()
                event = await anext(stream)
            assert (event.kind, event.key, event.lock) == (EventKind.LOCK_EXPIRED, "reap/me", lock)


async def test_hand_made_resources_are_skipped_or_adopted(
    harness: K8sHarness, namespace: str, kube_env: KubeEnv
) -> None:
    base = f"/apis/{crds.GROUP}/{crds.VERSION}/namespaces/{namespace}"
    async with replica(harness, namespace, "a") as cp, asyncio.timeout(60):
        cp.ADOPT_AFTER = 3600.0  # the leader would adopt it in 2 s: see the next test
        # an Index without the control plane's status: in flight, not part of the state
        status, answer = await kube_env.request(
            "POST",
            f"{base}/indices",
            body={
                "apiVersion": crds.API_VERSION,
                "kind": "Index",
                "metadata": {"name": "by-hand"},
                "spec": {"settings": {"number_of_shards": 2}},
            },
        )
        assert status == 201, answer
        # a "lock" Lease whose annotation does not match its name, and one without any
        for name, annotations in (
            ("lock-bogus", {"controlplane.dev/lock-key": "other"}),
            ("lock-x", {}),
        ):
            status, answer = await kube_env.request(
                "POST",
                f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases",
                body={
                    "metadata": {
                        "name": name,
                        "labels": {"controlplane.dev/lease-type": "lock"},
                        "annotations": annotations,
                    },
                    "spec": {"holderIdentity": "\x7fgarbage", "leaseDurationSeconds": 5},
                },
            )
            assert status == 201, answer
        # a schema-invalid Index is refused by the API server itself
        status, answer = await kube_env.request(
            "POST",
            f"{base}/indices",
            body={
                "apiVersion": crds.API_VERSION,
                "kind": "Index",
                "metadata": {"name": "bad"},
                "spec": {"settings": {"number_of_shards": 0}},
            },
        )
        assert status == 422, answer
        state = await cp.get_cluster_state(consistent=True)
        assert "by-hand" not in state.indices and not state.locks
        assert await cp.is_healthy()
        # creating it through the control plane adopts the object
        adopted = await cp.create_index("by-hand", index_settings(2, 0))
        assert adopted.settings.number_of_shards == 2
        assert (await cp.get_index("by-hand")) == adopted


async def test_runs_with_the_least_privilege_service_account(
    harness: K8sHarness, namespace: str, kube_env: KubeEnv
) -> None:
    await apply_rbac(kube_env, namespace)
    token = await kube_env.service_account_token(namespace, "controlplane")
    config = Config(mode="k8s", k8s=K8sConfig(namespace=namespace, **FAST))
    async with asyncio.timeout(90):
        for _ in range(100):  # the new binding reaches the authorizer's cache shortly
            cp = K8sControlPlane(
                config, configuration=kube_env.configuration(token), clock=harness.clock
            )
            try:
                await cp.start()
                break
            except PermissionDeniedError:
                await cp.stop()
                await asyncio.sleep(0.2)
        try:
            await cp.elector.wait_leading()
            await cp.register_node(Node(id="n1"))
            index = await cp.create_index("logs", index_settings(1, 0))
            assert index.routing[0].primary.node_id == "n1"
            lock = await cp.acquire_lock("rbac/lock", "me", 10)
            await cp.release_lock("rbac/lock", "me", lock.token)
            await cp.heartbeat("n1")
            await cp.delete_index("logs")
            await cp.unregister_node("n1")
            assert not (await cp.get_cluster_state(consistent=True)).indices
        finally:
            await cp.stop()


async def test_apiserver_restart_loses_and_doubles_no_event(
    kube_binaries: tuple[Path, Path], tmp_path: Path
) -> None:
    etcd, apiserver = kube_binaries
    async with KubeEnv(tmp_path / "env", etcd=etcd, kube_apiserver=apiserver) as env:
        harness = K8sHarness(env)
        await harness.install_crds()
        namespace = await env.create_namespace()
        async with replica(harness, namespace, "a") as cp, asyncio.timeout(120):
            v0 = (await cp.get_cluster_state(consistent=True)).version
            names = [f"before-{i}" for i in range(5)] + [f"after-{i}" for i in range(5)]
            async with cp.watch(since=v0, kinds={EventKind.FLAG_CHANGED}) as stream:
                for name in names[:5]:
                    await cp.set_feature_flag(name, True)
                await env.restart_apiserver()
                for name in names[5:]:
                    while True:  # refused or unanswered while it restarts: idempotent, retry
                        try:
                            await cp.set_feature_flag(name, True)
                            break
                        except (UnavailableError, OperationTimeoutError):
                            await asyncio.sleep(0.1)
                events = [await next_event(stream, 30, f"flag {n}") for n in names]
            assert [e.key for e in events] == names
            versions = [e.version for e in events]
            assert versions == sorted(set(versions))
            assert dict(
                (await cp.get_cluster_state(consistent=True)).feature_flags
            ) == dict.fromkeys(names, True)


async def test_the_leader_adopts_an_index_made_by_hand_or_marks_it_invalid(
    harness: K8sHarness, namespace: str, kube_env: KubeEnv
) -> None:
    base = f"/apis/{crds.GROUP}/{crds.VERSION}/namespaces/{namespace}/indices"

    def index(name: str, settings: dict[str, object]) -> dict[str, object]:
        return {
            "apiVersion": crds.API_VERSION,
            "kind": "Index",
            "metadata": {"name": name},
            "spec": {"settings": settings},
        }

    async with replica(harness, namespace, "a") as cp, asyncio.timeout(60):
        await cp.elector.wait_leading()
        await cp.register_node(Node(id="n1"))
        v0 = (await cp.get_cluster_state(consistent=True)).version
        async with cp.watch(since=v0, kinds={EventKind.INDEX_CREATED}) as stream:
            status, answer = await kube_env.request(
                "POST",
                base,
                body=index("applied", {"number_of_shards": 1, "number_of_replicas": 0}),
            )
            assert status == 201, answer
            event = await next_event(stream, 30, "the adopted index")
        assert event.key == "applied" and event.index is not None
        assert event.index.routing[0].primary.node_id == "n1"
        # an extra setting that is not a scalar: free-form for the schema, refused by the
        # control plane's own validation
        status, answer = await kube_env.request(
            "POST",
            base,
            body=index("not-scalar", {"number_of_shards": 1, "extra": {"nested": {"a": 1}}}),
        )
        assert status == 201, answer  # the schema lets it through: the leader refuses it
        while True:
            status, current = await kube_env.request("GET", f"{base}/not-scalar")
            if (current.get("status") or {}).get("state") == "invalid":
                break
            await asyncio.sleep(0.2)
        (condition,) = current["status"]["conditions"]
        assert (condition["type"], condition["status"]) == ("Valid", "False")
        assert "not-scalar" not in (await cp.get_cluster_state(consistent=True)).indices
        assert await cp.is_healthy()
