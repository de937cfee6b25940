"""The k8s backend measured against a local API server (issue #4's benchmark).

    .venv/bin/python bench/k8s_bench.py            # N = 200 per operation after 10 warm-up
    .venv/bin/python bench/k8s_bench.py --quick    # N = 20, under a minute

Starts a real etcd + kube-apiserver v1.36.3 on 127.0.0.1 (``KubeEnv``, binaries built once and
cached; etcd with ``--unsafe-no-fsync``), installs the CRDs and runs, sequentially:

- ours: one ``K8sControlPlane`` (default k8s settings) in a namespace of its own, three
  registered nodes (node timeout 1 h: they never heart-beat), then ``create_index`` (1 shard,
  1 replica: returns once materialized, with its routing), ``get_cluster_state()`` (the local
  read), ``acquire_lock`` of a new key and ``release_lock``, ``set_feature_flag``; watch
  delivery: a flag written on the first replica, the time until its ``FLAG_CHANGED`` event
  comes out of a ``watch()`` on the same replica and on a second replica of the namespace.
  Every API request the first replica sends while an operation runs is counted (requests per
  operation and the time spent in them).
- raw, the reference peer: the same objects through ``kubernetes_asyncio`` directly in a
  second namespace, no backend logic: an Index custom resource created and its status
  merge-patched (the two writes ``create_index`` makes, same documents), a Lease created and
  released (``PUT``), the Cluster resource's spec replaced with one more flag, a ``GET`` of
  the Cluster resource (what a read costs without a cache), and the time from that ``PUT``
  to its event on a raw watch stream.
- the watch cache's freshness wait (raw, no backend): a consistent list (no
  ``resourceVersion``) of a kind without recent writes, the same with ``resourceVersion=0``;
  then, after every write of a new flag (a new revision of the Cluster kind, never a no-op):
  a consistent list of that kind; of an idle kind (ClusterNode), back to back, with 150 ms
  and 50 ms between rounds, with ``limit=1``, with ``resourceVersionMatch=NotOlderThan`` the
  write; three idle kinds at once; a list with ``resourceVersion=0``; a ``GET`` (read from
  etcd). kube-apiserver asks etcd for a progress notification at most every 100 ms per
  resource, and an idle resource's watch cache learns of newer revisions only that way: the
  rows show which reads wait for it (docs/kubernetes.md, "Benchmark").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import msgspec
from benchlib import (
    CpuMeter,
    event_loop,
    load_at_end,
    pct,
    preamble,
    print_table,
    process_cpu,
    ratio,
    timed_sequence,
    wait_idle,
)
from kubernetes_asyncio import client as k8s

from controlplane.backends.k8s import crds
from controlplane.backends.k8s.backend import K8sControlPlane
from controlplane.backends.k8s.errors import call_json
from controlplane.config import Config, K8sConfig
from controlplane.testing.k8s_env import KUBERNETES_VERSION, KubeEnv
from controlplane.types import EventKind, IndexSettings, Node

TARGET_CREATE_P50 = 0.020
TARGET_STATE = 10e-6
TARGET_WATCH_P50 = 0.050
MERGE_PATCH = "application/merge-patch+json"
G, V = crds.GROUP, crds.VERSION


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} µs"
    return f"{seconds * 1e3:.2f} ms"


def p5099(samples: list[float] | None) -> str:
    if not samples:
        return "-"
    return f"{fmt(pct(samples, 50))} / {fmt(pct(samples, 99))}"


# --- counting the API requests of a replica ------------------------------------------------------


@dataclass
class Requests:
    """API requests (not watches) sent by one ApiClient, by method and resource."""

    on: bool = False
    count: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def install(self, api: Any) -> None:
        original = api.call_api

        async def timed(coro: Awaitable[Any], what: str) -> Any:
            t0 = time.perf_counter()
            try:
                return await coro
            finally:
                if self.on:
                    self.count[what] = self.count.get(what, 0) + 1
                    self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - t0

        def call_api(resource_path: str, method: str, *args: Any, **kwargs: Any) -> Any:
            path_params = kwargs.get("path_params", args[0] if args else None)
            query_params = kwargs.get("query_params", args[1] if len(args) > 1 else None)
            query = dict(query_params or [])
            coro = original(resource_path, method, *args, **kwargs)
            if query.get("watch"):
                return coro
            params = dict(path_params or {})
            parts = resource_path.rstrip("/").split("/")
            named = parts[-1] == "{name}" or (len(parts) > 1 and parts[-2] == "{name}")
            plural = next(
                (params.get(p[1:-1], p) for p in reversed(parts) if p not in {"{name}", "status"}),
                "?",
            )
            sub = "/status" if parts[-1] == "status" else ""
            what = f"{method} {plural}{'/name' if named else ''}{sub}"
            if method == "GET" and not named:
                rv = query.get("resourceVersion")
                what += " (list rv=0)" if rv == "0" else " (consistent list)"
            return timed(coro, what)

        api.call_api = call_api

    def start(self) -> None:
        self.count.clear()
        self.seconds.clear()
        self.on = True

    def stop(self, n: int) -> str:
        self.on = False
        total = sum(self.count.values()) / max(n, 1)
        spent = sum(self.seconds.values()) / max(n, 1)
        parts = ", ".join(
            f"{k} x{self.count[k] / n:.2f} ({self.seconds[k] / self.count[k] * 1e3:.1f} ms each)"
            for k in sorted(self.count, key=lambda k: -self.seconds[k])
        )
        return f"{total:.2f} requests/op, {spent * 1e3:.1f} ms/op inside them: {parts}"


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Results:
    ours: dict[str, list[float]] = field(default_factory=dict)
    raw: dict[str, list[float]] = field(default_factory=dict)
    lists: dict[str, list[float]] = field(default_factory=dict)
    requests: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def replica(env: KubeEnv, namespace: str, identity: str) -> K8sControlPlane:
    config = Config(mode="k8s", k8s=K8sConfig(namespace=namespace))
    return K8sControlPlane(config, configuration=env.configuration(), identity=identity)


async def watch_delivery(
    writer: K8sControlPlane, watcher: K8sControlPlane, n: int, warmup: int, prefix: str
) -> list[float]:
    """Write a flag on ``writer``; time until ``watcher``'s watch delivers its event."""
    samples: list[float] = []
    clock = time.perf_counter
    async with watcher.watch(kinds={EventKind.FLAG_CHANGED}) as events:
        for i in range(warmup + n):
            key = f"{prefix}-{i}"
            t0 = clock()
            write = asyncio.ensure_future(writer.set_feature_flag(key, True))
            async with asyncio.timeout(30):
                async for event in events:
                    if event.key == key:
                        if i >= warmup:
                            samples.append(clock() - t0)
                        break
            await write
    return samples


