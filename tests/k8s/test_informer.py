"""Informers against the real API server: list + watch delivers every change once and in
order; an API server restart and 410 Gone (from a compacted etcd) lose and double nothing."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from controlplane.backends.k8s import crds
from controlplane.backends.k8s.informer import (
    Backoff,
    Change,
    ChangeType,
    Informer,
    ListWatch,
    ObjectKey,
)
from controlplane.errors import NotFoundError
from controlplane.testing.k8s_env import HOST, KubeEnv

pytestmark = pytest.mark.anyio

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "crds"
MERGE = "application/merge-patch+json"
FAST = Backoff(initial=0.05, maximum=1.0)


async def until(predicate: Callable[[], bool], within: float = 30.0, what: str = "") -> None:
    """Wait (bounded) until ``predicate()`` holds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what or predicate}")
        await asyncio.sleep(0.02)


class Nodes:
    """ClusterNode custom resources in one namespace, written through one client."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api = k8s.CustomObjectsApi(api)
        self.namespace = namespace
        self.args = (crds.GROUP, crds.VERSION, namespace, "clusternodes")

    async def create(self, name: str, address: str = "a") -> int:
        body = {
            "apiVersion": crds.API_VERSION,
            "kind": "ClusterNode",
            "metadata": {"name": name},
            "spec": {"address": address},
        }
        created = await self.api.create_namespaced_custom_object(*self.args, body)
        return int(created["metadata"]["resourceVersion"])

    async def patch(self, name: str, address: str) -> int:
        patched = await self.api.patch_namespaced_custom_object(
            *self.args, name, {"spec": {"address": address}}, _content_type=MERGE
        )
        return int(patched["metadata"]["resourceVersion"])

    async def delete(self, name: str) -> None:
        await self.api.delete_namespaced_custom_object(*self.args, name)

    async def state(self) -> dict[str, tuple[int, str]]:
        """``name -> (resourceVersion, address)`` as the API server has it now."""
        listed = await self.api.list_namespaced_custom_object(*self.args)
        return {
            item["metadata"]["name"]: (
                int(item["metadata"]["resourceVersion"]),
                item["spec"]["address"],
            )
            for item in listed["items"]
        }


class Recorder:
    """Applies every change to a model, checking it against the model as it goes."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.model: dict[str, tuple[int, str]] = {}
        self.problems: list[str] = []

    def __call__(self, change: Change) -> None:
        self.changes.append(change)
        name = change.key.name
        if change.type is ChangeType.ADDED:
            if name in self.model:
                self.problems.append(f"ADDED twice: {name}")
        elif name not in self.model:
            self.problems.append(f"{change.type} of unknown {name}")
        elif (
            change.old is None
            or int(change.old["metadata"]["resourceVersion"]) != (self.model[name][0])
        ):
            self.problems.append(f"{change.type} of {name}: old is not the last one seen")
        if change.type is ChangeType.DELETED:
            self.model.pop(name, None)
            return
        assert change.new is not None
        version = int(change.new["metadata"]["resourceVersion"])
        if name in self.model and version <= self.model[name][0]:
            self.problems.append(f"{name} went from {self.model[name][0]} to {version}")
        self.model[name] = (version, change.new["spec"]["address"])

    def versions(self, name: str) -> list[tuple[ChangeType, int]]:
        return [(c.type, c.resource_version) for c in self.changes if c.key.name == name]


@pytest.fixture(scope="module")
async def installed(kube_env: KubeEnv) -> None:
    await kube_env.install_crds(sorted(DEPLOY.glob("*.yaml")))


def node_informer(api: Any, namespace: str, **options: Any) -> Informer:
    source = ListWatch.custom_objects(
        api, crds.GROUP, crds.VERSION, "clusternodes", "ClusterNode", namespace=namespace
    )
    return Informer(source, backoff=FAST, **options)


