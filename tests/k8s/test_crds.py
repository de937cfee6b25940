"""The CustomResourceDefinitions: generated from the msgspec types, committed up to date, and
enforced by a real API server (schema limits, CEL rules, status subresource, printer
columns)."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from controlplane.backends.k8s import crds
from controlplane.testing.k8s_env import KubeEnv
from controlplane.types import (
    HashRing,
    HealthStatus,
    IndexSettings,
    ShardCopy,
    ShardRouting,
    ShardState,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "crds"
MERGE = "application/merge-patch+json"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, child in node.get("properties", {}).items():
            yield from _walk(child, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                yield from _walk(node[key], f"{path}[{key}]")


# -- without an API server -------------------------------------------------------------------


def test_committed_crds_are_up_to_date() -> None:
    stale = crds.stale_manifests(DEPLOY)
    assert not stale, (
        f"deploy/crds is stale ({', '.join(stale)}): run "
        "python -m controlplane.backends.k8s.crds --write deploy/crds/"
    )
    expected = {f"{m['metadata']['name']}.yaml" for m in crds.crd_manifests()}
    assert {p.name for p in DEPLOY.glob("*.yaml")} == expected


def test_check_command_reports_stale_files(tmp_path: Path) -> None:
    lines: list[str] = []
    assert crds.main(["--write", str(tmp_path)], out=lines.append) == 0
    assert crds.main(["--check", str(tmp_path)], out=lines.append) == 0
    (tmp_path / "indices.controlplane.dev.yaml").write_text("# edited by hand\n")
    assert crds.main(["--check", str(tmp_path)], out=lines.append) == 1
    assert "indices.controlplane.dev.yaml" in lines[-1]


def test_schemas_are_structural() -> None:
    for manifest in crds.crd_manifests():
        (version,) = manifest["spec"]["versions"]
        for path, node in _walk(version["schema"]["openAPIV3Schema"]):
            assert not {"$ref", "anyOf", "oneOf", "allOf", "title"} & node.keys(), path
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
            assert not ("properties" in node and "additionalProperties" in node), path
            assert "uniqueItems" not in node, path
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "controlplane"
        assert labels["app.kubernetes.io/part-of"] == "controlplane"


def test_every_domain_field_is_in_the_schema() -> None:
    """One source of truth: the spec schemas follow the domain types' fields."""
    (index, node, cluster) = (
        m["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for m in crds.crd_manifests()
    )
    settings = index["properties"]["spec"]["properties"]["settings"]["properties"]
    assert set(settings) == {f.name for f in msgspec.structs.fields(IndexSettings)}
    copy = index["properties"]["status"]["properties"]["routing"]["items"]["properties"]
    assert set(copy["copies"]["items"]["properties"]) == {
        f.name for f in msgspec.structs.fields(ShardCopy)
    }
    ring = cluster["properties"]["spec"]["properties"]["hashRing"]["properties"]
    assert set(ring) == {f.name for f in msgspec.structs.fields(HashRing)} - {"version"}
    assert "id" not in node["properties"]["spec"]["properties"]  # the name is the node id


def test_resources_convert_to_the_domain_types() -> None:
    routing = (ShardRouting(shard=0, copies=(ShardCopy(primary=True, node_id="n1"),)),)
    status = crds.IndexStatus(observed_generation=2, state=crds.IndexState.ACTIVE, routing=routing)
    raw = msgspec.to_builtins(status)
    assert raw["observedGeneration"] == 2
    assert msgspec.convert(raw, crds.IndexStatus) == status
    spec = msgspec.convert({"settings": {"number_of_shards": 3}}, crds.IndexSpec)
    assert spec.settings == IndexSettings(number_of_shards=3)  # type: ignore[attr-defined]


# -- on the API server -----------------------------------------------------------------------


@pytest.fixture(scope="session")
async def installed(kube_env: KubeEnv) -> KubeEnv:
    """The committed CRDs, installed and served."""
    names = await kube_env.install_crds(sorted(DEPLOY.glob("*.yaml")))
    assert sorted(names) == sorted(r.crd_name for r in crds.RESOURCES)
    return kube_env


def _path(namespace: str, plural: str, name: str = "", sub: str = "") -> str:
    path = f"/apis/{crds.API_VERSION}/namespaces/{namespace}/{plural}"
    return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


def _object(kind: str, name: str, spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": crds.API_VERSION,
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }


async def _create(env: KubeEnv, ns: str, plural: str, obj: dict[str, Any]) -> tuple[int, Any]:
    return await env.request("POST", _path(ns, plural), body=obj)


@pytest.mark.anyio
async def test_index_accepted_with_defaults(installed: KubeEnv, namespace: str) -> None:
    status, body = await _create(
        installed,
        namespace,
        "indices",
        _object(
            "Index",
            "logs-2026",
            {"settings": {"number_of_shards": 3}, "mappings": {"properties": {"a": {"x": 1}}}},
        ),
    )
    assert status == 201, body
    spec = msgspec.convert(body["spec"], crds.IndexSpec)
    assert spec.settings == IndexSettings(number_of_shards=3, number_of_replicas=1)  # type: ignore[attr-defined]
    assert body["spec"]["mappings"] == {"properties": {"a": {"x": 1}}}  # kept as given

    # unknown fields are pruned, not stored
    status, body = await _create(
        installed, namespace, "indices", _object("Index", "pruned", {"bogus": 1})
    )
    assert status == 201, body
    assert "bogus" not in body["spec"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "spec", "expect"),
    [
        ("negative", {"settings": {"number_of_shards": -1}}, "number_of_shards"),
        ("too-many", {"settings": {"number_of_shards": 1025}}, "number_of_shards"),
        ("replicas", {"settings": {"number_of_replicas": 17}}, "number_of_replicas"),
        ("strings", {"settings": {"number_of_shards": "3"}}, "number_of_shards"),
        ("dotted.name", {}, "lowercase DNS label"),
        ("x" * 64, {}, "lowercase DNS label"),
    ],
)
async def test_invalid_index_rejected(
    installed: KubeEnv, namespace: str, name: str, spec: Any, expect: str
) -> None:
    status, body = await _create(installed, namespace, "indices", _object("Index", name, spec))
    assert status == 422, body
    assert expect in body["message"]


