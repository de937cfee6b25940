"""Raft peer transport benchmark: one-way throughput and ping-pong round trips.

Two members run in two processes (as in a real cluster) on 127.0.0.1:

- **throughput**: member ``a`` sends N small messages (about 100 bytes encoded) to ``b`` as fast
  as the transport takes them, keeping at most ``--window`` queued (so nothing is dropped);
  the clock stops when ``b`` reports, over its own connection back to ``a``, that it has
  them all.
- **round trip**: ``a`` sends one message, ``b`` answers it, ``a`` waits for the answer;
  repeated, with p50/p99 reported.
- **baseline**: the same round trip over bare asyncio streams (4-byte length prefix,
  ``readexactly``), to show what the transport adds.

Usage: ``python bench/transport_bench.py [--messages N] [--pings N] [--tls] [--uvloop]``
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import multiprocessing
import os
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.backends.raft.transport import (
    PeerTransport,
    TransportOptions,
)

CLUSTER = "bench"


class Data(msgspec.Struct, frozen=True, array_like=True, tag="d"):
    seq: int
    term: int
    payload: bytes


class Ping(msgspec.Struct, frozen=True, array_like=True, tag="p"):
    seq: int


class Pong(msgspec.Struct, frozen=True, array_like=True, tag="q"):
    seq: int


class Done(msgspec.Struct, frozen=True, array_like=True, tag="x"):
    received: int


Message = Data | Ping | Pong | Done
DECODER = msgspec.msgpack.Decoder(Message)
PAYLOAD = bytes(range(85))
OPTIONS = TransportOptions(queue_max_messages=1 << 20)


def message_size() -> int:
    return len(msgspec.msgpack.encode(Data(123_456, 7, PAYLOAD)))


# ---------------------------------------------------------------------------- TLS material


def make_pki(directory: Path) -> None:
    """One CA and one certificate per member (server and client use), via openssl."""
    ext = directory / "leaf.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=bench ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign",
            "-addext", "subjectKeyIdentifier=hash",
            "-addext", "authorityKeyIdentifier=keyid:always")  # fmt: skip
    for n, member in enumerate("ab", start=1):
        openssl("req", "-new", *ec, "-keyout", f"{member}.key", "-out", f"{member}.csr",
                "-subj", f"/CN={member}")  # fmt: skip
        openssl("x509", "-req", "-in", f"{member}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-set_serial", str(n), "-days", "1", "-extfile", "leaf.ext",
                "-out", f"{member}.pem")  # fmt: skip


def tls_contexts(pki: str | None, member: str) -> tuple[ssl.SSLContext | None, ...]:
    """(server context, client context) for ``member``, or no TLS."""
    if pki is None:
        return None, None
    d = Path(pki)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(d / f"{member}.pem", d / f"{member}.key")
    server.load_verify_locations(d / "ca.pem")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(d / f"{member}.pem", d / f"{member}.key")
    client.load_verify_locations(d / "ca.pem")
    return server, client


def run(main: Callable[[], Coroutine[Any, Any, None]], use_uvloop: bool) -> None:
    if use_uvloop:
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            raise SystemExit("--uvloop: uvloop is not installed (pip install uvloop)") from None
        uvloop.run(main())
    else:
        asyncio.run(main())


# ---------------------------------------------------------------------------- member b


def member_b(pipe: Connection, a_port: int, pki: str | None, use_uvloop: bool) -> None:
    # a closes first at the end of the run; b would log that as a lost peer.
    logging.getLogger("controlplane.raft.transport").setLevel(logging.ERROR)

    async def main() -> None:
        received = 0
        expected = -1

        def on_message(message: Message) -> None:
            nonlocal received
            match message:
                case Data():
                    received += 1
                    if received == expected:
                        b.send("a", Done(received))
                case Ping(seq=seq):
                    b.send("a", Pong(seq))
                case _:
                    pass

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    header = await reader.readexactly(4)
                    payload = await reader.readexactly(struct.unpack(">I", header)[0])
                    writer.write(header + payload)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server_ssl, client_ssl = tls_contexts(pki, "b")
        b = PeerTransport[Message](
            "b",
            CLUSTER,
            decoder=DECODER,
            on_message=on_message,
            peers={"a": ("127.0.0.1", a_port)},
            options=OPTIONS,
            server_ssl=server_ssl,
            client_ssl=client_ssl,
        )
        raw = await asyncio.start_server(echo, "127.0.0.1", 0)
        async with b, raw:
            pipe.send((b.port, raw.sockets[0].getsockname()[1]))
            loop = asyncio.get_running_loop()
            while True:
                command = await loop.run_in_executor(None, pipe.recv)
                if command is None:
                    break
                received, expected = 0, command
                pipe.send("ready")

    run(main, use_uvloop)


# ---------------------------------------------------------------------------- member a


async def throughput(
    a: PeerTransport[Message], pipe: Connection, inbox: asyncio.Queue[Message], n: int, window: int
) -> float:
    pipe.send(n)
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    start = time.perf_counter()
    sent = 0
    while sent < n:
        for _ in range(min(1000, n - sent)):
            a.send("b", Data(sent, 7, PAYLOAD))
            sent += 1
        await asyncio.sleep(0)
        while a.pending("b") > window:  # noqa: ASYNC110 - the transport offers no event
            await asyncio.sleep(0)
    done = await inbox.get()
    elapsed = time.perf_counter() - start
    assert isinstance(done, Done) and done.received == n, done
    return elapsed


async def round_trips(
    a: PeerTransport[Message], inbox: asyncio.Queue[Message], n: int
) -> list[float]:
    samples = []
    for seq in range(n):
        start = time.perf_counter_ns()
        a.send("b", Ping(seq))
        reply = await inbox.get()
        samples.append((time.perf_counter_ns() - start) / 1e6)
        assert isinstance(reply, Pong) and reply.seq == seq
    return samples


async def raw_round_trips(port: int, n: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = msgspec.msgpack.encode(Data(123_456, 7, PAYLOAD))
    frame = struct.pack(">I", len(payload)) + payload
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        writer.write(frame)
        header = await reader.readexactly(4)
        await reader.readexactly(struct.unpack(">I", header)[0])
        samples.append((time.perf_counter_ns() - start) / 1e6)
    writer.close()
    await writer.wait_closed()
    return samples


def describe(name: str, samples: list[float]) -> str:
    qs = statistics.quantiles(samples, n=100)
    return (
        f"{name:<26} p50 {qs[49]:.3f} ms   p99 {qs[98]:.3f} ms   "
        f"mean {statistics.fmean(samples):.3f} ms   ({len(samples)} samples)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300_000)
    parser.add_argument("--window", type=int, default=20_000, help="max queued messages")
    parser.add_argument("--pings", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3, help="throughput repetitions")
    parser.add_argument("--tls", action="store_true", help="mutual TLS between the members")
    parser.add_argument("--uvloop", action="store_true", help="run both members on uvloop")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        pki = None
        if args.tls:
            make_pki(Path(tmp))
            pki = tmp

        async def bench() -> None:
            inbox: asyncio.Queue[Message] = asyncio.Queue()
            server_ssl, client_ssl = tls_contexts(pki, "a")
            a = PeerTransport[Message](
                "a",
                CLUSTER,
                decoder=DECODER,
                on_message=inbox.put_nowait,
                options=OPTIONS,
                server_ssl=server_ssl,
                client_ssl=client_ssl,
            )
            async with a:
                ctx = multiprocessing.get_context("spawn")
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=member_b, args=(theirs, a.port, pki, args.uvloop))
                proc.start()
                loop = asyncio.get_running_loop()
                b_port, raw_port = await loop.run_in_executor(None, ours.recv)
                a.set_peer("b", "127.0.0.1", b_port)
                try:
                    print(
                        f"python {sys.version.split()[0]}, loop {type(loop).__module__}, "
                        f"{'mutual TLS' if args.tls else 'plain TCP'}, {os.cpu_count()} CPUs, "
                        f"message {message_size()} bytes encoded (+4 bytes of frame header)"
                    )
                    await round_trips(a, inbox, 500)  # connect both ways, warm up
                    rates = []
                    for _ in range(args.rounds):
                        elapsed = await throughput(a, ours, inbox, args.messages, args.window)
                        rates.append(args.messages / elapsed)
                    print(
                        f"{'one-way throughput':<26} best {max(rates):,.0f} msg/s   "
                        f"median {statistics.median(rates):,.0f} msg/s   "
                        f"({args.rounds} x {args.messages:,} messages, "
                        f"{max(rates) * (message_size() + 4) / 1e6:.1f} MB/s)"
                    )
                    print(
                        describe("round trip (transport)", await round_trips(a, inbox, args.pings))
                    )
                    if not args.tls:
                        print(
                            describe(
                                "round trip (bare streams)",
                                await raw_round_trips(raw_port, args.pings),
                            )
                        )
                    stats = a.stats().peers["b"]
                    print(
                        f"a->b: sent {stats.sent_frames:,} frames, dropped {stats.dropped_frames}, "
                        f"connection errors {stats.connection_errors}"
                    )
                finally:
                    await a.close()  # first, so that b's exit is not reported as a lost peer
                    ours.send(None)
                    await loop.run_in_executor(None, proc.join)

        run(bench, args.uvloop)


if __name__ == "__main__":
    main()
