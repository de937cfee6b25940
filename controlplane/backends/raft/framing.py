"""Length-prefixed frames over asyncio streams.

A frame is a 4-byte big-endian unsigned length followed by exactly that many payload bytes. The
payload is opaque here (bytes in, bytes out); decoding it into a typed message is the caller's
choice, helped by :func:`decode_frame` and :class:`FramedStream`, which translate ``msgspec``
errors into :class:`FrameDecodeError` so callers only ever handle this module's errors.

Every reader enforces a maximum frame size *before* reading a payload, so a hostile length
prefix costs nothing. After any :class:`FrameError` the stream is out of sync and must be closed.

Used by the Raft peer transport and by the client/server API; it knows nothing of either.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import struct
import time
from collections import deque
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar

import msgspec

from controlplane.errors import ControlPlaneError

__all__ = (
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "MAX_FRAME_SIZE_LIMIT",
    "EndOfStream",
    "FrameDecodeError",
    "FrameError",
    "FrameReader",
    "FrameTooLargeError",
    "FramedStream",
    "TruncatedFrameError",
    "check_max_frame_size",
    "decode_frame",
    "encode_frame",
    "encode_message_frame",
    "read_frame",
    "write_frames",
)

HEADER_SIZE = 4
"""Size of the length prefix in bytes."""
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
"""Default maximum payload size (16 MiB)."""
MAX_FRAME_SIZE_LIMIT = 2**32 - 1
"""The largest payload a 4-byte length prefix can describe."""

_HEADER = struct.Struct(">I")
_DEFAULT_READ_SIZE = 256 * 1024
_MAX_REASON = 200  # decode errors may echo hostile input; keep log lines short

T = TypeVar("T")
RecvT = TypeVar("RecvT")
SendT = TypeVar("SendT")


class FrameError(ControlPlaneError):
    """Raised when a stream violates the framing protocol; the stream must then be closed."""


class FrameTooLargeError(FrameError):
    """Raised when a frame's length exceeds the maximum frame size (on read or on write)."""

    def __init__(self, size: int, max_size: int) -> None:
        super().__init__(
            f"frame of {size} bytes exceeds the maximum frame size of {max_size} bytes"
        )
        self.size = size
        self.max_size = max_size


class TruncatedFrameError(FrameError):
    """Raised when the stream ends inside a frame (in its length prefix or its payload)."""

    def __init__(self, expected: int, received: int) -> None:
        super().__init__(
            f"stream ended inside a frame: got {received} of {expected} bytes "
            "(header included; the expected size is a lower bound if the header was cut)"
        )
        self.expected = expected
        self.received = received


class FrameDecodeError(FrameError):
    """Raised when a well-framed payload does not decode to the expected message type.

    Covers malformed encodings, schema mismatches and unknown union tags alike.
    """


class EndOfStream(EOFError):  # named after the event, like anyio.EndOfStream
    """Raised when the stream ends cleanly at a frame boundary: the peer closed its side.

    Not a :class:`FrameError`: it is the normal way a framed conversation ends.
    """


def check_max_frame_size(max_size: int) -> int:
    """Return ``max_size`` if it is a usable maximum payload size, else raise ``ValueError``."""
    if not 0 < max_size <= MAX_FRAME_SIZE_LIMIT:
        raise ValueError(f"max frame size must be in 1..{MAX_FRAME_SIZE_LIMIT}, got {max_size}")
    return max_size


# --------------------------------------------------------------------------- tracing


class _Tracer:
    """Latency tracing for diagnosis, off unless ``CONTROLPLANE_TRACE`` names a directory.

    Call sites test ``TRACE is not None`` first, so tracing costs one global lookup when off.
    Each process appends ``name key monotonic_ns`` lines to ``<dir>/trace.<pid>``, 64 lines at
    a time and at exit (``CLOCK_MONOTONIC`` is the same clock in every process of the machine,
    so the files of a cluster's processes and of its clients line up).

    Events (``key``: the last entry index of a Ready, or 0): ``n.prop``/``n.res`` a local
    proposal called/returned, ``n.idx`` it got its index, ``n.wake`` the node loop woke,
    ``n.rd`` a Ready with entries, ``n.early`` its early messages sent, ``n.t0``/``n.t1`` the
    storage thread's write+fsync start/end (key: ``index ns``), ``n.p1`` the loop resumed
    after it, ``n.sent`` the Ready's messages sent, ``n.apply`` committed entries applied,
    ``n.adv`` advance, ``n.rAppend``/``n.rResp`` an Append with entries/an AppendResponse
    received; service: ``s.recv`` a request frame, ``s.call``/``s.ret`` around the proposal,
    ``s.strm`` replicated commands queued, ``s.flush`` a write to a client; client:
    ``c.start``, ``c.flush``, ``c.read`` (key: frames), ``c.reply``, ``c.done`` of a write.
    """

    __slots__ = ("_file", "_lines")

    def __init__(self, directory: str) -> None:
        self._file = open(  # noqa: SIM115 - lives as long as the process
            os.path.join(directory, f"trace.{os.getpid()}"), "a", encoding="ascii"
        )
        self._lines: list[str] = []
        atexit.register(self.flush)

    def __call__(self, name: str, key: object = 0) -> None:
        self._lines.append(f"{name} {key} {time.monotonic_ns()}\n")
        if len(self._lines) >= 64:
            self.flush()

    def flush(self) -> None:
        self._file.writelines(self._lines)
        self._lines.clear()
        self._file.flush()


