"""Tests of controlplane.factory.open_control_plane."""

from __future__ import annotations

import os

import anyio
import pytest

from controlplane.config import Config
from controlplane.errors import ClosedError, InvalidConfigError, NotAvailableYetError
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
@pytest.mark.parametrize("mode", ["raft", "k8s"])
async def test_modes_not_available_yet(mode: str) -> None:
    with pytest.raises(NotAvailableYetError) as info:
        await open_control_plane(mode=mode)
    message = str(info.value)
    assert message.startswith(f"mode '{mode}' is not available in this version")
    assert "use mode: memory for tests" in message


@pytest.mark.anyio
async def test_auto_says_what_it_chose() -> None:
    with pytest.raises(NotAvailableYetError, match="mode 'auto' chose 'raft'"):
        await open_control_plane(Config())


@pytest.mark.anyio
async def test_bad_configuration() -> None:
    with pytest.raises(InvalidConfigError, match=r"^mode: must be one of"):
        await open_control_plane(mode="paxos")
    with pytest.raises(InvalidConfigError, match=r"^watch_retention: must be at least 1"):
        await open_control_plane(Config(mode="memory"), watch_retention=0)
    with pytest.raises(InvalidConfigError, match=r"^raft\.bogus: unknown field"):
        await open_control_plane(mode="memory", raft__bogus=1)
