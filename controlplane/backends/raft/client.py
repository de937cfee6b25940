"""The raft backend of ``ControlPlane`` for a process that is not a member: a network client.

A :class:`RaftClient` keeps an exact replica of the cluster state: it subscribes to the stream
of committed commands of one member (any member: their logs agree) and applies each command to
its own :class:`~controlplane.state.StateMachine`, checking that it produces the version the
member reported. So local reads are microseconds, and watches come out of the client's own
apply with exactly the semantics of a member's watches; after a reconnect (to the same or
another member, across leader changes) the client asks for the commands after its replica's
version, so watches continue without gap or duplicate.

Writes travel as :class:`~controlplane.commands.ClientCommand` with this client's id and a
sequence number: the replicated session table applies each at most once, so the client retries
the same request after a lost connection or a timeout, on any member, and gets the original
result back. A write returns once the client's replica has applied it (read-your-writes).
Consistent reads go through the member's ReadIndex.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import ssl
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import Any

import msgspec

from ... import commands as c
from ...codec import dec_hook, decode_command, decode_state, encode_command
from ...config import TlsConfig, parse_address
from ...errors import (
    ClosedError,
    ControlPlaneError,
    InvalidRequestError,
    NotLeaderError,
    OperationTimeoutError,
    PermissionDeniedError,
    StorageError,
    UnavailableError,
    error_from_code,
)
from ...state import StateMachine
from ...types import (
    BackendHealth,
    ClusterConfig,
    ClusterState,
    EventKind,
    HashRing,
    Index,
    Lock,
    Node,
    ShardRouting,
)
from ...validation import check_holder, check_name
from ...watch import EventStream, WatchHub
from ..base import CommandBackend
from . import framing
from .coretypes import ConfChangeType
from .framing import (
    DEFAULT_MAX_FRAME_SIZE,
    EndOfStream,
    FrameError,
    FrameReader,
    FrameTooLargeError,
    check_max_frame_size,
    close_writer,
    decode_frame,
    describe_error,
    encode_message_frame,
    read_frame,
)
from .tls import client_context
from .transport import ExponentialBackoff
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
    error_from_reply,
)

__all__ = ["RaftClient", "connect"]

_log = logging.getLogger("controlplane.raft.client")
_ENCODER = msgspec.msgpack.Encoder()
_HELLO_DECODER = msgspec.msgpack.Decoder(ServerHello)
_REPLY_DECODER: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)
_ENVELOPE = 64  # bytes an Execute adds around its command (tag, request id, headers)
_THREAD_DECODE = 1024 * 1024  # decode states larger than this off the event loop

# What each command's handler returns (see controlplane.state); the rest return None.
_RESULT_TYPES: dict[type[Any], Any] = {
    c.CreateIndex: Index,
    c.UpdateIndexSettings: Index,
    c.RegisterNode: Node,
    c.UpdateNodeStatus: Node,
    c.AllocateShard: ShardRouting,
    c.DeallocateShard: ShardRouting,
    c.UpdateShardState: ShardRouting,
    c.AcquireLock: Lock,
    c.RenewLock: Lock,
    c.UpdateHashRing: HashRing,
    c.SetClusterConfig: ClusterConfig,
    c.MarkNodesDown: tuple[str, ...],
    c.ExpireLocks: tuple[str, ...],
}
_RESULT_DECODERS: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {
    command: msgspec.msgpack.Decoder(result, dec_hook=dec_hook)
    for command, result in _RESULT_TYPES.items()
}


class _Disconnected(Exception):
    """The connection a request was sent on is gone; the request may be retried elsewhere."""


class _Refused(Exception):
    """A member refused the connection (``error`` says why and which class)."""

    def __init__(self, error: ControlPlaneError) -> None:
        super().__init__(error.message)
        self.error = error


class _StreamEnded(Exception):
    """The subscription on a connection ended; the connection is abandoned."""

    def __init__(self, reason: str, *, compacted: bool = False, diverged: bool = False) -> None:
        super().__init__(reason)
        self.compacted = compacted
        self.diverged = diverged


class _Link:
    """One connection to a member, after a successful hello."""

    _TICK = 0.01
    """Granularity of the per-request deadlines (seconds): requests whose deadlines fall in
    the same tick share one timer, instead of a timer (``asyncio.timeout``) each."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: str,
        hello: ServerHello,
        max_frame: int,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.address = address
        self.hello = hello
        self.max_frame = max_frame
        self.pending: dict[int, asyncio.Future[Reply | None]] = {}
        self.chunks: dict[int, list[bytes]] = {}
        self.subscription = 0
        self.target: int | None = None
        """The member's state version when it accepted the subscription."""
        self.broken: str | None = None
        self._out: list[bytes | bytearray] = []
        """Frames sent in this iteration of the event loop, written together by ``flush``."""
        self._out_bytes = 0
        self._high_water = writer.transport.get_write_buffer_limits()[1]
        self._deadlines: dict[int, list[int]] = {}
        """Request ids by the tick their attempt times out at."""
        self.heard_at = time.monotonic()
        """When the last frame arrived (``time.monotonic()``)."""
        self.watchdog: asyncio.TimerHandle | None = None

    def send(self, message: Request) -> None:
        """Queue ``message``; it is written with the others sent in this loop iteration."""
        if self.broken is not None:
            raise _Disconnected(self.broken)
        frame = encode_message_frame(_ENCODER, message, self.max_frame)
        if not self._out:
            asyncio.get_running_loop().call_soon(self.flush)
        self._out.append(frame)
        self._out_bytes += len(frame)

    def flush(self) -> None:
        """Write the queued frames now (in one ``write``)."""
        out = self._out
        if out and self.broken is None and not self.writer.transport.is_closing():
            self.writer.write(out[0] if len(out) == 1 else b"".join(out))
            if framing.TRACE is not None:
                framing.TRACE("c.flush")
        out.clear()
        self._out_bytes = 0

    async def call(self, message: Request, within: float) -> Reply:
        """Send ``message`` and wait for its reply; ``_Disconnected`` if the link breaks,
        ``TimeoutError`` when no reply came within ``within`` seconds (to about 10 ms).

        Nothing waits for the socket to drain: the frames in flight are bounded by the
        client's ``max_in_flight``, and a member that reads nothing makes the reply late (the
        caller then breaks the link)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply | None] = loop.create_future()
        rid = message.request
        self.pending[rid] = future
        tick = math.ceil((loop.time() + within) / self._TICK)
        due = self._deadlines.get(tick)
        if due is None:
            due = self._deadlines[tick] = []
            loop.call_at(tick * self._TICK, self._expire, tick)
        due.append(rid)
        try:
            self.send(message)
            if self._out_bytes > self._high_water or len(self.pending) == 1:
                # A burst of large requests, or the only request in flight (no other can
                # join its write): to the transport now, not in the next loop iteration.
                self.flush()
            reply = await future
        finally:
            self.pending.pop(rid, None)
            self.chunks.pop(rid, None)
        if reply is None:
            raise _Disconnected(self.broken or "the connection was closed")
        return reply

    def _expire(self, tick: int) -> None:
        for rid in self._deadlines.pop(tick, ()):
            future = self.pending.get(rid)
            if future is not None and not future.done():
                future.set_exception(TimeoutError())

    def resolve(self, request: int, reply: Reply) -> None:
        future = self.pending.get(request)
        if future is not None and not future.done():
            future.set_result(reply)

    def abort(self, reason: str) -> None:
        """Break the link: pending calls end with ``_Disconnected``; idempotent."""
        if self.broken is not None:
            return
        self.broken = reason
        self._out.clear()
        self._out_bytes = 0
        self.writer.transport.abort()
        for future in self.pending.values():
            if not future.done():
                future.set_result(None)  # a value, not an exception: nobody may be waiting


class RaftClient(CommandBackend):
    """``ControlPlane`` over the network, for processes that are not Raft members.

    ``addresses`` are the members' client addresses (``host:port``); the client talks to one
    at a time and moves to the next when it fails (backoff with jitter). ``cluster_id`` must
    match the members'. Mutual TLS: ``tls`` (certificate, key and CA files) or a ready
    ``ssl_context``.

    Guarantees:

    * Every write is applied at most once, however often it is retried; it is retried (same
      request, any member) after lost connections and member timeouts until
      ``request_timeout`` seconds passed. A write that returns was applied exactly once, and
      the client's own reads already see it. ``OperationTimeoutError`` means "may or may not
      have taken effect".
    * ``get_cluster_state()`` reads the client's replica (no I/O); ``consistent=True`` is
      linearizable (ReadIndex on a member, then the replica catches up to it).
    * ``watch(since=v)`` has the memory/raft semantics (every event after ``v``, in order,
      exactly once), continuing across reconnects and leader changes. If the client had to
      rebuild its replica from a member's snapshot (it fell behind every member's history),
      watches behind it end with ``CompactedError``, as on a member that installs a snapshot.

    ``keepalive``: the member sends a frame at least this often (seconds); a member silent for
    ``keepalive_timeout`` seconds is taken for hung (stopped, frozen, or behind a network that
    drops its frames though the connection looks open) and the client moves to another one:
    pending requests are retried there, watches resume there. 0 turns both off (the
    ``attempt_timeout`` of each request still applies).

    ``replica=False`` makes a write-only client, for processes that only write (a load
    generator, a job that registers nodes): it subscribes to nothing and keeps no replica, so
    it costs neither the member a stream of every command nor itself an apply of every
    command. It gives up local reads, ``consistent=True`` reads and watches (they raise
    ``InvalidRequestError``) and read-your-writes through its own state: a write returns when
    the member answered it (the write was committed and applied there), not when a local
    replica applied it. Writes keep their at-most-once retries and their results.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        cluster_id: str = "controlplane",
        tls: TlsConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] | None = None,
        client_id: str | None = None,
        watch_retention: int = 10_000,
        request_timeout: float = 30.0,
        attempt_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        keepalive: float = 0.5,
        keepalive_timeout: float = 2.0,
        start_timeout: float | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_SIZE,
        max_in_flight: int = 1024,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        replica: bool = True,
    ) -> None:
        super().__init__(clock)
        if not addresses:
            raise InvalidRequestError("give the client address of at least one member")
        self._addresses = list(addresses)
        self._endpoints = {a: parse_address(a) for a in self._addresses}
        self.cluster_id = cluster_id
        self.client_id = client_id or uuid.uuid4().hex
        check_holder(self.client_id)
        if ssl_context is None and tls is not None:
            ssl_context = client_context(tls)
        self._ssl = ssl_context
        self._retention = watch_retention
        self._request_timeout = request_timeout
        self._attempt_timeout = attempt_timeout
        self._connect_timeout = connect_timeout
        if keepalive and not MIN_KEEPALIVE <= keepalive < keepalive_timeout:
            raise InvalidRequestError(
                f"keepalive must be 0 or at least {MIN_KEEPALIVE} s and less than "
                f"keepalive_timeout ({keepalive_timeout}), got {keepalive}"
            )
        self._keepalive = keepalive
        self._keepalive_timeout = keepalive_timeout if keepalive else 0.0
        self._start_timeout = request_timeout if start_timeout is None else start_timeout
        self._max_frame = check_max_frame_size(max_frame_bytes)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._backoff = (backoff_initial, backoff_max)
        self._replica = replica
        self._known = 0
        """Without a replica: the highest state version a member reported to this client."""
        self._machine = StateMachine()
        self._hub = WatchHub(watch_retention)
        self._link: _Link | None = None
        self._ready = False
        self._resync = False
        self._compacted: set[str] = set()
        self._refusals: dict[str, ControlPlaneError] = {}
        self._errors: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._seq = 0
        self._acked = 0
        self._finished: set[int] = set()
        self._changed = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False
        self._opened: weakref.WeakSet[asyncio.StreamWriter] = weakref.WeakSet()

    # --- what the client is connected to ------------------------------------------------------

    @property
    def member_id(self) -> str | None:
        """The member this client is connected to now (None while reconnecting)."""
        link = self._link
        return link.hello.member_id if link is not None and link.broken is None else None

    @property
    def member_address(self) -> str | None:
        """The address of that member."""
        link = self._link
        return link.address if link is not None and link.broken is None else None

    @property
    def version(self) -> int:
        """The version of the client's replica (without one: the latest a member reported)."""
        return self._machine.state.version if self._replica else self._known

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, subscribe and wait until the replica is current.

        Raises ``PermissionDeniedError`` when every member refuses this client (wrong cluster
        id, refused TLS certificate), ``UnavailableError`` when no member could be reached
        within ``start_timeout``.
        """
        if self._stopped:
            raise ClosedError("this RaftClient was stopped; create a new one")
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._maintain(), name=f"raft-client-{self.client_id}")
        deadline = loop.time() + self._start_timeout
        try:
            while True:
                changed = self._changed
                if self._ready:
                    return
                if len(self._refusals) == len(self._addresses):
                    raise self._refused_by_all()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise UnavailableError(
                        f"no member of {self._addresses} could be reached within "
                        f"{self._start_timeout} s: {self._describe_errors()}"
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await changed.wait()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close the connection and end every watch (``ClosedError``); idempotent.

        Writes still waiting fail with ``ClosedError``.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._hub.close()
        self._notify()
        self._advance()
        for writer in list(self._opened):  # whatever a cancelled task left open
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def health(self) -> BackendHealth:
        """Healthy while connected to a member and the replica is subscribed."""
        link = self._link
        healthy = self._ready and link is not None and link.broken is None and not self._stopped
        if link is not None and link.broken is None:
            detail = f"client {self.client_id} connected to member {link.hello.member_id} at "
            detail += link.address
        elif self._stopped:
            detail = "stopped"
        else:
            detail = f"not connected: {self._describe_errors()}"
        return BackendHealth(
            healthy=healthy,
            backend="raft-client",
            role="client",
            leader=link.hello.leader_id if link is not None else None,
            version=self.version,
            detail=detail,
        )

    # --- the CommandBackend primitives -------------------------------------------------------

    async def _execute(self, command: c.Command) -> Any:
        if framing.TRACE is not None:
            framing.TRACE("c.start")
        self._check_open()
        deadline = asyncio.get_running_loop().time() + self._request_timeout
        async with self._slots:
            self._seq += 1
            seq = self._seq
            try:
                acked, data = self._acked, self._wrap(seq, command)
                if len(data) + _ENVELOPE > self._max_frame:
                    raise InvalidRequestError(
                        f"the {type(command).__name__} command is larger than the maximum "
                        f"frame size of {self._max_frame} bytes"
                    )

                def make(rid: int) -> Execute:
                    nonlocal acked, data
                    if acked != self._acked:  # a retry: acknowledge what is known now
                        acked, data = self._acked, self._wrap(seq, command)
                    return Execute(request=rid, command=data)

                reply = await self._call(make, deadline)
            finally:
                self._finish(seq)
        if not isinstance(reply, ExecuteReply):
            raise _unexpected(reply)
        if framing.TRACE is not None:
            framing.TRACE("c.reply")
        await self._reach(reply.version, deadline)
        if framing.TRACE is not None:
            framing.TRACE("c.done")
        decoder = _RESULT_DECODERS.get(type(command))
        return None if decoder is None else decoder.decode(reply.value)

    def _wrap(self, seq: int, command: c.Command) -> bytes:
        # ``ack`` is read at each attempt: it may have advanced since the first one.
        return encode_command(
            c.ClientCommand(
                client_id=self.client_id,
                seq=seq,
                command=command,
                ack=self._acked,
                time=command.time,
            )
        )

    def _finish(self, seq: int) -> None:
        """``seq`` will not be sent again: acknowledge every request up to the first gap."""
        self._finished.add(seq)
        while self._acked + 1 in self._finished:
            self._acked += 1
            self._finished.discard(self._acked)

    def _local_state(self) -> ClusterState:
        self._check_replica("read the cluster state")
        return self._machine.state

    async def _linearizable_state(self) -> ClusterState:
        self._check_open()
        self._check_replica("read the cluster state")
        deadline = asyncio.get_running_loop().time() + self._request_timeout
        reply = await self._call(lambda rid: ReadIndex(request=rid), deadline)
        if not isinstance(reply, VersionReply):
            raise _unexpected(reply)
        await self._reach(reply.version, deadline)
        return self._machine.state

    async def heartbeat(self, node_id: str) -> None:
        """Report ``node_id`` alive to the leader; a DOWN node is brought back ACTIVE."""
        self._check_open()
        check_name("node", node_id)
        deadline = asyncio.get_running_loop().time() + self._request_timeout
        reply = await self._call(
            lambda rid: Heartbeat(request=rid, node_id=node_id, min_version=self.version),
            deadline,
        )
        if not isinstance(reply, VersionReply):
            raise _unexpected(reply)
        await self._reach(reply.version, deadline)

    def watch(
        self, since: int | None = None, kinds: Collection[EventKind] | None = None
    ) -> EventStream:
        """Events with version > ``since``, in order, exactly once, across reconnects."""
        self._check_replica("watch")
        return self._hub.watch(since, kinds)

    # --- operations (for the CLI) --------------------------------------------------------------

    async def status(self) -> MemberStatus:
        """The Raft status of the member this client is connected to."""
        self._check_open()
        deadline = asyncio.get_running_loop().time() + self._request_timeout
        reply = await self._call(lambda rid: Status(request=rid), deadline)
        if not isinstance(reply, StatusReply):
            raise _unexpected(reply)
        return reply.status

    async def statuses(self) -> dict[str, MemberStatus | ControlPlaneError]:
        """The status of every member address, or the error that address gave."""
        self._check_open()
        deadline = asyncio.get_running_loop().time() + self._request_timeout
        out: dict[str, MemberStatus | ControlPlaneError] = {}
        for address in self._addresses:
            try:
                reply = await self._one_off(address, lambda rid: Status(request=rid), deadline)
            except ControlPlaneError as exc:
                out[address] = exc
                continue
            out[address] = reply.status if isinstance(reply, StatusReply) else _unexpected(reply)
        return out

    async def member_add(self, member_id: str, peer_address: str, *, voter: bool = False) -> None:
        """Add a member (a non-voting learner unless ``voter``) listening for peers at
        ``peer_address``. Sent to the leader; not retried (it may or may not have happened
        when the connection breaks)."""
        parse_address(peer_address)
        kind = ConfChangeType.ADD_VOTER if voter else ConfChangeType.ADD_LEARNER
        await self._on_leader(
            lambda rid: MemberChange(
                request=rid, kind=kind.value, member_id=member_id, peer_address=peer_address
            )
        )

    async def member_promote(self, member_id: str) -> None:
        """Make a caught-up learner a voter (on the leader)."""
        await self._on_leader(
            lambda rid: MemberChange(
                request=rid, kind=ConfChangeType.PROMOTE_LEARNER.value, member_id=member_id
            )
        )

    async def member_remove(self, member_id: str) -> None:
        """Remove a member from the cluster (on the leader)."""
        await self._on_leader(
            lambda rid: MemberChange(
                request=rid, kind=ConfChangeType.REMOVE.value, member_id=member_id
            )
        )

    async def transfer_leader(self, to: str | None = None) -> None:
        """Move leadership to ``to`` (default: the most caught-up voter); returns once moved."""
        await self._on_leader(lambda rid: TransferLeader(request=rid, to=to))

    async def snapshot_save(self) -> bytes:
        """The connected member's whole state, encoded as a snapshot (``decode_state``)."""
        self._check_open()
        deadline = asyncio.get_running_loop().time() + self._request_timeout
        reply = await self._call(lambda rid: SnapshotSave(request=rid), deadline)
        if not isinstance(reply, StateChunk):
            raise _unexpected(reply)
        return reply.data

    async def restore(self, snapshot: bytes) -> None:
        """Replace the whole state with a snapshot from :meth:`snapshot_save` (applied once)."""
        await self.restore_state(decode_state(snapshot))

    # --- requests ---------------------------------------------------------------------------

    async def _call(
        self, make: Callable[[int], Request], deadline: float, *, retry: bool = True
    ) -> Reply:
        """Send a request until it gets an answer other than "unavailable" (with ``retry``).

        An unavailable member, a lost connection or a missing answer moves the client to
        another member and the request is sent again there.
        """
        loop = asyncio.get_running_loop()
        while True:
            link = await self._connected(deadline)
            remaining = deadline - loop.time()
            try:
                reply = await link.call(
                    make(next(self._ids)), max(0.0, min(remaining, self._attempt_timeout))
                )
            except _Disconnected as exc:
                if not retry:
                    raise UnavailableError(
                        f"the connection to member {link.hello.member_id} was lost ({exc}); "
                        "the request may or may not have taken effect"
                    ) from None
                continue
            except FrameTooLargeError as exc:
                raise InvalidRequestError(str(exc)) from None
            except TimeoutError:
                link.abort(f"no answer within {min(remaining, self._attempt_timeout):.1f} s")
                if not retry or loop.time() >= deadline:
                    raise OperationTimeoutError(
                        f"no answer from member {link.hello.member_id} in time; the request "
                        "may or may not have taken effect"
                    ) from None
                continue
            if isinstance(reply, ErrorReply):
                error = error_from_reply(reply)
                # Safe to send again (the session applies a write once), and likely to work on
                # another member: the member was busy, stopping, or failed.
                retryable = isinstance(error, UnavailableError | ClosedError | StorageError)
                retry_here = retry and retryable and not isinstance(error, NotLeaderError)
                if retry_here and loop.time() < deadline:
                    link.abort(f"member {link.hello.member_id} answered: {error.message}")
                    continue
                raise error
            return reply

    async def _connected(self, deadline: float) -> _Link:
        loop = asyncio.get_running_loop()
        while True:
            self._check_open()
            changed = self._changed
            link = self._link
            if link is not None and link.broken is None:
                return link
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise UnavailableError(
                    f"no member of {self._addresses} is reachable: {self._describe_errors()}"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()

    async def _reach(self, version: int, deadline: float) -> None:
        """Wait until the replica has applied ``version`` (read-your-writes)."""
        if not self._replica:
            self._known = max(self._known, version)
            return
        loop = asyncio.get_running_loop()
        while self._machine.state.version < version:
            self._check_open()
            progress = self._progress
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise OperationTimeoutError(
                    f"the request completed at version {version}, but this client's replica "
                    f"is still at version {self._machine.state.version}"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await progress.wait()

    async def _on_leader(self, make: Callable[[int], Request]) -> None:
        """Send an operation that only the leader performs: to the connected member, then to
        the others in turn while they answer "not the leader"."""
        self._check_open()
        deadline = asyncio.get_running_loop().time() + self._request_timeout
        try:
            reply = await self._call(make, deadline, retry=False)
        except NotLeaderError as exc:
            refusal = exc
        else:
            if not isinstance(reply, VersionReply):
                raise _unexpected(reply)
            return
        tried = {self.member_address or ""}
        for address in self._addresses:
            if address in tried:
                continue
            try:
                reply = await self._one_off(address, make, deadline)
            except NotLeaderError:
                continue
            except UnavailableError as exc:
                if isinstance(exc, OperationTimeoutError):
                    raise
                _log.info("cannot send the operation to %s: %s", address, exc)
                continue
            if not isinstance(reply, VersionReply):
                raise _unexpected(reply)
            return
        raise NotLeaderError(
            f"no member reachable from this client leads ({refusal.message})",
            leader_id=refusal.leader_id,
        )

    async def _one_off(
        self, address: str, make: Callable[[int], Request], deadline: float
    ) -> Reply:
        """Send one request on a connection of its own to ``address``; raise its error."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                link = await self._connect(address, keepalive=False)
                try:
                    rid = next(self._ids)
                    link.send(make(rid))
                    link.flush()
                    await link.writer.drain()
                    frames = FrameReader(link.reader, self._max_frame)
                    chunks: list[bytes] = []
                    while True:
                        message = decode_frame(_REPLY_DECODER, await frames.read_frame())
                        if isinstance(message, Replicate | Alive) or message.request != rid:
                            continue
                        if isinstance(message, StateChunk) and not message.last:
                            chunks.append(message.data)
                            continue
                        if isinstance(message, StateChunk):
                            data = b"".join([*chunks, message.data])
                            return StateChunk(rid, message.version, data, True)
                        if isinstance(message, ErrorReply):
                            raise error_from_reply(message)
                        return message
                finally:
                    link.abort("done")
                    await close_writer(link.writer)
        except _Refused as exc:
            raise exc.error from None
        except TimeoutError:
            raise OperationTimeoutError(f"member at {address} did not answer in time") from None
        except (OSError, EOFError, FrameError) as exc:
            raise UnavailableError(f"member at {address}: {describe_error(exc)}") from None

    # --- the connection ----------------------------------------------------------------------

    async def _connect(self, address: str, *, keepalive: bool = True) -> _Link:
        host, port = self._endpoints[address]
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(host, port, ssl=self._ssl)
                self._opened.add(writer)
                hello = ClientHello(
                    protocol=PROTOCOL_NAME,
                    version=PROTOCOL_VERSION,
                    cluster_id=self.cluster_id,
                    client_id=self.client_id,
                    keepalive=self._keepalive if keepalive else 0.0,
                )
                writer.write(encode_message_frame(_ENCODER, hello, HELLO_MAX_SIZE))
                await writer.drain()
                reply = decode_frame(_HELLO_DECODER, await read_frame(reader, HELLO_MAX_SIZE))
        except ssl.SSLError as exc:
            if writer is not None:
                writer.transport.abort()
            raise _Refused(
                PermissionDeniedError(
                    f"TLS with the member at {address} failed: {describe_error(exc)}; check the "
                    "client's certificate, key and CA"
                )
            ) from None
        except (EndOfStream, ConnectionResetError) as exc:
            if writer is not None:
                writer.transport.abort()
            if self._ssl is not None:  # TLS 1.3: a refused certificate shows only now
                raise _Refused(
                    PermissionDeniedError(
                        f"the member at {address} closed the TLS connection without answering "
                        "the hello: it most likely refused this client's certificate; check "
                        "the client's certificate, key and CA"
                    )
                ) from None
            raise EndOfStream(
                f"the member at {address} closed the connection before answering the hello "
                f"({describe_error(exc)}); is it stopping, or does it require TLS?"
            ) from None
        except BaseException:
            if writer is not None:
                writer.transport.abort()
            raise
        if not reply.ok:
            await close_writer(writer)
            error = error_from_code(reply.code or "unavailable", reply.reason)
            raise _Refused(
                type(error)(
                    f"member {reply.member_id or address} refused the connection: {reply.reason}"
                )
            )
        return _Link(reader, writer, address, reply, self._max_frame)

    async def _maintain(self) -> None:
        """Keep one subscribed connection to a member, moving on when it fails."""
        backoff = ExponentialBackoff(*self._backoff)
        position = random.randrange(len(self._addresses))  # spread clients over the members
        while True:
            address = self._addresses[position % len(self._addresses)]
            position += 1
            try:
                link = await self._connect(address)
            except _Refused as exc:
                self._refusals[address] = exc.error
                self._note(address, exc.error.message)
            except (OSError, TimeoutError, EOFError, FrameError) as exc:
                self._note(address, describe_error(exc))
            else:
                self._refusals.pop(address, None)
                try:
                    if await self._use(link):
                        backoff.reset()
                except Exception:  # a bug: keep the client alive, start afresh
                    _log.exception(
                        "client %s: the connection to %s failed", self.client_id, address
                    )
                    self._resync = True
            await asyncio.sleep(backoff.next())

    async def _use(self, link: _Link) -> bool:
        """Subscribe on ``link`` and apply its stream until it breaks; True if it got ready."""
        state = self._machine.state
        snapshot_ok = (
            self._resync or state.version == 0 or len(self._compacted) >= len(self._addresses)
        )
        link.subscription = next(self._ids)
        since = -1 if self._resync else state.version
        reason = "the connection was closed"
        was_ready = False
        try:
            if self._replica:
                link.send(
                    Subscribe(request=link.subscription, since=since, snapshot_ok=snapshot_ok)
                )
            else:
                link.target = 0  # nothing to catch up with: ready once connected
            self._link = link
            self._notify()
            self._check_ready(link)
            if self._keepalive_timeout and link.hello.keepalive:  # else an older member
                self._watch_link(link)
            _log.info(
                "client %s connected to member %s at %s",
                self.client_id,
                link.hello.member_id,
                link.address,
            )
            await self._pump(link)
        except _StreamEnded as exc:
            reason = str(exc)
            if exc.compacted:
                self._compacted.add(link.address)
            if exc.diverged:
                self._resync = True
                _log.error("client %s: %s; rebuilding the replica", self.client_id, exc)
        except EndOfStream:
            reason = "the member closed the connection"
        except (OSError, EOFError, FrameError, _Disconnected) as exc:
            reason = describe_error(exc)
        finally:
            if link.watchdog is not None:
                link.watchdog.cancel()
            was_ready = link.target is not None
            link.abort(reason)
            reason = link.broken or reason  # ours, if we broke it (the member saw no fault)
            if self._link is link:
                self._link = None
                self._ready = False
                self._notify()
            await close_writer(link.writer)
        if not self._stopped:
            self._note(link.address, reason)
            _log.info(
                "client %s: connection to member %s at %s ended: %s",
                self.client_id,
                link.hello.member_id,
                link.address,
                reason,
            )
        return was_ready

    def _watch_link(self, link: _Link, confirm: bool = False) -> None:
        """Break ``link`` once its member has been silent for ``keepalive_timeout``."""
        link.watchdog = None
        loop = asyncio.get_running_loop()
        silent = time.monotonic() - link.heard_at
        if silent < self._keepalive_timeout:
            link.watchdog = loop.call_later(
                self._keepalive_timeout - silent, self._watch_link, link
            )
        elif not confirm:
            # Look again once the loop has polled the socket: if this process was the one
            # that stalled, the frames that came meanwhile are read first.
            link.watchdog = loop.call_later(self._keepalive, self._watch_link, link, True)
        else:
            link.abort(
                f"nothing from member {link.hello.member_id} for {silent:.1f} s (keep-alives "
                f"every {self._keepalive} s were asked for): it hangs, or the network drops "
                "its frames"
            )

    async def _pump(self, link: _Link) -> None:
        frames = FrameReader(link.reader, self._max_frame)
        while True:
            batch = await frames.read_frames()
            link.heard_at = time.monotonic()
            if framing.TRACE is not None:
                framing.TRACE("c.read", len(batch))
            before = self._machine.state.version
            for payload in batch:
                message = decode_frame(_REPLY_DECODER, payload)
                if isinstance(message, Replicate):  # most frames: no coroutine for them
                    self._apply(message.version, message.command)
                elif not isinstance(message, Alive):
                    await self._receive(link, message)
            if self._machine.state.version != before:
                self._advance()
                self._check_ready(link)

    async def _receive(self, link: _Link, message: Reply) -> None:
        if isinstance(message, Replicate):
            self._apply(message.version, message.command)
            return
        if isinstance(message, Alive):
            return
        rid = message.request
        if isinstance(message, StateChunk):
            if rid != link.subscription and rid not in link.pending:
                return  # the caller gave up
            chunks = link.chunks.setdefault(rid, [])
            chunks.append(message.data)
            if message.last:
                del link.chunks[rid]
                data = b"".join(chunks)
                if rid == link.subscription:
                    await self._install(message.version, data)
                    self._check_ready(link)
                else:
                    link.resolve(rid, StateChunk(rid, message.version, data, True))
            return
        if rid == link.subscription:
            if isinstance(message, VersionReply):
                link.target = message.version
                self._compacted.clear()
                self._check_ready(link)
                return
            if isinstance(message, ErrorReply):
                raise _StreamEnded(
                    f"the member ended the subscription: {message.message}",
                    compacted=message.code == "compacted",
                )
        if rid == 0 and isinstance(message, ErrorReply):
            _log.warning("member %s: %s", link.hello.member_id, message.message)
            return
        link.resolve(rid, message)

    def _apply(self, version: int, data: bytes) -> None:
        try:
            command = decode_command(data)
        except InvalidRequestError as exc:
            raise _StreamEnded(
                f"the command of version {version} is undecodable: {exc}", diverged=True
            ) from None
        outcome = self._machine.apply(command)
        if outcome.version != version or not outcome.events:
            raise _StreamEnded(
                f"the replica diverged: applying the command of version {version} produced "
                f"version {outcome.version}",
                diverged=True,
            )
        self._hub.publish(version, outcome.events)

    async def _install(self, version: int, data: bytes) -> None:
        if len(data) > _THREAD_DECODE:
            state = await asyncio.to_thread(decode_state, data)
        else:
            state = decode_state(data)
        if state.version != version:
            raise _StreamEnded(
                f"the member sent a state of version {state.version} as version {version}",
                diverged=True,
            )
        _log.info("client %s: replica replaced by the state at version %d", self.client_id, version)
        self._machine = StateMachine(state)
        if version >= self._hub.head:
            self._hub.reset(version)
        else:  # only after a divergence: the replica went back; its watches cannot go on
            old, self._hub = self._hub, WatchHub(self._retention, version=version)
            old.close("this client's replica was rebuilt from a member's state; watch again")
        self._resync = False
        self._advance()

    def _check_ready(self, link: _Link) -> None:
        if (
            not self._ready
            and self._link is link
            and link.target is not None
            and self._machine.state.version >= link.target
        ):
            self._ready = True
            self._notify()

    # --- small helpers -------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _advance(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _note(self, address: str, reason: str) -> None:
        self._errors[address] = reason
        self._notify()

    def _describe_errors(self) -> str:
        if not self._errors:
            return "no attempt finished yet"
        return "; ".join(f"{a}: {e}" for a, e in self._errors.items())

    def _refused_by_all(self) -> ControlPlaneError:
        first = next(iter(self._refusals.values()))
        detail = "; ".join(f"{a}: {e.message}" for a, e in self._refusals.items())
        return type(first)(f"every member refused this client: {detail}")

    def _check_replica(self, what: str) -> None:
        if not self._replica:
            raise InvalidRequestError(
                f"this RaftClient keeps no replica (replica=False): it cannot {what}; "
                "use a client with a replica"
            )

    def _check_open(self) -> None:
        if self._stopped:
            raise ClosedError("this RaftClient was stopped")


async def connect(
    addresses: Sequence[str],
    *,
    cluster_id: str = "controlplane",
    tls: TlsConfig | None = None,
    **options: Any,
) -> RaftClient:
    """A started :class:`RaftClient` of the members at ``addresses`` (see its options)."""
    client = RaftClient(addresses, cluster_id=cluster_id, tls=tls, **options)
    await client.start()
    return client


def _unexpected(reply: Reply) -> ControlPlaneError:
    return ControlPlaneError(f"unexpected reply from the member: {type(reply).__name__}")
