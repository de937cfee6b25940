"""The factory opens the k8s backend from a configuration alone: ``mode: k8s`` with a
kubeconfig, and ``mode: auto`` when a kubeconfig is configured, on the real API server."""

from __future__ import annotations

import pytest

from controlplane.config import Config, K8sConfig
from controlplane.factory import open_control_plane
from controlplane.testing.k8s_env import KubeEnv
from controlplane.testing.k8s_harness import K8sHarness

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("mode", ["k8s", "auto"])
async def test_the_factory_opens_the_k8s_backend(
    kube_env: KubeEnv, namespace: str, mode: str
) -> None:
    await K8sHarness(kube_env).install_crds()
    config = Config(
        mode=mode,  # type: ignore[arg-type]
        k8s=K8sConfig(namespace=namespace, kubeconfig=str(kube_env.kubeconfig_path)),
    )
    async with await open_control_plane(config) as cp:
        health = await cp.health()
        assert health.backend == "k8s"
        assert health.healthy
        index = await cp.create_index("logs")
        assert await cp.get_index("logs") == index
    async with await open_control_plane(config) as again:  # the state is on the API server
        assert [i.name for i in await again.list_indices()] == ["logs"]
