"""Tests of controlplane.factory.open_control_plane."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from controlplane.config import Config, K8sConfig, resolve_mode
from controlplane.errors import ClosedError, InvalidConfigError
from controlplane.factory import open_control_plane
from controlplane.protocol import ControlPlane
from controlplane.types import EventKind


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a config, the factory reads the environment: start from a neutral one."""
    for var in list(os.environ):
        if var.startswith("CONTROLPLANE") or var in {
            "CONTROL_PLANE_MODE",
            "KUBERNETES_SERVICE_HOST",
            "NODE_ID",
            "CLUSTER_ID",
            "DATA_DIR",
            "RAFT_PEERS",
            "RAFT_LISTEN",
            "CLIENT_LISTEN",
            "HTTP_LISTEN",
            "K8S_NAMESPACE",
        }:
            monkeypatch.delenv(var)


@pytest.mark.anyio
async def test_memory_opens_started() -> None:
    with anyio.fail_after(10):
        cp = await open_control_plane(Config(mode="memory"))
        try:
            assert isinstance(cp, ControlPlane)
            assert (await cp.health()).healthy
            async with cp.watch(kinds={EventKind.FLAG_CHANGED}) as events:
                await cp.set_feature_flag("dark-mode", True)
                event = await anext(events)
            assert (event.key, event.enabled) == ("dark-mode", True)
        finally:
            await cp.stop()
        with pytest.raises(ClosedError):
            cp.watch()


@pytest.mark.anyio
async def test_memory_from_overrides_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with anyio.fail_after(10):
        async with await open_control_plane(mode="memory", watch_retention=5) as cp:
            assert (await cp.health()).healthy
        monkeypatch.setenv("CONTROL_PLANE_MODE", "memory")
        async with await open_control_plane() as cp:
            assert (await cp.health()).healthy


@pytest.mark.anyio
async def test_raft_opens_a_single_member(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with await open_control_plane(
            mode="raft",
            raft__data_dir=str(tmp_path),
            raft__listen_port=0,
            raft__client_port=0,
            raft__http_port=0,
        ) as cp:
            assert isinstance(cp, ControlPlane)
            index = await cp.create_index("logs")
            assert (await cp.get_index("logs")) == index
            assert (await cp.health()).backend == "raft"


@pytest.mark.anyio
async def test_k8s_without_credentials_is_a_clear_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    with pytest.raises(InvalidConfigError) as info:
        await open_control_plane(mode="k8s")
    message = str(info.value)
    assert message.startswith("k8s.kubeconfig: cannot load the kubeconfig")
    assert "Set k8s.kubeconfig" in message


@pytest.mark.anyio
async def test_auto_outside_a_pod_is_raft(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        config = Config(mode="auto")
        cp = await open_control_plane(
            config,
            raft__data_dir=str(tmp_path),
            raft__listen_port=0,
            raft__client_port=0,
            raft__http_port=0,
        )
        try:
            assert (await cp.health()).backend == "raft"
        finally:
            await cp.stop()


def test_auto_chooses_k8s_with_a_kubeconfig_outside_a_pod(tmp_path: Path) -> None:
    """(Inside a pod: tests/test_config.py.) A kubeconfig that is configured, not one merely
    present in ~/.kube, makes auto choose k8s."""
    assert resolve_mode(Config(mode="auto"), env={}, fs_root=tmp_path) == "raft"
    configured = Config(mode="auto", k8s=K8sConfig(kubeconfig=str(tmp_path / "kubeconfig")))
    assert resolve_mode(configured, env={}, fs_root=tmp_path) == "k8s"


@pytest.mark.anyio
async def test_bad_configuration() -> None:
    with pytest.raises(InvalidConfigError, match=r"^mode: must be one of"):
        await open_control_plane(mode="paxos")
    with pytest.raises(InvalidConfigError, match=r"^watch_retention: must be at least 1"):
        await open_control_plane(Config(mode="memory"), watch_retention=0)
    with pytest.raises(InvalidConfigError, match=r"^raft\.bogus: unknown field"):
        await open_control_plane(mode="memory", raft__bogus=1)
