"""Leader election on a Lease against the real API server: one leader of three at a time, a
killed leader replaced, a partitioned leader stepping down by its renew deadline (before
anyone can take over), and a graceful release handing over at once.

Timings are short (a 3 s lease, 1.5 s renew deadline, 0.3 s retry period) and every bound
asserted is generous: the machine is shared."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s

from controlplane.backends.k8s import election
from controlplane.backends.k8s.election import Elector, LeadershipLostError, Term
from controlplane.backends.k8s.leases import Leases
from controlplane.errors import InvalidConfigError
from controlplane.testing.faultproxy import FaultProxy
from controlplane.testing.k8s_env import HOST, KubeEnv

pytestmark = pytest.mark.anyio

FAST = {"lease_duration": 3, "renew_deadline": 1.5, "retry_period": 0.3}


@dataclass
class Terms:
    """Leading intervals (local monotonic time) recorded by a leader-only reconciler, and a
    sampler of ``is_leader`` over all electors."""

    intervals: list[tuple[str, int, float, float]] = field(default_factory=list)
    running: dict[str, float] = field(default_factory=dict)
    max_leaders: int = 0

    def reconciler(self, identity: str) -> Callable[[Term], Any]:
        async def reconcile(term: Term) -> None:
            started = time.monotonic()
            self.running[identity] = started
            try:
                await asyncio.Event().wait()
            finally:
                del self.running[identity]
                self.intervals.append((identity, term.term, started, time.monotonic()))

        return reconcile

    async def sample(self, electors: list[Elector]) -> None:
        while True:
            self.max_leaders = max(self.max_leaders, sum(e.is_leader for e in electors))
            self.max_leaders = max(self.max_leaders, len(self.running))
            await asyncio.sleep(0.02)

    def check_no_overlap(self) -> None:
        spans = sorted(
            self.intervals + [(i, -1, s, time.monotonic()) for i, s in self.running.items()],
            key=lambda span: span[2],
        )
        for before, after in itertools.pairwise(spans):
            assert after[2] >= before[3], f"terms overlap: {before} and {after}"
        assert self.max_leaders <= 1


@contextlib.asynccontextmanager
async def electors(
    env: KubeEnv, namespace: str, names: list[str], terms: Terms, **options: Any
) -> AsyncIterator[dict[str, Elector]]:
    """One ApiClient and one Elector per name (not started); all closed at the end."""
    async with contextlib.AsyncExitStack() as stack:
        made = {}
        for name in names:
            api = await stack.enter_async_context(env.api_client())
            elector = Elector(Leases(api, namespace), identity=name, **{**FAST, **options})
            elector.add_reconciler(terms.reconciler(name))
            made[name] = elector
            stack.push_async_callback(elector.close)
        sampler = asyncio.create_task(terms.sample(list(made.values())))
        try:
            yield made
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler


async def leader_of(group: dict[str, Elector], within: float, but: str = "") -> Elector:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        leaders = [e for e in group.values() if e.is_leader and e.identity != but]
        if leaders:
            return leaders[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no leader within {within} s")


async def test_defaults_are_client_gos_and_timing_is_validated(
    kube_env: KubeEnv, namespace: str
) -> None:
    async with kube_env.api_client() as api:
        leases = Leases(api, namespace)
        elector = Elector(leases)
        assert (elector.lease_duration, elector.renew_deadline, elector.retry_period) == (
            15.0,
            10.0,
            2.0,
        )
        assert election.JITTER_FACTOR == 1.2 and elector.release_on_stop
        assert elector.name == "controlplane-leader" and not elector.is_leader
        for bad in (
            {"lease_duration": 10, "renew_deadline": 10},  # must step down before expiry
            {"renew_deadline": 2.4, "retry_period": 2},  # > 1.2 x retry period
            {"retry_period": 0},
        ):
            with pytest.raises(InvalidConfigError):
                Elector(leases, **bad)  # type: ignore[arg-type]


async def test_one_leader_of_three_and_a_killed_leader_is_replaced(
    kube_env: KubeEnv, namespace: str
) -> None:
    terms = Terms()
    names = ["a", "b", "c"]
    async with (
        electors(kube_env, namespace, names, terms, release_on_stop=False) as group,
        asyncio.timeout(60),
    ):
        for elector in group.values():
            elector.start()
        first = await leader_of(group, within=15)
        await asyncio.sleep(1.5)  # several renewals: still exactly one leader
        assert first.is_leader and sum(e.is_leader for e in group.values()) == 1
        assert {e.leader for e in group.values()} == {first.identity}
        old_term = first.term
        assert old_term is not None

        killed_at = time.monotonic()
        await first.close()  # killed: no release, the Lease must expire
        second = await leader_of(group, within=20, but=first.identity)
        took = time.monotonic() - killed_at
        # lease duration (3 s) + a retry period with jitter (0.66 s); generous bound
        assert took < 12, took
        assert second.term is not None and second.term.term == old_term.term + 1
        await asyncio.sleep(0.6)
    terms.check_no_overlap()
    assert [(i, t) for i, t, _, _ in terms.intervals][:1] == [(first.identity, old_term.term)]


async def test_partitioned_leader_stops_by_its_renew_deadline_and_another_takes_over(
    kube_env: KubeEnv, namespace: str
) -> None:
    terms = Terms()
    async with (
        FaultProxy(HOST, target_port=kube_env.port) as proxy,
        contextlib.AsyncExitStack() as stack,
        asyncio.timeout(60),
    ):
        configuration = kube_env.configuration()
        configuration.host = f"https://{HOST}:{proxy.port}"
        api = await stack.enter_async_context(k8s.ApiClient(configuration=configuration))
        partitioned = Elector(Leases(api, namespace), identity="p", **FAST)  # type: ignore[arg-type]
        partitioned.add_reconciler(terms.reconciler("p"))
        stack.push_async_callback(partitioned.close)
        partitioned.start()
        await asyncio.wait_for(partitioned.wait_leading(), 15)

        lost: list[BaseException] = []

        async def user_code() -> None:
            try:
                async with partitioned.leading():
                    await asyncio.Event().wait()
            except LeadershipLostError as exc:
                lost.append(exc)

        user = asyncio.create_task(user_code())
        group = await stack.enter_async_context(electors(kube_env, namespace, ["b", "c"], terms))
        for elector in group.values():
            elector.start()
        await asyncio.sleep(1.0)  # the standbys observe the leader renewing
        assert partitioned.is_leader and not any(e.is_leader for e in group.values())

        cut_at = time.monotonic()
        proxy.blackhole()
        await asyncio.wait_for(partitioned.wait_standby(), 10)
        stopped = time.monotonic() - cut_at
        assert stopped < FAST["renew_deadline"] + 1.0, stopped  # generous
        await asyncio.wait_for(user, 5)
        assert lost and isinstance(lost[0], LeadershipLostError)
        assert "p" not in terms.running

        successor = await leader_of(group, within=20)
        assert successor.identity in ("b", "c")
        proxy.pass_through()  # healed: the old leader stays a standby
        await asyncio.sleep(1.5)
        assert not partitioned.is_leader and successor.is_leader
        assert partitioned.terms == 1
    terms.check_no_overlap()


async def test_graceful_release_hands_over_at_once(kube_env: KubeEnv, namespace: str) -> None:
    terms = Terms()
    # a long lease: only the release can explain a quick take-over
    slow = {"lease_duration": 15, "renew_deadline": 10, "retry_period": 0.3}
    async with (
        electors(kube_env, namespace, ["a", "b"], terms, **slow) as group,
        asyncio.timeout(60),
    ):
        group["a"].start()
        await asyncio.wait_for(group["a"].wait_leading(), 15)
        group["b"].start()
        await asyncio.sleep(1.0)
        assert not group["b"].is_leader
        released_at = time.monotonic()
        await group["a"].close()
        assert "a" not in terms.running
        term = await asyncio.wait_for(group["b"].wait_leading(), 10)
        assert time.monotonic() - released_at < 5  # well under the 15 s lease
        assert term.term == 2
    terms.check_no_overlap()
