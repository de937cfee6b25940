"""A member's client service: the control-plane API for processes that are not members.

See :mod:`.wire` for the protocol. A member serves every request itself: writes are proposed
through its :class:`~.node.RaftNode` (which forwards them to the leader), consistent reads go
through ReadIndex, heart-beats are delivered to the leader, and each connection can carry the
stream of committed commands that keeps a client's replica of the state exact
(:attr:`ControlPlaneFsm.commands <.backend.ControlPlaneFsm.commands>`).

Limits: the frame size, the number of connections, the number of requests in flight per
connection (beyond it: an ``unavailable`` error reply) and the bytes queued for a connection
(a subscriber that reads too slowly is sent the whole state when it fell behind the commands
the member keeps, never an unbounded queue; a connection whose buffer overflows anyway, or that
accepts no bytes for ``write_timeout`` seconds, is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import weakref
from collections.abc import Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec

from ...codec import decode_command, encode_state
from ...commands import ClientCommand, validate
from ...errors import (
    ControlPlaneError,
    InvalidRequestError,
    NotLeaderError,
    OperationTimeoutError,
)
from ...types import ClusterState
from . import framing
from .coretypes import ConfChangeType
from .framing import (
    EndOfStream,
    FrameDecodeError,
    FrameError,
    FrameReader,
    FrameTooLargeError,
    check_max_frame_size,
    close_writer,
    decode_frame,
    describe_error,
    encode_message_frame,
    read_frame,
    stop_listening,
)
from .wire import (
    HELLO_MAX_SIZE,
    MIN_KEEPALIVE,
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    Alive,
    ClientHello,
    ErrorReply,
    Execute,
    ExecuteReply,
    Heartbeat,
    MemberChange,
    MemberStatus,
    PeerProgress,
    ReadIndex,
    Replicate,
    Reply,
    Request,
    ServerHello,
    SnapshotSave,
    StateChunk,
    Status,
    StatusReply,
    Subscribe,
    TransferLeader,
    VersionReply,
    error_reply,
    request_id_of,
)

if TYPE_CHECKING:
    from .backend import RaftControlPlane

__all__ = ["ClientService"]

_log = logging.getLogger("controlplane.raft.service")
_ENCODER = msgspec.msgpack.Encoder()
_HELLO_DECODER = msgspec.msgpack.Decoder(ClientHello)
_REQUEST_DECODER: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
_ALIVE = Alive()
_REPLICATE_BATCH = 256
_STREAM_HIGH_WATER = 1024 * 1024  # drain within a batch beyond this many queued bytes


def _keepalive_interval(hello: ClientHello) -> float:
    """The keep-alive interval a client gets: what it asked for, at least the floor."""
    return max(hello.keepalive, MIN_KEEPALIVE) if hello.keepalive else 0.0


class _ConnectionGone(Exception):
    """The connection broke or was closed for misbehaving; its tasks end."""


class ClientService:
    """Serves the client protocol of :mod:`.wire` for one member.

    ``backend`` is the started member; ``ssl_context`` (a server context that requires client
    certificates, see :func:`.tls.server_context`) turns on mutual TLS. The service reads only
    the public attributes of the backend (``node``, ``fsm``, ``config``, ``heartbeat``).
    """

    def __init__(
        self,
        backend: RaftControlPlane,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 1024,
        max_in_flight: int = 1024,
        max_frame_bytes: int | None = None,
        max_buffer_bytes: int = 8 * 1024 * 1024,
        hello_timeout: float = 10.0,
        write_timeout: float = 30.0,
        snapshot_chunk_bytes: int = 1024 * 1024,
    ) -> None:
        self._backend = backend
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.max_frame_bytes = check_max_frame_size(
            max_frame_bytes or backend.config.raft.max_frame_bytes
        )
        self._chunk = max(1, min(snapshot_chunk_bytes, self.max_frame_bytes // 2))
        # Room for one chunk of a snapshot or one largest frame on top of the usual backlog.
        self._max_buffer = max_buffer_bytes + self.max_frame_bytes
        self._hello_timeout = hello_timeout
        self._write_timeout = write_timeout
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._unserved: set[asyncio.StreamWriter] = set()
        self._accepted: weakref.WeakSet[asyncio.StreamWriter] = weakref.WeakSet()
        self._closing = False
        self.subscriptions = 0
        """Clients subscribed to this member's stream of commands now."""

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``."""
        if self._address is None:
            raise RuntimeError("the client service is not listening; call start() first")
        return self._address

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        return self.address[1]

    @property
    def connections(self) -> int:
        """Connections open now (including those still in their handshake)."""
        return len(self._tasks)

    async def start(self) -> None:
        """Start listening. Raises ``OSError`` if the address cannot be bound."""
        if self._server is not None or self._closing:
            raise RuntimeError("the client service can be started once")
        self._server = await asyncio.start_server(self._on_connection, self._host, self._port)
        sockname = self._server.sockets[0].getsockname()
        self._address = (sockname[0], sockname[1])
        _log.info(
            "member %s serving clients on %s:%d%s",
            self._backend.config.raft.node_id,
            *self._address,
            " (mutual TLS)" if self._ssl else "",
        )

    async def close(self) -> None:
        """Stop listening and close every connection; requests in progress are abandoned
        (their clients retry elsewhere). Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            await stop_listening(self._server)
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        for writer in [*self._unserved, *self._accepted]:  # whatever a cancelled task left
            writer.transport.abort()
        self._unserved.clear()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._server.wait_closed()

    # --- connections ----------------------------------------------------------------------

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback rather than a coroutine: asyncio creates no task of its own (whose
        # cancellation 3.11's start_server mishandles), so close() can end ours.
        if self._closing:
            writer.transport.abort()
            return
        if len(self._tasks) >= self.max_connections:
            _log.warning(
                "refusing a client connection from %s: %d connections open (the limit)",
                _peername(writer),
                len(self._tasks),
            )
            if self._ssl is None:  # over TLS nothing readable can be said before a handshake
                refusal = ServerHello(
                    ok=False,
                    code="unavailable",
                    reason=f"member {self._backend.config.raft.node_id} has too many client "
                    f"connections ({self.max_connections}); try another member",
                )
                writer.write(encode_message_frame(_ENCODER, refusal, HELLO_MAX_SIZE))
                writer.close()
            else:
                writer.transport.abort()
            return
        self._unserved.add(writer)
        self._accepted.add(writer)
        task = asyncio.get_running_loop().create_task(
            self._serve(reader, writer), name=f"client-service-{_peername(writer)}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._unserved.discard(writer)
        peer = _peername(writer)
        conn: _Connection | None = None
        try:
            if self._ssl is not None and not await self._start_tls(writer, peer):
                return
            hello = await self._hello(reader, writer, peer)
            if hello is None:
                return
            conn = _Connection(self, reader, writer, hello, peer)
            await conn.run()
        except EndOfStream:
            _log.debug("client connection from %s closed", peer)
        except FrameError as exc:
            _log.warning("closing client connection from %s: %s", peer, exc)
        except (OSError, EOFError, _ConnectionGone) as exc:
            _log.info("client connection from %s ended: %s", peer, describe_error(exc))
        finally:
            if conn is not None:
                await conn.cancel_tasks()
            await close_writer(writer)

    async def _start_tls(self, writer: asyncio.StreamWriter, peer: str) -> bool:
        assert self._ssl is not None
        try:
            await writer.start_tls(self._ssl, ssl_handshake_timeout=self._hello_timeout)
        except OSError as exc:  # includes ssl.SSLError: an untrusted or missing certificate
            writer.transport.abort()
            _log.warning("TLS handshake with client %s failed: %s", peer, describe_error(exc))
            return False
        except BaseException:
            writer.transport.abort()
            raise
        return True

    async def _hello(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> ClientHello | None:
        raft = self._backend.config.raft
        try:
            async with asyncio.timeout(self._hello_timeout):
                payload = await read_frame(reader, HELLO_MAX_SIZE)
            hello = decode_frame(_HELLO_DECODER, payload)
        except EndOfStream:
            return None
        except (FrameError, TimeoutError) as exc:
            problem = "no hello in time" if isinstance(exc, TimeoutError) else str(exc)
            _log.warning("closing client connection from %s: bad hello: %s", peer, problem)
            if isinstance(exc, FrameDecodeError):
                refusal = ServerHello(
                    ok=False, code="invalid_request", reason=f"bad hello: {problem}"
                )
                writer.write(encode_message_frame(_ENCODER, refusal, HELLO_MAX_SIZE))
                await writer.drain()
            return None
        code, reason = "", ""
        if hello.protocol != PROTOCOL_NAME:
            code, reason = "invalid_request", f"wrong protocol {hello.protocol!r}: this is "
            reason += f"{PROTOCOL_NAME!r} (the client port of a controlplane member)"
        elif hello.version != PROTOCOL_VERSION:
            code = "invalid_request"
            reason = f"unsupported protocol version {hello.version} (this member speaks "
            reason += f"{PROTOCOL_VERSION})"
        elif hello.cluster_id != raft.cluster_id:
            code = "permission_denied"
            reason = f"cluster id mismatch: member {raft.node_id} belongs to cluster "
            reason += f"{raft.cluster_id!r}, the client asked for {hello.cluster_id!r}"
        node = self._backend.node
        if not code and node.failure is not None:
            code = "unavailable"
            reason = f"member {node.id} stopped after a failure: {node.failure}"
        host, port = self.address
        reply = ServerHello(
            ok=not code,
            reason=reason,
            member_id=node.id,
            leader_id=node.leader_id,
            client_address=_format_address(host, port),
            code=code,
            keepalive=_keepalive_interval(hello) if not code else 0.0,
        )
        writer.write(encode_message_frame(_ENCODER, reply, HELLO_MAX_SIZE))
        await writer.drain()
        if code:
            _log.warning("refused client %r from %s: %s", hello.client_id, peer, reason)
            return None
        return hello


class _Connection:
    """One accepted client connection: its requests, its replies, its subscription."""

    def __init__(
        self,
        service: ClientService,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        hello: ClientHello,
        peer: str,
    ) -> None:
        self._service = service
        self._backend = service._backend
        self._reader = reader
        self._writer = writer
        self._client_id = hello.client_id
        self._keepalive = _keepalive_interval(hello)
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._written_at = time.monotonic()
        self._peer = peer
        self._handlers: set[asyncio.Task[None]] = set()
        self._stream: asyncio.Task[None] | None = None
        self._broken: str | None = None
        self._out: list[bytes | bytearray] = []
        """Frames queued in this iteration of the loop, written together by ``_flush``."""
        self._out_bytes = 0
        self._high_water = writer.transport.get_write_buffer_limits()[1]
        self._quick = 0
        """Writes in flight without a task of their own (see :meth:`_proposed`)."""
        self._ended = False

    async def run(self) -> None:
        """Read and dispatch requests until the client leaves or the connection breaks."""
        frames = FrameReader(self._reader, self._service.max_frame_bytes)
        if self._keepalive:
            self._keep_alive()
        try:
            while True:
                for payload in await frames.read_frames():
                    await self._dispatch(payload)
        except (EndOfStream, FrameError, OSError):
            if self._broken is not None:  # we aborted it: that is the real reason
                raise _ConnectionGone(self._broken) from None
            raise

    async def cancel_tasks(self) -> None:
        """End the handlers and the stream of this connection."""
        self._ended = True
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
        tasks = [*self._handlers, *([self._stream] if self._stream else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _dispatch(self, payload: bytes) -> None:
        if framing.TRACE is not None:
            framing.TRACE("s.recv")
        try:
            message = decode_frame(_REQUEST_DECODER, payload)
        except FrameDecodeError as exc:
            _log.info(
                "undecodable request from client %s at %s: %s", self._client_id, self._peer, exc
            )
            await self._send(
                ErrorReply(
                    request=request_id_of(payload),
                    code=InvalidRequestError.code,
                    message=f"the member cannot decode this request: {exc}",
                )
            )
            return
        if isinstance(message, Subscribe):
            if self._stream is not None and not self._stream.done():
                await self._send(
                    ErrorReply(
                        request=message.request,
                        code=InvalidRequestError.code,
                        message="this connection is already subscribed",
                    )
                )
                return
            self._stream = self._spawn(self._subscription(message), "stream")
            return
        limit = self._service.max_in_flight
        if self._in_flight() >= limit:
            await self._send(
                ErrorReply(
                    request=message.request,
                    code="unavailable",
                    message=f"{limit} requests are in flight on this connection (the limit); "
                    "wait for replies before sending more",
                )
            )
            return
        if isinstance(message, Execute) and (started := self._start(message)) is not None:
            # The hot path: answered from the proposal's callback, no task per request.
            if framing.TRACE is not None:
                framing.TRACE("s.call")
            self._quick += 1
            started.add_done_callback(partial(self._proposed, message, time.monotonic()))
            return
        self._handlers.add(self._spawn(self._handle(message, None), "request"))

    def _keep_alive(self) -> None:
        """Send :class:`Alive` if nothing else went out for the client's interval; re-arm."""
        self._keepalive_timer = None
        if self._ended or self._broken is not None:
            return
        idle = time.monotonic() - self._written_at
        if idle >= self._keepalive:
            try:
                self._write(_ALIVE)
            except _ConnectionGone:
                return
            idle = 0.0
        self._keepalive_timer = asyncio.get_running_loop().call_later(
            self._keepalive - idle, self._keep_alive
        )

    def _in_flight(self) -> int:
        return len(self._handlers) + self._quick

    def _proposed(self, message: Execute, since: float, future: asyncio.Future[Any]) -> None:
        """A write proposed by :meth:`_start` is done: reply with its outcome."""
        self._quick -= 1
        if self._ended:
            return
        if future.cancelled() or future.exception() is not None:
            # No outcome (another leader's entry took its index, a deadline, a stop): the
            # task's full path retries or answers, as for any request.
            self._handlers.add(self._spawn(self._handle(message, future), "request"))
            return
        if framing.TRACE is not None:
            framing.TRACE("s.ret")
        self._backend.node.metrics.proposal_seconds.observe(time.monotonic() - since)
        try:
            reply: Reply = _execute_reply(message.request, future.result())
        except ControlPlaneError as exc:
            reply = error_reply(message.request, exc)
        try:
            self._answer_now(message, reply)
            if self._needs_drain():
                self._handlers.add(self._spawn(self._drain_quietly(), "drain"))
        except _ConnectionGone:
            pass

    def _start(self, message: Execute) -> asyncio.Future[Any] | None:
        """On the leader, propose a valid command at once (in this iteration of the loop, not
        in the next one, where the request's task starts); None if the task should do it all."""
        node = self._backend.node
        if not node.is_leader:
            return None
        try:
            _check_write(message.command)
        except Exception:  # the task finds it again, and answers with the error
            return None
        return node.start_proposal(message.command)

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"client-{what}-{self._peer}")
        task.add_done_callback(self._handlers.discard)
        return task

    # --- sending ------------------------------------------------------------------------------

    def _write(self, message: Reply) -> None:
        """Queue one frame; raises ``FrameTooLargeError`` if it exceeds the frame size.

        Frames queued in one iteration of the event loop go to the transport in one ``write``
        (one send system call for a burst of replies and replicated commands).
        """
        if self._broken is not None:
            raise _ConnectionGone(self._broken)
        frame = encode_message_frame(_ENCODER, message, self._service.max_frame_bytes)
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(frame)
        self._out_bytes += len(frame)
        queued = self._writer.transport.get_write_buffer_size() + self._out_bytes
        if queued > self._service._max_buffer:
            self._fail("the client does not read its replies: its buffer overflowed")

    def _flush(self) -> None:
        out = self._out
        if not out or self._broken is not None or self._writer.transport.is_closing():
            out.clear()
            self._out_bytes = 0
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        self._writer.write(data)
        self._written_at = time.monotonic()
        if framing.TRACE is not None:
            framing.TRACE("s.flush")

    def _needs_drain(self) -> bool:
        transport = self._writer.transport
        queued = transport.get_write_buffer_size() + self._out_bytes
        return queued > self._high_water or transport.is_closing()

    async def _drain(self) -> None:
        """Wait while the transport holds more than its high-water mark (with the write
        timeout); below it there is nothing to wait for, so no timer is armed."""
        if not self._needs_drain():
            return
        self._flush()
        try:
            async with asyncio.timeout(self._service._write_timeout):
                await self._writer.drain()
        except TimeoutError:
            self._fail(f"the client accepted no data for {self._service._write_timeout} s")
        except OSError as exc:
            self._fail(describe_error(exc))

    async def _send(self, message: Reply) -> None:
        self._write(message)
        await self._drain()

    def _fail(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
            self._writer.transport.abort()  # the reader then sees the end of the stream
        raise _ConnectionGone(reason)

    # --- requests -------------------------------------------------------------------------

    async def _handle(self, message: Request, started: asyncio.Future[Any] | None) -> None:
        try:
            try:
                reply = await self._answer(message, started)
            except ControlPlaneError as exc:
                reply = error_reply(message.request, exc)
            except Exception as exc:
                _log.exception("request %r from client %s failed", message, self._client_id)
                reply = ErrorReply(
                    request=message.request,
                    code="internal",
                    message=f"the member failed to serve the request: {type(exc).__name__}: {exc}",
                )
            if reply is None:
                return
            self._answer_now(message, reply, own_task=True)
            await self._drain()
        except _ConnectionGone:
            pass

    async def _drain_quietly(self) -> None:
        with contextlib.suppress(_ConnectionGone):
            await self._drain()

    def _answer_now(self, message: Request, reply: Reply, *, own_task: bool = False) -> None:
        try:
            self._write(reply)
        except FrameTooLargeError as exc:
            self._write(error_reply(message.request, InvalidRequestError(str(exc))))
        if self._in_flight() - own_task == 0:
            # The only request in flight: no other reply can join this write, so do not
            # wait for the next loop iteration (where the loop first polls for I/O).
            self._flush()

    async def _answer(self, message: Request, started: asyncio.Future[Any] | None) -> Reply | None:
        backend = self._backend
        node = backend.node
        match message:
            case Execute(request=rid, command=data):
                if started is None:  # else validated and proposed by _start already
                    _check_write(data)  # nothing invalid reaches the log
                if framing.TRACE is not None:
                    framing.TRACE("s.call")
                # The bytes the client sent, as validated: every replica decodes them alike.
                outcome = await node.propose(data, started=started)
                if framing.TRACE is not None:
                    framing.TRACE("s.ret")
                return _execute_reply(rid, outcome)
            case ReadIndex(request=rid):
                await node.read_index()
                return VersionReply(request=rid, version=self._version())
            case Heartbeat(request=rid, node_id=node_id, min_version=min_version):
                await self._reach(min_version, node.options.request_timeout)
                await backend.heartbeat(node_id)
                return VersionReply(request=rid, version=self._version())
            case Status(request=rid):
                return StatusReply(request=rid, status=self._status())
            case MemberChange(request=rid, kind=kind, member_id=member, peer_address=address):
                try:
                    change = ConfChangeType(kind)
                except ValueError:
                    kinds = ", ".join(k.value for k in ConfChangeType)
                    raise InvalidRequestError(
                        f"unknown membership change {kind!r}; use one of {kinds}"
                    ) from None
                if not node.is_leader:
                    raise NotLeaderError(
                        f"member {node.id} is not the leader: send membership changes to the "
                        f"leader ({node.leader_id or 'none known now'})",
                        leader_id=node.leader_id,
                    )
                await node.change_membership(change, member, address or None)
                return VersionReply(request=rid, version=self._version())
            case TransferLeader(request=rid, to=to):
                await node.transfer_leadership(to)
                return VersionReply(request=rid, version=self._version())
            case SnapshotSave(request=rid):
                await self._send_state(rid, backend.fsm.machine.state)
                return None
            case Subscribe():  # dispatched to _subscription
                raise AssertionError("unreachable")
        raise AssertionError(f"unhandled request {message!r}")

    def _version(self) -> int:
        return self._backend.fsm.machine.state.version

    async def _reach(self, version: int, within: float) -> None:
        """Wait until this member's state reached ``version`` (a client read it elsewhere)."""
        commands = self._backend.fsm.commands
        try:
            async with asyncio.timeout(within):
                while self._version() < version:
                    await commands.wait_beyond(commands.head)
        except TimeoutError:
            raise OperationTimeoutError(
                f"member {self._backend.node.id} has not reached state version {version} "
                f"(it is at {self._version()}); try another member"
            ) from None

    def _status(self) -> MemberStatus:
        node = self._backend.node
        core = node.core
        conf = node.conf
        progress: tuple[PeerProgress, ...] = ()
        last = core.log.last_index() if core is not None else 0
        if core is not None and node.is_leader:
            progress = tuple(
                PeerProgress(
                    member_id=member,
                    match=pr.match,
                    next=pr.next,
                    state=pr.state.value,
                    lag=max(0, last - pr.match),
                )
                for member, pr in sorted(core.tracker.progress.items())
            )
        host, port = self._service.address
        failure = node.failure
        return MemberStatus(
            member_id=node.id,
            cluster_id=node.cluster_id,
            role=node.role,
            leader_id=node.leader_id,
            term=node.term,
            commit_index=node.commit_index,
            applied_index=node.applied_index,
            last_index=last,
            state_version=self._version(),
            voters=tuple(conf.voters),
            learners=tuple(conf.learners),
            client_address=_format_address(host, port),
            progress=progress,
            failure=None if failure is None else f"{type(failure).__name__}: {failure}",
        )

    async def _send_state(self, rid: int, state: ClusterState) -> None:
        data = await asyncio.to_thread(encode_state, state)  # off the loop: it may be large
        chunk = self._service._chunk
        with memoryview(data) as view:
            for start in range(0, max(1, len(data)), chunk):
                part = bytes(view[start : start + chunk])
                last = start + chunk >= len(data)
                await self._send(StateChunk(rid, state.version, part, last))

    # --- the subscription -----------------------------------------------------------------

    async def _subscription(self, sub: Subscribe) -> None:
        self._service.subscriptions += 1
        try:
            await self._stream_commands(sub)
        except _ConnectionGone:
            pass
        except Exception as exc:  # a bug: tell the client, which resubscribes elsewhere
            _log.exception("the replication stream to client %s failed", self._client_id)
            with contextlib.suppress(_ConnectionGone):
                await self._send(
                    ErrorReply(request=sub.request, code="internal", message=f"stream: {exc}")
                )
        finally:
            self._service.subscriptions -= 1

    async def _stream_commands(self, sub: Subscribe) -> None:
        fsm = self._backend.fsm
        commands = fsm.commands
        since = sub.since
        if commands.since(since, limit=0) is None and not sub.snapshot_ok:
            await self._compacted(sub, since)
            return
        await self._send(VersionReply(request=sub.request, version=self._version()))
        while True:
            entries = commands.since(since, limit=_REPLICATE_BATCH)
            if entries is None:
                if not sub.snapshot_ok:
                    await self._compacted(sub, since)
                    return
                state = fsm.machine.state
                await self._send_state(sub.request, state)
                since = state.version
                continue
            if not entries:
                await commands.wait_beyond(since)
                continue
            try:
                if framing.TRACE is not None:
                    framing.TRACE("s.strm")
                for version, command in entries:
                    self._write(Replicate(version=version, command=command))
                    since = version
                    if self._out_bytes > _STREAM_HIGH_WATER:
                        self._flush()
                        await self._drain()
            except FrameTooLargeError:
                # A command larger than a client frame (a huge RestoreState proposed on a
                # member): send the state instead, which comes in chunks.
                state = fsm.machine.state
                await self._send_state(sub.request, state)
                since = state.version
            await self._drain()

    async def _compacted(self, sub: Subscribe, since: int) -> None:
        base = self._backend.fsm.commands.base
        await self._send(
            ErrorReply(
                request=sub.request,
                code="compacted",
                message=f"member {self._backend.node.id} keeps the commands after version "
                f"{base} only, not after {since}",
            )
        )


def _check_write(data: bytes) -> None:
    """Raise ``InvalidRequestError`` unless ``data`` is a valid ``ClientCommand``."""
    command = decode_command(data)
    if not isinstance(command, ClientCommand):
        raise InvalidRequestError(
            f"a client may only execute ClientCommand, not {type(command).__name__}"
        )
    validate(command)


def _execute_reply(request: int, outcome: Any) -> ExecuteReply:
    """The reply to a write: its version and encoded result (raises its domain error)."""
    result = outcome.unwrap()
    return ExecuteReply(request=request, version=result.version, value=result.value)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peername(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return _format_address(str(peer[0]), int(peer[1]))
    return str(peer)
