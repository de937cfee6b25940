"""The Raft node driver and the raft backend with a single member, over real disk and sockets.

Covers: durability across restarts, snapshots (taken after ``snapshot_entries``, read back at
start-up), refusing another member's data directory without touching it, linearizable reads,
and the driver's own contract (fail-stop on any error inside its loop, ``stop()`` after such a
failure, the ``message_filter`` seam, error translation of the operator calls).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from controlplane.backends.raft.backend import ControlPlaneFsm, RaftControlPlane
from controlplane.backends.raft.core import ConfChangeType
from controlplane.backends.raft.hardstate import IdentityMismatchError
from controlplane.backends.raft.messages import InstallSnapshot
from controlplane.backends.raft.node import NodeOptions, PeerMessage, RaftNode, SnapshotChunk
from controlplane.backends.raft.records import ConfState, SnapshotMeta
from controlplane.backends.raft.storage import DiskStorage
from controlplane.config import Config, RaftConfig
from controlplane.errors import (
    ClosedError,
    InvalidRequestError,
    LockHeldError,
    NotLeaderError,
    OperationTimeoutError,
    StorageError,
    UnavailableError,
)

from .cluster_util import FAST, assert_no_asyncio_errors

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield from assert_no_asyncio_errors(caplog)


def single(data_dir: Path, **raft: Any) -> Config:
    """A single-member configuration (no peers) with fast timing, on ports picked by the OS."""
    settings = {**FAST, "listen_port": 0, "client_port": 0, "http_port": 0, **raft}
    return Config(mode="raft", raft=RaftConfig(data_dir=str(data_dir), **settings))


def digest(directory: Path) -> dict[str, object]:
    """Every file and directory under ``directory`` with the hash of its content."""
    return {
        str(p.relative_to(directory)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        )
        for p in sorted(directory.rglob("*"))
    }


def tear_the_log_tail(data: Path) -> None:
    """Append a torn record after the last record of the log."""
    segment = next((data / "wal").glob("*.log"))
    with open(segment, "r+b") as f:
        end = len(f.read().rstrip(b"\0"))
        f.seek(end)
        f.write(b"\x07\x00\x00\x00torn")


async def wait_until(condition: Callable[[], bool], within: float = 10.0) -> None:
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - polls state that has no event
            await asyncio.sleep(0.01)


async def write_some(cp: RaftControlPlane, n: int, prefix: str = "flag") -> None:
    for i in range(n):
        await cp.set_feature_flag(f"{prefix}-{i % 7}", i % 2 == 0 or i >= n - 7)


# --- durability ---------------------------------------------------------------------------------


async def test_writes_survive_a_restart_and_versions_continue(tmp_path: Path) -> None:
    config = single(tmp_path / "d")
    with anyio.fail_after(30):
        async with RaftControlPlane(config) as cp:
            await cp.wait_ready(10)
            await cp.create_index("logs", {"shards": 2, "replicas": 0})
            await write_some(cp, 20)
            lock = await cp.acquire_lock("leader-election", "me", ttl=600)
            before = await cp.get_cluster_state(consistent=True)

        async with RaftControlPlane(config) as cp:
            await cp.wait_ready(10)
            after = await cp.get_cluster_state(consistent=True)
            assert after == before
            assert (await cp.get_lock("leader-election")).token == lock.token
            await cp.set_feature_flag("after-restart", True)
            state = await cp.get_cluster_state()
            assert state.version == before.version + 1
            assert state.feature_flags["after-restart"] is True


async def test_proposals_waiting_together_share_an_entry_each_with_its_own_result(
    tmp_path: Path,
) -> None:
    """Proposals queued in one iteration of the loop go into one log entry; each command is
    still applied on its own, in order, with its own result or error, counts toward the
    snapshot threshold, and survives a restart."""
    config = single(tmp_path / "d", snapshot_entries=150)
    n = 200
    with anyio.fail_after(30):
        async with RaftControlPlane(config) as cp:
            await cp.wait_ready(10)
            first_index = cp.node.commit_index
            calls = [cp.acquire_lock(f"k{i}", f"h{i}", ttl=600) for i in range(n)]
            calls.insert(100, cp.acquire_lock("k0", "someone-else", ttl=600))  # held: fails
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            refused = outcomes.pop(100)
            assert isinstance(refused, LockHeldError)
            tokens = [lock.token for lock in outcomes if not isinstance(lock, BaseException)]
            assert len(tokens) == n and tokens == sorted(set(tokens))  # applied in order
            entries = cp.node.commit_index - first_index
            assert entries * 4 <= n, f"{n + 1} proposals took {entries} entries"
            before = await cp.get_cluster_state()
            assert len(before.locks) == n
            # Fewer than 150 entries, more than 150 commands: a snapshot is taken.
            await wait_until(lambda: bool(list((tmp_path / "d" / "snap").glob("*.snap"))))

        async with RaftControlPlane(config) as cp:
            await cp.wait_ready(10)
            assert await cp.get_cluster_state(consistent=True) == before


async def test_snapshots_are_taken_during_a_steady_stream_of_writes(tmp_path: Path) -> None:
    """The node loop checks the threshold after every Ready: one write after the other never
    leaves it idle, and it used to check only when idle (the log then grew unbounded)."""
    with anyio.fail_after(60):
        async with RaftControlPlane(single(tmp_path / "d", snapshot_entries=10)) as cp:
            await cp.wait_ready(10)
            await write_some(cp, 300)
            assert cp.node.metrics.snapshots_taken.value >= 5


async def test_a_large_state_waits_for_its_size_of_log_before_the_next_snapshot(
    tmp_path: Path,
) -> None:
    """Past ``snapshot_entries`` a snapshot is due only once the log since the last one is as
    large as that snapshot: a large state is not encoded again after a few small writes."""
    with anyio.fail_after(60):
        async with RaftControlPlane(single(tmp_path / "d", snapshot_entries=10)) as cp:
            await cp.wait_ready(10)
            node = cp.node
            await asyncio.gather(
                *(cp.create_index(f"ix-{i}", {"number_of_shards": 16}) for i in range(300))
            )
            await wait_until(lambda: not node._snapshot_running)
            await write_some(cp, 10)  # a snapshot of the 300 indices, if none was due yet
            await wait_until(lambda: not node._snapshot_running)
            taken = node.metrics.snapshots_taken.value
            size = node._snapshot_size
            assert taken >= 1 and size > 100_000

            await write_some(cp, 100)  # 10 times snapshot_entries, a few KB of log
            assert 0 < node._since_snapshot_bytes < size
            assert not node._snapshot_running
            assert node.metrics.snapshots_taken.value == taken

            # Enough bytes of log (indices with ~2 KB of mappings each), and it is taken.
            mappings = {"properties": {f"field-{j}": {"type": "keyword"} for j in range(60)}}
            for i in range(150):
                await cp.create_index(f"more-{i}", mappings=mappings)
            await wait_until(lambda: node.metrics.snapshots_taken.value > taken)


async def test_proposal_data_may_not_start_with_the_batch_mark(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with RaftControlPlane(single(tmp_path / "d")) as cp:
            await cp.wait_ready(10)
            with pytest.raises(InvalidRequestError, match="0xC1"):
                await cp.node.propose(b"\xc1\x90")


async def test_snapshot_is_taken_and_read_back_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controlplane.raft.node")
    config = single(tmp_path / "d", snapshot_entries=10)
    with anyio.fail_after(30):
        async with RaftControlPlane(config) as cp:
            await cp.wait_ready(10)
            await write_some(cp, 45)
            # The snapshot is written by a task of its own: wait until one is durable.
            await wait_until(lambda: bool(list((tmp_path / "d" / "snap").glob("*.snap"))))
            taken = [r for r in caplog.records if "snapshot at" in r.getMessage()]
            assert taken, "no snapshot was logged"
            # A few entries after the last snapshot (fewer than snapshot_entries: no new one),
            # so that start-up has something to replay on top of it.
            await write_some(cp, 3)
            before = await cp.get_cluster_state(consistent=True)

        restored: list[int] = []
        applied: list[int] = []
        real_restore, real_apply = ControlPlaneFsm.restore, ControlPlaneFsm.apply

        def restore(self: ControlPlaneFsm, data: bytes) -> None:
            real_restore(self, data)
            restored.append(self.machine.state.version)

        def apply(self: ControlPlaneFsm, index: int, data: bytes) -> Any:
            applied.append(index)
            return real_apply(self, index, data)

        monkeypatch.setattr(ControlPlaneFsm, "restore", restore)
        monkeypatch.setattr(ControlPlaneFsm, "apply", apply)
        async with RaftControlPlane(config) as cp:
            await cp.wait_ready(10)
            assert await cp.get_cluster_state(consistent=True) == before
            # Start-up restored the snapshot and replayed only the entries after it.
            assert len(restored) == 1 and 0 < restored[0] <= before.version
            snapshot_index = cp.node.core.log.first_index() - 1 if cp.node.core else 0
            assert snapshot_index >= 10
            assert applied and min(applied) > snapshot_index
            await cp.set_feature_flag("after-restart", True)
            assert (await cp.get_cluster_state()).version == before.version + 1


@pytest.mark.parametrize(
    ("cluster_id", "node_id"), [("another-cluster", "cp-1"), ("controlplane", "cp-2")]
)
async def test_a_data_directory_of_another_member_is_refused_untouched(
    tmp_path: Path, cluster_id: str, node_id: str
) -> None:
    data = tmp_path / "d"
    with anyio.fail_after(30):
        async with RaftControlPlane(single(data)) as cp:
            await cp.wait_ready(10)
            await write_some(cp, 5)
        # A torn record at the end of the log: opening the directory as storage would cut it
        # off, i.e. write to it. A refused member must not even do that.
        tear_the_log_tail(data)
        before = digest(data)

        wrong = single(data, cluster_id=cluster_id, node_id=node_id)
        cp = RaftControlPlane(wrong)
        with pytest.raises(IdentityMismatchError) as error:
            await cp.start()
        message = str(error.value)
        assert "member 'cp-1' of cluster 'controlplane'" in message
        assert f"not to member {node_id!r} of cluster {cluster_id!r}" in message
        assert digest(data) == before
        await cp.stop()

        # The right member still opens it (and then repairs the torn tail itself).
        async with RaftControlPlane(single(data)) as cp:
            await cp.wait_ready(10)
            assert len((await cp.get_cluster_state(consistent=True)).feature_flags) == 5


async def test_consistent_reads_see_every_completed_write(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with RaftControlPlane(single(tmp_path / "d")) as cp:
            await cp.wait_ready(10)
            for i in range(20):
                await cp.set_feature_flag(f"f{i}", True)
                state = await cp.get_cluster_state(consistent=True)
                assert state.feature_flags[f"f{i}"] is True
                assert state.version == i + 1
            assert cp.node.applied_index >= cp.node.commit_index - 0  # all applied
            health = await cp.health()
            assert health.healthy and health.role == "leader" and health.leader == "cp-1"


async def test_a_start_that_failed_can_be_retried(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = single(tmp_path / "d", listen_port=port)
        cp = RaftControlPlane(config)
        with anyio.fail_after(20):
            with pytest.raises(OSError):
                await cp.start()
            assert not (await cp.health()).healthy
            # A second attempt really tries again (it used to return at once, "started").
            with pytest.raises(OSError):
                await cp.start()
            with pytest.raises(ClosedError):
                await cp.set_feature_flag("x", True)
            await cp.stop()
    with anyio.fail_after(20):
        async with RaftControlPlane(config) as cp:  # the port is free now
            await cp.wait_ready(10)
            await cp.set_feature_flag("x", True)


# --- the driver on its own ---------------------------------------------------------------------


class KV:
    """A minimal Fsm: ``b"k=v"`` sets k; the result is the number of entries applied."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.data: dict[str, str] = {}
        self.count = 0
        self.fail_on = fail_on

    def apply(self, index: int, data: bytes) -> Any:
        if data == self.fail_on:
            raise RuntimeError("a bug in the state machine")
        key, _, value = data.decode().partition("=")
        self.data[key] = value
        self.count += 1
        return self.count

    def snapshot(self) -> Callable[[], bytes]:
        data = dict(self.data)
        return lambda: msgspec.msgpack.encode(data)

    def restore(self, data: bytes) -> None:
        self.data = msgspec.msgpack.decode(data, type=dict[str, str])


