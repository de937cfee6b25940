"""The public conformance suite run against the k8s backend on the real API server.

Each check gets a fresh namespace (and control plane) on the session's API server; the
control plane's own time is the harness's fake clock (see
:mod:`controlplane.testing.k8s_harness`).
"""

from __future__ import annotations

import pytest

from controlplane.testing.conformance import ALL_CHECKS, Check, CheckNotApplicable
from controlplane.testing.k8s_env import KubeEnv
from controlplane.testing.k8s_harness import K8sHarness

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.name)
async def test_conformance(check: Check, kube_env: KubeEnv) -> None:
    try:
        await check(K8sHarness(kube_env))
    except CheckNotApplicable as exc:
        pytest.skip(str(exc))
