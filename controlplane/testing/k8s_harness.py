"""The conformance harness of the k8s backend: a fresh namespace per cluster on a real API server.

The API server and etcd (:class:`~controlplane.testing.k8s_env.KubeEnv`) are the caller's and
outlive the harness (one per test session); the harness installs the CRDs once, and each
:meth:`K8sHarness.open` creates a namespace, starts a :class:`K8sControlPlane` in it, waits
until it leads (a fresh namespace has no other candidate) and deletes the namespace on exit.

Without an ``env`` (the conformance suite's table of harnesses builds them without
arguments) the harness uses one environment shared by the whole process, started on first
use and killed at interpreter exit (:func:`shared_env`).

The control plane's own time (lock TTLs, node timeouts) runs on a :class:`FakeClock`, as in
the other harnesses, so those checks are instant: :meth:`advance_time` moves it and runs the
leader's duties. Leader election and the informers run on real time.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import anyio

from ..config import Config, K8sConfig
from ..errors import ClosedError
from ..protocol import ControlPlane
from .conformance_harness import FakeClock, HarnessBase

if TYPE_CHECKING:
    from ..backends.k8s.backend import K8sControlPlane
    from .k8s_env import KubeEnv

__all__ = ["K8sHarness", "shared_env"]

_shared: KubeEnv | None = None


async def shared_env() -> KubeEnv:
    """One etcd + kube-apiserver for this process, started on the first call (building the
    binaries if they are not cached) and killed at interpreter exit. Its processes do not
    belong to an event loop, so tests on different loops can share it."""
    global _shared
    if _shared is None:
        from .k8s_env import KubeEnv  # noqa: PLC0415 (needs the k8s extra)

        env = KubeEnv()
        await env.start()
        atexit.register(_kill, env)
        _shared = env
    return _shared


def _kill(env: KubeEnv) -> None:
    for pid in env.pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    shutil.rmtree(env.directory, ignore_errors=True)


class K8sHarness(HarnessBase):
    """Fresh k8s control planes, each in a namespace of its own on ``env``'s API server."""

    name = "k8s"
    virtual_time = True
    timeout = 20.0

    def __init__(self, env: KubeEnv | None = None, *, start: float = 1_700_000_000.0) -> None:
        self._env = env
        self.clock = FakeClock(start)
        self._open: list[K8sControlPlane] = []

    def now(self) -> float:
        """The fake clock."""
        return self.clock()

    @property
    def env(self) -> KubeEnv:
        """The API server this harness opens control planes on."""
        if self._env is None:
            raise RuntimeError("no KubeEnv yet: open() starts the shared one")
        return self._env

    async def install_crds(self) -> None:
        """Install the CRDs (once per API server)."""
        if self._env is None:
            self._env = await shared_env()
        from ..backends.k8s.crds import crd_manifests  # noqa: PLC0415

        manifests = crd_manifests()
        installed = getattr(self.env, "_installed_crds", {})
        if all(m["metadata"]["name"] in installed for m in manifests):
            return
        await self.env.install_crds(manifests)

    @asynccontextmanager
    async def control_plane(
        self, namespace: str, *, watch_retention: int | None = None, identity: str | None = None
    ) -> AsyncIterator[K8sControlPlane]:
        """A started control plane in ``namespace`` (on this harness's clock)."""
        from ..backends.k8s.backend import K8sControlPlane  # noqa: PLC0415 (optional backend)

        config = Config(
            mode="k8s",
            k8s=K8sConfig(namespace=namespace),
            watch_retention=watch_retention or 10_000,
        )
        cp = K8sControlPlane(
            config, configuration=self.env.configuration(), clock=self.clock, identity=identity
        )
        try:
            await cp.start()
            self._open.append(cp)
            yield cp
        finally:
            with contextlib.suppress(ValueError):
                self._open.remove(cp)
            await cp.stop()

    @asynccontextmanager
    async def _open_cm(self, watch_retention: int | None) -> AsyncIterator[ControlPlane]:
        await self.install_crds()
        namespace = await self.env.create_namespace("cp")
        try:
            async with self.control_plane(namespace, watch_retention=watch_retention) as cp:
                with anyio.fail_after(self.timeout):
                    await cp.elector.wait_leading()
                yield cp
        finally:
            await self.env.delete_namespace(namespace)

    def open(
        self, *, watch_retention: int | None = None
    ) -> AbstractAsyncContextManager[ControlPlane]:
        """A fresh started control plane in a new namespace; it leads."""
        return self._open_cm(watch_retention)

    async def advance_time(self, seconds: float) -> None:
        """Move the fake clock, then run the leader's duties (node-down, lock reaping)."""
        self.clock.advance(seconds)
        for cp in list(self._open):
            with contextlib.suppress(ClosedError):
                await cp.run_maintenance()