async def test_list_then_watch_delivers_every_change_once_in_order(
    kube_env: KubeEnv, namespace: str, installed: None
) -> None:
    async with kube_env.api_client() as api:
        nodes = Nodes(api, namespace)
        before = {name: await nodes.create(name) for name in ("n0", "n1", "n2")}
        recorder = Recorder()
        informer = node_informer(api, namespace, page_size=2)  # the list takes two pages
        informer.add_handler(recorder)
        async with informer, asyncio.timeout(60):
            subscription = informer.subscribe(replay=True)
            await informer.wait_synced(within=30)
            assert {k.name for k in informer.cache} == set(before)
            assert all(c.type is ChangeType.ADDED and c.relist for c in recorder.changes)

            written: dict[str, list[tuple[ChangeType, int]]] = {}
            for i in range(3, 8):
                name = f"n{i}"
                written[name] = [(ChangeType.ADDED, await nodes.create(name))]
            for round_ in range(3):
                for name in ("n1", "n3", "n5"):
                    version = await nodes.patch(name, f"addr-{round_}")
                    written.setdefault(name, []).append((ChangeType.MODIFIED, version))
            await nodes.delete("n0")
            await nodes.delete("n3")
            final = await nodes.state()

            await until(lambda: recorder.model == final, what="the model matches the server")
            assert not recorder.problems, recorder.problems
            for name, expected in written.items():
                seen = [(t, v) for t, v in recorder.versions(name) if t is not ChangeType.DELETED]
                if name == "n1":
                    seen = seen[1:]  # its first ADDED came from the list
                assert seen == expected, name
            for name in ("n0", "n3"):
                assert [t for t, _ in recorder.versions(name)][-1] is ChangeType.DELETED
            watched = [c.resource_version for c in recorder.changes if not c.relist]
            assert watched == sorted(watched) and len(set(watched)) == len(watched)
            assert informer.stats.gone == 0 and informer.stats.lists == 1
            assert {k.name: informer.cache[k]["spec"]["address"] for k in informer.cache} == {
                n: a for n, (_, a) in final.items()
            }

            # a subscription sees the same sequence (after its replay of the first list)
            from_queue = [await subscription.__anext__() for _ in range(len(recorder.changes))]
            assert from_queue == recorder.changes
        # closing the informer ends its subscriptions
        with pytest.raises(StopAsyncIteration):
            await subscription.__anext__()


async def test_a_list_delivers_its_changes_before_the_version_moves_past_them(
    kube_env: KubeEnv, namespace: str, installed: None
) -> None:
    """While the changes of a list are delivered, ``resource_version`` stays below every change
    still to come (a consumer merging several informers by version, as the backend does, must
    not believe the informer is past a change it has not delivered yet); once they are all
    delivered it is the list's, and the progress handlers hear of it."""
    async with kube_env.api_client() as api:
        nodes = Nodes(api, namespace)
        written = [await nodes.create(f"n{i}") for i in range(6)]
        informer = node_informer(api, namespace, page_size=4)
        delivered: list[tuple[int, int]] = []  # (the change's version, the informer's then)
        progress: list[int] = []
        informer.add_handler(
            lambda change: delivered.append((change.resource_version, informer.resource_version))
        )
        informer.add_progress_handler(lambda: progress.append(informer.resource_version))
        async with informer, asyncio.timeout(60):
            await informer.wait_synced(within=30)
            assert sorted(v for v, _ in delivered) == written
            for i, (_, then) in enumerate(delivered):
                still_to_come = [v for v, _ in delivered[i:]]
                assert then < min(still_to_come), (i, delivered)
            assert informer.resource_version >= written[-1]
            assert progress and progress[-1] == informer.resource_version
            # a watched change is delivered with the version at (or past) it, then progress
            version = await nodes.patch("n0", "moved")
            await until(lambda: informer.resource_version >= version, what="the patch")
            assert delivered[-1] == (version, version)
            assert progress[-1] == version


async def test_leases_are_watched_with_the_same_informer(kube_env: KubeEnv, namespace: str) -> None:
    async with kube_env.api_client() as api:
        coordination = k8s.CoordinationV1Api(api)
        informer = Informer(ListWatch.leases(api, namespace, label_selector="team=a"), backoff=FAST)
        async with informer, asyncio.timeout(60):
            await informer.wait_synced(within=30)
            for name, team in (("l1", "a"), ("l2", "b"), ("l3", "a")):
                await coordination.create_namespaced_lease(
                    namespace,
                    {
                        "metadata": {"name": name, "labels": {"team": team}},
                        "spec": {"holderIdentity": name},
                    },
                )
            await until(lambda: len(informer) == 2, what="two leases of team a")
            lease = informer.get("l3", namespace)
            assert lease is not None
            assert lease["kind"] == "Lease" and lease["spec"]["holderIdentity"] == "l3"
            assert informer.get("l2", namespace) is None  # the selector applies


class Proxy:
    """A TCP proxy to the API server that tests can cut off (fault injection, not a fake:
    the bytes are the real API server's)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.blocked = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    def cut(self) -> None:
        """Close every connection."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@pytest.fixture(scope="module")
