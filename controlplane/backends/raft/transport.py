"""The Raft peer transport: one pipelined, length-prefixed TCP (optionally mutual-TLS) connection
per peer and direction.

Each member listens for its peers and keeps one long-lived *outbound* connection to every peer
it sends to; replies travel on the peer's own outbound connection, as in etcd. Messages are
msgpack frames (see :mod:`.framing`) of a caller-supplied ``msgspec`` type ``T``: this module
never looks inside them.

Contract:

- :meth:`PeerTransport.send` never blocks and never fails for network reasons. It encodes the
  message and, when the peer's connection is up, nothing is queued before it and the socket
  is not backed up, hands it to the socket at once (no task wake-up on the way). Otherwise it
  appends it to a bounded per-peer queue and returns; a writer task per peer connects and
  drains the queue, writing many frames per system call and per ``drain()``.
- Per peer, messages arrive **in send order, at most once, possibly with gaps**. Gaps come from
  queue overflow (the *oldest* queued message is dropped and counted), from frames written to a
  connection that breaks, and from restarts. Raft tolerates message loss; it must not be used
  where loss is not tolerable. An acceptor keeps only the newest connection from each member,
  so an older connection's frames are never delivered after a newer one's.
- Connections are made lazily (on the first message to a peer, and after a failure on the next
  message), with capped exponential backoff and jitter between failed attempts.
- The first frame of every connection is a :class:`Handshake`. The acceptor checks protocol,
  version, cluster id, that it is the member the sender expects, and that the sender is a
  known member; it answers with a :class:`HandshakeReply` and closes the connection on
  rejection. Hostile or malformed input (bad handshake, oversized, truncated or undecodable
  frame, unknown message type) closes *that* connection with a warning on the
  ``controlplane.raft.transport`` logger and a counter; the transport keeps serving.
- ``on_message`` is called synchronously on the event loop, in arrival order. An exception
  from it is logged and counted; the connection stays open.
- ``on_unreachable(member_id)``, when given, is called on the event loop each time a
  connection to that peer cannot be made or is lost: messages sent to it may not arrive
  (Raft then stops pipelining to it and probes instead).
- :meth:`PeerTransport.close` stops the listener, closes every connection and ends every task
  it started before it returns.

Not provided: binding a TLS certificate's identity to the member id it claims (any
certificate signed by the trusted CA may claim any member id), message priorities (a large
message delays the heartbeats queued behind it), and flow control beyond the queue bound
(:meth:`PeerTransport.pending` lets the caller apply its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import msgspec

from controlplane.backends.raft.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    EndOfStream,
    FrameError,
    FrameReader,
    check_max_frame_size,
    close_writer,
    decode_frame,
    describe_error,
    encode_frame,
    encode_message_frame,
    read_frame,
    stop_listening,
)
from controlplane.errors import ClosedError, ControlPlaneError

__all__ = (
    "HANDSHAKE_MAX_SIZE",
    "PROTOCOL_NAME",
    "PROTOCOL_VERSION",
    "ExponentialBackoff",
    "Handshake",
    "HandshakeReply",
    "PeerStats",
    "PeerTransport",
    "TransportClosedError",
    "TransportError",
    "TransportOptions",
    "TransportStats",
)

logger = logging.getLogger("controlplane.raft.transport")

PROTOCOL_NAME = "controlplane-raft"
"""Names the protocol in the handshake, so a client of another service is told what it hit."""
PROTOCOL_VERSION = 1
"""The only wire version spoken; a handshake with another version is rejected."""
HANDSHAKE_MAX_SIZE = 64 * 1024
"""Maximum size of a handshake frame (and of its reply)."""

T = TypeVar("T")


class TransportError(ControlPlaneError):
    """Base class of the transport's own errors."""


class TransportClosedError(TransportError, ClosedError):
    """Raised when the transport is used before :meth:`PeerTransport.start` or after close."""


class Handshake(msgspec.Struct, frozen=True, array_like=True):
    """The first frame on every connection, sent by the connecting member.

    Fields are only ever appended, with defaults.
    """

    protocol: str
    version: int
    cluster_id: str
    sender: str
    """Member id of the connecting member."""
    receiver: str
    """Member id the sender believes it is connecting to."""