async def local_reads(cp: K8sControlPlane, n: int) -> list[float]:
    """``get_cluster_state()`` timed one call at a time (``n`` calls)."""
    clock = time.perf_counter
    samples = []
    for _ in range(n):
        t0 = clock()
        await cp.get_cluster_state()
        samples.append(clock() - t0)
    return samples


async def run_ours(env: KubeEnv, args: argparse.Namespace, res: Results) -> dict[str, Any]:
    """Measure the backend; return the raw documents it wrote (for the raw peer)."""
    namespace = await env.create_namespace("bench")
    n, warmup = args.n, args.warmup
    docs: dict[str, Any] = {}
    async with replica(env, namespace, "first") as cp:
        async with asyncio.timeout(60):
            await cp.elector.wait_leading()
        reqs = Requests()
        reqs.install(cp._api)
        config = await cp.get_cluster_config()
        await cp.set_cluster_config(msgspec.structs.replace(config, node_timeout=3600.0))
        for i in range(3):
            await cp.register_node(Node(id=f"n{i}", address=f"10.0.0.{i + 10}:9300", zone=f"z{i}"))
        settings = IndexSettings(number_of_shards=1, number_of_replicas=1)

        async def measure(name: str, call: Callable[[int], Awaitable[object]]) -> None:
            await timed_sequence(call, 0, warmup)
            reqs.start()
            res.ours[name] = await timed_sequence(
                lambda i: call(i + warmup), n, 0
            )  # the same names continue after the warm-up
            res.requests[name] = reqs.stop(n)
            print(f"ours: {name}: p50/p99 {p5099(res.ours[name])}; {res.requests[name]}")

        await measure("create_index", lambda i: cp.create_index(f"idx-{i}", settings))
        first = next(o for o in cp._informers["index"] if o["metadata"]["name"] == "idx-0")
        docs["index_spec"] = first["spec"]
        docs["index_status"] = first["status"]
        cluster_obj = cp._informers["cluster"].get("controlplane", namespace)
        assert cluster_obj is not None
        docs["cluster_spec"] = cluster_obj["spec"]
        state = await cp.get_cluster_state()
        print(
            f"ours: state has {len(state.indices)} indices, {len(state.nodes)} nodes, "
            f"{len(state.feature_flags)} flags",
            flush=True,
        )
        await local_reads(cp, 1000)
        res.ours["get_cluster_state"] = await local_reads(cp, args.reads)
        print(f"ours: get_cluster_state(): p50/p99 {p5099(res.ours['get_cluster_state'])}")

        tokens: dict[int, int] = {}

        async def acquire(i: int) -> None:
            lock = await cp.acquire_lock(f"bench/lock-{i}", "bench", 600.0)
            tokens[i] = lock.token

        async def release(i: int) -> None:
            await cp.release_lock(f"bench/lock-{i}", "bench", tokens[i])

        await measure("acquire_lock", acquire)
        await measure("release_lock", release)
        await measure("set_feature_flag", lambda i: cp.set_feature_flag(f"flag-{i}", True))

        reqs.start()
        res.ours["watch, same replica"] = await watch_delivery(cp, cp, n, warmup, "w-same")
        res.requests["watch, same replica"] = reqs.stop(n + warmup)
        print(f"ours: watch, same replica: p50/p99 {p5099(res.ours['watch, same replica'])}")
        async with replica(env, namespace, "second") as other:
            reqs2 = Requests()
            reqs2.install(other._api)
            reqs2.start()
            res.ours["watch, other replica"] = await watch_delivery(cp, other, n, warmup, "w-other")
            res.requests["watch, other replica"] = "watcher: " + reqs2.stop(n + warmup)
            print(
                f"ours: watch, other replica: p50/p99 {p5099(res.ours['watch, other replica'])}; "
                f"{res.requests['watch, other replica']}",
                flush=True,
            )
    return docs


