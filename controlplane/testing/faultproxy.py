"""A fault-injecting TCP proxy for tests: put it between two processes and break the link.

:class:`FaultProxy` listens on ``listen_host:listen_port`` (port 0 picks a free port, see
:attr:`FaultProxy.port`) and, for every connection it accepts, opens one to
``target_host:target_port`` and copies bytes both ways. What happens to the bytes is switched
at run time, separately for each :class:`Direction`:

* :attr:`Fault.PASS`: forward them (after the configured delay, if any).
* :attr:`Fault.DELAY`: forward each chunk ``delay_ms`` milliseconds after it was read, in
  order (latency, not a bandwidth limit).
* :attr:`Fault.BLACKHOLE`: read and discard them; connections stay open and new ones are
  accepted, so the sender sees a silent peer rather than an error. An end of stream is not
  forwarded either. A connection that lost bytes this way has a gap in its byte stream: it is
  closed when its direction leaves the blackhole (:attr:`Fault.PASS` or :attr:`Fault.DELAY`
  again), and the endpoints reconnect on a clean connection.
* :attr:`Fault.DROP`: close every connection at once, and every new one as soon as it is
  accepted (a refused or reset connection). Closing a connection ends both directions, so
  dropping either direction drops the connection.

Convenience methods set both directions: :meth:`~FaultProxy.pass_through`,
:meth:`~FaultProxy.drop`, :meth:`~FaultProxy.blackhole`, :meth:`~FaultProxy.delay`, and
:meth:`~FaultProxy.one_way` (forward one direction only, blackhole the other).

Example::

    proxy = FaultProxy("127.0.0.1", target_host="127.0.0.1", target_port=server_port)
    await proxy.start()
    try:
        ...  # clients connect to proxy.port
        proxy.blackhole()  # partition
        ...
        proxy.pass_through()  # heal
    finally:
        await proxy.close()

Everything runs on the event loop that called :meth:`~FaultProxy.start`; modes may be switched
from any coroutine or callback on that loop. Only for tests, on loopback: there is no
authentication, no TLS termination (TLS passes through as opaque bytes) and no limit on the
number of connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from controlplane.backends.raft.framing import stop_listening

__all__ = ["Direction", "Fault", "FaultProxy", "LinkStats"]

_log = logging.getLogger("controlplane.testing.faultproxy")

_CHUNK = 64 * 1024
_CONNECT_TIMEOUT = 5.0


class Direction(enum.Enum):
    """Which way bytes travel through the proxy."""

    UPSTREAM = "upstream"
    """From the connecting client to the target (client -> server)."""
    DOWNSTREAM = "downstream"
    """From the target back to the client (server -> client)."""


class Fault(enum.Enum):
    """What the proxy does to the bytes of one direction (see the module docstring)."""

    PASS = "pass"
    DELAY = "delay"
    BLACKHOLE = "blackhole"
    DROP = "drop"


@dataclass
class LinkStats:
    """Counters of one direction, over the proxy's lifetime."""

    forwarded_bytes: int = 0
    """Bytes written to the other side."""
    discarded_bytes: int = 0
    """Bytes read and thrown away (blackhole, or pending when a connection was dropped)."""


@dataclass
class _Setting:
    fault: Fault = Fault.PASS
    delay_ms: float = 0.0


@dataclass(eq=False)
class _Pipe:
    """One direction of one connection: reads from ``reader``, writes to ``writer``."""

    direction: Direction
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    queue: deque[tuple[float, bytes | None]] = field(default_factory=deque)
    """``(due time, chunk)``; a ``None`` chunk is the end of stream."""
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    tainted: bool = False
    """Bytes (or the end of stream) were discarded: the byte stream has a gap."""
    reading: bool = True


@dataclass(eq=False)
class _Connection:
    ident: int
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    pipes: dict[Direction, _Pipe]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False


