"""Locks and node heart-beats as Leases against the real API server: racing clients, fencing
tokens, expiry by observed time (immune to clock skew), RBAC denials and hostile Leases."""

from __future__ import annotations

import asyncio
import datetime
import re
import time
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s

from controlplane.backends.k8s.errors import error_for_status
from controlplane.backends.k8s.leases import (
    KEY_ANNOTATION,
    LEASE_TYPE_LABEL,
    NODE_ID_LABEL,
    Leases,
    format_micro_time,
    lock_lease_name,
    node_lease_name,
    parse_micro_time,
)
from controlplane.errors import (
    AlreadyExistsError,
    CompactedError,
    ConflictError,
    InvalidRequestError,
    LockHeldError,
    LockNotHeldError,
    NotFoundError,
    OperationTimeoutError,
    PermissionDeniedError,
    UnavailableError,
)
from controlplane.testing.k8s_env import KubeEnv

pytestmark = pytest.mark.anyio

MICRO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


class ManualClock:
    """A monotonic clock the test moves (the judge's clock: no sleeping in the tests)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def raw_lease(env: KubeEnv, namespace: str, name: str) -> dict[str, Any]:
    status, body = await env.request(
        "GET", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
    )
    assert status == 200, body
    return dict(body)


async def put_lease(
    env: KubeEnv, namespace: str, name: str, spec: dict[str, Any], **metadata: Any
) -> dict[str, Any]:
    """Create (or overwrite) a Lease by hand, as another program or a person would."""
    path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    body = {"metadata": {"name": name, **metadata}, "spec": spec}
    status, answer = await env.request("POST", path, body=body)
    if status == 409:
        current = await raw_lease(env, namespace, name)
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        status, answer = await env.request("PUT", f"{path}/{name}", body=body)
    assert status in (200, 201), answer
    return dict(answer)


def test_micro_time_and_lease_names() -> None:
    moment = datetime.datetime(2026, 1, 2, 3, 4, 5, 120, tzinfo=datetime.UTC)
    assert format_micro_time(moment) == "2026-01-02T03:04:05.000120Z"
    assert parse_micro_time(format_micro_time(moment)) == moment
    naive = datetime.datetime(2026, 1, 2, 3, 4, 5)  # taken as UTC
    assert format_micro_time(naive) == "2026-01-02T03:04:05.000000Z"
    skewed = datetime.datetime(
        2026, 1, 2, 5, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    )
    assert format_micro_time(skewed) == "2026-01-02T03:04:05.000000Z"
    assert parse_micro_time("2026-01-02T03:04:05.123456789+02:00") == datetime.datetime(
        2026, 1, 2, 1, 4, 5, 123456, tzinfo=datetime.UTC
    )
    for bad in ("", "garbage", "2026-01-02", None, 17, "2026-13-02T03:04:05Z"):
        assert parse_micro_time(bad) is None
    label = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
    keys = ["a", "A", "shards/7:primary", "shards-7-primary", "///", "x" * 253, "ü"]
    names = [lock_lease_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    assert all(label.fullmatch(n) and len(n) <= 63 for n in names), names


async def test_acquire_renew_release_with_growing_tokens(kube_env: KubeEnv, namespace: str) -> None:
    async with kube_env.api_client() as api, asyncio.timeout(60):
        leases = Leases(api, namespace)
        key = "shards/7:primary"
        first = await leases.acquire(key, "alpha", ttl=30)
        assert (first.key, first.holder, first.token, first.ttl) == (key, "alpha", 1, 30.0)
        with pytest.raises(LockHeldError, match="held by 'alpha'"):
            await leases.acquire(key, "beta", ttl=30)
        with pytest.raises(LockHeldError):  # not re-entrant, as in the raft backend
            await leases.acquire(key, "alpha", ttl=30)

        renewed = await leases.renew(key, "alpha", first.token, ttl=2.5)
        assert renewed.token == first.token and renewed.ttl == 3.0  # whole seconds, up
        lease = await raw_lease(kube_env, namespace, lock_lease_name(key))
        assert MICRO_TIME.fullmatch(lease["spec"]["renewTime"])
        assert MICRO_TIME.fullmatch(lease["spec"]["acquireTime"])
        assert lease["metadata"]["annotations"][KEY_ANNOTATION] == key
        assert lease["metadata"]["labels"][LEASE_TYPE_LABEL] == "lock"

        await leases.release(key, "alpha", first.token)
        lease = await raw_lease(kube_env, namespace, lock_lease_name(key))
        assert "holderIdentity" not in lease["spec"]
        assert lease["spec"]["leaseTransitions"] == 1  # the counter survives the release
        with pytest.raises(LockNotHeldError, match="nobody"):
            await leases.renew(key, "alpha", first.token)

        # every acquisition gets a larger token, also the same holder's after a release
        again = await leases.acquire(key, "alpha", ttl=30)
        assert again.token == 2
        await leases.release(key, "alpha", again.token)
        other = await leases.acquire(key, "beta", ttl=30)
        assert other.token == 3
        with pytest.raises(LockNotHeldError, match="token 3"):
            await leases.release(key, "alpha", again.token)
        assert await leases.get_lock(key) == other
        with pytest.raises(InvalidRequestError):
            await leases.acquire("", "alpha", ttl=1)
        with pytest.raises(InvalidRequestError):
            await leases.acquire(key, "alpha", ttl=-1)


async def test_two_clients_racing_one_winner_per_round_and_tokens_grow(
    kube_env: KubeEnv, namespace: str
) -> None:
    async with (
        kube_env.api_client() as api_a,
        kube_env.api_client() as api_b,
        asyncio.timeout(60),
    ):
        clients = {"a": Leases(api_a, namespace), "b": Leases(api_b, namespace)}
        key = "race"
        tokens: list[int] = []
        for _ in range(30):
            results = await asyncio.gather(
                *(c.acquire(key, name, ttl=30) for name, c in clients.items()),
                return_exceptions=True,
            )
            won = [r for r in results if not isinstance(r, BaseException)]
            lost = [r for r in results if isinstance(r, BaseException)]
            assert len(won) == 1, results
            assert len(lost) == 1 and isinstance(lost[0], LockHeldError), results
            lock = won[0]
            assert not tokens or lock.token > tokens[-1]
            tokens.append(lock.token)
            loser = "b" if lock.holder == "a" else "a"
            with pytest.raises(LockNotHeldError):  # the loser cannot renew nor release it
                await clients[loser].renew(key, loser, lock.token)
            await clients[lock.holder].release(key, lock.holder, lock.token)
        assert tokens == list(range(1, 31))
        # the race was real: both read a free Lease and one write was refused (409)
        assert sum(c.conflicts for c in clients.values()) > 0


async def test_expired_lock_is_taken_over_and_the_old_holder_cannot_renew(
    kube_env: KubeEnv, namespace: str
) -> None:
    async with (
        kube_env.api_client() as api_a,
        kube_env.api_client() as api_b,
        asyncio.timeout(60),
    ):
        a, b = Leases(api_a, namespace), Leases(api_b, namespace)
        held = await a.acquire("ttl", "a", ttl=1)  # and never renewed
        with pytest.raises(LockHeldError):
            await b.acquire("ttl", "b", ttl=30)
        # b takes it once one second has passed on its own clock since it first saw it
        deadline = time.monotonic() + 20
        while True:
            try:
                taken = await b.acquire("ttl", "b", ttl=30)
                break
            except LockHeldError:
                assert time.monotonic() < deadline, "never became acquirable"
                await asyncio.sleep(0.1)
        assert taken.token > held.token
        with pytest.raises(LockNotHeldError):
            await a.renew("ttl", "a", held.token)
        with pytest.raises(LockNotHeldError):
            await a.release("ttl", "a", held.token)
        assert (await b.renew("ttl", "b", taken.token)).token == taken.token


async def test_expiry_follows_the_observers_clock_not_renew_time(
    kube_env: KubeEnv, namespace: str
) -> None:
    clock = ManualClock()
    async with kube_env.api_client() as api, asyncio.timeout(60):
        judge = Leases(api, namespace, clock=clock)
        now = datetime.datetime.now(datetime.UTC)
        # renewTime two hours in the past, duration one hour: by wall clocks long expired,
        # but this process has just seen it, so it is held for an hour of *our* time
        past = lock_lease_name("past")
        await put_lease(
            kube_env,
            namespace,
            past,
            {
                "holderIdentity": "skewed",
                "leaseDurationSeconds": 3600,
                "renewTime": format_micro_time(now - datetime.timedelta(hours=2)),
                "leaseTransitions": 4,
            },
        )
        with pytest.raises(LockHeldError, match="skewed"):
            await judge.acquire("past", "me", ttl=10)
        clock.advance(3599)
        with pytest.raises(LockHeldError):
            await judge.acquire("past", "me", ttl=10)
        clock.advance(2)
        assert (await judge.acquire("past", "me", ttl=10)).token == 5

        # renewTime a year ahead, duration 2 s: by wall clocks valid for a year, but unrenewed
        # for 2 s of our time it is expired
        future = lock_lease_name("future")
        await put_lease(
            kube_env,
            namespace,
            future,
            {
                "holderIdentity": "skewed",
                "leaseDurationSeconds": 2,
                "renewTime": format_micro_time(now + datetime.timedelta(days=365)),
            },
        )
        with pytest.raises(LockHeldError):
            await judge.acquire("future", "me", ttl=10)
        clock.advance(2.5)
        assert (await judge.acquire("future", "me", ttl=10)).token == 1

        # a renewal (a new renewTime and resourceVersion) starts the observed duration again
        async with kube_env.api_client() as holder_api:
            holder = Leases(holder_api, namespace)
            lock = await holder.acquire("renewed", "holder", ttl=10)
            with pytest.raises(LockHeldError):
                await judge.acquire("renewed", "me", ttl=10)
            clock.advance(9)
            await holder.renew("renewed", "holder", lock.token)
            with pytest.raises(LockHeldError):
                await judge.acquire("renewed", "me", ttl=10)
            clock.advance(9)  # 18 s since first seen, 9 since the renewal was seen
            with pytest.raises(LockHeldError):
                await judge.acquire("renewed", "me", ttl=10)
            clock.advance(1.5)
            assert (await judge.acquire("renewed", "me", ttl=10)).token == lock.token + 1


async def test_hostile_leases_are_judged_not_crashed_on(kube_env: KubeEnv, namespace: str) -> None:
    clock = ManualClock()
    async with kube_env.api_client() as api, asyncio.timeout(60):
        leases = Leases(api, namespace, clock=clock)
        garbage = "x" * 300 + "\u2603\n\t\"'"
        # a holder but no duration: expired (nothing says how long it may hold)
        await put_lease(kube_env, namespace, lock_lease_name("k1"), {"holderIdentity": garbage})
        assert (await leases.acquire("k1", "me", ttl=5)).token == 1
        # no spec fields at all, or an empty holder: free
        await put_lease(kube_env, namespace, lock_lease_name("k2"), {})
        assert (await leases.acquire("k2", "me", ttl=5)).token == 1
        await put_lease(
            kube_env,
            namespace,
            lock_lease_name("k3"),
            {"holderIdentity": "", "leaseDurationSeconds": 60, "leaseTransitions": 9},
        )
        assert (await leases.acquire("k3", "me", ttl=5)).token == 10
        # a garbage holder with a duration but no renewTime: held for that long, observed
        await put_lease(
            kube_env,
            namespace,
            lock_lease_name("k4"),
            {"holderIdentity": garbage, "leaseDurationSeconds": 60},
        )
        with pytest.raises(LockHeldError, match="xxx"):
            await leases.acquire("k4", "me", ttl=5)
        clock.advance(61)
        assert (await leases.acquire("k4", "me", ttl=5)).token == 1
        # the node liveness helper skips what is not a heart-beat and judges the rest
        await put_lease(
            kube_env,
            namespace,
            node_lease_name("liar"),
            {"holderIdentity": garbage},
            labels={LEASE_TYPE_LABEL: "node", NODE_ID_LABEL: "someone-else"},
        )
        await put_lease(
            kube_env,
            namespace,
            node_lease_name("mute"),
            {"holderIdentity": garbage},
            labels={LEASE_TYPE_LABEL: "node", NODE_ID_LABEL: "mute"},
        )
        judged = await leases.node_liveness()
        assert [(n.node_id, n.alive) for n in judged] == [("mute", False)]


async def test_node_heartbeats_and_down_detection_by_observed_time(
    kube_env: KubeEnv, namespace: str
) -> None:
    clock = ManualClock()
    async with (
        kube_env.api_client() as node_api,
        kube_env.api_client() as leader_api,
        asyncio.timeout(60),
    ):
        nodes = Leases(node_api, namespace)  # the data nodes' side, real clock
        leader = Leases(leader_api, namespace, clock=clock)  # the leader's judgement
        for node_id in ("n1", "n2"):
            record = await nodes.heartbeat(node_id, node_timeout=9.5)
            assert record.holder == node_id and record.duration == 10
        assert await leader.expired_nodes() == []  # first seen now: alive for 10 s
        clock.advance(10.5)
        assert await leader.expired_nodes() == ["n1", "n2"]
        await nodes.heartbeat("n1", node_timeout=10)
        judged = {n.node_id: n for n in await leader.node_liveness()}
        assert judged["n1"].alive and judged["n1"].remaining == pytest.approx(10)
        assert not judged["n2"].alive
        lease = await raw_lease(kube_env, namespace, node_lease_name("n1"))
        assert MICRO_TIME.fullmatch(lease["spec"]["renewTime"])
        assert lease["metadata"]["labels"][NODE_ID_LABEL] == "n1"
        # heart-beats of one node from two clients conflict and still both land
        await asyncio.gather(
            *(nodes.heartbeat("n2", 10) for _ in range(3)), leader.heartbeat("n2", 10)
        )
        assert await leader.expired_nodes() == []


async def test_permission_denied_names_the_verb_and_resource(
    kube_env: KubeEnv, namespace: str
) -> None:
    token = await kube_env.service_account_token(namespace, "nobody")
    async with kube_env.api_client(token=token) as api, asyncio.timeout(60):
        leases = Leases(api, namespace)
        deadline = time.monotonic() + 20
        while True:  # a brand-new token may be unknown (401) for a moment
            with pytest.raises(PermissionDeniedError) as denied:
                await leases.acquire("guarded", "me", ttl=5)
            if "HTTP 403" in str(denied.value) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        message = str(denied.value)
        assert "permission denied to get leases/" in message
        assert f"namespace {namespace}" in message
        assert f"system:serviceaccount:{namespace}:nobody" in message
        assert "HTTP 403" in message and "grant the verb 'get'" in message
        with pytest.raises(PermissionDeniedError, match="list leases"):
            await leases.node_liveness()
    # nothing was written
    async with kube_env.api_client() as admin:
        listed = await k8s.CoordinationV1Api(admin).list_namespaced_lease(namespace)
        assert listed.items == []


def test_http_statuses_map_to_the_error_hierarchy() -> None:
    def status(code: int, reason: str = "", message: str = "m") -> dict[str, Any]:
        return {"kind": "Status", "code": code, "reason": reason, "message": message}

    cases = {
        400: InvalidRequestError,
        401: PermissionDeniedError,
        403: PermissionDeniedError,
        404: NotFoundError,
        409: ConflictError,
        410: CompactedError,
        422: InvalidRequestError,
        429: UnavailableError,
        500: UnavailableError,
        503: UnavailableError,
        504: OperationTimeoutError,
    }
    for code, cls in cases.items():
        error = error_for_status(code, status(code), verb="get", resource="leases/x")
        assert type(error) is cls, (code, error)
        assert f"HTTP {code}" in str(error) and "get leases/x" in str(error)
    exists = error_for_status(409, status(409, "AlreadyExists"), verb="create", resource="r")
    assert isinstance(exists, AlreadyExistsError)
    later = error_for_status(429, b"not json", verb="list", resource="r", retry_after="2")
    assert "retry after 2 s" in str(later) and "not json" in str(later)