# --- the raw peer --------------------------------------------------------------------------------


async def run_raw(env: KubeEnv, args: argparse.Namespace, res: Results, docs: Any) -> None:
    namespace = await env.create_namespace("raw")
    n, warmup = args.n, args.warmup
    labels = {"app.kubernetes.io/name": "controlplane"}
    async with env.api_client() as api:
        custom = k8s.CustomObjectsApi(api)
        coord = k8s.CoordinationV1Api(api)

        async def js(function: Callable[..., Awaitable[Any]], *a: Any, **kw: Any) -> Any:
            return await call_json(function, *a, verb="bench", resource="bench", **kw)

        async def index(i: int) -> None:
            body = {
                "apiVersion": f"{G}/{V}",
                "kind": "Index",
                "metadata": {"name": f"idx-{i}", "labels": labels},
                "spec": docs["index_spec"],
            }
            made = await js(
                custom.create_namespaced_custom_object, G, V, namespace, "indices", body
            )
            status = dict(docs["index_status"])
            status["observedGeneration"] = made["metadata"]["generation"]
            patch = {"metadata": {"resourceVersion": made["metadata"]["resourceVersion"]}}
            await js(
                custom.patch_namespaced_custom_object_status,
                G,
                V,
                namespace,
                "indices",
                f"idx-{i}",
                {**patch, "status": status},
                _content_type=MERGE_PATCH,
            )

        async def index_create_only(i: int) -> None:
            body = {
                "apiVersion": f"{G}/{V}",
                "kind": "Index",
                "metadata": {"name": f"only-{i}", "labels": labels},
                "spec": docs["index_spec"],
            }
            await js(custom.create_namespaced_custom_object, G, V, namespace, "indices", body)

        leases: dict[int, Any] = {}

        async def lease(i: int) -> None:
            now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": f"lock-{i}", "labels": labels},
                "spec": {
                    "holderIdentity": "bench",
                    "leaseDurationSeconds": 600,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 1,
                },
            }
            leases[i] = await js(coord.create_namespaced_lease, namespace, body)

        async def lease_release(i: int) -> None:
            body = leases[i]
            body["spec"]["holderIdentity"] = None
            await js(coord.replace_namespaced_lease, f"lock-{i}", namespace, body)

        cluster = {
            "apiVersion": f"{G}/{V}",
            "kind": "Cluster",
            "metadata": {"name": "controlplane", "labels": labels},
            "spec": json.loads(json.dumps(docs["cluster_spec"])),
        }
        current = [
            await js(custom.create_namespaced_custom_object, G, V, namespace, "clusters", cluster)
        ]

        async def flag(i: int, prefix: str = "flag") -> None:
            body = current[0]
            body["spec"].setdefault("featureFlags", {})[f"{prefix}-{i}"] = True
            current[0] = await js(
                custom.replace_namespaced_custom_object,
                G,
                V,
                namespace,
                "clusters",
                "controlplane",
                body,
            )

        async def get_cluster(i: int) -> None:
            await js(
                custom.get_namespaced_custom_object, G, V, namespace, "clusters", "controlplane"
            )

        async def list_idle(i: int, rv: str | None = None) -> None:
            kw = {"resource_version": rv} if rv is not None else {}
            await js(custom.list_namespaced_custom_object, G, V, namespace, "clusternodes", **kw)

        wl = itertools.count()

        async def after_write(
            what: str, read: Callable[[int], Awaitable[object]], pause: float = 0.0
        ) -> None:
            """A new flag written (a new revision of the Cluster kind), then ``read(its
            resourceVersion)`` timed; ``pause`` seconds between rounds. At most 50 rounds."""
            samples = []
            for i in range(warmup + min(n, 50)):
                await flag(next(wl), "wl")  # a new flag every time: never a no-op PUT
                written = int(current[0]["metadata"]["resourceVersion"])
                t0 = time.perf_counter()
                await read(written)
                if i >= warmup:
                    samples.append(time.perf_counter() - t0)
                if pause:
                    await asyncio.sleep(pause)
            print(f"raw: {what}: p50/p99 {p5099(samples)}", flush=True)
            res.lists[what] = samples

        def lister(plural: str, **kw: Any) -> Callable[[int], Awaitable[object]]:
            async def read(written: int) -> None:
                await js(custom.list_namespaced_custom_object, G, V, namespace, plural, **kw)

            return read

        async def not_older_than(written: int) -> None:
            await js(
                custom.list_namespaced_custom_object,
                G,
                V,
                namespace,
                "clusternodes",
                resource_version=str(written),
                resource_version_match="NotOlderThan",
            )

        async def get_node(written: int) -> None:
            await js(custom.get_namespaced_custom_object, G, V, namespace, "clusternodes", "n0")

        async def three_idle(written: int) -> None:
            await asyncio.gather(
                lister("clusternodes")(written),
                lister("indices")(written),
                js(coord.list_namespaced_lease, namespace),
            )

        async def measure(name: str, call: Callable[[int], Awaitable[object]]) -> list[float]:
            samples = await timed_sequence(call, n, warmup)
            print(f"raw: {name}: p50/p99 {p5099(samples)}", flush=True)
            return samples

        res.raw["create_index"] = await measure("Index create + status patch", index)
        res.lists["Index create only"] = await measure("Index create only", index_create_only)
        res.raw["get_cluster_state"] = await measure("GET Cluster", get_cluster)
        res.raw["acquire_lock"] = await measure("Lease create", lease)
        res.raw["release_lock"] = await measure("Lease PUT (release)", lease_release)
        res.raw["set_feature_flag"] = await measure("Cluster PUT (one more flag)", flag)
        res.raw["watch"] = await raw_watch(custom, namespace, current, flag, n=n, warmup=warmup)
        print(f"raw: watch Cluster PUT -> event: p50/p99 {p5099(res.raw['watch'])}", flush=True)
        res.lists["consistent list, idle kind"] = await measure(
            "consistent list of an idle kind", list_idle
        )
        res.lists["list rv=0, same kind"] = await measure(
            "list rv=0 of the same kind", lambda i: list_idle(i, "0")
        )
        node = {
            "apiVersion": f"{G}/{V}",
            "kind": "ClusterNode",
            "metadata": {"name": "n0", "labels": labels},
            "spec": {"address": "10.0.0.1:9300"},
        }
        await js(custom.create_namespaced_custom_object, G, V, namespace, "clusternodes", node)
        idle = "an idle kind (ClusterNode) right after a write of another (Cluster)"
        await after_write("consistent list right after a write of its kind", lister("clusters"))
        await after_write(f"consistent list of {idle}", lister("clusternodes"))
        await after_write("the same, 150 ms between rounds", lister("clusternodes"), pause=0.15)
        await after_write("the same, 50 ms between rounds", lister("clusternodes"), pause=0.05)
        await after_write("the same with limit=1", lister("clusternodes", limit=1))
        await after_write("the same, resourceVersionMatch=NotOlderThan the write", not_older_than)
        await after_write("three idle kinds listed at once", three_idle)
        await after_write(f"list rv=0 of {idle}", lister("clusternodes", resource_version="0"))
        await after_write(f"GET (no resourceVersion: from etcd) of {idle}", get_node)


