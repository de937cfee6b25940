"""Tests of the Raft peer transport over real loopback sockets (and real TLS).

Every wait is bounded by ``anyio.fail_after``; the only timing assertion is a lower bound
that backoff makes certain.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import pytest

from controlplane.backends.raft.framing import (
    FrameTooLargeError,
    encode_frame,
    read_frame,
)
from controlplane.backends.raft.transport import (
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    ExponentialBackoff,
    Handshake,
    HandshakeReply,
    PeerTransport,
    TransportClosedError,
    TransportError,
    TransportOptions,
)

pytestmark = pytest.mark.anyio

LOGGER = "controlplane.raft.transport"
CLUSTER = "cluster-1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail on what asyncio only logs: never-retrieved task exceptions, failing callbacks."""
    yield
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# ---------------------------------------------------------------------------- test messages


class Ping(msgspec.Struct, frozen=True, tag="ping"):
    src: str
    seq: int


class Blob(msgspec.Struct, frozen=True, tag="blob"):
    src: str
    data: bytes


class Other(msgspec.Struct, frozen=True, tag="other"):
    """Encodable, but not part of the receivers' union: an unknown message type to them."""

    note: str


TestMessage = Ping | Blob
DECODER = msgspec.msgpack.Decoder(TestMessage)
ENCODER = msgspec.msgpack.Encoder()
Transport = PeerTransport[TestMessage]


class Inbox:
    """An ``on_message`` callback that records what it is given."""

    def __init__(self) -> None:
        self.messages: list[TestMessage] = []
        self.fail_on: int | None = None

    def __call__(self, message: TestMessage) -> None:
        self.messages.append(message)
        if isinstance(message, Ping) and message.seq == self.fail_on:
            raise RuntimeError("callback bug")

    def seqs(self, src: str) -> list[int]:
        return [m.seq for m in self.messages if isinstance(m, Ping) and m.src == src]