@pytest.mark.anyio
async def test_number_of_shards_is_immutable(installed: KubeEnv, namespace: str) -> None:
    obj = _object("Index", "fixed", {"settings": {"number_of_shards": 2}})
    assert (await _create(installed, namespace, "indices", obj))[0] == 201
    path = _path(namespace, "indices", "fixed")
    patch = {"spec": {"settings": {"number_of_shards": 4}}}
    status, body = await installed.request("PATCH", path, body=patch, content_type=MERGE)
    assert status == 422, body
    assert "number_of_shards is fixed at creation" in body["message"]
    patch = {"spec": {"settings": {"number_of_replicas": 2}}}
    status, body = await installed.request("PATCH", path, body=patch, content_type=MERGE)
    assert status == 200, body
    assert body["spec"]["settings"] == {"number_of_shards": 2, "number_of_replicas": 2, "extra": {}}
    assert body["metadata"]["generation"] == 2


@pytest.mark.anyio
async def test_index_status_subresource(installed: KubeEnv, namespace: str) -> None:
    obj = _object("Index", "routed", {"settings": {"number_of_shards": 1}})
    assert (await _create(installed, namespace, "indices", obj))[0] == 201
    path = _path(namespace, "indices", "routed", "status")
    routing = (
        ShardRouting(
            shard=0,
            copies=(
                ShardCopy(primary=True, node_id="n1", state=ShardState.STARTED),
                ShardCopy(primary=False),
            ),
        ),
    )
    good = crds.IndexStatus(
        observed_generation=1,
        state=crds.IndexState.ACTIVE,
        health=HealthStatus.YELLOW,
        routing=routing,
        conditions=(
            crds.Condition(
                type="Allocated",
                status="True",
                last_transition_time=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
                reason="ShardsPlaced",
            ),
        ),
    )
    raw = msgspec.to_builtins(good)
    status, body = await installed.request("PATCH", path, body={"status": raw}, content_type=MERGE)
    assert status == 200, body
    assert msgspec.convert(body["status"], crds.IndexStatus) == good

    two_primaries = ShardRouting(shard=0, copies=(ShardCopy(primary=True), ShardCopy(primary=True)))
    bad_copy = {"primary": True, "node_id": "Not_A_Node"}
    for routing_value, expect in (
        ([msgspec.to_builtins(two_primaries)], "exactly one primary"),
        ([{"shard": 0, "copies": [bad_copy]}], "node_id"),
    ):
        status, body = await installed.request(
            "PATCH", path, body={"status": {"routing": routing_value}}, content_type=MERGE
        )
        assert status == 422, body
        assert expect in body["message"]
    status, body = await installed.request(
        "PATCH", path, body={"status": {"state": "exploded"}}, content_type=MERGE
    )
    assert status == 422, body

    # status is written only through the subresource: the main resource ignores it
    status, body = await installed.request(
        "PATCH",
        _path(namespace, "indices", "routed"),
        body={"status": {"state": "invalid"}},
        content_type=MERGE,
    )
    assert status == 200 and body["status"]["state"] == "active"