async def raw_watch(
    custom: Any,
    namespace: str,
    current: list[Any],
    flag: Callable[[int, str], Awaitable[None]],
    *,
    n: int,
    warmup: int,
) -> list[float]:
    """A raw watch on the Cluster resources: Cluster PUT issued -> its MODIFIED event read."""
    rv = current[0]["metadata"]["resourceVersion"]
    response = await custom.list_namespaced_custom_object(
        G,
        V,
        namespace,
        "clusters",
        watch=True,
        resource_version=rv,
        timeout_seconds=600,
        _preload_content=False,
    )
    seen: asyncio.Queue[tuple[float, str]] = asyncio.Queue()

    async def read() -> None:
        async for line in response.content:
            if line.strip():
                event = json.loads(line)
                obj = event.get("object") or {}
                await seen.put(
                    (time.perf_counter(), (obj.get("metadata") or {}).get("resourceVersion", ""))
                )

    reader = asyncio.create_task(read())
    samples = []
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            write = asyncio.ensure_future(flag(i, "watch"))
            await write
            want = current[0]["metadata"]["resourceVersion"]
            async with asyncio.timeout(30):
                while True:
                    at, got = await seen.get()
                    if got == want:
                        break
            if i >= warmup:
                samples.append(at - t0)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        response.close()
    return samples


