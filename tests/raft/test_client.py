"""The network client (``RaftClient``) and the members' client service, against three members
in this process: operations, read-your-writes, watches across a member failure, at-most-once
retries, the wire protocol's handling of hostile input, limits, and mutual TLS.

Timing is short (30 ms heart-beats, 0.3 s election timeout); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from controlplane.backends.raft import service as service_module
from controlplane.backends.raft.client import RaftClient, connect
from controlplane.backends.raft.framing import encode_frame, read_frame
from controlplane.backends.raft.service import ClientService
from controlplane.backends.raft.wire import (
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    Alive,
    ClientHello,
    ErrorReply,
    Execute,
    ExecuteReply,
    ReadIndex,
    Replicate,
    Reply,
    Request,
    ServerHello,
    StateChunk,
    Status,
    StatusReply,
    Subscribe,
    VersionReply,
)
from controlplane.codec import decode_state, encode_command
from controlplane.commands import ClientCommand, CreateIndex
from controlplane.config import TlsConfig
from controlplane.errors import (
    AlreadyExistsError,
    ClosedError,
    CompactedError,
    InvalidRequestError,
    LockHeldError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from controlplane.types import ClusterEvent, EventKind, Index, Node, NodeStatus
from controlplane.watch import EventStream

from .cluster_util import LocalCluster, assert_no_asyncio_errors, client_address

pytestmark = pytest.mark.anyio

ENCODER = msgspec.msgpack.Encoder()
REPLIES: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)
HELLO_REPLY = msgspec.msgpack.Decoder(ServerHello)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield from assert_no_asyncio_errors(caplog)
    failures = [
        r.getMessage()
        for r in caplog.records
        if r.name in ("controlplane.raft.client", "controlplane.raft.service")
        and r.levelno >= logging.ERROR
    ]
    assert not failures, failures


# --- helpers ------------------------------------------------------------------------------------


def addresses(cluster: LocalCluster) -> list[str]:
    return [client_address(cluster.members[m]) for m in cluster.ids if m in cluster.members]


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **raft: Any) -> AsyncIterator[LocalCluster]:
    async with LocalCluster(tmp_path, **raft) as cluster:
        await cluster.start_all()
        await cluster.wait_leader()
        yield cluster


@contextlib.asynccontextmanager
async def client_of(cluster: LocalCluster, **options: Any) -> AsyncIterator[RaftClient]:
    client = await connect(addresses(cluster), **{"request_timeout": 15.0, **options})
    try:
        yield client
    finally:
        await client.stop()


async def collect_until(stream: EventStream, flag: str) -> list[ClusterEvent]:
    """The events of ``stream`` before the FLAG_CHANGED event of ``flag``."""
    out: list[ClusterEvent] = []
    async for event in stream:
        if event.kind is EventKind.FLAG_CHANGED and event.key == flag:
            return out
        out.append(event)
    raise AssertionError("the watch ended")


@dataclass
class Raw:
    """A hand-driven connection to a member's client port."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    hello: ServerHello

    @classmethod
    async def open(
        cls, address: str, cluster_id: str = "controlplane", *, keepalive: float = 0.0
    ) -> Raw:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        hello = ClientHello(PROTOCOL_NAME, PROTOCOL_VERSION, cluster_id, "raw-client", keepalive)
        writer.write(encode_frame(ENCODER.encode(hello)))
        reply = HELLO_REPLY.decode(await read_frame(reader))
        return cls(reader, writer, reply)

    def send(self, message: Request) -> None:
        self.writer.write(encode_frame(ENCODER.encode(message)))

    def send_payload(self, payload: bytes) -> None:
        self.writer.write(encode_frame(payload))

    async def receive(self, within: float = 10.0) -> Reply:
        with anyio.fail_after(within):
            return REPLIES.decode(await read_frame(self.reader, 64 * 1024 * 1024))

    async def reply_to(self, request: int, within: float = 10.0) -> Reply:
        """The next reply to ``request`` (skipping the replication stream)."""
        with anyio.fail_after(within):
            while True:
                reply = await self.receive()
                if not isinstance(reply, Replicate) and reply.request == request:
                    return reply

    async def closed_by_member(self, within: float = 10.0) -> bool:
        with anyio.fail_after(within):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionResetError:
                pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def client_command(seq: int, command: Any, client_id: str = "by-hand") -> bytes:
    return encode_command(
        ClientCommand(client_id=client_id, seq=seq, command=command, time=command.time)
    )


