"""Tests of controlplane.testing.faultproxy: every fault, each direction, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import pytest

from controlplane.testing.faultproxy import Direction, Fault, FaultProxy

pytestmark = pytest.mark.anyio

UP, DOWN = Direction.UPSTREAM, Direction.DOWNSTREAM
QUIET = 0.3
"""How long "nothing arrives" is watched for."""


@dataclass
class Server:
    """A loopback server that records what it receives and echoes it (optionally with a
    greeting sent first on every connection)."""

    greeting: bytes = b""
    echo: bool = True
    received: bytearray = field(default_factory=bytearray)
    connections: int = 0
    eofs: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            if self.greeting:
                writer.write(self.greeting)
                await writer.drain()
            while data := await reader.read(65536):
                self.received += data
                if self.echo:
                    writer.write(data)
                    await writer.drain()
            self.eofs += 1
        except OSError:
            pass
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@contextlib.asynccontextmanager
async def running(server: Server) -> AsyncIterator[Server]:
    server.server = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.server.close()
        for w in server.writers:
            w.close()


@contextlib.asynccontextmanager
async def proxied(server: Server) -> AsyncIterator[FaultProxy]:
    async with running(server):
        proxy = FaultProxy("127.0.0.1", target_host="127.0.0.1", target_port=server.port)
        await proxy.start()
        try:
            yield proxy
        finally:
            await proxy.close()


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def read_exactly(reader: asyncio.StreamReader, n: int, within: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), within)


async def nothing_arrives(reader: asyncio.StreamReader) -> None:
    """Assert the connection stays open and silent for QUIET seconds."""
    with pytest.raises(TimeoutError):
        data = await asyncio.wait_for(reader.read(1), QUIET)
        pytest.fail(f"expected silence, got {data!r}")


async def is_closed(reader: asyncio.StreamReader, within: float = 5.0) -> bool:
    """True if the connection ends (EOF or reset) within ``within`` seconds."""
    try:
        data = await asyncio.wait_for(reader.read(65536), within)
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return data == b""


async def eventually(predicate: object, within: float = 5.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_pass_forwards_both_ways_and_counts() -> None:
    with anyio.fail_after(20):
        async with proxied(Server()) as proxy:
            reader, writer = await connect(proxy)
            writer.write(b"hello")
            assert await read_exactly(reader, 5) == b"hello"
            payload = bytes(range(256)) * 1024  # several chunks
            writer.write(payload)
            assert await read_exactly(reader, len(payload)) == payload
            assert proxy.connections == 1
            assert proxy.stats(UP).forwarded_bytes == 5 + len(payload)
            await eventually(lambda: proxy.stats(DOWN).forwarded_bytes == 5 + len(payload))
            assert proxy.stats(UP).discarded_bytes == 0
            assert proxy.fault(UP) is Fault.PASS
            assert proxy.address == f"127.0.0.1:{proxy.port}"
            writer.close()


async def test_end_of_stream_is_forwarded_both_ways() -> None:
    with anyio.fail_after(20):
        server = Server()
        async with proxied(server) as proxy:
            reader, writer = await connect(proxy)
            writer.write(b"bye")
            writer.write_eof()
            assert await read_exactly(reader, 3) == b"bye"
            # The server sees the end of stream, closes, and the client sees that in turn.
            assert await is_closed(reader)
            assert server.eofs == 1
            await eventually(lambda: proxy.connections == 0)
            writer.close()


async def test_delay_adds_latency_per_direction() -> None:
    with anyio.fail_after(20):
        async with proxied(Server()) as proxy:
            reader, writer = await connect(proxy)
            proxy.delay(150)
            start = time.monotonic()
            writer.write(b"ping")
            assert await read_exactly(reader, 4) == b"ping"
            assert time.monotonic() - start >= 0.29  # 150 ms each way
            proxy.delay(200, UP)
            proxy.set_fault(Fault.PASS, DOWN)
            start = time.monotonic()
            for i in range(5):  # a latency, not a rate limit: chunks overlap in flight
                writer.write(b"%d" % i)
                await asyncio.sleep(0.01)
            assert await read_exactly(reader, 5) == b"01234"
            assert 0.2 <= time.monotonic() - start < 1.0
            proxy.pass_through()
            start = time.monotonic()
            writer.write(b"fast")
            assert await read_exactly(reader, 4) == b"fast"
            assert time.monotonic() - start < 0.15
            writer.close()


async def test_blackhole_keeps_connections_open_and_silent() -> None:
    with anyio.fail_after(20):
        server = Server()
        async with proxied(server) as proxy:
            reader, writer = await connect(proxy)
            writer.write(b"a")
            assert await read_exactly(reader, 1) == b"a"
            proxy.blackhole()
            writer.write(b"lost")
            await nothing_arrives(reader)
            assert bytes(server.received) == b"a"
            assert proxy.stats(UP).discarded_bytes == 4
            # New connections are accepted, and are just as silent.
            reader2, writer2 = await connect(proxy)
            writer2.write(b"also lost")
            await nothing_arrives(reader2)
            assert proxy.connections == 2
            # The end of stream does not get through either.
            writer2.write_eof()
            await nothing_arrives(reader2)
            # Healing closes the connections whose byte stream has a gap...
            proxy.pass_through()
            assert await is_closed(reader)
            assert await is_closed(reader2)
            # ... and fresh ones work.
            reader3, writer3 = await connect(proxy)
            writer3.write(b"back")
            assert await read_exactly(reader3, 4) == b"back"
            for w in (writer, writer2, writer3):
                w.close()


async def test_blackhole_then_heal_keeps_untouched_connections() -> None:
    with anyio.fail_after(20):
        async with proxied(Server()) as proxy:
            reader, writer = await connect(proxy)
            proxy.blackhole()
            await nothing_arrives(reader)  # nothing was sent, so nothing was lost
            proxy.pass_through()
            writer.write(b"still here")
            assert await read_exactly(reader, 10) == b"still here"
            writer.close()


async def test_drop_closes_existing_and_new_connections() -> None:
    with anyio.fail_after(20):
        server = Server()
        async with proxied(server) as proxy:
            reader, writer = await connect(proxy)
            writer.write(b"x")
            assert await read_exactly(reader, 1) == b"x"
            proxy.drop()
            assert await is_closed(reader)
            assert proxy.fault(UP) is Fault.DROP
            # New connections are closed as soon as they are accepted.
            for _ in range(3):
                reader2, writer2 = await connect(proxy)
                assert await is_closed(reader2)
                writer2.close()
            assert server.connections == 1
            proxy.pass_through()
            reader3, writer3 = await connect(proxy)
            writer3.write(b"ok")
            assert await read_exactly(reader3, 2) == b"ok"
            writer.close()
            writer3.close()


async def test_drop_of_one_direction_drops_the_connection() -> None:
    with anyio.fail_after(20):
        async with proxied(Server()) as proxy:
            reader, writer = await connect(proxy)
            proxy.set_fault(Fault.DROP, DOWN)
            assert proxy.fault(UP) is Fault.PASS
            assert await is_closed(reader)
            writer.close()


async def test_one_way_upstream_only() -> None:
    with anyio.fail_after(20):
        server = Server(greeting=b"hi")
        async with proxied(server) as proxy:
            proxy.one_way(UP)
            assert (proxy.fault(UP), proxy.fault(DOWN)) == (Fault.PASS, Fault.BLACKHOLE)
            reader, writer = await connect(proxy)
            writer.write(b"request")
            await eventually(lambda: bytes(server.received) == b"request")
            await nothing_arrives(reader)  # neither the greeting nor the echo
            assert proxy.stats(DOWN).discarded_bytes == 2 + 7
            writer.close()


async def test_one_way_downstream_only() -> None:
    with anyio.fail_after(20):
        server = Server(greeting=b"hi")
        async with proxied(server) as proxy:
            proxy.one_way(DOWN)
            reader, writer = await connect(proxy)
            assert await read_exactly(reader, 2) == b"hi"
            writer.write(b"request")
            await nothing_arrives(reader)
            assert bytes(server.received) == b""
            assert proxy.stats(UP).discarded_bytes == 7
            writer.close()


async def test_unreachable_target_closes_the_connection() -> None:
    with anyio.fail_after(20):
        server = Server()
        async with running(server):
            port = server.port
        async with FaultProxy(target_port=port) as proxy:
            reader, writer = await connect(proxy)
            assert await is_closed(reader)
            writer.close()


async def test_close_ends_everything_and_is_idempotent() -> None:
    with anyio.fail_after(20):
        async with running(Server()) as server:
            proxy = FaultProxy(target_port=server.port, name="test")
            with pytest.raises(RuntimeError, match="not started"):
                _ = proxy.port
            await proxy.start()
            await proxy.start()  # no-op
            reader, writer = await connect(proxy)
            proxy.delay(1000)
            writer.write(b"in flight")  # queued when the proxy closes
            await asyncio.sleep(0.05)
            await proxy.close()
            assert await is_closed(reader)
            await proxy.close()
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", proxy.port)
            with pytest.raises(RuntimeError, match="closed"):
                await proxy.start()
            assert proxy.stats(UP).discarded_bytes == 9
            writer.close()


def test_delay_only_with_delay_fault() -> None:
    proxy = FaultProxy(target_port=1)
    with pytest.raises(ValueError):
        proxy.set_fault(Fault.PASS, delay_ms=10)
    with pytest.raises(ValueError):
        proxy.delay(-1)
    proxy.delay(5, DOWN)
    assert (proxy.fault(UP), proxy.fault(DOWN)) == (Fault.PASS, Fault.DELAY)
