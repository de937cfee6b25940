"""The process-cluster harness itself: real ``controlplane serve`` members elect a leader,
survive SIGKILL, SIGSTOP and partitions, and are all killed at the end."""

from __future__ import annotations

import os
from collections.abc import Callable

import anyio
import pytest

from controlplane.backends.raft.client import connect
from controlplane.errors import UnavailableError
from controlplane.testing.faultproxy import Direction, Fault
from controlplane.types import EventKind

from .cluster import MemberExitedError, ProcessCluster

pytestmark = pytest.mark.anyio

Make = Callable[..., ProcessCluster]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_three_members_elect_and_replace_a_killed_leader(process_cluster: Make) -> None:
    with anyio.fail_after(60):
        async with process_cluster(3) as cluster:
            leader = await cluster.wait_ready(30)
            assert all(m.leader == cluster.members[leader].id for m in cluster.members)
            config = cluster.members[0].config_path.read_text()
            assert "127.0.0.1" in config and "peers" in config

            await cluster.kill(leader)
            assert not cluster.members[leader].running
            others = [i for i in range(3) if i != leader]
            new = await cluster.wait_leader(30, other_than=leader, agree=others)
            assert new != leader

            await cluster.restart(leader)
            assert cluster.members[leader].starts == 2
            # The restarted member rejoined: it logged the leader the others agree on.
            current = await cluster.wait_ready(30)
            assert cluster.members[leader].leader == cluster.members[current].id
            cluster.check_exits()


async def test_paused_leader_is_replaced_and_follows_after_resume(process_cluster: Make) -> None:
    with anyio.fail_after(60):
        async with process_cluster(3) as cluster:
            leader = await cluster.wait_ready(30)
            cluster.pause(leader)
            others = [i for i in range(3) if i != leader]
            new = await cluster.wait_leader(30, other_than=leader, agree=others)
            cluster.resume(leader)
            # Once resumed, the old leader hears of the new term and follows.
            await cluster.wait_leader(30, agree=[leader])
            assert cluster.members[leader].leader != cluster.members[leader].id
            assert new != leader
            cluster.check_exits()


async def test_a_client_leaves_a_paused_member_and_its_watch_goes_on(
    process_cluster: Make,
) -> None:
    """The member a client is connected to hangs (SIGSTOP: its connection stays open): the
    keep-alives stop, the client moves to another member, its write and its watch go on
    there. Attempts may take 60 s here: only the keep-alive can move it this soon."""
    with anyio.fail_after(90):
        async with process_cluster(3) as cluster:
            await cluster.wait_ready(30)
            client = await connect(
                cluster.client_addresses(),
                cluster_id=cluster.cluster_id,
                start_timeout=10,
                attempt_timeout=60.0,
                request_timeout=60.0,
                keepalive=0.2,
                keepalive_timeout=1.0,
            )
            try:
                await client.set_feature_flag("before", True)
                hung = next(
                    i
                    for i, m in enumerate(cluster.members)
                    if m.client_address == client.member_address
                )
                async with client.watch(
                    since=client.version, kinds={EventKind.FLAG_CHANGED}
                ) as events:
                    cluster.pause(hung)
                    try:
                        with anyio.fail_after(30):
                            await client.set_feature_flag("after", True)
                            event = await anext(aiter(events))
                    finally:
                        cluster.resume(hung)
                assert event.key == "after"
                assert client.member_address != cluster.members[hung].client_address
            finally:
                await client.stop()
            cluster.check_exits()


async def test_isolated_leader_is_replaced_and_rejoins_after_heal(process_cluster: Make) -> None:
    with anyio.fail_after(60):
        async with process_cluster(3) as cluster:
            leader = await cluster.wait_ready(30)
            cluster.isolate(leader)
            assert not cluster.healed
            others = [i for i in range(3) if i != leader]
            await cluster.wait_leader(30, other_than=leader, agree=others)
            cluster.heal()
            assert cluster.healed
            await cluster.wait_leader(30, agree=[0, 1, 2])
            assert cluster.members[leader].leader != cluster.members[leader].id
            cluster.check_exits()