# --- operations -------------------------------------------------------------------------------


async def test_every_kind_of_operation_through_the_client(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with running(tmp_path) as cluster, client_of(cluster) as client:
            assert (await client.health()).healthy
            index = await client.create_index("logs", {"shards": 2, "replicas": 1})
            assert isinstance(index, Index) and index.name == "logs"
            assert (await client.get_index("logs")) == index
            with pytest.raises(AlreadyExistsError):
                await client.create_index("logs")
            updated = await client.update_index_settings("logs", {"replicas": 0})
            assert updated.settings.number_of_replicas == 0
            for i in range(3):
                node = await client.register_node(Node(id=f"n{i}", address=f"n{i}:9300"))
                assert node.id == f"n{i}"
            assert [n.id for n in await client.list_nodes()] == ["n0", "n1", "n2"]
            routing = await client.get_shard_routing("logs")
            copy = routing[0].copies[0]
            assert copy.node_id is not None  # the allocator placed it
            started = await client.update_shard_state("logs", 0, copy.node_id, "started")  # type: ignore[arg-type]
            assert started.copies[0].state == "started"
            drained = await client.update_node_status("n2", NodeStatus.DRAINING)
            assert drained.status is NodeStatus.DRAINING
            await client.heartbeat("n0")
            with pytest.raises(NotFoundError):
                await client.heartbeat("nobody")
            lock = await client.acquire_lock("jobs/1", "me", ttl=30)
            with pytest.raises(LockHeldError):
                await client.acquire_lock("jobs/1", "you", ttl=30)
            renewed = await client.renew_lock("jobs/1", "me", lock.token, ttl=60)
            assert renewed.token == lock.token and renewed.ttl == 60
            await client.release_lock("jobs/1", "me", lock.token)
            ring = await client.update_hash_ring(vnodes=8)
            assert ring.vnodes == 8 and (await client.get_hash_ring()) == ring
            config = await client.get_cluster_config()
            stored = await client.set_cluster_config(config, expected_version=config.version)
            assert stored.version > config.version
            await client.set_feature_flag("dark-mode", True)
            assert await client.get_feature_flags() == {"dark-mode": True}
            await client.unregister_node("n1")
            await client.delete_index("logs")
            with pytest.raises(NotFoundError):
                await client.get_index("logs")
            mine = await client.get_cluster_state()
            assert mine == await client.get_cluster_state(consistent=True)
            leader = await cluster.wait_leader()
            assert mine == await leader.get_cluster_state(consistent=True), "an exact replica"
            # Operations.
            status = await client.status()
            assert status.member_id == client.member_id
            assert status.state_version == mine.version
            statuses = await client.statuses()
            assert len(statuses) == 3
            lead = [s for s in statuses.values() if not isinstance(s, Exception)]
            assert [s.role for s in lead].count("leader") == 1
            assert {p.member_id for s in lead for p in s.progress} == set(cluster.ids)
            snapshot = await client.snapshot_save()
            assert decode_state(snapshot).version >= mine.version
            await client.create_index("after-the-backup")
            await client.restore(snapshot)
            restored = await client.get_cluster_state()
            assert "after-the-backup" not in restored.indices
            assert restored.feature_flags == mine.feature_flags
        await client.stop()
        with pytest.raises(ClosedError):
            await client.create_index("closed")


async def test_writes_are_readable_at_once_and_others_writes_after_a_consistent_read(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(60):
        async with running(tmp_path) as cluster, client_of(cluster) as a, client_of(cluster) as b:
            for i in range(20):
                await a.set_feature_flag(f"f{i}", True)
                assert (await a.get_feature_flags())[f"f{i}"] is True  # no I/O: the replica
                state = await b.get_cluster_state(consistent=True)
                assert state.feature_flags[f"f{i}"] is True
            leader = await cluster.wait_leader()
            await leader.set_feature_flag("from-a-member", True)
            assert (await a.get_cluster_state(consistent=True)).feature_flags["from-a-member"]


async def test_a_write_only_client_writes_but_keeps_no_replica(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with (
            running(tmp_path) as cluster,
            client_of(cluster, replica=False) as writer,
            client_of(cluster) as reader,
        ):
            index = await writer.create_index("logs", {"number_of_shards": 2})
            assert isinstance(index, Index) and index.name == "logs"
            with pytest.raises(AlreadyExistsError):
                await writer.create_index("logs")
            await writer.register_node(Node(id="data-1"))
            await writer.heartbeat("data-1")  # the member had reached the writer's version
            assert writer.version >= index.created_version
            state = await reader.get_cluster_state(consistent=True)
            assert "logs" in state.indices and "data-1" in state.nodes
            for read in (
                writer.get_cluster_state,
                lambda: writer.get_cluster_state(consistent=True),
                lambda: writer.get_index("logs"),
            ):
                with pytest.raises(InvalidRequestError, match="keeps no replica"):
                    await read()
            with pytest.raises(InvalidRequestError, match="keeps no replica"):
                writer.watch()
            assert (await writer.health()).healthy


async def test_a_client_watch_delivers_what_a_member_watch_delivers(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with running(tmp_path) as cluster, client_of(cluster) as client:
            member = cluster.follower()
            async with client.watch(since=0) as mine, member.watch(since=0) as theirs:
                await client.register_node(Node(id="n1", address="n1:1"))
                await member.create_index("idx", {"shards": 2, "replicas": 0})
                lock = await client.acquire_lock("k", "h", ttl=5)
                await member.release_lock("k", "h", lock.token)
                await client.set_feature_flag("end", True)
                seen = await collect_until(mine, "end")
                assert seen == await collect_until(theirs, "end")
            kinds = [e.kind for e in seen]
            assert EventKind.SHARD_ALLOCATED not in kinds  # created with its copies placed
            assert kinds.count(EventKind.LOCK_ACQUIRED) == kinds.count(EventKind.LOCK_RELEASED) == 1


# --- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("graceful", [True, False], ids=["stop", "crash"])
async def test_the_member_of_the_client_stops_while_writes_are_in_flight(
    tmp_path: Path, graceful: bool
) -> None:
    """Every write returns its own result exactly once; the watch goes on without a gap."""
    writes = 60
    with anyio.fail_after(90):
        # A proposal a follower forwarded to a leader that crashed is only given up by the
        # member after its request timeout; the client gives up on it (and retries the same
        # request elsewhere) after ``attempt_timeout``.
        async with running(tmp_path) as cluster, client_of(cluster, attempt_timeout=2) as client:
            first = client.member_id
            assert first is not None
            v0 = client.version
            results: dict[int, Any] = {}
            async with client.watch(since=v0) as events:

                async def write(i: int) -> None:
                    if i % 2:
                        results[i] = await client.acquire_lock(f"lock-{i}", "me", ttl=60)
                    else:
                        results[i] = await client.create_index(f"index-{i}")

                async with anyio.create_task_group() as tg:
                    for i in range(writes):
                        tg.start_soon(write, i)
                        await asyncio.sleep(0.005)
                        if i == writes // 3:
                            await cluster.stop(first, transfer=graceful)
                assert client.member_id != first
                await client.set_feature_flag("end", True)
                seen = await collect_until(events, "end")
            assert len(results) == writes
            for i, value in results.items():
                assert value.key == f"lock-{i}" if i % 2 else value.name == f"index-{i}"
            state = await client.get_cluster_state(consistent=True)
            assert len(state.indices) == writes // 2 and len(state.locks) == writes // 2
            created = [e.key for e in seen if e.kind is EventKind.INDEX_CREATED]
            acquired = [e.key for e in seen if e.kind is EventKind.LOCK_ACQUIRED]
            assert sorted(created) == sorted(f"index-{i}" for i in range(0, writes, 2))
            assert sorted(acquired) == sorted(f"lock-{i}" for i in range(1, writes, 2))
            versions = [e.version for e in seen]
            assert versions == sorted(versions) and len(set(versions)) == writes
            # The tokens (versions) the writes returned are those their events carry.
            by_key = {e.key: e.version for e in seen}
            for i, value in results.items():
                produced = value.token if i % 2 else value.created_version
                assert by_key[f"lock-{i}" if i % 2 else f"index-{i}"] == produced
            survivor = await cluster.wait_leader()
            async with survivor.watch(since=v0) as theirs:
                assert await collect_until(theirs, "end") == seen


async def test_a_write_whose_reply_was_lost_is_retried_and_returns_its_first_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost: list[int] = []
    original = service_module._Connection._write

    def lose_first_execute_reply(self: Any, message: Reply) -> None:
        if isinstance(message, ExecuteReply) and not lost:
            lost.append(message.version)  # committed and applied, but the client never hears
            self._writer.transport.abort()
            raise service_module._ConnectionGone("reply lost on purpose")
        original(self, message)

    monkeypatch.setattr(service_module._Connection, "_write", lose_first_execute_reply)
    with anyio.fail_after(60):
        async with running(tmp_path) as cluster, client_of(cluster) as client:
            index = await client.create_index("once")  # not AlreadyExistsError
            assert lost == [index.created_version]
            lock = await client.acquire_lock("k", "me", ttl=30)
            state = await client.get_cluster_state(consistent=True)
            assert state.indices["once"] == index and state.locks["k"] == lock
            created = [
                e
                async for e in _take(client.watch(since=0), state.version)
                if e.kind is EventKind.INDEX_CREATED
            ]
            assert len(created) == 1


async def _take(stream: EventStream, until: int) -> AsyncIterator[ClusterEvent]:
    async with stream:
        async for event in stream:
            yield event
            if event.version >= until:
                return


async def test_a_replica_that_diverges_is_rebuilt_from_the_members_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = service_module.Replicate
    corrupted: list[int] = []

    def corrupt_once(*, version: int, command: bytes) -> Replicate:
        if not corrupted:
            corrupted.append(version)
            version += 1  # the client's apply cannot produce it
        return real(version=version, command=command)

    monkeypatch.setattr(service_module, "Replicate", corrupt_once)
    with anyio.fail_after(30):
        async with running(tmp_path) as cluster, client_of(cluster) as client:
            async with client.watch(since=0) as stream:
                await client.set_feature_flag("first", True)
                await client.set_feature_flag("second", True)
                with pytest.raises(CompactedError):  # its history was replaced with the state
                    await stream.__anext__()
            leader = await cluster.wait_leader()
            assert await client.get_cluster_state(consistent=True) == (
                await leader.get_cluster_state(consistent=True)
            )
            assert corrupted == [1]
    diverged = [r for r in caplog.records if "diverged" in r.getMessage()]
    assert diverged and diverged[0].levelno == logging.ERROR
    caplog.clear()  # the error is expected here


async def test_the_same_execute_sent_twice_is_applied_once(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as cluster:
            raw = await Raw.open(client_address(cluster.follower()))
            try:
                assert raw.hello.ok
                command = client_command(1, CreateIndex(name="dup"))
                raw.send(Execute(request=1, command=command))
                raw.send(Execute(request=2, command=command))
                one, two = await raw.reply_to(1), await raw.reply_to(2)
                assert isinstance(one, ExecuteReply) and isinstance(two, ExecuteReply)
                assert (one.version, one.value) == (two.version, two.value)
                again = client_command(2, CreateIndex(name="dup"))  # a new request: applied
                raw.send(Execute(request=3, command=again))
                error = await raw.reply_to(3)
                assert isinstance(error, ErrorReply) and error.code == "already_exists"
                leader = await cluster.wait_leader()
                state = await leader.get_cluster_state(consistent=True)
                assert list(state.indices) == ["dup"] and state.version == one.version
                bare = encode_command(CreateIndex(name="bare"))  # no session: refused
                raw.send(Execute(request=4, command=bare))
                error = await raw.reply_to(4)
                assert isinstance(error, ErrorReply) and error.code == "invalid_request"
            finally:
                await raw.close()


# --- hostile and limited connections ------------------------------------------------------------


async def test_a_client_of_another_cluster_is_refused(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as cluster:
            client = RaftClient(addresses(cluster), cluster_id="other", start_timeout=10)
            with pytest.raises(PermissionDeniedError, match="cluster id mismatch"):
                await client.start()
            raw = await Raw.open(addresses(cluster)[0], cluster_id="other")
            assert not raw.hello.ok and raw.hello.code == "permission_denied"
            assert "'controlplane'" in raw.hello.reason
            assert await raw.closed_by_member()
            await raw.close()


async def test_keep_alives_go_only_to_clients_that_ask_for_them(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as cluster:
            asking = await Raw.open(addresses(cluster)[0], keepalive=0.1)
            silent = await Raw.open(addresses(cluster)[0])
            assert asking.hello.ok and silent.hello.ok
            assert (asking.hello.keepalive, silent.hello.keepalive) == (0.1, 0.0)
            assert await asking.receive() == Alive()
            assert await asking.receive() == Alive()  # again, while nothing else is sent
            with pytest.raises(TimeoutError):
                await silent.receive(within=0.5)
            for raw in (asking, silent):
                await raw.close()


async def test_a_client_whose_own_loop_stalled_does_not_leave_its_member(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Silence seen after the client's own loop was blocked is checked again once the socket
    was read: the member was not the one that hung."""
    caplog.set_level(logging.INFO, logger="controlplane.raft.client")
    with anyio.fail_after(30):
        async with (
            running(tmp_path) as cluster,
            client_of(cluster, keepalive=0.2, keepalive_timeout=1.0) as client,
        ):
            member = client.member_id
            time.sleep(1.5)  # noqa: ASYNC251 (blocks the loop: the members here, and this client)
            await asyncio.sleep(1.0)
            await client.set_feature_flag("after-the-stall", True)
            assert client.member_id == member
    assert not [r for r in caplog.records if "nothing from member" in r.getMessage()]


async def test_a_member_that_grants_no_keep_alives_is_not_left_for_its_silence(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member older than keep-alives ignores the hello's field and says 0 in its answer."""
    monkeypatch.setattr(service_module, "_keepalive_interval", lambda hello: 0.0)
    caplog.set_level(logging.INFO, logger="controlplane.raft.client")
    with anyio.fail_after(30):
        async with (
            running(tmp_path) as cluster,
            client_of(cluster, keepalive=0.1, keepalive_timeout=0.3, replica=False) as client,
        ):
            member = client.member_id
            await asyncio.sleep(1.0)  # idle: nothing at all comes from the member
            await client.set_feature_flag("still-here", True)
            assert client.member_id == member
    assert not [r for r in caplog.records if "nothing from member" in r.getMessage()]


@pytest.mark.parametrize("keepalive", [-1.0, float("nan"), 1e9])
async def test_a_hello_with_a_bad_keepalive_is_refused(tmp_path: Path, keepalive: float) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as cluster:
            raw = await Raw.open(addresses(cluster)[0], keepalive=keepalive)
            assert not raw.hello.ok and raw.hello.code == "invalid_request"
            assert "bad hello" in raw.hello.reason
            assert await raw.closed_by_member()
            await raw.close()


@pytest.mark.parametrize(("keepalive", "timeout"), [(0.01, 2.0), (2.0, 2.0), (3.0, 2.0)], ids=str)
def test_keepalive_options_are_checked(keepalive: float, timeout: float) -> None:
    with pytest.raises(InvalidRequestError, match="keepalive"):
        RaftClient(["127.0.0.1:1"], keepalive=keepalive, keepalive_timeout=timeout)


async def test_garbage_after_the_hello_gets_an_error_reply_and_the_connection_stays(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as cluster:
            raw = await Raw.open(addresses(cluster)[0])
            try:
                raw.send_payload(b"\xc1 not msgpack at all")
                reply = await raw.receive()
                assert isinstance(reply, ErrorReply)
                assert (reply.request, reply.code) == (0, "invalid_request")
                raw.send_payload(ENCODER.encode(["NoSuchRequest", 7, "x"]))
                reply = await raw.receive()
                assert isinstance(reply, ErrorReply) and (reply.request, reply.code) == (
                    7,
                    "invalid_request",
                )
                raw.send_payload(ENCODER.encode(["Execute", 8, b"\x00\x01"]))  # not a command
                reply = await raw.receive()
                assert isinstance(reply, ErrorReply) and reply.request == 8
                raw.send(Status(request=9))
                reply = await raw.receive()
                assert isinstance(reply, StatusReply) and reply.request == 9
            finally:
                await raw.close()


async def test_an_oversized_frame_closes_only_its_connection(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as cluster:
            address = addresses(cluster)[0]
            async with client_of(cluster) as client:
                bystander = await connect([address])
                try:
                    raw = await Raw.open(address)
                    raw.writer.write(struct.pack(">I", 64 * 1024 * 1024) + b"x" * 1024)
                    assert await raw.closed_by_member()
                    await raw.close()
                    truncated = await Raw.open(address)
                    truncated.writer.write(struct.pack(">I", 100) + b"only part")
                    truncated.writer.write_eof()
                    assert await truncated.closed_by_member()
                    await truncated.close()
                    await bystander.set_feature_flag("still-served", True)
                    assert bystander.member_address == address
                    await client.get_cluster_state(consistent=True)
                finally:
                    await bystander.stop()


async def test_connection_and_in_flight_limits(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as cluster:
            member = cluster.follower()
            service = ClientService(member, max_connections=2, max_in_flight=1)
            await service.start()
            address = f"127.0.0.1:{service.port}"
            opened: list[Raw] = []
            try:
                opened = [await Raw.open(address), await Raw.open(address)]
                refused = await Raw.open(address)
                opened.append(refused)
                assert not refused.hello.ok and refused.hello.code == "unavailable"
                raw = opened[0]
                # Two reads in one write: the second arrives while the first is in flight.
                raw.writer.write(
                    encode_frame(ENCODER.encode(ReadIndex(request=1)))
                    + encode_frame(ENCODER.encode(ReadIndex(request=2)))
                )
                second = await raw.reply_to(2)
                assert isinstance(second, ErrorReply) and second.code == "unavailable"
                first = await raw.reply_to(1)
                assert isinstance(first, VersionReply)
            finally:
                for raw in opened:
                    await raw.close()
                await service.close()


async def test_a_subscriber_behind_the_kept_commands_gets_the_state(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path, snapshot_entries=10_000) as cluster:
            for cp in cluster.members.values():  # keep only a few commands
                cp.fsm.commands.retention = 3
            leader = await cluster.wait_leader()
            for i in range(20):
                await leader.set_feature_flag(f"f{i}", True)
            member = cluster.follower()
            await member.get_cluster_state(consistent=True)
            raw = await Raw.open(client_address(member))
            try:
                raw.send(Subscribe(request=1, since=1, snapshot_ok=False))
                refused = await raw.reply_to(1)
                assert isinstance(refused, ErrorReply) and refused.code == "compacted"
                raw.send(Subscribe(request=2, since=1, snapshot_ok=True))
                ack = await raw.reply_to(2)
                assert isinstance(ack, VersionReply)
                chunk = await raw.reply_to(2)
                assert isinstance(chunk, StateChunk) and chunk.last
                assert decode_state(chunk.data) == member.fsm.machine.state
                await leader.set_feature_flag("live", True)
                live = await raw.receive()
                assert isinstance(live, Replicate) and live.version == chunk.version + 1
            finally:
                await raw.close()
            # A new client starts from the state, then follows the commands.
            async with client_of(cluster) as client:
                # Current with its member at start; with the leader after a consistent read
                # (a follower may learn the last commit up to lazy_commit_delay later).
                state = await client.get_cluster_state(consistent=True)
                assert state.version == (await leader.get_cluster_state()).version
                await client.set_feature_flag("through-the-client", True)
                assert (await leader.get_cluster_state(consistent=True)).feature_flags[
                    "through-the-client"
                ]


async def test_operations_change_membership_and_leadership(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with LocalCluster(tmp_path, joining=1) as cluster:
            await cluster.start_all()
            await cluster.wait_leader()
            newcomer = cluster.joining[0]
            host, port = cluster.address(newcomer)
            async with client_of(cluster) as client:
                await client.member_add(newcomer, f"{host}:{port}")  # sent on to the leader
                for cp in cluster.members.values():  # the operator's part, for now
                    cp.node.set_peer(newcomer, host, port)
                await cluster.start(newcomer)
                with anyio.fail_after(20):
                    while True:
                        try:
                            await client.member_promote(newcomer)
                            break
                        except (InvalidRequestError, UnavailableError):  # not caught up yet
                            await asyncio.sleep(0.05)
                assert newcomer in (await client.status()).voters
                await client.member_remove(newcomer)
                await cluster.stop(newcomer)
                assert newcomer not in (await client.status()).voters
                leader = await cluster.wait_leader()
                target = next(m for m in cluster.members if m != leader.node.id)
                await client.transfer_leader(target)
                await cluster.wait_for(lambda: cluster.members[target].node.is_leader)
                await client.set_feature_flag("under-the-new-leader", True)
                with pytest.raises(InvalidRequestError):
                    await client.transfer_leader("no-such-member")


# --- mutual TLS ---------------------------------------------------------------------------------

LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CAs ca1 and ca2; ``member`` and ``client`` certificates from ca1, ``rogue`` from ca2."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("pki")
    (d / "leaf.ext").write_text(LEAF_EXTENSIONS)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    for ca in ("ca1", "ca2"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                "-subj", f"/CN=test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for serial, (name, ca) in enumerate(
        [("member", "ca1"), ("client", "ca1"), ("rogue", "ca2")], start=1
    ):
        openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-set_serial", str(serial), "-days", "2", "-extfile", "leaf.ext",
                "-out", f"{name}.pem")  # fmt: skip
    return d


def tls(pki: Path, name: str, ca: str = "ca1") -> TlsConfig:
    return TlsConfig(
        cert_file=str(pki / f"{name}.pem"),
        key_file=str(pki / f"{name}.key"),
        ca_file=str(pki / f"{ca}.pem"),
    )


async def test_mutual_tls_admits_only_clients_with_a_certificate_of_the_cluster_ca(
    tmp_path: Path, pki: Path
) -> None:
    with anyio.fail_after(60):
        async with running(tmp_path, tls=tls(pki, "member")) as cluster:
            async with client_of(cluster, tls=tls(pki, "client")) as client:
                await client.set_feature_flag("over-tls", True)
                assert (await client.get_cluster_state(consistent=True)).feature_flags
            no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            no_cert.load_verify_locations(pki / "ca1.pem")
            rogue = tls(pki, "rogue", ca="ca1")  # trusts the members, is not trusted by them
            for options in ({"ssl_context": no_cert}, {"tls": rogue}):
                stranger = RaftClient(addresses(cluster), start_timeout=3, **options)
                with pytest.raises((PermissionDeniedError, UnavailableError)) as refused:
                    await stranger.start()
                assert "certificate" in str(refused.value).lower() or "TLS" in str(refused.value), (
                    refused.value
                )
            plain = RaftClient(addresses(cluster), start_timeout=1.5)
            with pytest.raises(UnavailableError, match="require TLS"):
                await plain.start()
