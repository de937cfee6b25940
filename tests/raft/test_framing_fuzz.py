"""Framing under arbitrary input: readers only ever raise the documented errors and never hang.

Covers ``read_frame``, the buffered ``FrameReader`` (under every read granularity), the
payload -> message decode path, and, end to end, a live transport fed arbitrary bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.backends.raft.framing import (
    HEADER_SIZE,
    EndOfStream,
    FrameDecodeError,
    FramedStream,
    FrameError,
    FrameReader,
    FrameTooLargeError,
    TruncatedFrameError,
    check_max_frame_size,
    decode_frame,
    encode_frame,
    encode_message_frame,
    read_frame,
    write_frames,
)
from controlplane.backends.raft.transport import (
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    Handshake,
    HandshakeReply,
    PeerTransport,
)

READ_ERRORS = (EndOfStream, TruncatedFrameError, FrameTooLargeError)
TIMEOUT = 5.0  # seconds; only reached if something hangs


class Ping(msgspec.Struct, frozen=True, tag="ping"):
    src: str
    seq: int


class Note(msgspec.Struct, frozen=True, tag="note"):
    src: str
    body: Any  # arbitrary nesting: reaches msgspec's recursion limit


Message = Ping | Note
DECODER = msgspec.msgpack.Decoder(Message)
ENCODER = msgspec.msgpack.Encoder()


@pytest.fixture(scope="module")
def run() -> Iterator[asyncio.Runner]:
    """One event loop for every hypothesis example of the module."""
    with asyncio.Runner() as runner:
        yield runner


def reader_with(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def read_all_simple(data: bytes, max_size: int) -> tuple[list[bytes], BaseException]:
    reader = reader_with(data)
    frames: list[bytes] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                frames.append(await read_frame(reader, max_size))
            except READ_ERRORS as exc:
                return frames, exc


async def read_all_buffered(
    data: bytes, max_size: int, read_size: int
) -> tuple[list[bytes], BaseException]:
    frames_reader = FrameReader(reader_with(data), max_size, read_size=read_size)
    frames: list[bytes] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                frames.extend(await frames_reader.read_frames())
            except READ_ERRORS as exc:
                return frames, exc


# ---------------------------------------------------------------------------- examples


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_frames_round_trip_and_the_stream_ends_cleanly() -> None:
    payloads = [b"", b"x", bytes(range(256)) * 10]
    data = b"".join(encode_frame(p) for p in payloads)
    frames, end = await read_all_simple(data, 4096)
    assert frames == payloads
    assert isinstance(end, EndOfStream)
    frames, end = await read_all_buffered(data, 4096, 3)
    assert frames == payloads
    assert isinstance(end, EndOfStream)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("data", "error", "expected", "received"),
    [
        (b"\x00\x00", TruncatedFrameError, 4, 2),
        (b"\x00\x00\x00\x05abc", TruncatedFrameError, 9, 7),
        (b"\x00\x00\x10\x01" + bytes(10), FrameTooLargeError, 0, 0),
    ],
    ids=["cut-header", "cut-payload", "oversized"],
)
async def test_bad_streams_raise_precise_errors(
    data: bytes, error: type[FrameError], expected: int, received: int
) -> None:
    for frames, exc in (
        await read_all_simple(encode_frame(b"ok") + data, 4096),
        await read_all_buffered(encode_frame(b"ok") + data, 4096, 2),
    ):
        assert frames == [b"ok"]
        assert type(exc) is error
        if isinstance(exc, TruncatedFrameError):
            assert (exc.expected, exc.received) == (expected, received)
        if isinstance(exc, FrameTooLargeError):
            assert (exc.size, exc.max_size) == (4097, 4096)


@pytest.mark.anyio
async def test_the_size_limit_is_checked_before_the_payload_arrives() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"\xff\xff\xff\xff")  # no payload, no EOF: reading it would hang
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(FrameTooLargeError):
            await read_frame(reader, 1024)
        reader.feed_data(b"\xff\xff\xff\xff")
        with pytest.raises(FrameTooLargeError):
            await FrameReader(reader, 1024).read_frame()


def test_writers_refuse_oversized_frames_and_limits_are_validated() -> None:
    with pytest.raises(FrameTooLargeError):
        encode_frame(bytes(11), max_size=10)
    with pytest.raises(FrameTooLargeError):
        encode_message_frame(ENCODER, Note("a", "x" * 100), max_size=50)
    frame = encode_message_frame(ENCODER, Ping("a", 1))
    assert frame[HEADER_SIZE:] == ENCODER.encode(Ping("a", 1))
    assert int.from_bytes(frame[:HEADER_SIZE], "big") == len(frame) - HEADER_SIZE
    for bad in (0, -1, 2**32):
        with pytest.raises(ValueError):
            check_max_frame_size(bad)


@pytest.mark.anyio
async def test_framed_stream_talks_typed_messages_over_a_socket() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = FrameReader(reader)
        try:
            while True:
                write_frames(writer, await frames.read_frames())
                await writer.drain()
        except EndOfStream:
            pass
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server, asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        async with FramedStream[Message, Message](reader, writer, DECODER) as client:
            sent: list[Message] = [Ping("c", 1), Note("c", {"deep": [1, [2, [3]]]})]
            for message in sent:
                await client.send(message)
            assert [await client.receive() for _ in sent] == sent
            writer.write(encode_frame(ENCODER.encode({"type": "nope"})))
            await client.send(Ping("c", 2))
            with pytest.raises(FrameDecodeError, match="Invalid value 'nope'"):
                await client.receive()


# ---------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Byte strings that look like frames often enough to get past the length prefix.
framish = st.one_of(
    st.binary(max_size=200),
    st.lists(st.binary(max_size=40), max_size=6).map(
        lambda ps: b"".join(encode_frame(p) for p in ps)
    ),
    st.tuples(st.lists(st.binary(max_size=40), max_size=4), st.binary(max_size=20)).map(
        lambda t: b"".join(encode_frame(p) for p in t[0]) + t[1]
    ),
)


@FUZZ
@given(data=framish, max_size=st.integers(1, 64))
def test_read_frame_only_raises_frame_errors(
    run: asyncio.Runner, data: bytes, max_size: int
) -> None:
    frames, end = run.run(read_all_simple(data, max_size))
    consumed = b"".join(encode_frame(f) for f in frames)
    assert data.startswith(consumed)
    assert all(len(f) <= max_size for f in frames)
    if isinstance(end, EndOfStream):
        assert consumed == data


@FUZZ
@given(data=framish, max_size=st.integers(1, 64), read_size=st.integers(1, 70))
def test_buffered_reader_agrees_with_read_frame_at_any_granularity(
    run: asyncio.Runner, data: bytes, max_size: int, read_size: int
) -> None:
    simple = run.run(read_all_simple(data, max_size))
    buffered = run.run(read_all_buffered(data, max_size, read_size))
    assert buffered[0] == simple[0]
    assert type(buffered[1]) is type(simple[1])


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)
message_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["ping", "note", "nope", ""]) | st.text(max_size=8)},
    optional={"src": msgpack_values, "seq": msgpack_values, "body": msgpack_values},
)


@FUZZ
@given(payload=st.binary(max_size=300) | message_like.map(ENCODER.encode))
def test_decoding_a_payload_yields_a_message_or_frame_decode_error(payload: bytes) -> None:
    try:
        message = decode_frame(DECODER, payload)
    except FrameDecodeError as exc:
        assert len(str(exc)) < 300  # hostile input is not echoed at length
    else:
        assert isinstance(message, Ping | Note)


def test_deep_nesting_is_a_decode_error_not_a_crash() -> None:
    deep = b"\x82\xa4type\xa4note\xa4body" + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(FrameDecodeError):
        decode_frame(DECODER, deep)


# ---------------------------------------------------------------------------- end to end


async def feed_transport(data: bytes, after_handshake: bool) -> None:
    """Send ``data`` to a live transport, then check it still serves a well-behaved peer."""
    received: list[Message] = []
    transport = PeerTransport[Message](
        "a",
        "c1",
        decoder=DECODER,
        on_message=received.append,
        peers={"e": ("127.0.0.1", 9), "f": ("127.0.0.1", 9)},
    )
    async with transport, asyncio.timeout(TIMEOUT):
        for sender, payload in (("e", data), ("f", None)):
            reader, writer = await asyncio.open_connection(*transport.address)
            try:
                if after_handshake or payload is None:
                    hello = Handshake(PROTOCOL_NAME, PROTOCOL_VERSION, "c1", sender, "a")
                    writer.write(encode_frame(ENCODER.encode(hello)))
                    reply = msgspec.msgpack.decode(await read_frame(reader), type=HandshakeReply)
                    assert reply.accepted
                if payload is None:
                    writer.write(encode_frame(ENCODER.encode(Ping("f", 1))))
                    while Ping("f", 1) not in received:  # noqa: ASYNC110 - a plain list
                        await asyncio.sleep(0.001)
                else:
                    writer.write(payload)
                    writer.write_eof()
                    # The transport closes the connection once the input ends or is bad.
                    with contextlib.suppress(ConnectionError):
                        while await reader.read(65536):
                            pass
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
        stats = transport.stats()
        assert stats.protocol_errors <= 1
        assert stats.callback_errors == 0
    for message in received:
        assert isinstance(message, Ping | Note)


class RecordingHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=framish | message_like.map(lambda m: encode_frame(ENCODER.encode(m))),
    after_handshake=st.booleans(),
)
def test_a_live_transport_survives_arbitrary_bytes(
    run: asyncio.Runner, data: bytes, after_handshake: bool
) -> None:
    records: list[logging.LogRecord] = []
    handler = RecordingHandler(records)
    loggers = [logging.getLogger(name) for name in ("controlplane", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        run.run(feed_transport(data, after_handshake))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