async def test_one_way_cut_from_the_leader_moves_leadership(process_cluster: Make) -> None:
    with anyio.fail_after(60):
        async with process_cluster(3) as cluster:
            leader = await cluster.wait_ready(30)
            others = [i for i in range(3) if i != leader]
            # The leader's messages no longer arrive, but it still hears the others: they elect
            # a new leader, and the old one learns of the new term and steps down.
            for i in others:
                cluster.cut(leader, i, Fault.DROP)
            new = await cluster.wait_leader(30, other_than=leader, agree=others)
            assert cluster.links[leader, others[0]].fault(Direction.UPSTREAM) is Fault.DROP
            assert cluster.links[others[0], leader].fault(Direction.UPSTREAM) is Fault.PASS
            cluster.heal()
            await cluster.wait_leader(30, agree=[0, 1, 2])
            assert new != leader
            cluster.check_exits()


async def test_five_members_ride_out_a_minority_partition(process_cluster: Make) -> None:
    with anyio.fail_after(60):
        async with process_cluster(5) as cluster:
            leader = await cluster.wait_ready(30)
            minority = [leader, (leader + 1) % 5]
            majority = [i for i in range(5) if i not in minority]
            cluster.partition(minority)  # the rest is the majority side
            new = await cluster.wait_leader(30, other_than=leader, agree=majority)
            assert new in majority
            # The two in the minority still talk to each other, to nobody else.
            assert cluster.links[minority[0], minority[1]].fault(Direction.UPSTREAM) is Fault.PASS
            assert (
                cluster.links[minority[0], majority[0]].fault(Direction.UPSTREAM) is Fault.BLACKHOLE
            )
            assert cluster.links[majority[0], majority[1]].fault(Direction.UPSTREAM) is Fault.PASS
            cluster.heal()
            await cluster.wait_leader(30, agree=list(range(5)))
            cluster.check_exits()


async def test_close_kills_every_process_group(process_cluster: Make) -> None:
    with anyio.fail_after(60):
        cluster = process_cluster(3)
        async with cluster:
            await cluster.wait_ready(30)
            cluster.pause(0)  # a stopped process is killed too
            pids = [m.process.pid for m in cluster.members if m.process is not None]
            assert len(pids) == 3 and all(_alive(p) for p in pids)
        assert not any(_alive(p) for p in pids)
        assert not any(m.running for m in cluster.members)
        await cluster.close()  # idempotent


async def test_a_member_exiting_on_its_own_is_reported(process_cluster: Make) -> None:
    with anyio.fail_after(60):
        cluster = process_cluster(1)
        cluster.base.mkdir(parents=True)
        cluster.members[0].data_dir.write_text("not a directory")
        async with cluster:
            with pytest.raises(MemberExitedError, match="exited on its own with status"):
                await cluster.wait_ready(20)


async def test_clients_through_proxies(process_cluster: Make) -> None:
    with anyio.fail_after(60):
        async with process_cluster(3, proxy_clients=True, cluster_id="proxied") as cluster:
            await cluster.wait_ready(30)
            addresses = cluster.client_addresses()
            assert addresses == [p.address for p in cluster.client_proxies]
            assert not set(addresses) & {m.client_address for m in cluster.members}
            client = await connect(addresses, cluster_id="proxied", start_timeout=10)
            try:
                await client.set_feature_flag("through-proxy", True)
                state = await client.get_cluster_state(consistent=True)
                assert state.feature_flags["through-proxy"] is True
            finally:
                await client.stop()
            for i in range(3):
                cluster.isolate_clients(i, Fault.DROP)
            with pytest.raises(UnavailableError):
                await connect(addresses, cluster_id="proxied", start_timeout=1.0)
            cluster.heal()
            client = await connect(addresses, cluster_id="proxied", start_timeout=10)
            await client.stop()
            # The ops endpoints answer on every member.
            assert [await cluster.ready(i) for i in range(3)] == [True, True, True]
            states = [await cluster.state(i, consistent=True) for i in range(3)]
            assert all(
                s is not None and s["feature_flags"] == {"through-proxy": True} for s in states
            )