# --- the table -----------------------------------------------------------------------------------


def table(res: Results) -> str:
    rows = [["metric", "ours p50 / p99", "raw API call p50 / p99", "ratio (p50)", "target", "✓/✗"]]

    def row(metric: str, key: str, raw_key: str | None, target: float | None, what: str) -> None:
        ours = res.ours.get(key)
        raw = res.raw.get(raw_key) if raw_key else None
        o50 = pct(ours, 50) if ours else None
        r50 = pct(raw, 50) if raw else None
        ok = "-" if target is None or o50 is None else ("✓" if o50 < target else "✗")
        tgt = f"p50 < {fmt(target)}" if target is not None else "-"
        rows.append([metric, p5099(ours), f"{p5099(raw)} {what}".strip(), ratio(o50, r50), tgt, ok])

    row(
        "create_index (end to end)",
        "create_index",
        "create_index",
        TARGET_CREATE_P50,
        "(Index create + status patch)",
    )
    row(
        "get_cluster_state()",
        "get_cluster_state",
        "get_cluster_state",
        TARGET_STATE,
        "(GET of the Cluster CR)",
    )
    row("acquire_lock (new key)", "acquire_lock", "acquire_lock", None, "(Lease create)")
    row("release_lock", "release_lock", "release_lock", None, "(Lease PUT)")
    row("set_feature_flag", "set_feature_flag", "set_feature_flag", None, "(Cluster CR PUT)")
    row(
        "watch delivery, same replica",
        "watch, same replica",
        "watch",
        TARGET_WATCH_P50,
        "(Cluster PUT -> raw watch event)",
    )
    row(
        "watch delivery, other replica",
        "watch, other replica",
        "watch",
        TARGET_WATCH_P50,
        "(Cluster PUT -> raw watch event)",
    )
    text = print_table(rows)
    print()
    lists = [["API server reads (raw, no backend)", "p50 / p99"]]
    for k, v in res.lists.items():
        lists.append([k, p5099(v)])
    text += "\n\n" + print_table(lists)
    print()
    print("API requests the first replica sent per operation (watches not counted):")
    for k, v in res.requests.items():
        print(f"  {k}: {v}")
    return text