class FaultProxy:
    """A TCP proxy from ``listen_host:listen_port`` to ``target_host:target_port`` whose two
    directions can be delayed, blackholed or dropped at run time."""

    def __init__(
        self,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        *,
        target_host: str = "127.0.0.1",
        target_port: int,
        name: str | None = None,
    ) -> None:
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.name = name or f"proxy->{target_host}:{target_port}"
        self._settings = {d: _Setting() for d in Direction}
        self._stats = {d: LinkStats() for d in Direction}
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._next_ident = 0
        self._port: int | None = None
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening; :attr:`port` is known from then on."""
        if self._closed:
            raise RuntimeError(f"{self.name} was closed")
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._on_accept, self.listen_host, self.listen_port, reuse_address=True
        )
        sock: socket.socket = self._server.sockets[0]
        self._port = int(sock.getsockname()[1])

    async def close(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        self._closed = True
        if self._server is not None:
            await stop_listening(self._server)
        for conn in list(self._connections):
            self._close_connection(conn)
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        tasks = handlers + [t for conn in self._connections for t in conn.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._connections.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The port the proxy listens on (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to connect to (after :meth:`start`)."""
        return f"{self.listen_host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        return sum(1 for c in self._connections if not c.closed)

    def stats(self, direction: Direction) -> LinkStats:
        """Byte counters of ``direction``."""
        return self._stats[direction]

    # --- switching faults --------------------------------------------------------------------

    def fault(self, direction: Direction) -> Fault:
        """The current fault of ``direction``."""
        return self._settings[direction].fault

    def set_fault(
        self,
        fault: Fault,
        direction: Direction | None = None,
        *,
        delay_ms: float = 0.0,
    ) -> None:
        """Switch ``direction`` (both when None) to ``fault``; ``delay_ms`` is used by
        :attr:`Fault.DELAY` (and must be 0 otherwise). Takes effect at once for data not yet
        read; chunks already read keep the delay they were read with."""
        if delay_ms < 0 or (delay_ms and fault is not Fault.DELAY):
            raise ValueError(f"delay_ms={delay_ms} does not go with {fault}")
        directions = list(Direction) if direction is None else [direction]
        for d in directions:
            self._settings[d] = _Setting(fault, delay_ms)
        if fault is Fault.DROP:
            for conn in list(self._connections):
                self._close_connection(conn)
            return
        if fault in (Fault.PASS, Fault.DELAY):
            for conn in list(self._connections):
                if any(conn.pipes[d].tainted for d in directions):
                    self._close_connection(conn)

    def pass_through(self) -> None:
        """Heal: forward both directions without delay."""
        self.set_fault(Fault.PASS)

    def drop(self) -> None:
        """Close every connection, and new ones as soon as they are accepted."""
        self.set_fault(Fault.DROP)

    def blackhole(self, direction: Direction | None = None) -> None:
        """Discard ``direction`` (both when None), keeping connections open."""
        self.set_fault(Fault.BLACKHOLE, direction)

    def delay(self, delay_ms: float, direction: Direction | None = None) -> None:
        """Forward ``direction`` (both when None) ``delay_ms`` milliseconds late."""
        self.set_fault(Fault.DELAY, direction, delay_ms=delay_ms)

    def one_way(self, forward: Direction) -> None:
        """Forward only ``forward``; the other direction goes into a blackhole."""
        other = Direction.DOWNSTREAM if forward is Direction.UPSTREAM else Direction.UPSTREAM
        self.set_fault(Fault.PASS, forward)
        self.set_fault(Fault.BLACKHOLE, other)

    # --- connections -------------------------------------------------------------------------

    def _dropping(self) -> bool:
        return any(s.fault is Fault.DROP for s in self._settings.values())

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed or self._dropping():
            _abort(writer)
            return
        task = asyncio.get_running_loop().create_task(
            self._handle(reader, writer), name=f"{self.name}-accept"
        )
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            server_reader, server_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), _CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            _log.debug("%s: cannot reach the target: %s", self.name, exc)
            _abort(client_writer)
            return
        if self._closed or self._dropping():
            _abort(client_writer)
            _abort(server_writer)
            return
        for w in (client_writer, server_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._next_ident += 1
        conn = _Connection(
            ident=self._next_ident,
            client=client_writer,
            server=server_writer,
            pipes={
                Direction.UPSTREAM: _Pipe(Direction.UPSTREAM, client_reader, server_writer),
                Direction.DOWNSTREAM: _Pipe(Direction.DOWNSTREAM, server_reader, client_writer),
            },
        )
        self._connections.add(conn)
        loop = asyncio.get_running_loop()
        for pipe in conn.pipes.values():
            conn.tasks.append(
                loop.create_task(
                    self._read(conn, pipe), name=f"{self.name}-{conn.ident}-{pipe.direction.value}"
                )
            )
            conn.tasks.append(
                loop.create_task(
                    self._write(conn, pipe),
                    name=f"{self.name}-{conn.ident}-{pipe.direction.value}-w",
                )
            )
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            self._close_connection(conn)
            self._connections.discard(conn)

    async def _read(self, conn: _Connection, pipe: _Pipe) -> None:
        stats = self._stats[pipe.direction]
        while not conn.closed:
            try:
                chunk = await pipe.reader.read(_CHUNK)
            except (OSError, asyncio.IncompleteReadError):
                chunk = b""
            if conn.closed:
                return
            setting = self._settings[pipe.direction]
            if setting.fault is Fault.DROP:
                self._close_connection(conn)
                return
            if setting.fault is Fault.BLACKHOLE:
                stats.discarded_bytes += len(chunk)
                pipe.tainted = True
                if not chunk:  # the end of stream is swallowed too; stay open
                    pipe.reading = False
                    return
                continue
            due = time.monotonic() + setting.delay_ms / 1000.0
            pipe.queue.append((due, chunk or None))
            pipe.wakeup.set()
            if not chunk:
                pipe.reading = False
                return

    async def _write(self, conn: _Connection, pipe: _Pipe) -> None:
        stats = self._stats[pipe.direction]
        other = conn.pipes[
            Direction.DOWNSTREAM if pipe.direction is Direction.UPSTREAM else Direction.UPSTREAM
        ]
        while not conn.closed:
            if not pipe.queue:
                pipe.wakeup.clear()
                await pipe.wakeup.wait()
                continue
            due, chunk = pipe.queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            pipe.queue.popleft()
            if chunk is None:
                # End of stream: half-close; the connection ends once both sides have.
                with contextlib.suppress(OSError, RuntimeError):
                    if pipe.writer.can_write_eof():
                        pipe.writer.write_eof()
                if not other.reading and not other.queue:
                    self._close_connection(conn)
                return
            try:
                pipe.writer.write(chunk)
                await pipe.writer.drain()
            except (OSError, RuntimeError):
                self._close_connection(conn)
                return
            stats.forwarded_bytes += len(chunk)

    def _close_connection(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        for pipe in conn.pipes.values():
            self._stats[pipe.direction].discarded_bytes += sum(
                len(chunk) for _, chunk in pipe.queue if chunk
            )
            pipe.queue.clear()
            pipe.wakeup.set()
        _abort(conn.client)
        _abort(conn.server)
        current = asyncio.current_task()
        for task in conn.tasks:
            if task is not current:
                task.cancel()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once, discarding unsent data (a reset, as a dropped link would)."""
    transport = writer.transport
    with contextlib.suppress(Exception):
        transport.abort()