def lone_node(
    path: Path, fsm: KV, *, fsync: Callable[[int], None] | None = None, **options: Any
) -> RaftNode:
    storage = DiskStorage(path, fsync=fsync)
    storage.write_identity("c", "n1", ConfState(voters=("n1",)))
    opts = NodeOptions(**{"heartbeat_interval": 0.02, "election_timeout": 0.2, **options})
    return RaftNode("n1", "c", storage, fsm, options=opts)


def port_refuses(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def test_a_leaders_own_proposal_times_out_at_its_deadline(tmp_path: Path) -> None:
    # The leader's proposals share one deadline timer (no asyncio.timeout each): a proposal
    # stuck behind a slow disk still fails at its own deadline, saying the outcome is unknown,
    # and the timer keeps serving later proposals with other deadlines.
    slow = 0.0

    def fsync(fd: int) -> None:
        if slow:
            time.sleep(slow)
        os.fsync(fd)

    node = lone_node(tmp_path / "n1", KV(), fsync=fsync)
    with anyio.fail_after(20):
        await node.start()
        try:
            assert await node.propose(b"a=1") == 1
            slow = 0.6
            loop = asyncio.get_running_loop()
            started = loop.time()
            late = asyncio.ensure_future(node.propose(b"c=3", within=5))
            with pytest.raises(OperationTimeoutError, match="may or may not"):
                await node.propose(b"b=2", within=0.15)
            assert loop.time() - started < 0.5
            slow = 0.0
            assert await late is not None
            assert await node.propose(b"d=4", within=2) is not None
            assert not node._deadlines or all(f.done() for _, _, f in node._deadlines)
        finally:
            await node.stop()


async def test_a_failed_fsync_stops_the_member_and_stop_still_releases_everything(
    tmp_path: Path,
) -> None:
    failing = False

    def fsync(fd: int) -> None:
        if failing:
            raise OSError(errno.EIO, "injected I/O error")
        os.fsync(fd)

    node = lone_node(tmp_path / "n1", KV(), fsync=fsync)
    with anyio.fail_after(20):
        await node.start()
        try:
            assert await node.propose(b"a=1") == 1
            port = node.transport.port
            failing = True
            with pytest.raises(StorageError):
                await node.propose(b"b=2")
            assert node.failure is not None and "injected" in str(node.failure)
            assert not node.is_leader and node.leader_id is None  # it leads no more
            # Fail-stop: later requests are refused at once, the peer port is closed.
            with pytest.raises(UnavailableError, match="stopped after a failure"):
                await node.propose(b"c=3")
            with pytest.raises(UnavailableError):
                await node.read_index(within=1)
            await wait_until(lambda: port_refuses(port))  # the loop closes the transport
        finally:
            await node.stop()
    # stop() after a failure still ended every task and released the files (it used to
    # return at once, leaving the ticker, the listener and the storage open).
    assert all(task.done() for task in node._tasks)
    assert node._main is not None and node._main.done()
    await node.stop()  # idempotent


async def test_an_unexpected_error_in_the_loop_stops_the_member_instead_of_hanging(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = lone_node(tmp_path / "n1", KV(fail_on=b"boom"), request_timeout=60)
    with anyio.fail_after(20):  # far less than the request timeout: the failure is prompt
        await node.start()
        try:
            await node.propose(b"a=1")
            with pytest.raises(UnavailableError, match="stopped after an error"):
                await node.propose(b"boom")
            assert isinstance(node.failure, RuntimeError)
            with pytest.raises(UnavailableError):
                await node.propose(b"b=2")
        finally:
            await node.stop()
    crashes = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert crashes and "unexpected error" in crashes[0].getMessage()
    caplog.clear()  # the expected crash is not an error of this test


async def test_the_message_filter_sees_every_message_both_ways(tmp_path: Path) -> None:
    # Two voters: n1 alone cannot win an election while the filter drops everything.
    seen: list[PeerMessage] = []
    nodes: list[RaftNode] = []
    ports = {}
    for member in ("n1", "n2"):
        storage = DiskStorage(tmp_path / member)
        storage.write_identity("c", member, ConfState(voters=("n1", "n2")))
        node = RaftNode(
            member,
            "c",
            storage,
            KV(),
            options=NodeOptions(heartbeat_interval=0.02, election_timeout=0.2),
        )
        nodes.append(node)
    with anyio.fail_after(30):
        try:
            for node in nodes:
                await node.start()
                ports[node.id] = node.transport.port
            nodes[0].set_peer("n2", "127.0.0.1", ports["n2"])
            nodes[1].set_peer("n1", "127.0.0.1", ports["n1"])

            def drop_all(msg: PeerMessage) -> bool:
                seen.append(msg)
                return False

            nodes[0].message_filter = drop_all
            await asyncio.sleep(1.0)  # several election timeouts
            assert not any(node.is_leader for node in nodes)
            assert {m.src for m in seen} == {"n1", "n2"}  # outbound and inbound
            nodes[0].message_filter = None
            await wait_until(lambda: any(node.is_leader for node in nodes))
            leader = next(node for node in nodes if node.is_leader)
            assert await leader.propose(b"k=v") == 1
        finally:
            for node in nodes:
                await node.stop(transfer=False)


async def test_a_snapshot_arriving_right_after_another_does_not_lose_the_first(
    tmp_path: Path,
) -> None:
    """The leader streamed snapshot A and its InstallSnapshot, then (after taking a newer
    snapshot) the data of B, and all of it reached the follower's loop at once. The follower
    stepped A into its core and then replaced A's data by B's, so that installing A found no
    data and the member stopped ("never arrived")."""
    storage = DiskStorage(tmp_path / "n2")
    storage.write_identity("c", "n2", ConfState(voters=("n1", "n2")))
    fsm = KV()
    node = RaftNode("n2", "c", storage, fsm, options=NodeOptions(**FAST))
    conf = ConfState(voters=("n1", "n2"))

    def stream(meta: SnapshotMeta, state: dict[str, str]) -> SnapshotChunk:
        data = msgspec.msgpack.encode(state)
        return SnapshotChunk(1, "n1", "n2", meta, 0, data, True, zlib.crc32(data))

    a, b = SnapshotMeta(10, 1, conf), SnapshotMeta(20, 1, conf)
    with anyio.fail_after(10):
        await node.start()
        try:
            # What the transport delivers in one go (no await in between: one batch).
            node._receive(stream(a, {"k": "a"}))
            node._receive(InstallSnapshot(1, "n1", "n2", a))
            node._receive(stream(b, {"k": "b"}))
            await wait_until(lambda: node.applied_index >= 10 or node.failure is not None)
            assert node.failure is None
            assert node.applied_index == 10 and fsm.data == {"k": "a"}
            assert node.snapshots_installed == 1
            # B, once the leader sends its InstallSnapshot, is installed as well.
            node._receive(InstallSnapshot(1, "n1", "n2", b))
            await wait_until(lambda: node.applied_index >= 20 or node.failure is not None)
            assert node.failure is None and fsm.data == {"k": "b"}
        finally:
            await node.stop()


async def test_operator_calls_translate_errors(tmp_path: Path) -> None:
    node = lone_node(tmp_path / "n1", KV())
    with anyio.fail_after(20):
        await node.start()
        try:
            await node.read_index(within=5)
            assert node.is_leader
            with pytest.raises(InvalidRequestError, match="already"):
                await node.change_membership(ConfChangeType.ADD_LEARNER, "n1")
            with pytest.raises(InvalidRequestError, match="not a member"):
                await node.change_membership(ConfChangeType.REMOVE, "n9")
            with pytest.raises(InvalidRequestError, match="only voter"):
                await node.transfer_leadership()
            with pytest.raises(InvalidRequestError, match="not a voter"):
                await node.transfer_leadership("n9")
            await node.change_membership(ConfChangeType.ADD_LEARNER, "n2")
            assert node.conf.learners == ("n2",)
        finally:
            await node.stop()
        with pytest.raises(ClosedError):
            await node.propose(b"x=1")


async def test_change_membership_on_a_follower_says_who_leads(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path / "n2")
    storage.write_identity("c", "n2", ConfState(voters=("n1", "n2")))
    node = RaftNode("n2", "c", storage, KV(), options=NodeOptions(**FAST))
    with anyio.fail_after(10):
        await node.start()
        try:
            with pytest.raises(NotLeaderError):
                await node.change_membership(ConfChangeType.ADD_LEARNER, "n3")
            with pytest.raises(NotLeaderError):
                await node.transfer_leadership("n1")
        finally:
            await node.stop()