class Make(Protocol):
    def __call__(
        self, member_id: str, *, cluster_id: str = ..., port: int = ..., **kwargs: Any
    ) -> Awaitable[tuple[Transport, Inbox]]: ...


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Start transports that are all closed at the end of the test."""
    async with AsyncExitStack() as stack:

        async def start(
            member_id: str, *, cluster_id: str = CLUSTER, port: int = 0, **kwargs: Any
        ) -> tuple[Transport, Inbox]:
            inbox = Inbox()
            transport = Transport(
                member_id,
                cluster_id,
                decoder=DECODER,
                on_message=inbox,
                port=port,
                **kwargs,
            )
            await stack.enter_async_context(transport)
            return transport, inbox

        yield start


def introduce(*transports: Transport) -> None:
    """Give every transport the address of every other one."""
    for t in transports:
        for other in transports:
            if other is not t:
                t.set_peer(other.member_id, *other.address)


async def eventually(predicate: Callable[[], bool]) -> None:
    """Poll until ``predicate()`` holds; the caller bounds the wait with ``fail_after``."""
    while not predicate():  # noqa: ASYNC110 - counters and log records have no event to await
        await anyio.sleep(0.005)


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == LOGGER and r.levelno >= logging.WARNING and text in r.getMessage()
    ]


async def deliver(sender: Transport, receiver: Transport, inbox: Inbox, seq: int) -> None:
    """Send one ping and wait until it arrives."""
    sender.send(receiver.member_id, Ping(sender.member_id, seq))
    await eventually(lambda: seq in inbox.seqs(sender.member_id))


# ---------------------------------------------------------------------------- delivery


async def test_three_members_deliver_to_each_other_in_order(make: Make) -> None:
    with anyio.fail_after(10):
        (a, ia), (b, ib), (c, ic) = [await make(m) for m in "abc"]
        introduce(a, b, c)
        n = 300
        for seq in range(n):
            for sender in (a, b, c):
                for receiver in (a, b, c):
                    if receiver is not sender:
                        sender.send(receiver.member_id, Ping(sender.member_id, seq))
            if seq % 50 == 0:
                await anyio.lowlevel.checkpoint()  # interleave writes with sends
        await eventually(lambda: all(len(i.messages) == 2 * n for i in (ia, ib, ic)))
        for inbox, senders in ((ia, "bc"), (ib, "ac"), (ic, "ab")):
            for src in senders:
                assert inbox.seqs(src) == list(range(n))
        stats = a.stats()
        assert stats.peers["b"].sent_frames == n
        assert stats.peers["b"].received_frames == n
        assert stats.peers["b"].dropped_frames == 0
        assert stats.peers["b"].connection_errors == 0


async def test_a_burst_is_delivered_in_order_in_batches(make: Make) -> None:
    n = 20_000
    options = TransportOptions(queue_max_messages=n)
    with anyio.fail_after(10):
        a, _ = await make("a", options=options)
        b, ib = await make("b")
        introduce(a, b)
        for seq in range(n):
            a.send("b", Ping("a", seq))
        await eventually(lambda: len(ib.messages) == n)
        assert ib.seqs("a") == list(range(n))
        assert a.stats().peers["b"].sent_frames == n
        assert b.stats().peers["a"].received_frames == n


async def test_blobs_near_the_frame_limit_arrive_intact(make: Make) -> None:
    options = TransportOptions(max_frame_size=1 << 20, queue_max_bytes=8 << 20)
    with anyio.fail_after(10):
        a, _ = await make("a", options=options)
        b, ib = await make("b", options=options)
        introduce(a, b)
        rng = random.Random(7)
        blobs = [rng.randbytes(size) for size in (0, 1, 1000, (1 << 20) - 100)]
        for data in blobs:
            a.send("b", Blob("a", data))
        await eventually(lambda: len(ib.messages) == len(blobs))
        assert [m.data for m in ib.messages if isinstance(m, Blob)] == blobs
        with pytest.raises(FrameTooLargeError):
            a.send("b", Blob("a", bytes(1 << 20)))


async def test_a_full_queue_drops_the_oldest_messages(make: Make) -> None:
    with anyio.fail_after(10):
        a, _ = await make("a", options=TransportOptions(queue_max_messages=10))
        b, ib = await make("b")
        introduce(a, b)
        for seq in range(100):  # no await: the writer task cannot run yet
            a.send("b", Ping("a", seq))
        assert a.pending("b") == 10
        assert a.stats().peers["b"].dropped_frames == 90
        await eventually(lambda: len(ib.messages) == 10)
        assert ib.seqs("a") == list(range(90, 100))


async def test_messages_to_a_member_without_address_are_dropped_and_counted(make: Make) -> None:
    with anyio.fail_after(10):
        a, _ = await make("a")
        a.send("nobody", Ping("a", 1))
        assert a.stats().dropped_unknown_peer == 1
        assert a.pending("nobody") == 0


async def test_send_outside_the_running_state_raises() -> None:
    inbox = Inbox()
    t = Transport("a", CLUSTER, decoder=DECODER, on_message=inbox, peers={"b": ("127.0.0.1", 1)})
    with pytest.raises(TransportClosedError):
        t.send("b", Ping("a", 1))
    with pytest.raises(TransportClosedError):
        _ = t.address
    await t.start()
    await t.close()
    await t.close()  # idempotent
    with pytest.raises(TransportClosedError):
        t.send("b", Ping("a", 1))
    with pytest.raises(TransportError):
        await t.start()
    with pytest.raises(ValueError, match="own peer"):
        t.set_peer("a", "127.0.0.1", 1)


async def test_a_failing_callback_is_logged_and_the_connection_survives(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(10):
        a, _ = await make("a")
        b, ib = await make("b")
        introduce(a, b)
        ib.fail_on = 0
        for seq in range(5):
            a.send("b", Ping("a", seq))
        await eventually(lambda: len(ib.messages) == 5)
        assert b.stats().callback_errors == 1
        assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
        await deliver(a, b, ib, 5)
        assert a.stats().peers["b"].connection_errors == 0


# ---------------------------------------------------------------------------- reconnects


async def test_reconnects_after_the_peer_restarts_on_the_same_port(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    options = TransportOptions(backoff_initial=0.01, backoff_max=0.1)
    with anyio.fail_after(10):
        a, _ = await make("a", options=options)
        b, ib = await make("b")
        introduce(a, b)
        await deliver(a, b, ib, 0)
        port = b.port
        await b.close()
        # Down: the connection is lost, then connecting is refused (with backoff).
        a.send("b", Ping("a", 1))
        await eventually(lambda: a.stats().peers["b"].connection_errors >= 2)

        b2, ib2 = await make("b", port=port)
        b2.set_peer("a", *a.address)
        seq = 2
        while not ib2.messages:  # messages written into the dying connection may be lost
            a.send("b", Ping("a", seq))
            seq += 1
            await anyio.sleep(0.01)
        first = ib2.seqs("a")[0]
        for extra in range(seq, seq + 100):
            a.send("b", Ping("a", extra))
        await eventually(lambda: ib2.seqs("a")[-1:] == [seq + 99])
        got = ib2.seqs("a")
        assert got == sorted(set(got))  # in order, no duplicates
        assert got[got.index(seq) :] == list(range(seq, seq + 100))
        assert first >= 1
        assert warnings_with(caplog, "connection to peer b")


async def test_failed_connects_back_off(make: Make) -> None:
    with anyio.fail_after(10):
        free_port = await unused_port()
        a, _ = await make("a", options=TransportOptions(backoff_initial=0.05, backoff_max=2.0))
        a.set_peer("b", "127.0.0.1", free_port)
        started = time.monotonic()
        a.send("b", Ping("a", 0))
        await eventually(lambda: a.stats().peers["b"].connection_errors >= 4)
        # Three backoff delays lie before the 4th attempt: >= 25 + 50 + 100 ms.
        assert time.monotonic() - started >= 0.175
        assert a.pending("b") == 1  # kept for when the peer comes up


async def test_the_owner_hears_of_a_refused_connect_and_of_a_lost_connection(
    make: Make,
) -> None:
    options = TransportOptions(backoff_initial=0.01, backoff_max=0.05)
    unreachable: list[str] = []
    with anyio.fail_after(10):
        a, _ = await make("a", options=options, on_unreachable=unreachable.append)
        b, ib = await make("b")
        introduce(a, b)
        await deliver(a, b, ib, 0)
        assert unreachable == []  # connected: nothing to report
        await b.close()  # lost, then refused
        a.send("b", Ping("a", 1))
        await eventually(lambda: len(unreachable) >= 2)
        assert set(unreachable) == {"b"}
        reported = len(unreachable)
        assert a.stats().peers["b"].connection_errors >= reported  # once per failure


async def test_a_failing_unreachable_callback_is_logged_and_counted(make: Make) -> None:
    def broken(member_id: str) -> None:
        raise RuntimeError("callback bug")

    with anyio.fail_after(10):
        free_port = await unused_port()
        a, _ = await make(
            "a", options=TransportOptions(backoff_initial=0.01), on_unreachable=broken
        )
        a.set_peer("b", "127.0.0.1", free_port)
        a.send("b", Ping("a", 0))
        await eventually(lambda: a.stats().callback_errors >= 2)
        assert a.pending("b") == 1  # the transport goes on retrying


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    backoff = ExponentialBackoff(0.05, 2.0, rng=random.Random(1))
    ceilings = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    delays = [backoff.next() for _ in ceilings]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert 0.025 <= backoff.next() <= 0.05
    with pytest.raises(ValueError):
        ExponentialBackoff(0, 1)


async def test_set_peer_moves_the_connection_to_the_new_address(make: Make) -> None:
    with anyio.fail_after(10):
        a, _ = await make("a")
        b1, ib1 = await make("b")
        b2, ib2 = await make("b")
        introduce(a, b1)
        b2.set_peer("a", *a.address)
        await deliver(a, b1, ib1, 0)
        a.set_peer("b", *b2.address)
        seq = 1
        while not ib2.messages:
            a.send("b", Ping("a", seq))
            seq += 1
            await anyio.sleep(0.01)
        await deliver(a, b2, ib2, seq)
        assert a.stats().peers["b"].connection_errors == 0  # a move is not an error
        assert a.peers == {"b": b2.address}


async def test_remove_peer_closes_both_directions(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(10):
        a, _ = await make("a", options=TransportOptions(backoff_max=0.1))
        b, ib = await make("b")
        introduce(a, b)
        await deliver(a, b, ib, 0)
        b.remove_peer("a")  # b forgets a: a's connection is closed, and a is now unknown
        await eventually(lambda: bool(warnings_with(caplog, "connection to peer b at")))
        a.send("b", Ping("a", 1))
        await eventually(lambda: bool(warnings_with(caplog, "unknown member 'a'")))
        await eventually(lambda: a.stats().peers["b"].connection_errors >= 2)
        assert ib.seqs("a") == [0]
        a.remove_peer("b")
        a.send("b", Ping("a", 2))
        assert a.stats().dropped_unknown_peer == 1


# ---------------------------------------------------------------------------- handshake


async def test_a_member_of_another_cluster_is_rejected(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(10):
        a, ia = await make("a")
        b, _ = await make("b")
        x, _ = await make("x", cluster_id="cluster-2")
        introduce(a, b)
        x.set_peer("a", *a.address)
        a.set_peer("x", *x.address)  # even a known member id must not cross clusters
        x.send("a", Ping("x", 0))
        await eventually(lambda: x.stats().peers["a"].connection_errors >= 1)
        assert warnings_with(caplog, "cluster id mismatch")
        assert warnings_with(caplog, "handshake rejected: cluster id mismatch")
        assert a.stats().rejected_handshakes >= 1
        await deliver(b, a, ia, 0)  # a keeps serving its own cluster
        assert ia.seqs("x") == []


async def test_an_unknown_member_is_rejected(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    with anyio.fail_after(10):
        a, ia = await make("a")
        b, _ = await make("b")
        d, _ = await make("d")
        introduce(a, b)
        d.set_peer("a", *a.address)
        d.send("a", Ping("d", 0))
        await eventually(lambda: bool(warnings_with(caplog, "unknown member 'd'")))
        await eventually(lambda: d.stats().peers["a"].connection_errors >= 1)
        await deliver(b, a, ia, 0)
        assert ia.seqs("d") == []


async def test_membership_is_consulted_on_every_handshake(make: Make) -> None:
    members = {"b"}
    with anyio.fail_after(10):
        a, ia = await make("a", accept_from=members.__contains__)
        d, _ = await make("d", options=TransportOptions(backoff_max=0.05))
        d.set_peer("a", *a.address)
        d.send("a", Ping("d", 0))
        await eventually(lambda: d.stats().peers["a"].connection_errors >= 1)
        members.add("d")  # a membership change at run time
        seq = 1
        while not ia.messages:
            d.send("a", Ping("d", seq))
            seq += 1
            await anyio.sleep(0.01)


async def test_a_stale_address_reaching_another_member_is_rejected(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(10):
        a, _ = await make("a")
        c, ic = await make("c")
        introduce(a, c)
        a.set_peer("b", *c.address)  # a believes b lives where c does
        a.send("b", Ping("a", 0))
        await eventually(lambda: bool(warnings_with(caplog, "this is member 'c', not 'b'")))
        await deliver(a, c, ic, 1)
        assert ic.seqs("a") == [1]


# ---------------------------------------------------------------------------- hostile input


@asynccontextmanager
async def raw_connection(
    transport: Transport,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(*transport.address)
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()


def handshake_frame(sender: str, receiver: str, cluster_id: str = CLUSTER) -> bytes:
    hello = Handshake(PROTOCOL_NAME, PROTOCOL_VERSION, cluster_id, sender, receiver)
    return encode_frame(ENCODER.encode(hello))


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(handshake_frame("e", "a"))
    reply = msgspec.msgpack.decode(await read_frame(reader), type=HandshakeReply)
    assert reply.accepted, reply.reason


async def wait_closed_by_peer(reader: asyncio.StreamReader) -> None:
    with suppress(ConnectionError):
        while await reader.read(65536):
            pass


@dataclass(frozen=True)
class Attack:
    name: str
    after_handshake: bool
    data: bytes
    expect: str
    eof: bool = False


ATTACKS = [
    Attack("http-request", False, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "exceeds the maximum"),
    Attack("garbage", False, encode_frame(b"\xc1\xc1\xc1"), "bad handshake: undecodable"),
    Attack("wrong-handshake", False, encode_frame(ENCODER.encode(Ping("e", 1))), "bad handshake"),
    Attack("truncated-handshake", False, b"\x00\x00\x00\x10abc", "inside a frame", eof=True),
    Attack("oversized", True, b"\x00\x00\x04\x01" + bytes(100), "exceeds the maximum frame size"),
    Attack("truncated", True, b"\x00\x00\x00\x64" + bytes(10), "inside a frame", eof=True),
    Attack("garbage-frame", True, encode_frame(b"\xc1garbage"), "undecodable frame"),
    Attack(
        "unknown-tag",
        True,
        encode_frame(ENCODER.encode(Other("surprise"))),
        "Invalid value 'other'",
    ),
    Attack("not-a-struct", True, encode_frame(ENCODER.encode([1, 2, 3])), "undecodable frame"),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
async def test_hostile_input_closes_only_that_connection(
    make: Make, caplog: pytest.LogCaptureFixture, attack: Attack
) -> None:
    with anyio.fail_after(10):
        a, ia = await make("a", options=TransportOptions(max_frame_size=1024))
        b, _ = await make("b")
        introduce(a, b)
        a.set_peer("e", "127.0.0.1", 9)  # a known member id for the attacker to claim
        await deliver(b, a, ia, 0)  # b's connection is up before the attack
        async with raw_connection(a) as (reader, writer):
            if attack.after_handshake:
                await handshake(reader, writer)
            writer.write(attack.data)
            if attack.eof:
                writer.write_eof()
            await wait_closed_by_peer(reader)
        await eventually(lambda: bool(warnings_with(caplog, attack.expect)))
        assert a.stats().protocol_errors == 1
        if attack.after_handshake:
            assert a.stats().peers["e"].protocol_errors == 1
        await deliver(b, a, ia, 1)  # the same connection from b still works
        assert b.stats().peers["a"].connection_errors == 0


async def test_a_silent_client_is_dropped_after_the_handshake_timeout(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(10):
        a, _ = await make("a", options=TransportOptions(handshake_timeout=0.1))
        async with raw_connection(a) as (reader, _writer):
            await wait_closed_by_peer(reader)
        assert warnings_with(caplog, "no handshake in time")


async def test_a_newer_connection_from_the_same_member_replaces_the_older(make: Make) -> None:
    with anyio.fail_after(10):
        a, ia = await make("a")
        a.set_peer("e", "127.0.0.1", 9)
        async with raw_connection(a) as (r1, w1), raw_connection(a) as (r2, w2):
            await handshake(r1, w1)
            await handshake(r2, w2)
            await wait_closed_by_peer(r1)  # the old one is closed by a
            w2.write(encode_frame(ENCODER.encode(Ping("e", 7))))
            await eventually(lambda: ia.seqs("e") == [7])


# ---------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Pki:
    directory: Path

    def path(self, name: str) -> str:
        return str(self.directory / name)

    def server(self, ca: str, member: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.path(f"{member}.pem"), self.path(f"{member}.key"))
        ctx.load_verify_locations(self.path(f"{ca}.pem"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client(self, ca: str, member: str | None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.path(f"{ca}.pem"))
        if member is not None:
            ctx.load_cert_chain(self.path(f"{member}.pem"), self.path(f"{member}.key"))
        return ctx


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    """Two throwaway CAs and leaf certificates (server + client use) made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("pki")
    (d / "leaf.ext").write_text(LEAF_EXTENSIONS)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    for ca in ("ca1", "ca2"):
        _openssl(
            "req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
            "-subj", f"/CN=controlplane test {ca}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash",
            "-addext", "authorityKeyIdentifier=keyid:always",
            cwd=d,
        )  # fmt: skip
    for serial, (member, ca) in enumerate([("a", "ca1"), ("b", "ca1"), ("rogue", "ca2")], start=1):
        _openssl("req", "-new", *ec, "-keyout", f"{member}.key", "-out", f"{member}.csr",
                 "-subj", f"/CN=member {member}", cwd=d)  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{member}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-set_serial", str(serial), "-days", "2", "-extfile", "leaf.ext",
            "-out", f"{member}.pem",
            cwd=d,
        )  # fmt: skip
    yield Pki(d)


