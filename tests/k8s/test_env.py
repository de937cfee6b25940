"""The test environment itself: a real kube-apiserver on etcd, with TLS, client certificates,
RBAC and service-account tokens, cleaned up after use."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config
from kubernetes_asyncio.client.exceptions import ApiException

from controlplane.testing.k8s_env import KUBERNETES_VERSION, KubeEnv, KubeEnvError, reap_orphans

pytestmark = pytest.mark.anyio


async def _status_until(
    env: KubeEnv, path: str, token: str, wanted: int, within: float = 10.0
) -> tuple[int, Any]:
    """GET ``path`` until it answers ``wanted`` (RBAC and token caches follow writes within
    moments, not at once); the last answer after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        status, body = await env.request("GET", path, token=token)
        if status == wanted or time.monotonic() >= deadline:
            return status, body
        await asyncio.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_version_is_the_pinned_release(kube_env: KubeEnv) -> None:
    status, body = await kube_env.request("GET", "/version")
    assert status == 200
    assert body["gitVersion"] == KUBERNETES_VERSION
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    assert (body["major"], body["minor"]) == (major, minor)
    async with kube_env.api_client() as api:  # the kubeconfig's admin, through the client
        info = await k8s.VersionApi(api).get_code()
    assert info.git_version == KUBERNETES_VERSION


async def test_kubeconfig_loads_with_the_client(kube_env: KubeEnv, tmp_path: Path) -> None:
    api = await config.new_client_from_config(
        config_file=str(kube_env.kubeconfig_path),
        persist_config=False,
        temp_file_path=str(tmp_path),  # the embedded certificates are written here
    )
    async with api:
        review = await k8s.AuthenticationV1Api(api).create_self_subject_review({})
    user = review.status.user_info
    assert user.username == "controlplane-test-admin"
    assert "system:masters" in user.groups


async def test_certificates_carry_key_identifiers(kube_env: KubeEnv) -> None:
    pki = kube_env.directory / "pki"
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    for name in ("serving.crt", "admin.crt"):
        cert = x509.load_pem_x509_certificate((pki / name).read_bytes())
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    # the kubeconfig names the same server and embeds the admin's credentials
    config = yaml.safe_load(kube_env.kubeconfig_path.read_text())
    assert config["clusters"][0]["cluster"]["server"] == kube_env.server
    assert config["users"][0]["user"]["client-certificate-data"]


async def test_namespace_is_created(kube_env: KubeEnv, namespace: str) -> None:
    async with kube_env.api_client() as api:
        found = await k8s.CoreV1Api(api).read_namespace(namespace)
    assert found.metadata.name == namespace
    assert found.status.phase == "Active"


async def test_rbac_is_enforced_for_service_accounts(kube_env: KubeEnv, namespace: str) -> None:
    token = await kube_env.service_account_token(namespace, "reader")
    path = f"/api/v1/namespaces/{namespace}/configmaps"

    status, body = await _status_until(kube_env, path, token, 403)
    assert status == 403, body
    assert f"system:serviceaccount:{namespace}:reader" in body["message"]

    # granting exactly that permission makes the same request pass
    async with kube_env.api_client() as api:
        rbac = k8s.RbacAuthorizationV1Api(api)
        await rbac.create_namespaced_role(
            namespace,
            {
                "metadata": {"name": "read-configmaps"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
            },
        )
        await rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": "reader-reads-configmaps"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "read-configmaps",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
            },
        )
    status, body = await _status_until(kube_env, path, token, 200)
    assert status == 200, body
    # ... and nothing more: another namespace's config maps stay out of reach
    status, _ = await kube_env.request("GET", "/api/v1/namespaces/default/configmaps", token=token)
    assert status == 403

    async with kube_env.api_client(token=token) as api:  # the client, with the token
        with pytest.raises(ApiException) as denied:
            await k8s.CoreV1Api(api).list_namespaced_secret(namespace)
    assert denied.value.status == 403


async def test_env_stops_every_process(kube_binaries: tuple[Path, Path]) -> None:
    etcd, apiserver = kube_binaries
    env = KubeEnv(etcd=etcd, kube_apiserver=apiserver)
    async with env:
        pids = env.pids
        directory = env.directory
        assert len(pids) == 2 and all(_group_alive(pid) for pid in pids)
        status, _ = await env.request("GET", "/readyz")
        assert status == 200
    assert not any(_group_alive(pid) for pid in pids)
    assert env.pids == []
    assert not directory.exists()


async def test_failed_start_leaves_nothing_running(
    kube_binaries: tuple[Path, Path], tmp_path: Path
) -> None:
    etcd, apiserver = kube_binaries
    env = KubeEnv(
        tmp_path,
        etcd=etcd,
        kube_apiserver=apiserver,
        extra_apiserver_args=["--no-such-flag=1"],
    )
    with pytest.raises(KubeEnvError) as failure:
        await env.start()
    message = str(failure.value)
    assert "kube-apiserver exited" in message
    assert "no-such-flag" in message  # the log's tail is in the error
    assert env.pids == []
    assert len(env.started_pids) == 2  # etcd came up, then kube-apiserver failed
    assert not any(_group_alive(pid) for pid in env.started_pids)
    assert (tmp_path / "etcd.log").exists()


def test_peers_left_by_a_killed_test_process_are_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test process killed with SIGKILL runs no cleanup: the peers it started (in sessions
    of their own) live on. The next environment started on the machine kills them, and only
    them: a record whose pid now runs something else is dropped without a kill."""
    monkeypatch.setenv("CONTROLPLANE_TEST_PEERS_CACHE", str(tmp_path / "cache"))
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path;"
            "from controlplane.testing.k8s_env import _Process;"
            f"p = _Process('peer', ['sleep', '300'], Path({str(tmp_path / 'log')!r}));"
            "print(p.pid, flush=True); time.sleep(300)",
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, "CONTROLPLANE_TEST_PEERS_CACHE": str(tmp_path / "cache")},
    )
    try:
        assert owner.stdout is not None
        peer = int(owner.stdout.readline())
    finally:
        owner.kill()
        owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        running = tmp_path / "cache" / "running"
        (running / f"{owner.pid}.{stranger.pid}").write_bytes(b"kube-apiserver\0")
        assert _group_alive(peer)
        assert reap_orphans() == [peer]
        deadline = time.monotonic() + 10
        while _group_alive(peer) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group_alive(peer)
        assert stranger.poll() is None  # its command line is not the recorded one
        assert list(running.iterdir()) == []
    finally:
        stranger.kill()
        stranger.wait(10)
