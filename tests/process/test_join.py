"""``controlplane serve --join``: a fourth process joins a running three-member cluster
through its leader, becomes a voter, keeps the cluster committing after the leader is
SIGKILLed, and on restart neither joins again nor falls behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from controlplane.backends.raft.client import RaftClient, connect

from .cluster import ProcessCluster

pytestmark = pytest.mark.anyio

Make = Callable[..., ProcessCluster]


async def wait_until_applied(
    cluster: ProcessCluster, i: int, flag: str, within: float = 30.0
) -> dict[str, Any]:
    """Wait until member ``i``'s replica (``/v1/state``) holds feature flag ``flag``."""
    deadline = time.monotonic() + within
    while True:
        cluster.check_exits()
        state = await cluster.state(i)
        if state is not None and state.get("feature_flags", {}).get(flag) is True:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{cluster.members[i].id} did not apply {flag!r} within {within}s "
                f"(its state: {state and state.get('version')})\n{cluster.logs_tail()}"
            )
        await asyncio.sleep(0.05)


async def wait_logged(cluster: ProcessCluster, i: int, text: str, within: float = 30.0) -> None:
    """Wait until member ``i`` has logged ``text`` (a line may follow what the others see)."""
    deadline = time.monotonic() + within
    while text not in cluster.log_text(i):
        cluster.check_exits()
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{cluster.members[i].id} never logged {text!r}\n{cluster.logs_tail()}"
            )
        await asyncio.sleep(0.05)


async def wait_voter(client: RaftClient, member_id: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while member_id not in (status := await client.status()).voters:
        if time.monotonic() > deadline:
            raise AssertionError(f"{member_id} is not a voter: {status}")
        await asyncio.sleep(0.1)


async def test_a_member_joins_with_serve_join_and_outlives_the_leader(
    process_cluster: Make,
) -> None:
    with anyio.fail_after(240):
        async with process_cluster(3) as cluster:
            leader = await cluster.wait_ready(30)
            new = cluster.add_joining_member()
            joiner = cluster.members[new]
            cluster.start_joining(new, via=[0, 1, 2])
            client = await connect(
                [m.client_address for m in cluster.members[:3]],
                cluster_id=cluster.cluster_id,
                request_timeout=30.0,
            )
            try:
                await wait_voter(client, joiner.id)
                # The leader counts it a voter a moment before the joiner logs it.
                await wait_logged(cluster, new, "joined the cluster as a voter")
                await client.set_feature_flag("before", True)
                await wait_until_applied(cluster, new, "before")

                # SIGKILL the leader: three of four voters are left, so every commit now
                # needs the new member, whom the next leader knows from the log.
                await cluster.kill(leader)
                others = [i for i in range(4) if i != leader]
                await cluster.wait_leader(30, other_than=leader, agree=others)
                await client.set_feature_flag("after-the-kill", True)
                await wait_until_applied(cluster, new, "after-the-kill")
                await cluster.restart(leader)
                await cluster.wait_ready(30)

                # A restart with the same --join does not join again, and catches up.
                await cluster.kill(new)
                await client.set_feature_flag("while-it-was-down", True)
                cluster.start_joining(new, via=[0, 1, 2])
                await wait_until_applied(cluster, new, "while-it-was-down")
                await cluster.wait_ready(30)
                log = cluster.log_text(new)
                assert log.count("joining the cluster through") == 1, log
                assert "is a voter of the cluster: not joining" in log
                assert joiner.id in (await client.status()).voters
                cluster.check_exits()
            finally:
                await client.stop()


async def test_sigterm_stops_a_member_still_waiting_to_join(process_cluster: Make) -> None:
    """A joiner whose cluster cannot be reached yet stops cleanly on SIGTERM instead of
    waiting out ``raft.join_timeout``."""
    with anyio.fail_after(90):
        cluster = process_cluster(1)
        await cluster.start()
        await cluster.kill(0)  # nothing answers on its client port any more
        new = cluster.add_joining_member()
        cluster.start_joining(new, via=[0])
        await wait_logged(cluster, new, "joining")
        assert await cluster.terminate(new, within=30.0) == 0
    assert "stopped before start-up completed" in cluster.log_text(new)