_trace_dir = os.environ.get("CONTROLPLANE_TRACE")
TRACE: _Tracer | None = _Tracer(_trace_dir) if _trace_dir else None
"""The tracer when ``CONTROLPLANE_TRACE`` is set, else None."""


# --------------------------------------------------------------------------- reading


async def read_frame(reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Read exactly one frame and return its payload.

    Reads no byte beyond the frame, so another reader (e.g. :class:`FrameReader`) can take
    over the stream afterwards.

    Raises :class:`EndOfStream` on a clean end, :class:`TruncatedFrameError` on an end inside
    the frame, :class:`FrameTooLargeError` before reading an oversized payload; ``OSError``
    from the connection itself propagates unchanged.
    """
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EndOfStream from None
        raise TruncatedFrameError(HEADER_SIZE, len(exc.partial)) from None
    (size,) = _HEADER.unpack(header)
    if size > max_size:
        raise FrameTooLargeError(size, max_size)
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise TruncatedFrameError(HEADER_SIZE + size, HEADER_SIZE + len(exc.partial)) from None


class FrameReader:
    """A buffered frame parser: one ``read()`` on the stream yields every frame it completed.

    This is the fast path for a busy connection: no per-frame await when frames arrive in
    bursts. Errors are those of :func:`read_frame`; complete frames buffered before a bad
    frame are returned first, the error is raised by the next call.
    """

    __slots__ = ("_buf", "_max_size", "_read_size", "_reader", "_ready")

    def __init__(
        self,
        reader: asyncio.StreamReader,
        max_size: int = DEFAULT_MAX_FRAME_SIZE,
        *,
        read_size: int = _DEFAULT_READ_SIZE,
    ) -> None:
        self._reader = reader
        self._max_size = check_max_frame_size(max_size)
        self._read_size = read_size
        self._buf = bytearray()
        self._ready: deque[bytes] = deque()

    async def read_frames(self) -> list[bytes]:
        """Wait for at least one complete frame; return all complete frames buffered, in order."""
        if self._ready:
            frames = list(self._ready)
            self._ready.clear()
            return frames
        while True:
            frames = self._parse()
            if frames:
                return frames
            data = await self._reader.read(self._read_size)
            if not data:
                self._raise_eof()
            self._buf += data

    async def read_frame(self) -> bytes:
        """Return the next frame's payload."""
        if not self._ready:
            self._ready.extend(await self.read_frames())
        return self._ready.popleft()

    def _parse(self) -> list[bytes]:
        buf = self._buf
        end_of_data = len(buf)
        pos = 0
        frames: list[bytes] = []
        with memoryview(buf) as view:
            while end_of_data - pos >= HEADER_SIZE:
                (size,) = _HEADER.unpack_from(view, pos)
                if size > self._max_size:
                    if frames:
                        break  # hand over the good frames first
                    raise FrameTooLargeError(size, self._max_size)
                end = pos + HEADER_SIZE + size
                if end > end_of_data:
                    break
                frames.append(bytes(view[pos + HEADER_SIZE : end]))
                pos = end
        if pos:
            del buf[:pos]
        return frames

    def _raise_eof(self) -> None:
        buffered = len(self._buf)
        if not buffered:
            raise EndOfStream
        expected = HEADER_SIZE
        if buffered >= HEADER_SIZE:
            (size,) = _HEADER.unpack_from(self._buf, 0)
            expected += size
        raise TruncatedFrameError(expected, buffered)


def decode_frame(decoder: msgspec.msgpack.Decoder[T], payload: bytes) -> T:
    """Decode one payload, translating every decoding failure into :class:`FrameDecodeError`."""
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        reason = str(exc)
        if len(reason) > _MAX_REASON:
            reason = reason[:_MAX_REASON] + "..."
        raise FrameDecodeError(f"undecodable frame of {len(payload)} bytes: {reason}") from None


# --------------------------------------------------------------------------- writing


def encode_frame(
    payload: bytes | bytearray | memoryview, max_size: int = MAX_FRAME_SIZE_LIMIT
) -> bytes:
    """Return ``payload`` with its length prefix; :class:`FrameTooLargeError` if too large."""
    size = len(payload)
    if size > max_size:
        raise FrameTooLargeError(size, max_size)
    return _HEADER.pack(size) + payload


def encode_message_frame(
    encoder: msgspec.msgpack.Encoder, message: Any, max_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytearray:
    """Encode ``message`` straight into a complete frame (one buffer, no extra copy).

    Raises :class:`FrameTooLargeError` if the encoded payload exceeds ``max_size``;
    encoding errors of ``msgspec`` (an unsupported type: a programming error) propagate.
    """
    frame = bytearray(HEADER_SIZE)
    encoder.encode_into(message, frame, HEADER_SIZE)
    size = len(frame) - HEADER_SIZE
    if size > max_size:
        raise FrameTooLargeError(size, max_size)
    _HEADER.pack_into(frame, 0, size)
    return frame


def write_frames(
    writer: asyncio.StreamWriter,
    payloads: Iterable[bytes | bytearray | memoryview],
    max_size: int = MAX_FRAME_SIZE_LIMIT,
) -> int:
    """Buffer many frames with one write (call ``drain()`` afterwards); return bytes buffered."""
    chunks: list[bytes | bytearray | memoryview] = []
    total = 0
    for payload in payloads:
        size = len(payload)
        if size > max_size:
            raise FrameTooLargeError(size, max_size)
        chunks.append(_HEADER.pack(size))
        chunks.append(payload)
        total += HEADER_SIZE + size
    writer.writelines(chunks)
    return total


# --------------------------------------------------------------------------- typed stream


class FramedStream(Generic[RecvT, SendT]):
    """A typed, framed msgpack conversation over one asyncio stream pair.

    ``receive()`` returns messages decoded with the given decoder, in stream order;
    ``send_nowait()`` buffers without waiting so many messages share one ``drain()``.
    Errors: :class:`EndOfStream` at a clean end, :class:`FrameError` subclasses for protocol
    violations (after which the stream must be closed), ``OSError`` from the connection.
    Not safe for concurrent ``receive()`` calls from several tasks.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: msgspec.msgpack.Decoder[RecvT],
        *,
        encoder: msgspec.msgpack.Encoder | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self._frames = FrameReader(reader, max_frame_size)
        self._writer = writer
        self._decoder = decoder
        self._encoder = encoder if encoder is not None else msgspec.msgpack.Encoder()
        self._max_frame_size = max_frame_size

    @property
    def writer(self) -> asyncio.StreamWriter:
        """The underlying writer (for ``get_extra_info``, e.g. the peer's TLS certificate)."""
        return self._writer

    async def receive(self) -> RecvT:
        """Return the next message."""
        return decode_frame(self._decoder, await self._frames.read_frame())

    def send_nowait(self, message: SendT) -> None:
        """Buffer one message; it is written by the transport and flushed by :meth:`drain`."""
        self._writer.write(encode_message_frame(self._encoder, message, self._max_frame_size))

    async def send(self, message: SendT) -> None:
        """Send one message and wait until the write buffer is below its high-water mark."""
        self.send_nowait(message)
        await self._writer.drain()

    async def drain(self) -> None:
        """Wait until the write buffer is below its high-water mark."""
        await self._writer.drain()

    async def aclose(self) -> None:
        """Close the connection; idempotent. Connection errors while closing are ignored."""
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass
        except asyncio.CancelledError:
            self._writer.transport.abort()
            raise

    async def __aenter__(self) -> FramedStream[RecvT, SendT]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def close_writer(writer: asyncio.StreamWriter, within: float = 2.0) -> None:
    """Close a stream in order within ``within`` seconds, else abort it; never leak it."""
    writer.close()
    try:
        async with asyncio.timeout(within):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise


async def stop_listening(server: asyncio.Server) -> None:
    """``server.close()`` without CPython's accept race (gh-109564).

    On the selector event loop, a connection accepted in the iteration before ``close()``
    is left half made: its transport is never handed to the protocol, and its socket is
    never closed. So stop accepting first and let the accepts in flight complete; each then
    reaches its protocol, which closes it.
    """
    loop = asyncio.get_running_loop()
    if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        for sock in server.sockets:
            loop.remove_reader(sock.fileno())
        await asyncio.sleep(0)
    server.close()


def describe_error(exc: BaseException) -> str:
    """A short description of a connection error for log lines and messages."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
