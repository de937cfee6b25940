"""Fixtures of the Kubernetes tests: one real etcd + kube-apiserver per session
(:class:`~controlplane.testing.k8s_env.KubeEnv`), a namespace per test.

The binaries are built from their pinned Go modules on the first run on a machine (cached
outside the repository). That build runs once after collection, before any test starts, so
that it does not count against a test's timeout; without Go the tests fail, they do not skip.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.testing.gobuild import GoMissingError
from controlplane.testing.k8s_env import KubeEnv, build_binaries

_HERE = Path(__file__).resolve().parent
_built: tuple[Path, Path] | None = None
_build_error: str | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build etcd and kube-apiserver (if not cached) when a test of this directory runs."""
    global _built, _build_error
    if _built is not None or _build_error is not None:
        return
    if not any(Path(str(item.path)).is_relative_to(_HERE) for item in session.items):
        return
    started = time.monotonic()
    try:
        _built = build_binaries()
    except GoMissingError as exc:
        _build_error = f"the Kubernetes tests need Go to build etcd and kube-apiserver: {exc}"
    except Exception as exc:  # reported by the first test that needs the binaries
        _build_error = f"building the Kubernetes test binaries failed: {exc}"
    took = time.monotonic() - started
    if took > 5:
        print(f"\nbuilt etcd and kube-apiserver in {took:.0f} s", file=sys.stderr)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """asyncio, for the whole session: the API server outlives every test."""
    return "asyncio"


@pytest.fixture(scope="session")
def kube_binaries() -> tuple[Path, Path]:
    """``(etcd, kube-apiserver)``."""
    if _build_error is not None:
        pytest.fail(_build_error, pytrace=False)
    if _built is None:  # collected some other way: build now
        try:
            return build_binaries()
        except GoMissingError as exc:
            pytest.fail(f"the Kubernetes tests need Go: {exc}", pytrace=False)
    return _built


@pytest.fixture(scope="session")
async def kube_env(
    kube_binaries: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[KubeEnv]:
    """etcd and kube-apiserver for the session; stopped (process groups killed) at its end."""
    etcd, apiserver = kube_binaries
    env = KubeEnv(tmp_path_factory.mktemp("kube-env"), etcd=etcd, kube_apiserver=apiserver)
    async with env:
        yield env


@pytest.fixture
async def namespace(kube_env: KubeEnv) -> AsyncIterator[str]:
    """A fresh namespace for one test (deleted afterwards)."""
    name = await kube_env.create_namespace()
    yield name
    await kube_env.delete_namespace(name)