async def test_mutual_tls_lets_members_talk(make: Make, pki: Pki) -> None:
    with anyio.fail_after(10):
        a, ia = await make(
            "a", server_ssl=pki.server("ca1", "a"), client_ssl=pki.client("ca1", "a")
        )
        b, ib = await make(
            "b", server_ssl=pki.server("ca1", "b"), client_ssl=pki.client("ca1", "b")
        )
        introduce(a, b)
        for seq in range(100):
            a.send("b", Ping("a", seq))
            b.send("a", Ping("b", seq))
        await eventually(lambda: len(ia.messages) == len(ib.messages) == 100)
        assert ia.seqs("b") == ib.seqs("a") == list(range(100))


@pytest.mark.parametrize("client_cert", ["rogue", None], ids=["other-ca", "no-cert"])
async def test_mutual_tls_refuses_a_client_without_a_trusted_certificate(
    make: Make, pki: Pki, client_cert: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(10):
        a, ia = await make(
            "a", server_ssl=pki.server("ca1", "a"), client_ssl=pki.client("ca1", "a")
        )
        b, _ = await make("b", server_ssl=pki.server("ca1", "b"), client_ssl=pki.client("ca1", "b"))
        # The rogue trusts a's CA, but a does not trust the rogue's certificate.
        rogue, _ = await make("rogue", client_ssl=pki.client("ca1", client_cert))
        introduce(a, b)
        a.set_peer("rogue", *rogue.address)  # known by id: only TLS can keep it out
        rogue.set_peer("a", *a.address)
        rogue.send("a", Ping("rogue", 0))
        await eventually(lambda: rogue.stats().peers["a"].connection_errors >= 1)
        await eventually(lambda: bool(warnings_with(caplog, "TLS handshake with")))
        assert a.stats().rejected_handshakes >= 1
        await deliver(b, a, ia, 0)
        assert ia.seqs("rogue") == []


async def test_tls_client_refuses_a_server_from_another_ca(
    make: Make, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(10):
        a, _ = await make("a", client_ssl=pki.client("ca1", "a"))
        rogue, ir = await make(
            "rogue", server_ssl=pki.server("ca2", "rogue"), client_ssl=pki.client("ca2", "rogue")
        )
        introduce(a, rogue)
        a.send("rogue", Ping("a", 0))
        await eventually(lambda: a.stats().peers["rogue"].connection_errors >= 1)
        assert warnings_with(caplog, "CERTIFICATE_VERIFY_FAILED")
        assert ir.messages == []


# ---------------------------------------------------------------------------- shutdown


async def unused_port() -> int:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port: int = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    return port


async def test_close_leaves_no_task_and_no_socket_behind(pki: Pki) -> None:
    before = asyncio.all_tasks()
    with anyio.fail_after(10):
        transports: list[Transport] = []
        inboxes: list[Inbox] = []
        for member in "abc":
            inbox = Inbox()
            tls = member != "c"  # c speaks plain TCP, also to b's TLS listener
            t = Transport(
                member,
                CLUSTER,
                decoder=DECODER,
                on_message=inbox,
                server_ssl=pki.server("ca1", member) if tls else None,
                client_ssl=pki.client("ca1", member) if tls else None,
            )
            await t.start()
            transports.append(t)
            inboxes.append(inbox)
        a, b, c = transports
        introduce(a, b)
        c.set_peer("a", "127.0.0.1", await unused_port())  # a peer that is down: backing off
        c.set_peer("b", *b.address)  # plain TCP against a TLS listener: a broken handshake
        for seq in range(50):
            a.send("b", Ping("a", seq))
            b.send("a", Ping("b", seq))
            c.send("a", Ping("c", seq))
            c.send("b", Ping("c", seq))
        await eventually(lambda: len(inboxes[0].messages) == len(inboxes[1].messages) == 50)
        idle_reader, idle_writer = await asyncio.open_connection(*a.address)  # mid-handshake
        ports = [t.port for t in transports]
        await asyncio.gather(*(t.close() for t in transports))
        assert asyncio.all_tasks() == before
        await wait_closed_by_peer(idle_reader)
        idle_writer.close()
        await idle_writer.wait_closed()
        for port in ports:
            with pytest.raises(OSError):
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
        with pytest.raises(TransportClosedError):
            a.send("b", Ping("a", 99))
    gc.collect()  # an unclosed transport or socket would warn here (warnings are errors)


async def test_close_right_after_an_accept_leaves_no_socket_behind(make: Make) -> None:
    """CPython gh-109564: a connection the selector loop accepted in the iteration before
    ``Server.close()`` was left half made (its socket never closed). ``close()`` stops
    accepting first; the connection then reaches the transport, which closes it."""
    transport, _ = await make("a")
    loop = asyncio.get_running_loop()
    listening = transport._server.sockets[0] if transport._server else None
    assert listening is not None
    selector = loop._selector  # type: ignore[attr-defined]
    accept = selector.get_key(listening.fileno()).data[0]
    with anyio.fail_after(10):
        connecting = asyncio.ensure_future(asyncio.open_connection(*transport.address))
        while accept not in loop._ready:  # type: ignore[attr-defined]  # noqa: ASYNC110
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # the accept ran: the connection is being made
        await transport.close()
        _, writer = await connecting
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
    gc.collect()  # the half-made connection's socket would warn here (warnings are errors)
