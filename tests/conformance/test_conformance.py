"""The conformance suite (``controlplane.testing``) against every backend of ``conftest.py``.

One pytest test per check, parametrized over the ``harness`` fixture: a check is written once
and a backend is added by adding its harness.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import msgspec
import pytest

from controlplane import ClusterEvent, ClusterState, ControlPlane, EventStream, Lock, testing
from controlplane.errors import LockNotHeldError
from controlplane.testing import (
    ALL_CHECKS,
    BackendHarness,
    Check,
    CheckNotApplicable,
    MemoryHarness,
    VirtualClockHarness,
    get_check,
)
from controlplane.testing.conformance_harness import registered_checks


@pytest.mark.anyio
@pytest.mark.parametrize("check", ALL_CHECKS, ids=[c.name for c in ALL_CHECKS])
async def test_conformance(check: Check, harness: BackendHarness) -> None:
    try:
        await check(harness)
    except CheckNotApplicable as exc:
        pytest.skip(f"{harness.name}: {exc}")


def test_public_exports() -> None:
    assert isinstance(testing.__all__, tuple)
    assert sorted(testing.__all__) == list(testing.__all__)
    for name in testing.__all__:
        assert getattr(testing, name) is not None
    assert isinstance(MemoryHarness(), VirtualClockHarness)


def test_every_check_is_collected_and_documented() -> None:
    names = [c.name for c in ALL_CHECKS]
    assert len(names) == len(set(names)), "check names must be unique"
    assert registered_checks() == ALL_CHECKS, "every registered check is in ALL_CHECKS"
    undocumented = [c.name for c in ALL_CHECKS if not c.doc]
    assert not undocumented, f"checks without a docstring: {undocumented}"
    areas = {c.area for c in ALL_CHECKS}
    assert areas == {"indices", "nodes", "shards", "locks", "watch", "cluster"}


# --- the suite catches broken backends ----------------------------------------------------------


class _Faulty:
    """A backend that delegates to a real one except for one deliberate fault."""

    def __init__(self, inner: ControlPlane, fault: str) -> None:
        self._inner = inner
        self._fault = fault
        self._first_state: ClusterState | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def watch(self, since: int | None = None, kinds: Any = None) -> EventStream:
        stream = self._inner.watch(since, kinds)
        return _DroppingStream(stream) if self._fault == "drop-event" else stream

    async def acquire_lock(self, key: str, holder: str, ttl: float) -> Lock:
        lock = await self._inner.acquire_lock(key, holder, ttl)
        return msgspec.structs.replace(lock, token=1) if self._fault == "reuse-token" else lock

    async def get_cluster_state(self, consistent: bool = False) -> ClusterState:
        state = await self._inner.get_cluster_state(consistent)
        if self._fault == "stale-read" and not consistent:
            if self._first_state is None:
                self._first_state = state
            return self._first_state
        return state

    async def heartbeat(self, node_id: str) -> None:
        if self._fault == "deaf-heartbeat" and (await self.get_node(node_id)).status == "down":
            return
        await self._inner.heartbeat(node_id)

    def lock(self, key: str, *, ttl: float, holder: str | None = None, wait: float | None = None):  # type: ignore[no-untyped-def]
        if self._fault != "no-renewal":
            return self._inner.lock(key, ttl=ttl, holder=holder, wait=wait)
        return _no_renewal(self._inner, key, ttl, holder or "lazy")


@contextlib.asynccontextmanager
async def _no_renewal(cp: ControlPlane, key: str, ttl: float, holder: str) -> AsyncIterator[Lock]:
    lock = await cp.acquire_lock(key, holder, ttl)
    try:
        yield lock
    finally:
        with contextlib.suppress(LockNotHeldError):
            await cp.release_lock(key, holder, lock.token)


class _DroppingStream(EventStream):
    """Loses the third event."""

    def __init__(self, inner: EventStream) -> None:
        self._inner = inner
        self._count = 0

    async def __anext__(self) -> ClusterEvent:
        self._count += 1
        if self._count == 3:
            await self._inner.__anext__()
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def resume_version(self) -> int:
        return self._inner.resume_version


class _FaultyHarness(MemoryHarness):
    timeout = 1.0  # the faults make some checks wait for what never comes

    def __init__(self, fault: str) -> None:
        super().__init__()
        self._fault = fault

    def open(
        self, *, watch_retention: int | None = None
    ) -> contextlib.AbstractAsyncContextManager[ControlPlane]:
        @contextlib.asynccontextmanager
        async def wrapped() -> AsyncIterator[ControlPlane]:
            async with super(_FaultyHarness, self).open(watch_retention=watch_retention) as cp:
                yield cast(ControlPlane, _Faulty(cp, self._fault))

        return wrapped()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fault", "check_name"),
    [
        ("drop-event", "watch_replays_history_then_live"),
        ("drop-event", "watch_concurrent_writers"),
        ("reuse-token", "lock_fencing_tokens_grow"),
        ("stale-read", "cluster_state_reflects_writes"),
        ("deaf-heartbeat", "heartbeat_revives_down_node"),
        ("no-renewal", "lock_helper_renews"),
    ],
)
async def test_the_suite_catches_a_faulty_backend(fault: str, check_name: str) -> None:
    with pytest.raises(AssertionError):
        await get_check(check_name)(_FaultyHarness(fault))
    await get_check(check_name)(MemoryHarness())  # and passes without the fault