@pytest.mark.anyio
async def test_printer_columns(installed: KubeEnv, namespace: str) -> None:
    obj = _object("Index", "shown", {"settings": {"number_of_shards": 5, "number_of_replicas": 2}})
    assert (await _create(installed, namespace, "indices", obj))[0] == 201
    status, table = await installed.request("GET", _path(namespace, "indices"), accept=TABLE)
    assert status == 200, table
    columns = [c["name"] for c in table["columnDefinitions"]]
    assert columns == ["Name", "Shards", "Replicas", "Health", "State", "Age"]
    (row,) = table["rows"]
    assert row["cells"][:3] == ["shown", 5, 2]
    for resource in crds.RESOURCES[1:]:
        status, table = await installed.request(
            "GET", _path(namespace, resource.plural), accept=TABLE
        )
        assert status == 200, table["message"]
        names = [c["name"] for c in table["columnDefinitions"]][1:]
        assert names == [c["name"] for c in resource.columns]


@pytest.mark.anyio
async def test_cluster_node_validation(installed: KubeEnv, namespace: str) -> None:
    good = {
        "address": "10.0.0.7:9300",
        "roles": ["data", "master"],
        "zone": "eu-1a",
        "attributes": {"rack": "r1"},
        "resources": {"cpu_cores": 8},
    }
    status, body = await _create(
        installed, namespace, "clusternodes", _object("ClusterNode", "node-1", good)
    )
    assert status == 201, body
    status, body = await _create(
        installed, namespace, "clusternodes", _object("ClusterNode", "node-2", {})
    )
    assert status == 201, body
    assert body["spec"]["roles"] == ["data"]  # the domain type's default
    for spec, expect in (
        ({"roles": ["data", "data"]}, "roles"),
        ({"roles": ["chef"]}, "roles"),
        ({"zone": "Zone A"}, "zone"),
        ({"resources": {"cpu_cores": -1}}, "cpu_cores"),
        ({"attributes": {"rack": 1}}, "attributes"),
    ):
        status, body = await _create(
            installed, namespace, "clusternodes", _object("ClusterNode", "node-bad", spec)
        )
        assert status == 422, (spec, body)
        assert expect in body["message"]


@pytest.mark.anyio
async def test_cluster_validation(installed: KubeEnv, namespace: str) -> None:
    spec = {
        "config": {"node_timeout": 5, "settings": {"refresh.interval": "1s"}},
        "featureFlags": {"fast-path": True},
        "hashRing": {"nodes": ["n1", "n2"], "vnodes": 128, "follow_membership": False},
    }
    status, body = await _create(
        installed, namespace, "clusters", _object("Cluster", "controlplane", spec)
    )
    assert status == 201, body
    assert body["spec"]["hashRing"]["replication_factor"] == 3
    assert body["spec"]["config"]["max_lock_ttl"] == 3600
    for bad, expect in (
        ({"config": {"node_timeout": 0}}, "node_timeout"),
        ({"featureFlags": {"Bad Flag": True}}, "feature flag names"),
        ({"hashRing": {"nodes": ["n1", "n1"]}}, "nodes"),
        ({"hashRing": {"vnodes": 0}}, "vnodes"),
    ):
        status, body = await _create(
            installed, namespace, "clusters", _object("Cluster", "bad", bad)
        )
        assert status == 422, (bad, body)
        assert expect in body["message"]
