"""The operations endpoints of a raft member: /healthz, /readyz, /metrics and /v1/state.

Members run in this process with short timing; requests go over real sockets, written by
hand so that malformed ones can be sent too. Every wait is bounded; nothing asserts how long
something took.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from controlplane.backends.raft.backend import RaftControlPlane
from controlplane.backends.raft.ops_http import MAX_HEAD_BYTES, MAX_HEADERS, OpsServer
from controlplane.codec import state_from_json
from controlplane.config import Config, RaftConfig
from controlplane.errors import StorageError

from .cluster_util import FAST, LocalCluster, assert_no_asyncio_errors

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield from assert_no_asyncio_errors(caplog)


# --- a hand-written client ------------------------------------------------------------------------


class Reply(msgspec.Struct, frozen=True):
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


async def exchange(port: int, raw: bytes, *, eof: bool = False, within: float = 10.0) -> bytes:
    """Send ``raw`` (then half-close, with ``eof``) and read until the server closes."""
    with anyio.fail_after(within):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            await writer.drain()
            if eof:
                writer.write_eof()
            return await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()


def parse_reply(data: bytes) -> Reply:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    match = re.fullmatch(r"HTTP/1\.1 (\d{3}) [A-Za-z -]+", status_line)
    assert match is not None, status_line
    headers = {}
    for line in lines:
        name, _, value = line.partition(": ")
        headers[name.lower()] = value
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body) or body == b""
    return Reply(int(match[1]), headers, body)


async def request(port: int, raw: bytes, *, eof: bool = False) -> Reply:
    return parse_reply(await exchange(port, raw, eof=eof))


async def get(port: int, target: str, method: str = "GET") -> Reply:
    return await request(port, f"{method} {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode())


# --- a strict reading of the exposition, line by line -------------------------------------------

_SAMPLE = re.compile(
    r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\\n]|\\[\\\"n])*\",?)*)\})?"
    r" ([-+]?(?:[0-9.]+(?:e[-+]?[0-9]+)?|Inf|NaN))"
)
_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)=\"((?:[^\"\\\n]|\\[\\\"n])*)\"")


class Metrics:
    """The samples of a scrape: ``value(name, **labels)``, ``series(name)``."""

    def __init__(self, text: str) -> None:
        assert text.endswith("\n")
        self.types: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text[:-1].split("\n"):
            if line.startswith("# HELP "):
                assert re.fullmatch(r"# HELP [a-zA-Z_:][a-zA-Z0-9_:]* .+", line), line
            elif line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ")
                assert kind in ("counter", "gauge", "histogram"), line
                assert name not in self.types, f"second TYPE for {name}"
                self.types[name] = kind
            else:
                match = _SAMPLE.fullmatch(line)
                assert match is not None, f"not a valid sample line: {line!r}"
                name, labels, value = match.groups()
                family = re.sub(r"_(bucket|sum|count)$", "", name)
                assert name in self.types or family in self.types, f"{name} has no TYPE"
                self.samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(lb.items())): v for n, lb, v in self.samples if n == name}

    def value(self, name: str, **labels: str) -> float:
        found = [v for n, lb, v in self.samples if n == name and lb == labels]
        assert len(found) == 1, f"{name}{labels}: {found}"
        return found[0]


async def scrape(port: int) -> Metrics:
    reply = await get(port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Metrics(reply.text)


def http_port(cp: RaftControlPlane) -> int:
    address = cp.http_address
    assert address is not None
    return address[1]


async def wait_until(condition: Callable[[], Any], within: float = 10.0) -> None:
    with anyio.fail_after(within):
        while not await condition():  # noqa: ASYNC110 - polls over HTTP
            await asyncio.sleep(0.02)


def single(data_dir: Path, **raft: Any) -> Config:
    settings = {**FAST, "listen_port": 0, "client_port": 0, "http_port": 0, **raft}
    return Config(mode="raft", raft=RaftConfig(data_dir=str(data_dir), **settings))


REQUIRED = [
    "controlplane_raft_term",
    "controlplane_raft_role",
    "controlplane_raft_commit_index",
    "controlplane_raft_applied_index",
    "controlplane_raft_leader_changes_total",
    "controlplane_raft_proposal_seconds",
    "controlplane_raft_fsync_seconds",
    "controlplane_raft_snapshots_total",
    "controlplane_raft_snapshot_bytes",
    "controlplane_raft_peer_lag_entries",
    "controlplane_state_version",
    "controlplane_transport_sent_frames_total",
    "controlplane_transport_received_frames_total",
    "controlplane_transport_dropped_frames_total",
]


# --- a single member ------------------------------------------------------------------------------


async def test_a_single_member_serves_every_endpoint(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with RaftControlPlane(single(tmp_path / "d", snapshot_entries=5)) as cp:
            port = http_port(cp)
            assert port != 0
            await cp.wait_ready(10)
            for i in range(12):
                await cp.set_feature_flag(f"f{i}", i % 2 == 0)

            async def snapshot_taken() -> bool:
                return cp.node.metrics.snapshots_taken.value >= 1

            await wait_until(snapshot_taken)

            health = await get(port, "/healthz")
            assert (health.status, health.text) == (200, "ok\n")
            assert health.headers["content-type"] == "text/plain; charset=utf-8"
            ready = await get(port, "/readyz")
            assert (ready.status, ready.text) == (200, "ok\n")

            metrics = await scrape(port)
            assert set(REQUIRED) <= set(metrics.types)
            assert metrics.types["controlplane_raft_proposal_seconds"] == "histogram"
            assert metrics.types["controlplane_raft_leader_changes_total"] == "counter"
            assert metrics.value("controlplane_raft_term") >= 1
            assert metrics.series("controlplane_raft_role") == {
                (("role", "leader"),): 1,
                (("role", "follower"),): 0,
                (("role", "candidate"),): 0,
                (("role", "pre-candidate"),): 0,
            }
            commit = metrics.value("controlplane_raft_commit_index")
            assert commit >= 12
            assert metrics.value("controlplane_raft_applied_index") == commit
            assert metrics.value("controlplane_raft_leader_changes_total") >= 1
            assert metrics.value("controlplane_raft_proposal_seconds_count") >= 12
            assert metrics.value("controlplane_raft_proposal_seconds_bucket", le="+Inf") >= 12
            assert metrics.value("controlplane_raft_proposal_seconds_sum") > 0
            assert metrics.value("controlplane_raft_fsync_seconds_count") >= 1
            assert metrics.value("controlplane_raft_snapshots_total", kind="taken") >= 1
            assert metrics.value("controlplane_raft_snapshots_total", kind="installed") == 0
            assert metrics.value("controlplane_raft_snapshots_total", kind="sent") == 0
            assert metrics.value("controlplane_raft_snapshot_bytes") > 0
            assert metrics.series("controlplane_raft_peer_lag_entries") == {}  # no peers
            state = await cp.get_cluster_state()
            assert metrics.value("controlplane_state_version") == state.version
            assert metrics.value(
                "controlplane_raft_member_info", member="cp-1", cluster="controlplane"
            )

            reply = await get(port, "/v1/state")
            assert reply.status == 200 and reply.headers["content-type"] == "application/json"
            assert state_from_json(reply.body) == state
            reply = await get(port, "/v1/state?consistent=true")
            assert reply.status == 200 and state_from_json(reply.body) == state
            assert (await get(port, "/v1/state?consistent=false")).status == 200
            bad = await get(port, "/v1/state?consistent=maybe")
            assert bad.status == 400 and "consistent" in bad.text

            head = await get(port, "/healthz", method="HEAD")
            assert head.status == 200 and head.body == b""
            assert head.headers["content-length"] == "3"
        assert cp.http_address is None
    with pytest.raises(OSError):
        await exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")


BAD_REQUESTS: list[tuple[bytes, int]] = [
    (b"\x00\xff\xfe garbage\r\n\r\n", 400),
    (b"hello\r\n\r\n", 400),
    (b"GET /healthz\r\n\r\n", 400),
    (b"GET  /healthz HTTP/1.1\r\n\r\n", 400),
    (b"GET /healthz HTTP/9.9\r\n\r\n", 505),
    (b"GET /healthz HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET healthz HTTP/1.1\r\n\r\n", 400),
    (b"G\x7fT /healthz HTTP/1.1\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (4 * MAX_HEAD_BYTES) + b"\r\n\r\n", 431),
    (
        b"GET /healthz HTTP/1.1\r\n"
        + b"".join(b"X-%d: y\r\n" % i for i in range(MAX_HEADERS + 1))
        + b"\r\n",
        431,
    ),
    (b"POST /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 405),
    (b"POST /v1/state HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000, 405),
    (b"DELETE /v1/state HTTP/1.1\r\n\r\n", 405),
    (b"GET /nope HTTP/1.1\r\n\r\n", 404),
    (b"GET /healthz/ HTTP/1.1\r\n\r\n", 404),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", 400),  # ends inside the head
]


async def test_bad_requests_get_4xx_and_do_not_disturb_the_server(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with RaftControlPlane(single(tmp_path / "d")) as cp:
            port = http_port(cp)
            await cp.wait_ready(10)
            for raw, status in BAD_REQUESTS:
                reply = await request(port, raw, eof=True)
                assert reply.status == status, (raw[:60], reply)
                assert reply.headers["content-type"] == "text/plain; charset=utf-8"
                if status == 405:
                    assert reply.headers["allow"] == "GET, HEAD"
            # All at once, with good requests among them.
            raws = [raw for raw, _ in BAD_REQUESTS] + [b"GET /healthz HTTP/1.1\r\n\r\n"] * 5
            replies = await asyncio.gather(*(request(port, raw, eof=True) for raw in raws))
            assert [r.status for r in replies] == [s for _, s in BAD_REQUESTS] + [200] * 5
            # Connected and gone without a word: no answer, no harm.
            assert await exchange(port, b"", eof=True) == b""
            # Other request forms that are fine.
            assert (await request(port, b"GET /healthz HTTP/1.0\r\n\r\n")).status == 200
            absolute = b"GET http://127.0.0.1/readyz?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            assert (await request(port, absolute)).status == 200
            assert (await get(port, "/healthz")).text == "ok\n"
            assert (await scrape(port)).value("controlplane_raft_term") >= 1


async def test_a_slow_request_times_out_and_connections_are_capped(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with RaftControlPlane(single(tmp_path / "d")) as cp:
            await cp.wait_ready(10)
            impatient = OpsServer(cp, read_timeout=0.2)
            await impatient.start()
            try:
                # A head that never completes gets 408.
                slow = await request(impatient.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                assert slow.status == 408
                assert (await get(impatient.port, "/healthz")).status == 200
            finally:
                await impatient.close()
            ops = OpsServer(cp, max_connections=1)
            await ops.start()
            try:
                # While one connection is open, another one is refused with 503.
                reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
                try:
                    while not ops._connections:  # noqa: ASYNC110 - no event to wait on
                        await asyncio.sleep(0.01)
                    busy = await get(ops.port, "/healthz")
                    assert busy.status == 503 and "too many connections" in busy.text
                    writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
                    assert parse_reply(await reader.read()).status == 200
                finally:
                    writer.close()
                    await writer.wait_closed()
                assert (await get(ops.port, "/healthz")).status == 200
            finally:
                await ops.close()
                await ops.close()  # idempotent
            assert not ops.serving


async def test_a_failed_member_is_unhealthy(tmp_path: Path) -> None:
    failing = False

    def fsync(fd: int) -> None:
        if failing:
            raise OSError(errno.EIO, "injected I/O error")
        os.fsync(fd)

    with anyio.fail_after(30):
        async with RaftControlPlane(single(tmp_path / "d"), fsync=fsync) as cp:
            port = http_port(cp)
            await cp.wait_ready(10)
            assert (await get(port, "/healthz")).status == 200
            failing = True
            with pytest.raises(StorageError):
                await cp.set_feature_flag("never", True)
            health = await get(port, "/healthz")
            assert health.status == 503 and "failure" in health.text and "injected" in health.text
            ready = await get(port, "/readyz")
            assert ready.status == 503 and "failure" in ready.text
            consistent = await get(port, "/v1/state?consistent=true")
            assert consistent.status == 503
            assert (await scrape(port)).value("controlplane_raft_has_leader") == 0


async def test_an_ops_server_of_a_member_not_started(tmp_path: Path) -> None:
    cp = RaftControlPlane(single(tmp_path / "d"))
    ops = OpsServer(cp)
    with anyio.fail_after(20):
        await ops.start()
        await ops.start()  # already serving: nothing to do
        try:
            health = await get(ops.port, "/healthz")
            assert health.status == 503 and "not started" in health.text
            assert (await get(ops.port, "/readyz")).status == 503
            metrics = await scrape(ops.port)
            assert metrics.value("controlplane_state_version") == 0
            assert metrics.series("controlplane_raft_term") == {}
            reply = await get(ops.port, "/v1/state")
            assert reply.status == 200 and state_from_json(reply.body).version == 0
            assert (await get(ops.port, "/v1/state?consistent=true")).status == 503
        finally:
            await ops.close()


async def test_a_taken_http_port_fails_the_start_which_can_be_retried(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = single(tmp_path / "d", http_port=port)
        cp = RaftControlPlane(config)
        with anyio.fail_after(20):
            with pytest.raises(OSError):
                await cp.start()
            assert cp.http_address is None
    with anyio.fail_after(20):
        await cp.start()  # the port is free now
        try:
            assert cp.http_address == ("127.0.0.1", port)
            await cp.wait_ready(10)
            assert (await get(port, "/readyz")).status == 200
        finally:
            await cp.stop()


# --- three members --------------------------------------------------------------------------------


async def test_a_member_without_a_leader_is_alive_but_not_ready(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with LocalCluster(tmp_path) as cluster:
            cp = await cluster.start("cp-1")  # its two peers never start
            port = http_port(cp)
            assert port == cluster.configs["cp-1"].raft.http_port
            assert (await get(port, "/healthz")).text == "ok\n"
            ready = await get(port, "/readyz")
            assert ready.status == 503 and "no leader" in ready.text
            metrics = await scrape(port)
            assert metrics.value("controlplane_raft_has_leader") == 0
            assert metrics.value("controlplane_raft_role", role="leader") == 0
            assert metrics.series("controlplane_raft_peer_lag_entries") == {}
            assert (await get(port, "/v1/state")).status == 200  # the local replica
            ops = OpsServer(cp, consistent_timeout=0.3)
            await ops.start()
            try:
                reply = await get(ops.port, "/v1/state?consistent=true")
                assert reply.status == 503 and "quorum" in reply.text
            finally:
                await ops.close()


async def test_a_cluster_reports_lag_roles_and_transport_per_member(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with LocalCluster(tmp_path) as cluster:
            await cluster.start_all()
            leader = await cluster.wait_leader()
            for i in range(20):
                await leader.set_feature_flag(f"f{i}", True)
            state = await cluster.wait_converged()
            peers = sorted(m for m in cluster.members if m != leader.node.id)

            async def all_ready() -> bool:
                replies = [await get(http_port(cp), "/readyz") for cp in cluster.members.values()]
                return all(r.status == 200 for r in replies)

            await wait_until(all_ready)

            async def caught_up() -> bool:
                lag = (await scrape(http_port(leader))).series("controlplane_raft_peer_lag_entries")
                return lag == {(("peer", p),): 0 for p in peers}

            await wait_until(caught_up)  # lag is there for each peer, and drops to 0

            metrics = await scrape(http_port(leader))
            assert metrics.value("controlplane_raft_role", role="leader") == 1
            assert metrics.value("controlplane_state_version") == state.version
            for peer in peers:
                assert metrics.value("controlplane_transport_sent_frames_total", peer=peer) > 0
                assert metrics.value("controlplane_transport_received_frames_total", peer=peer) > 0
                assert metrics.value("controlplane_transport_dropped_frames_total", peer=peer) >= 0
            for member in peers:
                follower = cluster.members[member]
                metrics = await scrape(http_port(follower))
                assert metrics.value("controlplane_raft_role", role="follower") == 1
                assert metrics.value("controlplane_raft_term") == leader.node.term
                assert metrics.series("controlplane_raft_peer_lag_entries") == {}
                assert metrics.value("controlplane_raft_fsync_seconds_count") >= 1
                reply = await get(http_port(follower), "/v1/state?consistent=true")
                assert reply.status == 200 and state_from_json(reply.body) == state

            # A leader change is counted on the members that see it.
            before = {
                m: (await scrape(http_port(cp))).value("controlplane_raft_leader_changes_total")
                for m, cp in cluster.members.items()
            }
            await leader.node.transfer_leadership(peers[0])
            await cluster.wait_leader()
            for member, cp in cluster.members.items():
                metrics = await scrape(http_port(cp))
                changes = metrics.value("controlplane_raft_leader_changes_total")
                assert changes > before[member]


async def test_snapshot_counts_and_sizes_across_members(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with LocalCluster(tmp_path, snapshot_entries=5) as cluster:
            await cluster.start_all()
            cluster.isolate("cp-3")
            leader = await cluster.wait_leader(among=["cp-1", "cp-2"])
            for i in range(30):
                await leader.set_feature_flag(f"f{i}", True)

            async def taken() -> bool:
                metrics = await scrape(http_port(leader))
                return metrics.value("controlplane_raft_snapshots_total", kind="taken") >= 1

            await wait_until(taken)
            late = cluster.members["cp-3"]
            cluster.heal()  # the log cp-3 needs is compacted away: it gets a snapshot

            async def installed() -> bool:
                metrics = await scrape(http_port(late))
                return metrics.value("controlplane_raft_snapshots_total", kind="installed") >= 1

            await wait_until(installed, within=20)
            late_metrics = await scrape(http_port(late))
            assert late_metrics.value("controlplane_raft_snapshot_bytes") > 0
            sent = 0.0
            for cp in cluster.members.values():
                metrics = await scrape(http_port(cp))
                sent += metrics.value("controlplane_raft_snapshots_total", kind="sent")
            assert sent >= 1


async def test_closing_drops_requests_in_progress_quietly(tmp_path: Path) -> None:
    with anyio.fail_after(20):
        async with RaftControlPlane(single(tmp_path / "d")) as cp:
            await cp.wait_ready(10)
            ops = OpsServer(cp)
            await ops.start()
            streams = []
            try:
                for _ in range(3):  # each one in the middle of its request head
                    reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                    streams.append((reader, writer))
                while len(ops._connections) < 3:  # noqa: ASYNC110 - no event to wait on
                    await asyncio.sleep(0.01)
                await ops.close()
                for reader, _ in streams:
                    try:
                        data = await reader.read()
                    except ConnectionResetError:  # closed before it read what was sent
                        data = b""
                    assert data == b""  # closed without an answer
            finally:
                for _, writer in streams:
                    writer.close()
                    with contextlib.suppress(ConnectionError):
                        await writer.wait_closed()
            # The member's own server is unaffected.
            assert (await get(http_port(cp), "/healthz")).status == 200