async def main(args: argparse.Namespace) -> None:
    t_start = time.monotonic()
    idle = wait_idle(args.wait_idle) if args.wait_idle else None
    res = Results()
    env = KubeEnv()
    try:
        t0 = time.monotonic()
        await env.start()
        print(
            f"kube-apiserver {KUBERNETES_VERSION} + etcd up in {time.monotonic() - t0:.1f} s "
            f"at {env.server}",
            flush=True,
        )
        settings = (
            f"N {args.n} per operation after {args.warmup} warm-up, {args.reads} local reads; "
            f"kube-apiserver {KUBERNETES_VERSION} (watch cache on), etcd --unsafe-no-fsync, "
            "K8sControlPlane with default k8s settings"
        )
        _, loop_name = event_loop(True)
        preamble(env.directory, loop_name, settings, idle)
        await env.install_crds(crds.crd_manifests())
        meter = CpuMeter()
        servers0 = sum(process_cpu(pid) for pid in env.pids)
        own0, wall0 = time.process_time(), time.monotonic()
        docs = await run_ours(env, args, res)
        await run_raw(env, args, res, docs)
        print()
        wall = time.monotonic() - wall0
        servers = (sum(process_cpu(pid) for pid in env.pids) - servers0) / wall
        own = (time.process_time() - own0) / wall
        print(
            meter.report(servers + own, "this benchmark + etcd + kube-apiserver")
            + f" (benchmark process {own:.2f}, etcd + kube-apiserver {servers:.2f})"
        )
        print(load_at_end(t_start))
        print()
        table(res)
    finally:
        await env.stop()


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="samples per operation")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reads", type=int, default=200_000, help="get_cluster_state() calls")
    parser.add_argument("--quick", action="store_true", help="N 20, warm-up 3: under a minute")
    parser.add_argument(
        "--wait-idle", type=float, default=0.0, help="wait up to this many s for a quiet machine"
    )
    args = parser.parse_args()
    if args.quick:
        args.n, args.warmup, args.reads = 20, 3, 20_000
    return args


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupted)
    asyncio.run(main(parse()))