async def uncached_env(
    kube_binaries: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[KubeEnv]:
    """An API server without watch cache: watches and paginated lists read etcd, so a
    compaction of etcd makes old resourceVersions answer 410 Gone."""
    etcd, apiserver = kube_binaries
    env = KubeEnv(
        tmp_path_factory.mktemp("kube-env-uncached"),
        etcd=etcd,
        kube_apiserver=apiserver,
        extra_apiserver_args=["--watch-cache=false"],
    )
    async with env:
        await env.install_crds(sorted(DEPLOY.glob("*.yaml")))
        yield env


async def test_410_gone_in_the_watch_relists_and_emits_exactly_the_differences(
    uncached_env: KubeEnv,
) -> None:
    env = uncached_env
    namespace = await env.create_namespace()
    async with Proxy(env.port) as proxy, env.api_client() as admin:
        nodes = Nodes(admin, namespace)
        for name in ("keep", "change", "remove"):
            await nodes.create(name)
        configuration = env.configuration()
        configuration.host = f"https://{HOST}:{proxy.port}"
        async with k8s.ApiClient(configuration=configuration) as through_proxy:
            recorder = Recorder()
            informer = node_informer(through_proxy, namespace)
            informer.add_handler(recorder)
            async with informer, asyncio.timeout(60):
                await informer.wait_synced(within=30)
                await until(lambda: informer.stats.watches >= 1, what="watching")
                seen_before = len(recorder.changes)
                old_version = informer.resource_version

                proxy.blocked = True  # the informer is cut off: it retries with backoff
                proxy.cut()
                changed = await nodes.patch("change", "new")
                await nodes.delete("remove")
                added = await nodes.create("added")
                await nodes.create("transient")
                await nodes.delete("transient")
                compacted = await env.compact_etcd()
                assert compacted > old_version
                proxy.blocked = False

                final = await nodes.state()
                await until(lambda: recorder.model == final, what="the model matches")
                assert not recorder.problems, recorder.problems
                assert informer.stats.gone >= 1 and informer.stats.lists >= 2
                after = [
                    (c.type, c.key.name, c.resource_version) for c in recorder.changes[seen_before:]
                ]
                assert sorted(after, key=lambda c: c[1]) == [
                    (ChangeType.ADDED, "added", added),
                    (ChangeType.MODIFIED, "change", changed),
                    (ChangeType.DELETED, "remove", informer.resource_version),
                ]
                assert all(c.relist for c in recorder.changes[seen_before:])
                assert informer.cache.keys() == {
                    ObjectKey(namespace, n) for n in ("keep", "change", "added")
                }
    await env.delete_namespace(namespace)


async def test_410_gone_on_a_paginated_list_restarts_the_list(uncached_env: KubeEnv) -> None:
    env = uncached_env
    namespace = await env.create_namespace()
    async with env.api_client() as api:
        nodes = Nodes(api, namespace)
        names = [f"p{i}" for i in range(5)]
        for name in names:
            await nodes.create(name)
        list_function = k8s.CustomObjectsApi(api).list_namespaced_custom_object
        compactions = 0

        async def list_then_compact(*args: Any, **kwargs: Any) -> Any:
            """The real list; before the first continued page, write once and compact etcd
            past the list's resourceVersion (the continue token then answers 410)."""
            nonlocal compactions
            if kwargs.get("_continue") and compactions == 0:
                compactions += 1
                await nodes.patch("p0", "moved")
                await env.compact_etcd()
            return await list_function(*args, **kwargs)

        source = ListWatch(
            function=functools.partial(
                list_then_compact, crds.GROUP, crds.VERSION, namespace, "clusternodes"
            ),
            resource=f"clusternodes in {namespace}",
            api_version=crds.API_VERSION,
            kind="ClusterNode",
        )
        recorder = Recorder()
        informer = Informer(source, page_size=2, backoff=FAST)
        informer.add_handler(recorder)
        async with informer, asyncio.timeout(60):
            await informer.wait_synced(within=30)
            assert compactions == 1
            assert informer.stats.gone == 1 and informer.stats.lists == 2
            assert recorder.model == await nodes.state()
            assert [c.type for c in recorder.changes] == [ChangeType.ADDED] * len(names)
    await env.delete_namespace(namespace)


async def test_apiserver_restart_mid_watch_loses_and_doubles_nothing(
    kube_binaries: tuple[Path, Path], tmp_path: Path
) -> None:
    etcd, apiserver = kube_binaries
    async with KubeEnv(tmp_path / "env", etcd=etcd, kube_apiserver=apiserver) as env:
        await env.install_crds(sorted(DEPLOY.glob("*.yaml")))
        namespace = await env.create_namespace()
        recorder = Recorder()
        written: list[int] = []
        uncertain: list[int] = []
        async with env.api_client() as api, env.api_client() as writer_api:
            nodes = Nodes(writer_api, namespace)
            informer = node_informer(api, namespace)
            informer.add_handler(recorder)
            async with informer, asyncio.timeout(90):
                await informer.wait_synced(within=30)
                stop = asyncio.Event()

                async def write_continuously() -> None:
                    i = 0
                    while not stop.is_set():
                        name = f"w{i % 7}"
                        try:
                            if i < 7:
                                written.append(await nodes.create(name))
                            else:
                                written.append(await nodes.patch(name, f"v{i}"))
                        except ApiException as exc:
                            if exc.status in (429, 503):  # refused while starting: retry
                                await asyncio.sleep(0.05)
                                continue
                            if exc.status != 409:  # 409: created by an unanswered try
                                raise
                            uncertain.append(i)
                        except aiohttp.ClientError as exc:  # down
                            if not isinstance(exc, aiohttp.ClientConnectorError):
                                uncertain.append(i)  # sent: it may have happened
                            await asyncio.sleep(0.05)
                            continue
                        i += 1
                        await asyncio.sleep(0.01)

                async with asyncio.TaskGroup() as group:
                    group.create_task(write_continuously())
                    await until(lambda: len(written) >= 10, what="writes before the restart")
                    await env.restart_apiserver()
                    after_restart = len(written)
                    await until(lambda: len(written) >= after_restart + 10, what="writes after")
                    stop.set()
                final = await nodes.state()
                await until(lambda: recorder.model == final, within=60, what="model matches")
        assert not recorder.problems, recorder.problems
        versions = [c.resource_version for c in recorder.changes]
        assert len(set(versions)) == len(versions)  # nothing twice
        # nothing invented (a write whose answer was lost in the restart may show up)
        assert len(set(versions) - set(written)) <= len(uncertain)
        # every write the watch could see is there; a re-list may fold writes it missed
        if informer.stats.lists == 1:
            assert set(written) <= set(versions)


async def test_bookmarks_advance_the_resource_version_between_watches(
    kube_env: KubeEnv, namespace: str
) -> None:
    async with kube_env.api_client() as api, kube_env.api_client() as writer:
        # the watch cache sends a bookmark about 2 s before a watch's timeoutSeconds ends (and
        # every minute): a 3-6 s timeout gets one before the next watch starts
        informer = Informer(ListWatch.leases(api, namespace), watch_timeout=3.0, backoff=FAST)
        async with informer, asyncio.timeout(60):
            await informer.wait_synced(within=30)
            # writes elsewhere move the global resourceVersion; bookmarks carry it here
            await k8s.CoreV1Api(writer).create_namespaced_config_map(
                namespace, {"metadata": {"name": "elsewhere"}}
            )
            start = informer.resource_version
            await until(
                lambda: informer.stats.bookmarks > 0 and informer.resource_version > start,
                what="a bookmark",
            )
            await until(lambda: informer.stats.watches >= 2, what="a watch ending and resuming")
            assert informer.stats.lists == 1 and informer.stats.gone == 0
            assert len(informer) == 0


async def test_informer_started_before_its_crd_exists_syncs_once_installed(
    kube_env: KubeEnv, namespace: str
) -> None:
    group = f"t{uuid.uuid4().hex[:8]}.example.com"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }
    async with kube_env.api_client() as api:
        source = ListWatch.custom_objects(
            api, group, "v1", "widgets", "Widget", namespace=namespace
        )
        informer = Informer(source, backoff=Backoff(initial=0.05, maximum=0.2))
        async with informer, asyncio.timeout(60):
            await until(lambda: informer.stats.errors >= 1, what="a first failed list")
            assert not informer.synced.is_set()
            assert isinstance(informer.stats.last_error, NotFoundError)
            # install without waiting: the informer retries 404 and 429 until it lists
            await k8s.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
            await informer.wait_synced(within=30)
            widgets = k8s.CustomObjectsApi(api)
            await widgets.create_namespaced_custom_object(
                group,
                "v1",
                namespace,
                "widgets",
                {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"}},
            )
            await until(lambda: informer.get("w", namespace) is not None, what="the widget")
            await k8s.ApiextensionsV1Api(api).delete_custom_resource_definition(
                crd["metadata"]["name"]
            )