class HandshakeReply(msgspec.Struct, frozen=True, array_like=True):
    """The acceptor's answer to a :class:`Handshake`; a rejection is followed by close."""

    accepted: bool
    reason: str = ""


_HANDSHAKE_DECODER = msgspec.msgpack.Decoder(Handshake)
_REPLY_DECODER = msgspec.msgpack.Decoder(HandshakeReply)
_ENCODER = msgspec.msgpack.Encoder()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TransportOptions:
    """Tuning knobs; the defaults suit a LAN. Times are in seconds."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest payload sent or accepted; a larger inbound frame closes the connection."""
    queue_max_messages: int = 4096
    """Per-peer queue bound in messages; beyond it the oldest message is dropped."""
    queue_max_bytes: int = 64 * 1024 * 1024
    """Per-peer queue bound in bytes; must be at least ``max_frame_size``."""
    backoff_initial: float = 0.05
    backoff_max: float = 0.5
    """Cap of the reconnect backoff; also how long a connection must live to reset it. Half
    an election timeout at most: a member back from a restart must not wait out a long
    backoff for the vote requests sent to it (a vote held back for seconds, then delivered
    with the others, splits the next election)."""
    connect_timeout: float = 5.0
    """Outbound TCP connect + TLS handshake + transport handshake."""
    handshake_timeout: float = 5.0
    """Inbound: time allowed for the TLS handshake and for the first frame."""
    write_timeout: float = 10.0
    """A write that makes no room for this long marks the connection dead (stalled peer)."""
    close_timeout: float = 1.0
    """Grace period for an orderly (TLS) close before the connection is aborted."""
    batch_max_bytes: int = 1024 * 1024
    """Bytes handed to the socket per write before waiting for the buffer to drain."""
    read_size: int = 256 * 1024
    """Bytes requested per read on inbound connections."""

    def __post_init__(self) -> None:
        check_max_frame_size(self.max_frame_size)
        if self.queue_max_messages < 1:
            raise ValueError("queue_max_messages must be at least 1")
        if self.queue_max_bytes < self.max_frame_size + HEADER_SIZE:
            raise ValueError("queue_max_bytes must be at least max_frame_size (plus 4)")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        for name in ("connect_timeout", "handshake_timeout", "write_timeout", "close_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.batch_max_bytes < 1 or self.read_size < 1:
            raise ValueError("batch_max_bytes and read_size must be positive")


@dataclasses.dataclass(slots=True)
class PeerStats:
    """Counters for one peer (outbound to it and inbound from it). Frames, not messages,
    are counted; ``sent`` means handed to the socket, not delivered."""

    sent_frames: int = 0
    sent_bytes: int = 0
    received_frames: int = 0
    received_bytes: int = 0
    dropped_frames: int = 0
    """Dropped before sending: queue overflow, peer removed, transport closed."""
    connection_errors: int = 0
    """Failed connects, rejected handshakes, connections lost (either direction)."""
    protocol_errors: int = 0
    """Inbound connections from this peer closed for a bad frame."""


@dataclasses.dataclass(slots=True)
class TransportStats:
    """A snapshot of the transport's counters."""

    peers: dict[str, PeerStats]
    rejected_handshakes: int = 0
    """Inbound handshakes refused (wrong cluster, unknown member, ...)."""
    protocol_errors: int = 0
    """Inbound connections closed for malformed input, including before a valid handshake."""
    dropped_unknown_peer: int = 0
    """Messages sent to a member id with no address."""
    callback_errors: int = 0
    """Exceptions raised by ``on_message`` and ``on_unreachable``."""


class ExponentialBackoff:
    """Capped exponential backoff with "equal jitter".

    The n-th delay is uniform in ``[d/2, d]`` with ``d = min(initial * 2**n, maximum)``, so
    members that lost a peer together do not reconnect in lock step.
    """

    __slots__ = ("_current", "_initial", "_maximum", "_rng")

    def __init__(self, initial: float, maximum: float, *, rng: random.Random | None = None) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("need 0 < initial <= maximum")
        self._initial = initial
        self._maximum = maximum
        self._current = initial
        self._rng = rng if rng is not None else random.Random()

    def next(self) -> float:
        """Return the next delay and double the base (up to the cap)."""
        ceiling = self._current
        self._current = min(self._current * 2, self._maximum)
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        """Start again from the initial delay (after a connection proved healthy)."""
        self._current = self._initial


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class _Connection:
    __slots__ = ("broken", "failed", "opened_at", "reader", "watcher", "writer")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opened_at: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.opened_at = opened_at
        self.watcher: asyncio.Task[None] | None = None
        self.broken: str | None = None
        self.failed = False

    def mark_broken(self, reason: str, *, failed: bool) -> None:
        if self.broken is None:
            self.broken = reason
            self.failed = failed


class _Peer:
    __slots__ = (
        "conn",
        "failing",
        "host",
        "member_id",
        "moved",
        "port",
        "queue",
        "queued_bytes",
        "stats",
        "task",
        "wake",
    )

    def __init__(self, member_id: str, host: str, port: int, stats: PeerStats) -> None:
        self.member_id = member_id
        self.host = host
        self.port = port
        self.stats = stats
        self.queue: deque[bytearray] = deque()
        self.queued_bytes = 0
        self.wake = asyncio.Event()  # queue non-empty, connection broken, or address changed
        self.moved = asyncio.Event()  # address changed: cut the backoff short
        self.task: asyncio.Task[None] | None = None
        self.conn: _Connection | None = None
        self.failing = False  # consecutive failures are logged at DEBUG after the first


class PeerTransport(Generic[T]):
    """Sends messages of type ``T`` to peers and delivers the peers' messages to a callback.

    ``decoder`` decodes inbound payloads (usually a ``Decoder`` of a tagged union);
    ``encoder`` encodes outbound messages (default: a plain msgpack ``Encoder``).
    ``peers`` maps member ids to ``(host, port)``. ``accept_from(member_id)`` decides whether
    an inbound connection is accepted; by default, a member is accepted while it has an
    address (:meth:`set_peer`). It is consulted on every handshake, so membership may change
    at run time. ``server_ssl``/``client_ssl`` enable TLS; for mutual authentication the
    server context must require client certificates (``verify_mode = CERT_REQUIRED``).

    Use as ``async with PeerTransport(...) as transport:`` or call :meth:`start` and
    :meth:`close`. All methods must be called from the event loop's thread.
    """

    def __init__(
        self,
        member_id: str,
        cluster_id: str,
        *,
        decoder: msgspec.msgpack.Decoder[T],
        on_message: Callable[[T], None],
        on_unreachable: Callable[[str], None] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        peers: Mapping[str, tuple[str, int]] | None = None,
        accept_from: Callable[[str], bool] | None = None,
        encoder: msgspec.msgpack.Encoder | None = None,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        options: TransportOptions | None = None,
    ) -> None:
        self._member_id = member_id
        self._cluster_id = cluster_id
        self._decoder = decoder
        self._on_message = on_message
        self._on_unreachable = on_unreachable
        self._encoder = encoder if encoder is not None else _ENCODER
        self._host = host
        self._port = port
        self._accept_from = accept_from if accept_from is not None else self._has_address
        self._server_ssl = server_ssl
        self._client_ssl = client_ssl
        self._opts = options if options is not None else TransportOptions()

        self._state = _State.NEW
        self._closed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._peers: dict[str, _Peer] = {}
        self._stats: dict[str, PeerStats] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._inbound: dict[str, asyncio.Task[None]] = {}  # newest connection per member
        self._unserved: set[asyncio.StreamWriter] = set()
        self._rejected_handshakes = 0
        self._protocol_errors = 0
        self._dropped_unknown_peer = 0
        self._callback_errors = 0
        for peer_id, (peer_host, peer_port) in (peers or {}).items():
            self.set_peer(peer_id, peer_host, peer_port)

    # ------------------------------------------------------------------ public API

    @property
    def member_id(self) -> str:
        return self._member_id

    @property
    def cluster_id(self) -> str:
        return self._cluster_id

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` (the real port when 0 was asked for)."""
        if self._address is None:
            raise TransportClosedError("the transport is not listening; call start() first")
        return self._address

    @property
    def port(self) -> int:
        """The bound port."""
        return self.address[1]

    async def start(self) -> None:
        """Start listening. Raises ``OSError`` if the address cannot be bound."""
        if self._state is not _State.NEW:
            raise TransportError(f"the transport cannot be started: it is {self._state.value}")
        self._server = await asyncio.start_server(
            self._on_connection,
            self._host,
            self._port,
            limit=self._opts.read_size,
        )
        sockname = self._server.sockets[0].getsockname()
        self._address = (sockname[0], sockname[1])
        self._state = _State.RUNNING
        logger.info(
            "member %s of cluster %s listening on %s:%d%s",
            self._member_id,
            self._cluster_id,
            *self._address,
            " (TLS)" if self._server_ssl else "",
        )

    async def close(self) -> None:
        """Stop listening, close every connection, end every task; idempotent.

        Queued messages are dropped (and counted).
        """
        if self._state is _State.CLOSED:
            return
        if self._state is _State.CLOSING:
            await self._closed.wait()
            return
        self._state = _State.CLOSING
        try:
            if self._server is not None:
                await stop_listening(self._server)
            while self._tasks:
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks)
            if self._server is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._opts.close_timeout):
                        await self._server.wait_closed()
            for writer in self._unserved:
                writer.transport.abort()
            self._unserved.clear()
            for peer in self._peers.values():
                self._discard_queue(peer)
        finally:
            self._state = _State.CLOSED
            self._closed.set()
            logger.info("member %s: transport closed", self._member_id)

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

    def send(self, peer_id: str, message: T) -> None:
        """Queue ``message`` for ``peer_id`` and return at once; delivery is not guaranteed.

        A peer without an address is not an error (membership changes race with sends):
        the message is dropped and counted. Raises :class:`TransportClosedError` when not
        running, :class:`~.framing.FrameTooLargeError` when the encoded message exceeds
        ``max_frame_size``; ``msgspec.EncodeError`` for an unencodable message.
        """
        if self._state is not _State.RUNNING:
            raise TransportClosedError(f"cannot send: the transport is {self._state.value}")
        peer = self._peers.get(peer_id)
        if peer is None:
            self._dropped_unknown_peer += 1
            logger.debug("dropping a message to %s: no address for that member", peer_id)
            return
        frame = encode_message_frame(self._encoder, message, self._opts.max_frame_size)
        queue = peer.queue
        conn = peer.conn
        if not queue and conn is not None and conn.broken is None:
            # The fast path: nothing waits before this frame, so writing it now keeps the
            # order, and saves the writer task's wake-up (a loop iteration) on every hop.
            # Under backpressure (the socket's buffer above its high-water mark) the frame
            # queues and the writer task waits for the socket to drain as usual.
            transport = conn.writer.transport
            if (
                not transport.is_closing()
                and transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]
            ):
                transport.write(frame)
                stats = peer.stats
                stats.sent_frames += 1
                stats.sent_bytes += len(frame)
                return
        queue.append(frame)
        peer.queued_bytes += len(frame)
        if (
            len(queue) > self._opts.queue_max_messages
            or peer.queued_bytes > self._opts.queue_max_bytes
        ):
            self._drop_oldest(peer)
        if peer.task is None or peer.task.done():  # done: only if it crashed (and logged it)
            peer.task = self._spawn(self._run_peer(peer), f"raft-transport-to-{peer_id}")
        peer.wake.set()

    def set_peer(self, peer_id: str, host: str, port: int) -> None:
        """Add a peer or change its address. A changed address closes the current connection;
        the next message goes to the new address."""
        if peer_id == self._member_id:
            raise ValueError(f"member {peer_id!r} cannot be its own peer")
        peer = self._peers.get(peer_id)
        if peer is None:
            self._peers[peer_id] = _Peer(peer_id, host, port, self._peer_stats(peer_id))
            return
        if (peer.host, peer.port) == (host, port):
            return
        peer.host, peer.port = host, port
        peer.moved.set()
        if peer.conn is not None:
            peer.conn.mark_broken("the peer's address changed", failed=False)
            peer.wake.set()

    def remove_peer(self, peer_id: str) -> None:
        """Forget a peer: drop its queue, close the connections to and from it. Unknown ids
        are ignored. With the default ``accept_from`` it can no longer connect."""
        peer = self._peers.pop(peer_id, None)
        if peer is not None:
            self._discard_queue(peer)
            if peer.task is not None:
                peer.task.cancel()
        inbound = self._inbound.get(peer_id)
        if inbound is not None:
            inbound.cancel()

    @property
    def peers(self) -> dict[str, tuple[str, int]]:
        """A copy of the address book."""
        return {p.member_id: (p.host, p.port) for p in self._peers.values()}

    def pending(self, peer_id: str) -> int:
        """Messages queued for ``peer_id`` and not yet written (0 for an unknown peer)."""
        peer = self._peers.get(peer_id)
        return len(peer.queue) if peer is not None else 0

    def stats(self) -> TransportStats:
        """A snapshot (copy) of all counters."""
        return TransportStats(
            peers={k: dataclasses.replace(v) for k, v in self._stats.items()},
            rejected_handshakes=self._rejected_handshakes,
            protocol_errors=self._protocol_errors,
            dropped_unknown_peer=self._dropped_unknown_peer,
            callback_errors=self._callback_errors,
        )

    # ------------------------------------------------------------------ bookkeeping

    def _has_address(self, member_id: str) -> bool:
        return member_id in self._peers

    def _peer_stats(self, member_id: str) -> PeerStats:
        stats = self._stats.get(member_id)
        if stats is None:
            stats = self._stats[member_id] = PeerStats()
        return stats

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._track(task)
        return task

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("transport task %s crashed", task.get_name(), exc_info=exc)

    def _drop_oldest(self, peer: _Peer) -> None:
        queue = peer.queue
        dropped = 0
        while len(queue) > 1 and (
            len(queue) > self._opts.queue_max_messages
            or peer.queued_bytes > self._opts.queue_max_bytes
        ):
            peer.queued_bytes -= len(queue.popleft())
            dropped += 1
        peer.stats.dropped_frames += dropped
        logger.debug("queue to %s full: dropped %d oldest message(s)", peer.member_id, dropped)

    @staticmethod
    def _discard_queue(peer: _Peer) -> None:
        peer.stats.dropped_frames += len(peer.queue)
        peer.queue.clear()
        peer.queued_bytes = 0

    async def _close_writer(self, writer: asyncio.StreamWriter) -> None:
        await close_writer(writer, self._opts.close_timeout)

    # ------------------------------------------------------------------ outbound

    async def _run_peer(self, peer: _Peer) -> None:
        """The writer task of one peer: connect when there is work, pump, reconnect."""
        loop = asyncio.get_running_loop()
        backoff = ExponentialBackoff(self._opts.backoff_initial, self._opts.backoff_max)
        while True:
            while not peer.queue:
                peer.wake.clear()
                await peer.wake.wait()
            conn = await self._connect(peer)
            if conn is None:
                await self._backoff(peer, backoff.next())
                continue
            peer.conn = conn
            try:
                await self._pump(peer, conn)
            finally:
                peer.conn = None
                await self._close_connection(conn)
            if conn.failed:
                peer.stats.connection_errors += 1
                logger.warning(
                    "connection to peer %s at %s:%d lost: %s",
                    peer.member_id,
                    peer.host,
                    peer.port,
                    conn.broken,
                )
                self._unreachable(peer)
            if loop.time() - conn.opened_at >= self._opts.backoff_max:
                backoff.reset()
            else:  # a connection that dies young (e.g. our frames are refused) backs off too
                await self._backoff(peer, backoff.next())

    async def _backoff(self, peer: _Peer, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await peer.moved.wait()

    async def _connect(self, peer: _Peer) -> _Connection | None:
        peer.moved.clear()
        host, port = peer.host, peer.port
        hello = Handshake(
            protocol=PROTOCOL_NAME,
            version=PROTOCOL_VERSION,
            cluster_id=self._cluster_id,
            sender=self._member_id,
            receiver=peer.member_id,
        )
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._opts.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self._client_ssl, limit=self._opts.read_size
                )
                _set_nodelay(writer)
                writer.write(encode_frame(_ENCODER.encode(hello)))
                await writer.drain()
                reply = decode_frame(_REPLY_DECODER, await read_frame(reader, HANDSHAKE_MAX_SIZE))
        except asyncio.CancelledError:
            if writer is not None:
                writer.transport.abort()
            raise
        except (OSError, TimeoutError, EOFError, FrameError) as exc:
            if writer is not None:
                await self._close_writer(writer)
            self._connect_failed(peer, host, port, describe_error(exc))
            return None
        if not reply.accepted:
            await self._close_writer(writer)
            self._connect_failed(peer, host, port, f"handshake rejected: {reply.reason}")
            return None
        if peer.failing:
            logger.info("connected to peer %s at %s:%d", peer.member_id, host, port)
            peer.failing = False
        conn = _Connection(reader, writer, asyncio.get_running_loop().time())
        conn.watcher = self._spawn(
            self._watch(peer, conn), f"raft-transport-watch-{peer.member_id}"
        )
        return conn

    def _connect_failed(self, peer: _Peer, host: str, port: int, reason: str) -> None:
        peer.stats.connection_errors += 1
        level = logging.DEBUG if peer.failing else logging.WARNING
        peer.failing = True
        logger.log(
            level,
            "cannot connect to peer %s at %s:%d: %s (retrying with backoff)",
            peer.member_id,
            host,
            port,
            reason,
        )
        self._unreachable(peer)

    def _unreachable(self, peer: _Peer) -> None:
        """Tell the owner that messages to ``peer`` are not getting through."""
        if self._on_unreachable is None:
            return
        try:
            self._on_unreachable(peer.member_id)
        except Exception:
            self._callback_errors += 1
            logger.exception("on_unreachable failed for member %s", peer.member_id)

    async def _pump(self, peer: _Peer, conn: _Connection) -> None:
        writer = conn.writer
        queue = peer.queue
        stats = peer.stats
        batch_max = self._opts.batch_max_bytes
        transport = writer.transport
        while conn.broken is None:
            if not queue:
                peer.wake.clear()
                await peer.wake.wait()
                continue
            batch: list[bytearray] = []
            size = 0
            while queue and size < batch_max:
                frame = queue.popleft()
                batch.append(frame)
                size += len(frame)
            peer.queued_bytes -= size
            try:
                writer.writelines(batch)
                stats.sent_frames += len(batch)
                stats.sent_bytes += size
                if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
                    async with asyncio.timeout(self._opts.write_timeout):  # drain() will wait
                        await writer.drain()
                else:
                    await writer.drain()  # returns at once, or raises if the connection is lost
            except TimeoutError:
                conn.mark_broken(f"no write progress for {self._opts.write_timeout}s", failed=True)
            except OSError as exc:
                conn.mark_broken(describe_error(exc), failed=True)

    async def _watch(self, peer: _Peer, conn: _Connection) -> None:
        """Detect a dead outbound connection while idle: the acceptor never sends again."""
        try:
            data = await conn.reader.read(1)
        except OSError as exc:
            reason = describe_error(exc)
        else:
            reason = "closed by the peer" if not data else "the peer sent unexpected data"
        conn.mark_broken(reason, failed=True)
        peer.wake.set()

    async def _close_connection(self, conn: _Connection) -> None:
        if conn.watcher is not None:
            conn.watcher.cancel()
            try:
                await asyncio.wait([conn.watcher])
            except asyncio.CancelledError:
                conn.writer.transport.abort()
                raise
        await self._close_writer(conn.writer)

    # ------------------------------------------------------------------ inbound

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: asyncio then creates no task of its own (whose
        # cancellation 3.11's start_server mishandles), and ours is tracked at once.
        if self._state is not _State.RUNNING:
            writer.transport.abort()
            return
        # Tracked until _serve owns it: a task cancelled before it starts never runs its
        # finally, and close() must still close the socket.
        self._unserved.add(writer)
        self._spawn(self._serve(reader, writer), f"raft-transport-from-{_peername(writer)}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._unserved.discard(writer)
        task = asyncio.current_task()
        peername = _peername(writer)
        sender: str | None = None
        _set_nodelay(writer)
        if self._server_ssl is not None and not await self._start_tls(writer, peername):
            return
        try:
            sender = await self._accept(reader, writer, peername)
            if sender is not None:
                await self._receive(reader, sender, peername)
        except FrameError as exc:
            self._protocol_errors += 1
            if sender is not None:
                self._peer_stats(sender).protocol_errors += 1
            logger.warning("closing connection from member %s at %s: %s", sender, peername, exc)
        except (OSError, EOFError) as exc:
            if sender is not None:
                self._peer_stats(sender).connection_errors += 1
            logger.info(
                "connection from member %s at %s lost: %s", sender, peername, describe_error(exc)
            )
        finally:
            if sender is not None and self._inbound.get(sender) is task:
                del self._inbound[sender]
            await self._close_writer(writer)

    async def _start_tls(self, writer: asyncio.StreamWriter, peername: str) -> bool:
        # TLS is started here rather than by the listener so that the handshake runs in a
        # task of ours: close() can then cancel it, and a refused certificate is logged.
        # On failure the raw transport is aborted: its stream protocol is detached by then, so
        # an orderly close would never report completion.
        assert self._server_ssl is not None
        try:
            await writer.start_tls(
                self._server_ssl, ssl_handshake_timeout=self._opts.handshake_timeout
            )
        except OSError as exc:
            writer.transport.abort()
            self._rejected_handshakes += 1
            logger.warning("TLS handshake with %s failed: %s", peername, describe_error(exc))
            return False
        except BaseException:
            writer.transport.abort()
            raise
        return True

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peername: str
    ) -> str | None:
        """Run the acceptor's side of the handshake; return the sender's id if accepted."""
        try:
            async with asyncio.timeout(self._opts.handshake_timeout):
                payload = await read_frame(reader, HANDSHAKE_MAX_SIZE)
            hello = decode_frame(_HANDSHAKE_DECODER, payload)
        except EndOfStream:
            logger.debug("connection from %s closed before its handshake", peername)
            return None
        except (FrameError, TimeoutError) as exc:
            self._protocol_errors += 1
            problem = "no handshake in time" if isinstance(exc, TimeoutError) else str(exc)
            logger.warning("closing connection from %s: bad handshake: %s", peername, problem)
            return None
        reason = self._check_handshake(hello)
        writer.write(encode_frame(_ENCODER.encode(HandshakeReply(reason is None, reason or ""))))
        await writer.drain()
        if reason is not None:
            self._rejected_handshakes += 1
            logger.warning(
                "rejected connection from %s claiming member %r of cluster %r: %s",
                peername,
                hello.sender,
                hello.cluster_id,
                reason,
            )
            return None
        previous = self._inbound.get(hello.sender)
        if previous is not None:
            # Newest wins: the sender reconnected, so the old connection is dead or dying (or
            # two processes claim one member id, which this line in the log will reveal).
            logger.info(
                "member %s reconnected from %s: closing its older connection",
                hello.sender,
                peername,
            )
            previous.cancel()
        task = asyncio.current_task()
        assert task is not None
        self._inbound[hello.sender] = task
        logger.debug("accepted connection from member %s at %s", hello.sender, peername)
        return hello.sender

    def _check_handshake(self, hello: Handshake) -> str | None:
        if hello.protocol != PROTOCOL_NAME:
            return f"wrong protocol {hello.protocol!r}: this is {PROTOCOL_NAME!r}"
        if hello.version != PROTOCOL_VERSION:
            return (
                f"unsupported protocol version {hello.version} "
                f"(this member speaks {PROTOCOL_VERSION})"
            )
        if hello.cluster_id != self._cluster_id:
            return (
                f"cluster id mismatch: this member belongs to cluster {self._cluster_id!r}, "
                f"the sender to {hello.cluster_id!r}"
            )
        if hello.receiver != self._member_id:
            return (
                f"this is member {self._member_id!r}, not {hello.receiver!r} "
                "(the sender has a stale address for it)"
            )
        if hello.sender == self._member_id:
            return f"the sender claims this member's own id {self._member_id!r}"
        try:
            known = self._accept_from(hello.sender)
        except Exception:
            logger.exception("accept_from(%r) failed; rejecting the connection", hello.sender)
            known = False
        if not known:
            return f"unknown member {hello.sender!r}: not a peer of member {self._member_id!r}"
        return None

    async def _receive(self, reader: asyncio.StreamReader, sender: str, peername: str) -> None:
        frames = FrameReader(reader, self._opts.max_frame_size, read_size=self._opts.read_size)
        stats = self._peer_stats(sender)
        decoder = self._decoder
        on_message = self._on_message
        while True:
            try:
                batch = await frames.read_frames()
            except EndOfStream:
                logger.debug("connection from member %s at %s closed", sender, peername)
                return
            for payload in batch:
                message = decode_frame(decoder, payload)
                stats.received_frames += 1
                stats.received_bytes += HEADER_SIZE + len(payload)
                try:
                    on_message(message)
                except Exception:
                    self._callback_errors += 1
                    logger.exception("on_message failed for a message from member %s", sender)


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peername(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
