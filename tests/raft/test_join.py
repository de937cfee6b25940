"""Peer addresses in the replicated configuration, and joining a running cluster.

The core records a member's peer address in the configuration of the change that adds it
(and drops it with the member), snapshots carry them, and the node driver dials the members
at the addresses of the configuration in force, except for the members its local
configuration names. A member started with ``raft.join`` asks the leader of a running
cluster to add it, catches up and has itself promoted to voter, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from controlplane.backends.raft.backend import RaftControlPlane, free_port
from controlplane.backends.raft.core import ConfChangeType
from controlplane.backends.raft.join import JoinError
from controlplane.backends.raft.messages import InstallSnapshot
from controlplane.backends.raft.node import NodeOptions, RaftNode
from controlplane.backends.raft.progress import decode_conf_state, encode_conf_state
from controlplane.backends.raft.records import ConfState, SnapshotMeta
from controlplane.backends.raft.storage import DiskStorage
from controlplane.config import Config, RaftConfig
from controlplane.testing.raft_harness import RaftHarness

from .cluster_util import LocalCluster, assert_no_asyncio_errors, client_address
from .sim import Cluster

pytestmark = pytest.mark.anyio

ABC = ("a", "b", "c")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield from assert_no_asyncio_errors(caplog)


# --- the core ------------------------------------------------------------------------------------


def change(c: Cluster, member: str, kind: ConfChangeType, target: str, **kw: Any) -> None:
    c.core(member).propose_conf_change(kind, target, **kw)
    c.settle()


def test_conf_changes_record_keep_and_drop_peer_addresses() -> None:
    c = Cluster(ABC, spares=("d", "e"))
    c.campaign("a")
    change(c, "a", ConfChangeType.ADD_LEARNER, "d", address="h:4", own_address="h:1")
    # The leader records its own address too: a cluster formed without peers has none.
    expected = (("a", "h:1"), ("d", "h:4"))
    assert all(c.core(m).conf.addresses == expected for m in ("a", "b", "c", "d"))
    assert c.core("b").conf.address_of("d") == "h:4"

    c.run_until(lambda: c.nodes["d"].applied >= c.core("a").log.committed)
    change(c, "a", ConfChangeType.PROMOTE_LEARNER, "d", own_address="elsewhere:1")
    assert c.core("a").conf.voters == ("a", "b", "c", "d")
    assert c.core("d").conf.addresses == expected  # kept; the known own address stays

    change(c, "a", ConfChangeType.ADD_LEARNER, "e", address="h:5")
    change(c, "a", ConfChangeType.REMOVE, "d")
    assert all(
        c.core(m).conf.addresses == (("a", "h:1"), ("e", "h:5")) for m in ("a", "b", "c", "e")
    )
    assert c.core("a").conf.address_of("d") is None


def test_a_member_restored_from_a_snapshot_knows_the_addresses() -> None:
    c = Cluster(ABC, spares=("d", "e"))
    c.campaign("a")
    change(c, "a", ConfChangeType.ADD_LEARNER, "d", address="h:4")
    for n in range(10):
        c.propose("a", b"x%d" % n)
    assert c.nodes["a"].snapshot() is not None  # the log before it is gone
    assert c.nodes["a"].storage.snapshot_meta().conf.address_of("d") == "h:4"
    c.isolate("e")
    change(c, "a", ConfChangeType.ADD_LEARNER, "e", address="h:5")
    for n in range(5):
        c.propose("a", b"y%d" % n)
    assert c.nodes["a"].snapshot() is not None  # e can only catch up from a snapshot now
    c.heal()
    c.run_until(lambda: c.nodes["e"].applied >= c.core("a").log.committed)
    assert c.count(InstallSnapshot, dst="e") > 0
    installed = c.nodes["e"].storage.snapshot_meta()
    assert installed.index > 0
    assert installed.conf.addresses == (("d", "h:4"), ("e", "h:5"))
    c.restart("e")
    assert c.core("e").conf.address_of("d") == "h:4"


def test_a_configuration_encoded_before_addresses_existed_decodes() -> None:
    old_conf = msgspec.msgpack.encode([["a", "b"], ["c"]])
    assert decode_conf_state(old_conf) == ConfState(("a", "b"), ("c",))
    old_meta = msgspec.msgpack.encode([7, 2, [["a"], []]])
    meta = msgspec.msgpack.decode(old_meta, type=SnapshotMeta)
    assert meta == SnapshotMeta(7, 2, ConfState(("a",))) and meta.conf.addresses == ()
    new = ConfState(("a",), (), (("a", "h:1"),))
    assert decode_conf_state(encode_conf_state(new)) == new


def test_a_restarted_member_uses_the_addresses_of_its_log() -> None:
    c = Cluster(ABC, spares=("d",))
    c.campaign("a")
    change(c, "a", ConfChangeType.ADD_LEARNER, "d", address="h:4")
    c.restart("b")
    assert c.core("b").conf.addresses == (("d", "h:4"),)


# --- the node's address book ---------------------------------------------------------------------


async def test_the_node_dials_replicated_addresses_but_never_overrides_local_ones(
    tmp_path: Path,
) -> None:
    storage = DiskStorage(tmp_path / "n1")
    conf = ConfState(
        ("n1", "n2", "n3"),
        (),
        (("n1", "127.0.0.1:1001"), ("n2", "127.0.0.1:1002"), ("n3", "127.0.0.1:1003")),
    )
    storage.write_identity("c", "n1", conf)
    node = RaftNode(
        "n1",
        "c",
        storage,
        _NoFsm(),
        options=NodeOptions(heartbeat_interval=0.02, election_timeout=0.2),
        peers={"n2": ("127.0.0.1", 2002)},  # the local configuration (a proxy, say)
    )
    with anyio.fail_after(20):
        await node.start()
        try:
            # n2 keeps its local address, n3 comes from the configuration, n1 is itself.
            assert node.transport.peers == {
                "n2": ("127.0.0.1", 2002),
                "n3": ("127.0.0.1", 1003),
            }
            assert node.advertise_address == f"127.0.0.1:{node.transport.port}"
        finally:
            await node.stop(transfer=False)


class _NoFsm:
    def apply(self, index: int, data: bytes) -> None:
        return None

    def snapshot(self) -> Callable[[], bytes]:
        return lambda: b""

    def restore(self, data: bytes) -> None:
        pass


# --- joining through the leader ------------------------------------------------------------------

TIMING = {"heartbeat_interval": 0.05, "election_timeout": 0.5}


def joiner_config(data_dir: Path, member: str, join: list[str], **raft: Any) -> Config:
    settings: dict[str, Any] = {
        **TIMING,
        "node_id": member,
        "data_dir": str(data_dir),
        "listen_port": 0,
        "client_port": 0,
        "http_port": 0,
        "bootstrap": False,
        "join": tuple(join),
        "join_timeout": 30.0,
        **raft,
    }
    return Config(mode="raft", raft=RaftConfig(**settings))


def client_addresses(members: list[RaftControlPlane]) -> list[str]:
    return [client_address(cp) for cp in members]


@contextlib.asynccontextmanager
async def three_members() -> AsyncIterator[list[RaftControlPlane]]:
    async with RaftHarness(3, **TIMING).cluster() as cluster:
        yield cluster


@contextlib.asynccontextmanager
async def started(config: Config) -> AsyncIterator[RaftControlPlane]:
    cp = RaftControlPlane(config)
    try:
        await cp.start()
        yield cp
    finally:
        await cp.stop()


async def wait_for(condition: Callable[[], bool], within: float = 15.0) -> None:
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - polls state that has no event
            await asyncio.sleep(0.01)


async def test_a_member_joins_through_the_leader_and_follows_the_next_leader(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "controlplane.raft")
    with anyio.fail_after(90):
        async with three_members() as cluster:
            config = joiner_config(tmp_path / "cp-4", "cp-4", client_addresses(cluster))
            async with started(config) as joiner:
                node = joiner.node
                assert "cp-4" in node.conf.voters  # start() returned once it was a voter
                address = node.advertise_address
                assert address == f"127.0.0.1:{node.transport.port}"
                host, port = address.rsplit(":", 1)
                for cp in cluster:
                    # Every member learned the new one's address from the log...
                    assert cp.node.conf.address_of("cp-4") == address
                    await wait_for(lambda cp=cp: "cp-4" in cp.node.transport.peers)
                    assert cp.node.transport.peers["cp-4"] == (host, int(port))
                # ... and the new member the others' (it was configured with none).
                assert set(node.transport.peers) == {"cp-1", "cp-2", "cp-3"}

                leader = next(cp for cp in cluster if cp.node.is_leader)
                await leader.stop()  # hands leadership to another voter
                rest = [cp for cp in (*cluster, joiner) if cp is not leader]
                await wait_for(lambda: any(cp.node.is_leader for cp in rest))
                new = next(cp for cp in rest if cp.node.is_leader)
                assert new is not leader
                applied = node.applied_index
                # Three of four voters are left: this write commits only with cp-4's help.
                writer = next(cp for cp in rest if cp is not joiner)
                await writer.set_feature_flag("after-the-leader-left", True)
                await wait_for(
                    lambda: (
                        joiner.fsm.machine.state.feature_flags.get("after-the-leader-left") is True
                    )
                )
                assert node.applied_index > applied
            assert "joining the cluster through" in caplog.text

            # A restart does not join again: it is a voter already.
            caplog.clear()
            async with started(config) as again:
                assert "cp-4" in again.node.conf.voters
                assert "is a voter of the cluster: not joining" in caplog.text
                assert "joining the cluster through" not in caplog.text


async def test_a_member_that_joins_late_catches_up_from_a_snapshot(tmp_path: Path) -> None:
    with anyio.fail_after(90):
        async with LocalCluster(tmp_path, snapshot_entries=20) as cluster:
            await cluster.start_all()
            leader = await cluster.wait_leader()
            for i in range(60):
                await leader.set_feature_flag(f"f{i}", True)
            await cluster.wait_for(lambda: leader.node._snapshot_index > 0)
            members = list(cluster.members.values())
            config = joiner_config(tmp_path / "cp-4", "cp-4", client_addresses(members))
            async with started(config) as joiner:
                node = joiner.node
                assert "cp-4" in node.conf.voters
                assert node.snapshots_installed >= 1
                assert set(node.transport.peers) == {"cp-1", "cp-2", "cp-3"}
                assert joiner.fsm.machine.state.feature_flags.get("f59") is True


async def test_a_member_added_before_it_crashed_resumes_its_join(tmp_path: Path) -> None:
    with anyio.fail_after(90):
        async with three_members() as cluster:
            peer_port = free_port()
            address = f"127.0.0.1:{peer_port}"
            leader = next(cp for cp in cluster if cp.node.is_leader)
            # What a crash right after the leader added it leaves behind: a learner that
            # holds nothing yet.
            await leader.node.change_membership(ConfChangeType.ADD_LEARNER, "cp-5", address)
            config = joiner_config(
                tmp_path / "cp-5", "cp-5", client_addresses(cluster), listen_port=peer_port
            )
            async with started(config) as joiner:
                assert "cp-5" in joiner.node.conf.voters
                assert joiner.node.conf.address_of("cp-5") == address


async def test_a_join_that_cannot_complete_fails_in_time_and_says_what_to_do(
    tmp_path: Path,
) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    config = joiner_config(tmp_path / "cp-9", "cp-9", [nobody], join_timeout=1.0)
    cp = RaftControlPlane(config)
    with anyio.fail_after(30):
        with pytest.raises(JoinError, match=r"raft\.join_timeout") as info:
            await cp.start()
        assert nobody in str(info.value)
        await cp.stop()
