"""The shipped RBAC (deploy/rbac.yaml) is sufficient and not more: applied into a test
namespace of the real API server, the service account's token does what the backend needs
(Leases, leader election, the custom resources and their status) and is denied the rest."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client as k8s

from controlplane import __version__
from controlplane.backends.k8s import crds
from controlplane.backends.k8s.election import Elector
from controlplane.backends.k8s.errors import call_json
from controlplane.backends.k8s.leases import Leases, lock_lease_name
from controlplane.errors import PermissionDeniedError
from controlplane.testing.k8s_env import KubeEnv

ROOT = Path(__file__).resolve().parents[2]
RBAC = ROOT / "deploy" / "rbac.yaml"
CRDS = ROOT / "deploy" / "crds"
LABEL_KEYS = ("app.kubernetes.io/name", "app.kubernetes.io/part-of", "app.kubernetes.io/component")


def manifests() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(RBAC.read_text()) if d]


def test_manifests_parse_and_carry_the_labels() -> None:
    documents = manifests()
    assert sorted(d["kind"] for d in documents) == ["Role", "RoleBinding", "ServiceAccount"]
    for document in documents:  # namespaced only: no ClusterRole is needed
        labels = document["metadata"]["labels"]
        assert all(labels.get(k) for k in LABEL_KEYS), document["metadata"]
        assert labels["app.kubernetes.io/name"] == "controlplane"
        assert labels["app.kubernetes.io/version"] == __version__
        assert document["metadata"]["namespace"] == "controlplane"
    role = next(d for d in documents if d["kind"] == "Role")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert ("coordination.k8s.io", "leases", "update") in granted
    assert ("coordination.k8s.io", "leases", "delete") not in granted  # fencing counters
    assert ("controlplane.dev", "clusters", "delete") not in granted
    assert not any("*" in item for item in granted)
    for rule in role["rules"]:  # every resource is a CRD of the project or a Lease
        for resource in rule["resources"]:
            if rule["apiGroups"] == ["controlplane.dev"]:
                assert resource.split("/")[0] in {r.plural for r in crds.RESOURCES}
            else:
                assert rule["apiGroups"] == ["coordination.k8s.io"] and resource == "leases"


async def apply_rbac(env: KubeEnv, namespace: str) -> None:
    """Create the shipped objects in ``namespace`` (as the operator would, with kustomize)."""
    paths = {
        "ServiceAccount": f"/api/v1/namespaces/{namespace}/serviceaccounts",
        "Role": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
        "RoleBinding": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
    }
    for document in manifests():
        body = copy.deepcopy(document)
        body["metadata"]["namespace"] = namespace
        for subject in body.get("subjects", ()):
            subject["namespace"] = namespace
        status, answer = await env.request("POST", paths[body["kind"]], body=body)
        assert status == 201, answer


@pytest.fixture(scope="module")
async def with_crds(kube_env: KubeEnv) -> KubeEnv:
    await kube_env.install_crds(sorted(CRDS.glob("*.yaml")))
    return kube_env


@pytest.mark.anyio
async def test_service_account_can_do_what_the_backend_needs_and_nothing_else(
    with_crds: KubeEnv, namespace: str
) -> None:
    env = with_crds
    await apply_rbac(env, namespace)
    token = await env.service_account_token(namespace, "controlplane")
    other = await env.create_namespace("other")
    async with env.api_client(token=token) as api, asyncio.timeout(90):
        leases = Leases(api, namespace)
        deadline = time.monotonic() + 20
        while True:  # a new token and a new binding reach the authorizer's caches shortly
            try:
                lock = await leases.acquire("rbac/lock", "me", ttl=10)
                break
            except PermissionDeniedError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        # Leases: locks, heart-beats, node liveness, election
        renewed = await leases.renew("rbac/lock", "me", lock.token)
        await leases.release("rbac/lock", "me", renewed.token)
        again = await leases.acquire("rbac/lock", "me", ttl=10)
        assert again.token == lock.token + 1
        await leases.heartbeat("n1", 10)
        assert [n.node_id for n in await leases.node_liveness()] == ["n1"]
        elector = Elector(
            leases, identity="rbac-a", lease_duration=3, renew_deadline=2, retry_period=0.3
        )
        async with elector:
            term = await asyncio.wait_for(elector.wait_leading(), 10)
            assert term.term == 1
            await asyncio.sleep(0.8)  # renewed at least once
            assert elector.is_leader
        assert not elector.is_leader

        # the custom resources and their status subresource
        custom = k8s.CustomObjectsApi(api)
        group, version = crds.GROUP, crds.VERSION

        async def call(function: Any, *args: Any, verb: str, **kw: Any) -> dict[str, Any]:
            return await call_json(function, *args, verb=verb, resource="test", **kw)

        index = {
            "apiVersion": crds.API_VERSION,
            "kind": "Index",
            "metadata": {"name": "logs"},
            "spec": {"settings": {"number_of_shards": 1}},
        }
        await call(
            custom.create_namespaced_custom_object,
            group,
            version,
            namespace,
            "indices",
            index,
            verb="create",
        )
        for plural in ("indices", "clusternodes", "clusters"):
            listed = await call(
                custom.list_namespaced_custom_object,
                group,
                version,
                namespace,
                plural,
                verb="list",
            )
            assert isinstance(listed["items"], list)
        status, answer = await env.request(
            "PATCH",
            f"/apis/{crds.API_VERSION}/namespaces/{namespace}/indices/logs/status",
            token=token,
            body={"status": {"observedGeneration": 1}},
            content_type="application/merge-patch+json",
        )
        assert status == 200, answer
        await call(
            custom.delete_namespaced_custom_object,
            group,
            version,
            namespace,
            "indices",
            "logs",
            verb="delete",
        )

        # denied: deleting a Lease, Secrets, another namespace, deleting the Cluster
        core = k8s.CoordinationV1Api(api)
        with pytest.raises(PermissionDeniedError) as denied:
            await call_json(
                core.delete_namespaced_lease,
                lock_lease_name("rbac/lock"),
                namespace,
                verb="delete",
                resource=f"leases/{lock_lease_name('rbac/lock')} in namespace {namespace}",
            )
        message = str(denied.value)
        assert "permission denied to delete leases/" in message and "HTTP 403" in message
        assert f"system:serviceaccount:{namespace}:controlplane" in message
        with pytest.raises(PermissionDeniedError, match="list secrets"):
            await call_json(
                k8s.CoreV1Api(api).list_namespaced_secret,
                namespace,
                verb="list",
                resource=f"secrets in namespace {namespace}",
            )
        with pytest.raises(PermissionDeniedError, match="permission denied to get leases"):
            await Leases(api, other).acquire("elsewhere", "me", ttl=5)
        with pytest.raises(PermissionDeniedError, match="delete clusters"):
            await call_json(
                custom.delete_namespaced_custom_object,
                group,
                version,
                namespace,
                "clusters",
                "controlplane",
                verb="delete",
                resource=f"clusters/controlplane in namespace {namespace}",
            )
        with pytest.raises(PermissionDeniedError, match="list namespaces"):
            await call_json(k8s.CoreV1Api(api).list_namespace, verb="list", resource="namespaces")
    await env.delete_namespace(other)
