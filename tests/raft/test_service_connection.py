"""The client service's per-connection sending, against a fake transport: frames queued in one
loop iteration go out in one write, nothing waits while the buffer is below its high-water
mark, and a client that reads nothing is cut off (write timeout, buffer overflow)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from controlplane.backends.raft import service as service_module
from controlplane.backends.raft.framing import FrameReader
from controlplane.backends.raft.wire import (
    MIN_KEEPALIVE,
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    Alive,
    ClientHello,
    Replicate,
    Reply,
    VersionReply,
)

pytestmark = pytest.mark.anyio

REPLIES: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.extra = 0  # bytes the kernel did not take
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        return self.extra

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16 * 1024, 64 * 1024)

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


class FakeWriter:
    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.drains = 0

    def write(self, data: bytes) -> None:
        self.transport.writes.append(bytes(data))

    async def drain(self) -> None:
        self.drains += 1
        await asyncio.Event().wait()  # the client never reads


def connection(**service: Any) -> tuple[Any, FakeWriter]:
    writer = FakeWriter()
    fake_service = SimpleNamespace(
        _backend=None,
        max_frame_bytes=1024 * 1024,
        _max_buffer=service.get("max_buffer", 8 * 1024 * 1024),
        _write_timeout=service.get("write_timeout", 30.0),
    )
    hello = ClientHello(PROTOCOL_NAME, PROTOCOL_VERSION, "x", "c", service.get("keepalive", 0.0))
    conn = service_module._Connection(fake_service, None, writer, hello, "peer")  # type: ignore[arg-type]
    return conn, writer


async def frames_of(data: bytes) -> list[Reply]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return [REPLIES.decode(p) for p in await FrameReader(reader).read_frames()]


async def test_frames_of_one_loop_iteration_go_out_in_one_write() -> None:
    conn, writer = connection()
    conn._write(VersionReply(request=1, version=5))
    conn._write(Replicate(version=6, command=b"x"))
    await conn._drain()  # below the high-water mark: returns at once, no drain
    conn._write(VersionReply(request=2, version=6))
    assert writer.transport.writes == []
    await asyncio.sleep(0)
    assert len(writer.transport.writes) == 1 and writer.drains == 0
    assert await frames_of(writer.transport.writes[0]) == [
        VersionReply(request=1, version=5),
        Replicate(version=6, command=b"x"),
        VersionReply(request=2, version=6),
    ]


async def test_a_client_that_reads_nothing_is_cut_off_after_the_write_timeout() -> None:
    conn, writer = connection(write_timeout=0.05)
    writer.transport.extra = 100 * 1024  # above the high-water mark
    with pytest.raises(service_module._ConnectionGone, match="accepted no data"):
        await conn._send(VersionReply(request=1, version=5))
    assert writer.drains == 1 and writer.transport.aborted
    assert len(writer.transport.writes) == 1  # flushed before waiting


async def test_a_buffer_overflow_closes_the_connection() -> None:
    conn, writer = connection(max_buffer=1000)
    conn._write(Replicate(version=1, command=b"a" * 600))
    with pytest.raises(service_module._ConnectionGone, match="overflowed"):
        conn._write(Replicate(version=2, command=b"a" * 600))  # queued bytes count too
    assert writer.transport.aborted
    await asyncio.sleep(0)
    assert writer.transport.writes == []  # nothing is written on a broken connection


async def test_a_keep_alive_goes_out_only_after_an_idle_interval() -> None:
    conn, writer = connection(keepalive=30.0)
    conn._write(VersionReply(request=1, version=5))
    await asyncio.sleep(0)  # flushed: the connection was busy just now
    conn._keep_alive()
    await asyncio.sleep(0)
    assert len(writer.transport.writes) == 1  # the reply alone
    conn._written_at -= 30.0  # as if idle for the whole interval
    conn._keep_alive()
    await asyncio.sleep(0)
    assert await frames_of(writer.transport.writes[-1]) == [Alive()]
    assert conn._keepalive_timer is not None
    await conn.cancel_tasks()
    assert conn._keepalive_timer.cancelled()


def test_a_keep_alive_interval_below_the_floor_is_raised_to_it() -> None:
    conn, _ = connection(keepalive=0.001)
    assert conn._keepalive == MIN_KEEPALIVE
