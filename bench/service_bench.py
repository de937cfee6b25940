"""The Raft service end to end: member processes, network clients, real fsync; etcd and
PySyncObj measured in the same run.

Run (the documented full run, ~4-5 minutes)::

    .venv/bin/python bench/service_bench.py

``--quick`` is a ~1 minute smoke run (small N, one failover); ``--no-etcd`` and
``--no-pysyncobj`` leave the peers out. Not a test: it asserts nothing and prints a table.

Our cluster: three ``controlplane serve`` processes on 127.0.0.1 (ports picked at run time,
data directories in a temporary directory on the disk, fsync on, Raft defaults: heart-beat
0.1 s, election timeout 1.0 s randomized in [1.0, 2.0)), started by the process tests' harness
(``tests/process/cluster.py``) with the members dialling each other directly. This process is
the load generator: it talks to the members through ``RaftClient`` only. Measured:

1. write latency p50/p99 from one client, each write awaited before the next:
   ``register_node`` (1 h ``node_timeout`` first: these nodes never heart-beat), then
   ``create_index`` (its shards are placed on those nodes), ``acquire_lock``; first through a
   client with a replica (a write returns once the client's own replica applied it), then the
   same through a write-only client (``replica=False``: it returns when the member answered,
   as etcd's clients do; the rows compared with etcd);
2. throughput: ``--concurrency`` (64) callers for ``--seconds`` over ``--clients`` (4)
   write-only RaftClients (64 callers over a few clients is the equivalent of etcd's 64
   clients over a connection pool), of create_index and then set_feature_flag; the writes/s
   target is checked on set_feature_flag, one small keyed value written as etcd's put writes
   one (see ``TPUT_ROWS``);
3. reads: local (the client's replica, no I/O) and linearizable (``consistent=True``: ReadIndex
   on the member, then the replica catches up); the in-process local read
   (``RaftControlPlane.get_cluster_state()`` inside a member);
4. watch delivery: a write through one client, the event out of another client's watch;
5. commits/s with the proposers inside the leader's process (how PySyncObj benchmarks
   itself): member cp-1 runs ``bench/peers/controlplane_member.py`` (the same start as
   ``serve``, plus proposers), leadership is moved to it, and it runs ``set_feature_flag``
   callers against its own ``RaftControlPlane``;
6. failover: SIGKILL of the leader's process, then a new write attempt through the client
   every ``--poll`` (20 ms) until one is acknowledged; kill -> that acknowledgement. Repeated
   ``--failovers`` times, restarting the killed member in between. Then ``--pauses`` times
   the same with SIGSTOP instead (a hung leader: no connection closes, so the followers wait
   for their election timeout), resuming the paused member in between.

etcd v3.6.16 (``controlplane.testing.gobuild.build_peer("etcd")``): three members on
127.0.0.1, default fsync, election timeout 1000 ms and heart-beat 100 ms (its defaults), driven
by the same load generator through its JSON gateway (``/v3/kv/put``, ``/v3/kv/range``,
``/v3/lease/grant``, ``/v3/kv/txn``, ``/v3/watch``) over keep-alive HTTP/1.1. Operation
mapping: create_index and register_node are a put of the same JSON document our call stores;
acquire_lock is a lease grant plus a put-if-absent transaction bound to the lease (two
requests, as etcd's own lock recipe does).

PySyncObj 0.3.17 (installed into ``~/.cache/controlplane-bench/peers-venv``): three
processes, the proposers in the leader's process; commits/s, sequential commit latency,
failover. It keeps its log in memory and never fsyncs.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import msgspec
from benchlib import (
    BATCH,
    NO_BATCH,
    PEER_CONFS,
    PYSYNCOBJ,
    CpuMeter,
    Failover,
    LineProcess,
    PeerCluster,
    event_loop,
    fo_stats,
    load_at_end,
    ms,
    pct,
    peer_failovers,
    peer_setup,
    peer_throughput,
    preamble,
    print_table,
    process_cpu,
    profiled,
    rate,
    ratio,
    secs,
    timed_closed_loop,
    timed_sequence,
    wait_idle,
)

from controlplane.backends.raft.client import RaftClient, connect
from controlplane.errors import ControlPlaneError
from controlplane.types import EventKind, Node
from tests.process.cluster import HOST, ProcessCluster, free_ports

MEMBER_SCRIPT = Path(__file__).resolve().parent / "peers" / "controlplane_member.py"
CLUSTER_ID = "service-bench"
OUR_TIMING = {"heartbeat_interval": 0.1, "election_timeout": 1.0}  # controlplane's defaults
WRITES = ("register_node", "create_index", "acquire_lock")
"""Measured in this order: the indices are placed on the registered nodes."""

TPUT_OPS = ("create_index", "set_feature_flag")
"""The writes of the throughput phase, in the order they run (ours, then etcd's)."""

TPUT_ROWS = ("set_feature_flag", "create_index")
"""The same writes in the table's order. The writes/s target, set against etcd's put, is
checked on the first: one small keyed value written, as a put writes one. create_index, the
heaviest write (its apply on every replica also places the shard copies), is printed under
it."""

TARGET_P50 = 0.0012
TARGET_CLIENT_TPUT = 10_000.0
TARGET_LEADER_TPUT = 25_000.0
TARGET_LOCAL_INPROC = 100e-6
TARGET_LOCAL_CLIENT = 1e-3
TARGET_FAILOVER = 1.5

Call = Callable[[int, int], Awaitable[object]]
"""One operation: ``call(worker, i)``; each (worker, i) names a new object."""

_CLEANUP: list[Callable[[], None]] = []


@atexit.register
def _cleanup() -> None:
    """Kill whatever is still running (also after an exception or Ctrl-C)."""
    while _CLEANUP:
        with contextlib.suppress(Exception):
            _CLEANUP.pop()()


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def killpg(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:  # never signal a reaped process: its id may be reused
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


# --- load generation -----------------------------------------------------------------------------


async def sequential(call: Call, n: int, warmup: int) -> list[float]:
    return await timed_sequence(functools.partial(call, 0), n, warmup)


def lat_line(samples: list[float]) -> str:
    return f"p50 {ms(pct(samples, 50))} p99 {ms(pct(samples, 99))}"


@dataclass
class Tput:
    value: float  # acknowledged writes per second
    latencies: list[float]
    failed: int
    cpu: str = ""  # who used the cores
    cores: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # failures by type and message


def per_write(t: Tput) -> str:
    """CPU time each process spent per acknowledged write."""
    if not t.value:
        return "-"
    return ", ".join(f"{k} {v / t.value * 1e6:.0f} µs" for k, v in t.cores.items())


async def closed_loop(call: Call, callers: int, seconds: float, pids: dict[str, int]) -> Tput:
    """``callers`` tasks, each awaiting one call after the other for ``seconds``, with the
    cores each process in ``pids`` and this one used."""
    meter = CpuMeter()
    cpu0 = {name: process_cpu(pid) for name, pid in pids.items()}
    own0 = time.process_time()
    errors = (ControlPlaneError, OSError, EtcdError)
    seen: dict[str, int] = {}
    latencies, failed, wall = await timed_closed_loop(call, callers, seconds, errors, seen)
    cores = {name: (process_cpu(pid) - cpu0[name]) / wall for name, pid in pids.items()}
    cores["load generator"] = (time.process_time() - own0) / wall
    total = sum(cores.values())
    cpu = (
        meter.report(total, "members + load generator")
        + " ("
        + ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
        + ")"
    )
    return Tput(len(latencies) / wall, latencies, failed, cpu, cores, seen)


# --- our cluster ---------------------------------------------------------------------------------


class _Direct:
    """Stands in for a link's fault proxy: the address is the peer's own port, so members
    dial each other directly (a proxy would add a hop and this process's CPU to every
    message)."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class Members(ProcessCluster):
    """Three ``controlplane serve`` processes with our default Raft timing, no proxies."""

    def __init__(self, base: Path, *, fsync: bool = True) -> None:
        raft = {**OUR_TIMING, "fsync": fsync}
        super().__init__(base, 3, cluster_id=CLUSTER_ID, raft=raft, log_level="INFO")
        self.links = {  # type: ignore[assignment]
            (a, b): _Direct(f"{HOST}:{self.members[b].peer_port}") for a, b in self.links
        }
        _CLEANUP.append(self.kill_all)

    def warnings(self, most: int = 8) -> list[str]:
        """The members' WARNING/ERROR/CRITICAL log lines (the first ``most``, and a count)."""
        lines = [
            f"{m.id}: {line}"
            for m in self.members
            for line in self.log_text(m.index).splitlines()
            if " WARNING " in line or " ERROR " in line or " CRITICAL " in line
        ]
        return lines[:most] + ([f"... {len(lines) - most} more"] if len(lines) > most else [])

    def pids(self) -> dict[str, int]:
        return {m.id: m.process.pid for m in self.members if m.process is not None and m.running}


async def stable(cluster: Members, client: RaftClient | None = None) -> int:
    """The leader's index once every member logged it (and, with ``client``, a write passed)."""
    leader = await cluster.wait_ready(60.0)
    if client is not None:
        await client.set_feature_flag("bench-stable", True)
    return leader


def our_call(clients: list[RaftClient], op: str, prefix: str) -> Call:
    """``op`` through ``clients`` (worker ``w`` uses client ``w % len(clients)``)."""
    n = len(clients)
    if op == "create_index":
        return lambda w, i: clients[w % n].create_index(f"{prefix}-{w}-{i}")
    if op == "register_node":
        return lambda w, i: clients[w % n].register_node(make_node(f"{prefix}-{w}-{i}", i))
    if op == "acquire_lock":
        return lambda w, i: clients[w % n].acquire_lock(f"{prefix}-{w}-{i}", "bench", 600.0)
    if op == "set_feature_flag":  # one flag per worker, toggled: every write changes the state
        return lambda w, i: clients[w % n].set_feature_flag(f"{prefix}-{w}", bool(i & 1))
    raise ValueError(op)


def make_node(node_id: str, i: int) -> Node:
    return Node(id=node_id, address=f"10.1.{i // 250 % 250}.{i % 250}:9300", zone=f"z{i % 3}")


@dataclass
class Ours:
    seq: dict[str, list[float]] = field(default_factory=dict)  # one write-only client
    seq_replica: dict[str, list[float]] = field(default_factory=dict)  # one with a replica
    tput: dict[str, Tput] = field(default_factory=dict)
    reads: dict[str, list[float]] = field(default_factory=dict)
    watch: list[float] = field(default_factory=list)
    leader_tput: dict[int, dict[str, Any]] = field(default_factory=dict)
    leader_seq: dict[str, Any] = field(default_factory=dict)
    inproc_read: dict[str, Any] = field(default_factory=dict)
    failovers: list[Failover] = field(default_factory=list)
    pauses: list[Failover] = field(default_factory=list)
    docs: dict[str, bytes] = field(default_factory=dict)  # what create_index etc. store, JSON
    notes: list[str] = field(default_factory=list)


async def watch_latency(writer: RaftClient, watcher: RaftClient, n: int) -> list[float]:
    """Write a flag through ``writer``; time until ``watcher``'s watch delivers its event."""
    samples: list[float] = []
    clock = time.perf_counter
    async with watcher.watch(since=watcher.version, kinds={EventKind.FLAG_CHANGED}) as events:
        for i in range(n):
            key = f"watch-{i}"
            t0 = clock()
            write = asyncio.ensure_future(writer.set_feature_flag(key, True))
            async for event in events:
                if event.key == key:
                    samples.append(clock() - t0)
                    break
            await write
    return samples


async def py_spy(args: argparse.Namespace, pid: int, label: str, seconds: float) -> None:
    """Sample ``pid`` with py-spy (``--py-spy``) for ``seconds``; print its top functions."""
    if args.py_spy is None or args.profile is None:
        return
    args.profile.mkdir(parents=True, exist_ok=True)
    out = args.profile / f"{label}.collapsed"
    proc = await asyncio.create_subprocess_exec(
        str(args.py_spy),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "500",
        "--format",
        "raw",
        "--nonblocking",  # never pause the process: the timing stays as without py-spy
        "--gil",  # only samples holding the GIL: where the CPU time goes
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await proc.wait()
    print(summarize_collapsed(out, label), flush=True)


def summarize_collapsed(path: Path, label: str, top: int = 25) -> str:
    """The functions with the most samples (own and inclusive) in a py-spy raw file."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            k = int(count)
            total += k
            frames = [
                f.split(" (")[0] + " " + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                for f in stack.split(";")
                if f
            ]
            if frames:
                own[frames[-1]] = own.get(frames[-1], 0) + k
            for f in set(frames):
                incl[f] = incl.get(f, 0) + k
    lines = [f"\n--- py-spy {label}: {total} samples -> {path}", "own time:"]
    for f, k in sorted(own.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"  {100 * k / max(total, 1):5.1f}%  {f}")
    lines.append("inclusive:")
    for f, k in sorted(incl.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"  {100 * k / max(total, 1):5.1f}%  {f}")
    return "\n".join(lines)


async def one_client_writes(
    args: argparse.Namespace, client: RaftClient, tag: str, kind: str
) -> dict[str, list[float]]:
    """Each of WRITES ``args.n`` times through ``client``, one after the other: the samples."""
    out: dict[str, list[float]] = {}
    for op in WRITES:
        call = our_call([client], op, f"{tag[0]}-{op[:4]}")
        with profiled(args.profile, f"client-seq-{tag}-{op}"):
            out[op] = await sequential(call, args.n, args.warmup)
        print(f"ours: {op} through one {kind}: {lat_line(out[op])}", flush=True)
    return out


async def run_ours(args: argparse.Namespace, base: Path) -> Ours:
    res = Ours()
    cluster = Members(base / "ours", fsync=not args.no_fsync)
    clients: list[RaftClient] = []
    try:
        await cluster.start()
        lead = await stable(cluster)
        leader_address = cluster.members[lead].client_address
        print(f"ours: leader {cluster.members[lead].id}; clients connect to it", flush=True)
        # With --spread the throughput clients connect to any member (RaftClient's default):
        # followers forward the writes, and the stream of commands to clients is spread.
        anywhere = cluster.client_addresses() if args.spread else [leader_address]
        # One client only while the single-client latencies are measured: every connected
        # client receives the command stream, which would load the members and this process.
        clients.append(await connect([leader_address], cluster_id=CLUSTER_ID))
        one = clients[0]
        # The nodes registered below never heart-beat: with the default node_timeout (10 s)
        # the leader would mark them DOWN during the run and re-place every shard on them.
        config = await one.get_cluster_config()
        await one.set_cluster_config(msgspec.structs.replace(config, node_timeout=3600.0))
        res.seq_replica = await one_client_writes(args, one, "replica", "client with a replica")
        state = one._local_state()
        index = next(iter(state.indices.values()))
        res.docs["create_index"] = _json(index)
        res.docs["register_node"] = _json(next(iter(state.nodes.values())))
        # Then the same writes through a write-only client (etcd's clients hold no replica
        # either), on the larger state the first round left; `one` is not connected
        # meanwhile: the member would stream every command to it.
        await one.stop()
        lone = await connect([leader_address], cluster_id=CLUSTER_ID, replica=False)
        clients.append(lone)
        res.seq = await one_client_writes(args, lone, "write-only", "write-only client")
        await lone.stop()
        # The throughput clients hold no replica unless --replica-clients.
        writers = [
            await connect(anywhere, cluster_id=CLUSTER_ID, replica=args.replica_clients)
            for _ in range(args.clients)
        ]
        clients += writers
        pids = cluster.pids()
        for op in TPUT_OPS:
            await stable(cluster, writers[0])
            call = our_call(writers, op, f"t-{op[:4]}")
            spy = asyncio.gather(
                py_spy(args, pids[cluster.members[lead].id], f"leader-{op}", args.seconds - 0.5),
                py_spy(args, os.getpid(), f"load-generator-{op}", args.seconds - 0.5),
            )
            # py-spy samples this process too: no cProfile then (it would slow it down).
            with profiled(None if args.py_spy else args.profile, f"client-tput-{op}"):
                res.tput[op] = await closed_loop(call, args.concurrency, args.seconds, pids)
            await spy
            t = res.tput[op]
            res.notes += [f"ours {op}: {k} calls failed with {w}" for w, k in t.errors.items()]
            kind = "full" if args.replica_clients else "write-only"
            print(
                f"ours: {op}, {args.concurrency} callers over {args.clients} {kind} clients: "
                f"{rate(t.value)} ({t.failed} failed); {t.cpu}; CPU per write: " + per_write(t),
                flush=True,
            )
        for writer in writers:
            await writer.stop()
        one = await connect([leader_address], cluster_id=CLUSTER_ID)
        watcher = await connect(anywhere, cluster_id=CLUSTER_ID)
        clients += [one, watcher]
        clock = time.perf_counter
        local, linear = [], []
        for _ in range(args.reads):
            t0 = clock()
            await one.get_cluster_state()
            local.append(clock() - t0)
        for _ in range(args.reads // 10):
            t0 = clock()
            await one.get_cluster_state(consistent=True)
            linear.append(clock() - t0)
        res.reads = {"local": local, "linearizable": linear}
        print(
            f"ours: reads through the client: local p50 {ms(pct(local, 50))}, linearizable "
            f"p50 {ms(pct(linear, 50))}",
            flush=True,
        )
        res.watch = await watch_latency(one, watcher, args.watch_n)
        print(f"ours: watch delivery p50 {ms(pct(res.watch, 50))}", flush=True)
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.stop()
        # Nothing was killed on this cluster: a warning here is worth reading.
        res.notes += [f"member log: {line}" for line in cluster.warnings()]
        await cluster.close()
    # A fresh cluster for the proposers in the leader's process and the failovers.
    cluster = Members(base / "ours-2", fsync=not args.no_fsync)
    try:
        await cluster.start()
        await stable(cluster)
        await in_leader(args, cluster, res)
        client = await connect(cluster.client_addresses(), cluster_id=CLUSTER_ID)
        try:
            await failovers(
                "ours", args, res, lambda pause: our_failover(args, cluster, client, pause=pause)
            )
        finally:
            await client.stop()
    finally:
        await cluster.close()
    return res


def _json(value: Any) -> bytes:
    return msgspec.json.encode(value)


async def in_leader(args: argparse.Namespace, cluster: Members, res: Ours) -> None:
    """Replace cp-1 by the bench member script, make it lead, run proposers inside it."""
    member = cluster.members[0]
    await cluster.kill(0)
    command = [sys.executable, "-u", str(MEMBER_SCRIPT), "--config", str(member.config_path)]
    if not args.no_uvloop:
        command.append("--uvloop")
    if args.profile is not None:
        command += ["--profile", str(args.profile)]
    proc = await asyncio.to_thread(LineProcess, command, member.log_path, name="cp-1 (bench)")
    member.process = proc.proc  # the harness kills it with the others
    _CLEANUP.append(proc.kill)
    await stable(cluster)
    client = await connect(cluster.client_addresses(), cluster_id=CLUSTER_ID)
    try:
        await client.transfer_leader(member.id)
    finally:
        await client.stop()
    await cluster.wait_ready(30.0)
    call = proc.call  # blocking: in a thread
    print(f"ours: proposers inside the leader {member.id} ({proc.info.get('loop')})", flush=True)
    res.leader_seq = await asyncio.to_thread(call, {"op": "sequential", "n": args.n}, 600.0)
    for callers in (args.concurrency, args.high_concurrency):
        if not callers:
            continue
        pids = {m.id: m.process.pid for m in cluster.members[1:] if m.process is not None}
        cpu0 = {k: process_cpu(p) for k, p in pids.items()}
        cmd = {"op": "throughput", "command": "set_feature_flag", "concurrency": callers}
        out = await asyncio.to_thread(call, {**cmd, "seconds": args.seconds}, args.seconds + 120)
        if "error" in out:
            res.notes.append(f"in-leader x{callers}: {out['error']}")
            print(f"ours: in-leader x{callers} failed: {out['error']}", flush=True)
            continue
        out["followers_cores"] = {
            k: (process_cpu(p) - cpu0[k]) / out["elapsed"] for k, p in pids.items()
        }
        res.leader_tput[callers] = out
        print(
            f"ours: set_feature_flag x{callers} inside the leader: "
            f"{rate(out['ok'] / out['elapsed'])} ({out['failed']} failed; leader "
            f"{out['cores']:.2f} cores, GC {out['gc']:.2f} s; followers "
            + ", ".join(f"{v:.2f}" for v in out["followers_cores"].values())
            + ")",
            flush=True,
        )
        for what, k in out.get("errors", {}).items():
            res.notes.append(f"in-leader x{callers}: {k} calls failed with {what}")
    res.inproc_read = await asyncio.to_thread(call, {"op": "local_reads", "n": args.reads})


async def failovers(
    who: str,
    args: argparse.Namespace,
    res: Ours | EtcdResults,
    run: Callable[[bool], Awaitable[Failover]],
) -> None:
    """``--failovers`` runs of ``run(False)`` (SIGKILL), then ``--pauses`` of ``run(True)``
    (SIGSTOP), into ``res.failovers`` and ``res.pauses``, each printed."""
    for pause, count, out in (
        (False, args.failovers, res.failovers),
        (True, args.pauses, res.pauses),
    ):
        for i in range(count):
            f = await run(pause)
            out.append(f)
            print(
                f"{who}: {'paused' if pause else 'killed'} leader {i + 1}/{count}: new leader "
                f"seen after {secs(f.leader)}, first acknowledged write after {secs(f.commit)} "
                f"({f.attempts} attempts)",
                flush=True,
            )


async def our_failover(
    args: argparse.Namespace, cluster: Members, client: RaftClient, *, pause: bool = False
) -> Failover:
    """SIGKILL the leader (its kernel closes its connections), or with ``pause`` SIGSTOP it
    (nothing closes: only the election timeout tells), and time the next acknowledged write.

    With ``pause`` the writes go through a client of the two other members only, as etcd's
    go to its survivors: the row measures the election. A client connected to the hung
    member leaves it once its keep-alives stop for ``keepalive_timeout`` (2 s)."""
    lead = await stable(cluster, client)
    if pause:
        survivors = [a for i, a in enumerate(cluster.client_addresses()) if i != lead]
        writer = await connect(survivors, cluster_id=CLUSTER_ID, replica=False)
        try:
            return await _failover(args, cluster, writer, lead, pause=True)
        finally:
            await writer.stop()
    return await _failover(args, cluster, client, lead, pause=False)


async def _failover(
    args: argparse.Namespace, cluster: Members, client: RaftClient, lead: int, *, pause: bool
) -> Failover:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    attempts: set[asyncio.Task[None]] = set()

    async def attempt(k: int) -> None:
        with contextlib.suppress(ControlPlaneError, OSError):
            await client.set_feature_flag("failover", bool(k & 1))
            if not done.done():
                done.set_result(time.monotonic())

    t0 = time.monotonic()
    killing: asyncio.Task[None] | None = None
    if pause:
        cluster.pause(lead)
    else:
        killing = loop.create_task(cluster.kill(lead))
    leader_at: float | None = None
    count = 0
    while not done.done() and time.monotonic() - t0 < args.failover_deadline:
        task = loop.create_task(attempt(count))
        attempts.add(task)
        task.add_done_callback(attempts.discard)
        count += 1
        await asyncio.wait([done], timeout=args.poll)
        if leader_at is None and (killing is None or killing.done()):
            new = cluster.leader()
            if new is not None and new != lead:
                leader_at = time.monotonic()
    commit_at = done.result() if done.done() else None
    for task in list(attempts):
        task.cancel()
    await asyncio.gather(*attempts, return_exceptions=True)
    if killing is not None:
        await killing
    if leader_at is None:
        with contextlib.suppress(TimeoutError):
            await cluster.wait_leader(10.0, other_than=lead)
            leader_at = time.monotonic()
    if pause:
        cluster.resume(lead)  # it rejoins as a follower
    else:
        await cluster.start_member(lead)
    return Failover(
        None if leader_at is None else leader_at - t0,
        None if commit_at is None else commit_at - t0,
        count,
    )


# --- etcd -----------------------------------------------------------------------------------------


class EtcdError(Exception):
    """etcd answered with an error."""


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


class Http:
    """A minimal keep-alive HTTP/1.1 client (POST with a JSON body) for etcd's gateway."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _send(self, path: str, body: bytes) -> asyncio.StreamReader:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        return self.reader

    @staticmethod
    async def _head(reader: asyncio.StreamReader) -> tuple[int, int | None]:
        """(status, content length; None for chunked)."""
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length: int | None = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                length = None
        return status, length

    @staticmethod
    async def _chunk(reader: asyncio.StreamReader) -> bytes:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        data = await reader.readexactly(size) if size else b""
        await reader.readexactly(2)
        return data

    async def post(self, path: str, document: dict[str, Any]) -> dict[str, Any]:
        reader = await self._send(path, json.dumps(document).encode())
        try:
            status, length = await self._head(reader)
            if length is None:
                parts = []
                while chunk := await self._chunk(reader):
                    parts.append(chunk)
                body = b"".join(parts)
            else:
                body = await reader.readexactly(length)
        except BaseException:
            self.close()
            raise
        answer: dict[str, Any] = json.loads(body) if body else {}
        if status != 200:
            raise EtcdError(f"{path}: HTTP {status}: {answer.get('message', body[:200])}")
        return answer

    async def stream(self, path: str, document: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The JSON messages of a streaming answer (``/v3/watch``), one by one."""
        reader = await self._send(path, json.dumps(document).encode())
        status, length = await self._head(reader)
        if status != 200 or length is not None:
            raise EtcdError(f"{path}: HTTP {status}")
        buffer = b""
        while chunk := await self._chunk(reader):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    yield json.loads(line)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
            self.writer = None


class Etcd:
    """Three etcd members on 127.0.0.1, each in its own process group."""

    def __init__(self, binary: Path, base: Path) -> None:
        self.binary = binary
        self.base = base
        ports = free_ports(6)
        self.names = [f"e{i + 1}" for i in range(3)]
        self.client_ports = ports[0::2]
        self.peer_ports = ports[1::2]
        self.procs: list[subprocess.Popen[bytes] | None] = [None, None, None]
        self.log = base / "etcd.log"
        base.mkdir(parents=True, exist_ok=True)
        _CLEANUP.append(self.close)

    def start(self, i: int) -> None:
        cluster = ",".join(
            f"{n}=http://{HOST}:{p}" for n, p in zip(self.names, self.peer_ports, strict=True)
        )
        client = f"http://{HOST}:{self.client_ports[i]}"
        peer = f"http://{HOST}:{self.peer_ports[i]}"
        args = [
            str(self.binary),
            f"--name={self.names[i]}",
            f"--data-dir={self.base / self.names[i]}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={cluster}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=service-bench",
            "--log-level=error",
        ]
        with self.log.open("ab") as log:
            self.procs[i] = subprocess.Popen(
                args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            killpg(proc)
        self.procs[i] = None

    def pause(self, i: int, paused: bool = True) -> None:
        """SIGSTOP member ``i`` (or SIGCONT it with ``paused`` false)."""
        proc = self.procs[i]
        if proc is not None:
            os.killpg(proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def close(self) -> None:
        for i in range(3):
            self.kill(i)

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in zip(self.names, self.procs, strict=True) if p is not None}

    def http(self, i: int) -> Http:
        return Http(HOST, self.client_ports[i])

    async def status(self, i: int) -> dict[str, Any] | None:
        http = self.http(i)
        try:
            async with asyncio.timeout(1.0):
                return await http.post("/v3/maintenance/status", {})
        except (OSError, TimeoutError, EtcdError, asyncio.IncompleteReadError, ValueError):
            return None
        finally:
            http.close()

    async def leader(self, within: float = 60.0) -> int:
        """The index of the leader once every running member reports it."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            live = [i for i in range(3) if self.procs[i] is not None]
            answers = {i: await self.status(i) for i in live}
            if all(a is not None for a in answers.values()):
                leaders = {a["leader"] for a in answers.values() if a is not None}
                ids = {a["header"]["member_id"]: i for i, a in answers.items() if a is not None}
                if len(leaders) == 1 and (lead := leaders.pop()) in ids:
                    return ids[lead]
            await asyncio.sleep(0.05)
        raise TimeoutError(f"etcd: no leader within {within} s (see {self.log})")


async def etcd_put(http: Http, key: str, value: bytes) -> None:
    await http.post("/v3/kv/put", {"key": b64(key), "value": b64(value)})


async def etcd_lock(http: Http, key: str) -> None:
    """etcd's lock recipe in its simplest form: a lease, then put-if-absent bound to it."""
    lease = await http.post("/v3/lease/grant", {"TTL": 600})
    k = b64(key)
    answer = await http.post(
        "/v3/kv/txn",
        {
            "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": 0}],
            "success": [{"request_put": {"key": k, "value": b64("bench"), "lease": lease["ID"]}}],
        },
    )
    if not answer.get("succeeded"):
        raise EtcdError(f"lock {key} is taken")


def etcd_call(pool: list[Http], op: str, prefix: str, docs: dict[str, bytes]) -> Call:
    n = len(pool)
    if op == "acquire_lock":
        return lambda w, i: etcd_lock(pool[w % n], f"/cp/locks/{prefix}-{w}-{i}")
    if op == "set_feature_flag":
        return lambda w, i: etcd_put(pool[w % n], f"/cp/flags/{prefix}-{w}", b"true")
    doc = docs.get(op, b'{"id": "x"}')
    return lambda w, i: etcd_put(pool[w % n], f"/cp/{op}/{prefix}-{w}-{i}", doc)


@dataclass
class EtcdResults:
    note: str = ""
    seq: dict[str, list[float]] = field(default_factory=dict)
    tput: dict[str, Tput] = field(default_factory=dict)
    reads: dict[str, list[float]] = field(default_factory=dict)
    watch: list[float] = field(default_factory=list)
    failovers: list[Failover] = field(default_factory=list)
    pauses: list[Failover] = field(default_factory=list)


async def etcd_watch_latency(etcd: Etcd, lead: int, n: int) -> list[float]:
    writer, watcher = etcd.http(lead), etcd.http(lead)
    prefix = "/cp/watch/"
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    samples: list[float] = []
    clock = time.perf_counter
    stream = watcher.stream(
        "/v3/watch", {"create_request": {"key": b64(prefix), "range_end": b64(end)}}
    )
    try:
        first = await anext(stream)  # "created"
        assert first.get("result", {}).get("created"), first
        for i in range(n):
            key = f"{prefix}{i}"
            t0 = clock()
            write = asyncio.ensure_future(etcd_put(writer, key, b"1"))
            found = False
            while not found:
                message = await anext(stream)
                for event in message.get("result", {}).get("events", []):
                    if base64.b64decode(event["kv"]["key"]).decode() == key:
                        samples.append(clock() - t0)
                        found = True
            await write
    finally:
        await stream.aclose()
        writer.close()
        watcher.close()
    return samples


async def etcd_failover(args: argparse.Namespace, etcd: Etcd, *, pause: bool = False) -> Failover:
    lead = await etcd.leader()
    http = etcd.http(lead)
    try:
        await etcd_put(http, "/cp/failover", b"0")
    finally:
        http.close()
    survivors = [i for i in range(3) if i != lead]
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    attempts: set[asyncio.Task[None]] = set()

    async def attempt(i: int, k: int) -> None:
        http = etcd.http(i)
        try:
            await etcd_put(http, "/cp/failover", str(k).encode())
            if not done.done():
                done.set_result(time.monotonic())
        except (OSError, EtcdError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            http.close()

    t0 = time.monotonic()
    if pause:
        etcd.pause(lead)
    else:
        etcd.kill(lead)
    count = 0
    while not done.done() and time.monotonic() - t0 < args.failover_deadline:
        for i in survivors:
            task = loop.create_task(attempt(i, count))
            attempts.add(task)
            task.add_done_callback(attempts.discard)
            count += 1
        await asyncio.wait([done], timeout=args.poll)
    commit_at = done.result() if done.done() else None
    for task in list(attempts):
        task.cancel()
    await asyncio.gather(*attempts, return_exceptions=True)
    if pause:
        etcd.pause(lead, paused=False)
    else:
        etcd.start(lead)
    return Failover(None, None if commit_at is None else commit_at - t0, count)


async def run_etcd(args: argparse.Namespace, base: Path, docs: dict[str, bytes]) -> EtcdResults:
    res = EtcdResults()
    try:
        from controlplane.testing.gobuild import build_peer  # noqa: PLC0415

        binary = await asyncio.to_thread(build_peer, "etcd")
    except Exception as exc:
        res.note = f"no etcd binary: {exc}"
        return res
    etcd = Etcd(binary, base / "etcd")
    pool: list[Http] = []
    try:
        for i in range(3):
            etcd.start(i)
        lead = await etcd.leader()
        print(f"etcd: leader {etcd.names[lead]} ({binary})", flush=True)
        one = etcd.http(lead)
        pool.append(one)
        for op in WRITES:
            res.seq[op] = await sequential(etcd_call([one], op, "s", docs), args.n, args.warmup)
            s = res.seq[op]
            print(f"etcd: {op}: {lat_line(s)}", flush=True)
        pool += [etcd.http(lead) for _ in range(args.concurrency - 1)]
        for op in TPUT_OPS:
            await etcd.leader()
            call = etcd_call(pool, op, f"t-{op[:4]}", docs)
            res.tput[op] = t = await closed_loop(call, args.concurrency, args.seconds, etcd.pids())
            print(
                f"etcd: {op}, {args.concurrency} connections: {rate(t.value)} "
                f"({t.failed} failed); {t.cpu}; CPU per write: {per_write(t)}",
                flush=True,
            )
        clock = time.perf_counter
        for kind, serializable in (("local", True), ("linearizable", False)):
            body = {"key": b64("/cp/flags/t-set_-0"), "serializable": serializable}
            samples = []
            for _ in range(args.reads // 10):
                t0 = clock()
                await one.post("/v3/kv/range", body)
                samples.append(clock() - t0)
            res.reads[kind] = samples
        print(
            f"etcd: reads: serializable p50 {ms(pct(res.reads['local'], 50))}, linearizable "
            f"p50 {ms(pct(res.reads['linearizable'], 50))}",
            flush=True,
        )
        res.watch = await etcd_watch_latency(etcd, lead, args.watch_n)
        print(f"etcd: watch delivery p50 {ms(pct(res.watch, 50))}", flush=True)
        for http in pool:
            http.close()
        pool.clear()
        await failovers("etcd", args, res, lambda pause: etcd_failover(args, etcd, pause=pause))
        await etcd.leader()
    finally:
        for http in pool:
            http.close()
        etcd.close()
    return res


# --- PySyncObj -----------------------------------------------------------------------------------


@dataclass
class PeerResults:
    note: str = ""
    tput: dict[tuple[str, int], float] = field(default_factory=dict)
    cpu: dict[tuple[str, int], str] = field(default_factory=dict)
    seq: list[float] = field(default_factory=list)
    failovers: list[Failover] = field(default_factory=list)


def run_pysyncobj(args: argparse.Namespace) -> PeerResults:
    res = PeerResults()
    python, why, log = peer_setup()
    if python is None:
        res.note = why
        return res
    for conf, extra in PEER_CONFS:
        cluster = PeerCluster(python, extra, log)
        _CLEANUP.append(cluster.quit)
        try:
            lead = cluster.stable_leader()
            if conf == NO_BATCH:
                lead.call({"op": "seq", "n": args.warmup}, 600.0)
                res.seq = lead.call({"op": "seq", "n": args.n}, 600.0)["latencies"]
                print(f"PySyncObj ({conf}): sequential p50 {ms(pct(res.seq, 50))}", flush=True)
            callers_list = [args.concurrency, args.high_concurrency] if conf == BATCH else []
            for callers in [c for c in [*callers_list, args.concurrency] if c]:
                if (conf, callers) in res.tput:
                    continue
                lead = cluster.stable_leader()
                value, _, cpu = peer_throughput(cluster, lead, callers, args.seconds)
                res.tput[conf, callers], res.cpu[conf, callers] = value, cpu
                print(f"PySyncObj ({conf}) x{callers}: {rate(value)} ({cpu})", flush=True)
            if conf == BATCH and args.failovers:
                res.failovers = peer_failovers(
                    cluster, args.failovers, args.poll, args.failover_deadline
                )
        finally:
            cluster.quit()
    return res


# --- the table -----------------------------------------------------------------------------------


def check(value: float | None, target: float, higher: bool) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "✓" if (value >= target if higher else value < target) else "✗"


def table(
    args: argparse.Namespace, ours: Ours, etcd: EtcdResults | None, peer: PeerResults | None
) -> list[list[str]]:
    rows = [
        ["metric", "ours", "etcd 3.6", "PySyncObj", "ours/etcd", "ours/PySyncObj", "target", "✓/✗"]
    ]

    def add(metric: str, *cells: str) -> None:
        """A row: ours, etcd, PySyncObj, ours/etcd, ours/PySyncObj, target, check."""
        rows.append([metric, *cells, *[""] * (7 - len(cells))])

    def lat2(samples: list[float] | None) -> str:
        if not samples:
            return ""
        a, b = pct(samples, 50), pct(samples, 99)
        if b < 1e-4:
            return f"{a * 1e6:.2f} / {b * 1e6:.2f} µs"
        return f"{ms(a)} / {ms(b)}"

    def r50(a: list[float] | None, b: list[float] | None) -> str:
        return ratio(pct(a, 50), pct(b, 50)) if a and b else ""

    e_ok = etcd is not None and not etcd.note
    p_ok = peer is not None and not peer.note
    for op in ("create_index", "register_node", "acquire_lock"):
        s = ours.seq[op]
        es = etcd.seq.get(op) if e_ok and etcd else None
        first = op == "create_index"
        add(
            f"{op}, one write-only client, p50 / p99"
            + (" (etcd: lease grant + txn)" if op == "acquire_lock" else " (etcd: put)"),
            lat2(s),
            lat2(es),
            "",
            r50(s, es),
            "",
            "p50 < 1.2 ms" if first else "",
            check(pct(s, 50), TARGET_P50, False) if first else "",
        )
        sr = ours.seq_replica.get(op)
        add("  one client with a replica (read-your-writes)", lat2(sr), "", "", r50(sr, es))
    for op in TPUT_ROWS:
        t = ours.tput[op]
        et = etcd.tput.get(op) if e_ok and etcd else None
        first = op == TPUT_ROWS[0]
        add(
            f"writes/s, {args.concurrency} callers, {op} (etcd: put)"
            + ("" if first else "; it places 2 shard copies on every replica"),
            rate(t.value) + (f" ({t.failed} failed)" if t.failed else ""),
            rate(et.value) if et else "",
            "",
            ratio(t.value, et.value) if et else "",
            "",
            ">= 10,000/s" if first else "",
            check(t.value, TARGET_CLIENT_TPUT, True) if first else "",
        )
        add(
            "  latency under that load p50 / p99",
            lat2(t.latencies),
            lat2(et.latencies) if et else "",
        )
    for callers, out in ours.leader_tput.items():
        value = out["ok"] / out["elapsed"]
        theirs = peer.tput.get((BATCH, callers)) if p_ok and peer else None
        # The target is PySyncObj's own measure: many requests in flight at once.
        own_way = callers == args.high_concurrency
        add(
            f"commits/s, {callers} proposers in the leader's process"
            + (" (PySyncObj's own way)" if own_way else ""),
            rate(value) + (f" ({out['failed']} failed)" if out["failed"] else ""),
            "",
            rate(theirs) if theirs else "",
            "",
            ratio(value, theirs) if theirs else "",
            ">= 25,000/s" if own_way else "",
            check(value, TARGET_LEADER_TPUT, True) if own_way else "",
        )
        nb = peer.tput.get((NO_BATCH, callers)) if p_ok and peer else None
        if nb:
            add(f"  vs PySyncObj {NO_BATCH}", rate(value), "", rate(nb), "", ratio(value, nb))
    if ours.leader_seq and "p50" in ours.leader_seq:
        o50 = ours.leader_seq["p50"]
        p50 = pct(peer.seq, 50) if p_ok and peer and peer.seq else None
        add(
            "sequential commit in the leader's process p50 / p99",
            f"{ms(o50)} / {ms(ours.leader_seq['p99'])}",
            "",
            f"{ms(p50)} / {ms(pct(peer.seq, 99))} ({NO_BATCH})" if p50 and peer else "",
            "",
            ratio(o50, p50) if p50 else "",
        )
    if ours.inproc_read:
        v = ours.inproc_read["p50"]
        add(
            "local read in the member's process p50 / p99",
            f"{v * 1e6:.2f} / {ours.inproc_read['p99'] * 1e6:.2f} µs",
            "",
            "",
            "",
            "",
            "< 100 µs",
            check(v, TARGET_LOCAL_INPROC, False),
        )
    er = etcd.reads if e_ok and etcd else {}
    lo = ours.reads["local"]
    add(
        "local read through the client p50 / p99 (etcd: serializable range)",
        lat2(lo),
        lat2(er.get("local")),
        "",
        r50(lo, er.get("local")),
        "",
        "< 1 ms",
        check(pct(lo, 50), TARGET_LOCAL_CLIENT, False),
    )
    li = ours.reads["linearizable"]
    add(
        "linearizable read through the client p50 / p99",
        lat2(li),
        lat2(er.get("linearizable")),
        "",
        r50(li, er.get("linearizable")),
    )
    ew = etcd.watch if e_ok and etcd else None
    add(
        "watch delivery, write issued -> event received, p50 / p99",
        lat2(ours.watch),
        lat2(ew),
        "",
        r50(ours.watch, ew),
    )

    def spread(values: list[float | None]) -> str:
        return (
            ""
            if values[1] is None
            else " / ".join("-" if v is None else f"{v:.3f}" for v in values) + " s"
        )

    o = fo_stats(ours.failovers, "commit")
    e = fo_stats(etcd.failovers, "commit") if e_ok and etcd else [None] * 3
    p = fo_stats(peer.failovers, "commit") if p_ok and peer else [None] * 3
    add(
        f"failover: SIGKILL leader -> next acknowledged write, min / p50 / max of "
        f"{len(ours.failovers)}",
        spread(o),
        spread(e),
        spread(p),
        ratio(o[1], e[1]) if e[1] else "",
        ratio(o[1], p[1]) if p[1] else "",
        "< 1.5 s (p50)",
        check(o[1], TARGET_FAILOVER, False),
    )
    o = fo_stats(ours.pauses, "commit")
    e = fo_stats(etcd.pauses, "commit") if e_ok and etcd else [None] * 3
    add(
        f"  SIGSTOP leader (no connection closes) -> next acknowledged write, of "
        f"{len(ours.pauses)}",
        spread(o),
        spread(e),
        "",
        ratio(o[1], e[1]) if e[1] else "",
    )
    ol = fo_stats(ours.failovers, "leader")
    pl = fo_stats(peer.failovers, "leader") if p_ok and peer else [None] * 3
    add(
        "  SIGKILL -> new leader seen",
        spread(ol),
        "",
        spread(pl),
        "",
        ratio(ol[1], pl[1]) if pl[1] else "",
    )
    return rows


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="~1 min smoke run: small N")
    parser.add_argument("-n", type=int, default=1000, help="sequential writes per operation")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured writes first")
    parser.add_argument("--concurrency", type=int, default=64, help="callers / connections")
    parser.add_argument(
        "--high-concurrency",
        type=int,
        default=10_000,
        help="a second in-leader run with this many proposers (0: skip)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=4,
        help="RaftClients the callers share in the throughput runs",
    )
    parser.add_argument(
        "--spread",
        action="store_true",
        help="throughput clients connect to any member, not only to the leader",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput duration")
    parser.add_argument("--reads", type=int, default=10_000, help="local reads (1/10 others)")
    parser.add_argument("--watch-n", type=int, default=500, help="watch deliveries timed")
    parser.add_argument("--failovers", type=int, default=9)
    parser.add_argument(
        "--pauses", type=int, default=5, help="failovers after SIGSTOP of the leader"
    )
    parser.add_argument("--poll", type=float, default=0.02, help="new write attempt period")
    parser.add_argument("--failover-deadline", type=float, default=15.0)
    parser.add_argument(
        "--no-fsync", action="store_true", help="diagnostic: our members with raft.fsync false"
    )
    parser.add_argument("--no-etcd", action="store_true")
    parser.add_argument(
        "--replica-clients",
        action="store_true",
        help="throughput through full RaftClients (each applies every command to its own "
        "replica) instead of write-only ones (replica=False, like etcd's clients)",
    )
    parser.add_argument("--no-pysyncobj", action="store_true")
    parser.add_argument(
        "--no-uvloop",
        action="store_true",
        help="asyncio's loop in this process and in the in-leader member (the serve members "
        "use uvloop whenever it is installed)",
    )
    parser.add_argument("--data-dir", type=Path, help="parent of the temporary data dirs")
    parser.add_argument(
        "--profile", type=Path, help="cProfile the load generator and the in-leader member into DIR"
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="BIN",
        help="with --profile: py-spy the leader during the throughput runs",
    )
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the machine to be idle",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 100)
        args.warmup = min(args.warmup, 10)
        args.seconds = min(args.seconds, 1.0)
        args.reads = min(args.reads, 1000)
        args.watch_n = min(args.watch_n, 50)
        args.failovers = min(args.failovers, 1)
        args.pauses = min(args.pauses, 1)
        args.high_concurrency = min(args.high_concurrency, 1000)
    return args


def run(argv: list[str] | None = None) -> list[list[str]]:
    """Run the benchmark with command-line ``argv``; the table's rows."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and SIGTERM unwind through every finally (and then atexit): nothing is left
        # running. (A shell starts background jobs with SIGINT ignored: undo that too.)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupted)
    uvloop, loop_name = event_loop(args.no_uvloop)

    def arun(coro: Awaitable[Any]) -> Any:
        return uvloop.run(coro) if uvloop else asyncio.run(coro)  # type: ignore[arg-type]

    idle = wait_idle(args.wait_idle) if args.wait_idle > 0 else None
    base = Path(tempfile.mkdtemp(prefix="service-bench-", dir=args.data_dir))
    _CLEANUP.insert(0, lambda: shutil.rmtree(base, ignore_errors=True))
    t_start = time.monotonic()
    etcd = peer = None
    try:
        settings = (
            f"N={args.n} (+{args.warmup} warm-up) sequential per op, {args.concurrency} "
            f"callers x {args.seconds} s (ours over {args.clients} RaftClients, etcd over "
            f"{args.concurrency} HTTP connections), {args.failovers} failovers, attempt every "
            f"{args.poll} s" + (", OUR MEMBERS WITHOUT FSYNC (diagnostic)" if args.no_fsync else "")
        )
        members_loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
        loop_name += f" (load generator; serve members: {members_loop})"
        info = preamble(base, loop_name, settings, idle)
        meter = CpuMeter()
        ours = arun(run_ours(args, base))
        info["CPU during our runs"] = meter.report(who="benchmark + its children")
        if not args.no_etcd:
            meter = CpuMeter()
            etcd = arun(run_etcd(args, base, ours.docs))
            info["CPU during etcd's runs"] = meter.report(who="benchmark + its children")
        if not args.no_pysyncobj:
            peer = run_pysyncobj(args)
    finally:
        _cleanup()
    rows = table(args, ours, etcd, peer)
    print()
    for who, r in (("etcd", etcd), ("PySyncObj", peer)):
        if r is not None and r.note:
            print(f"{who} not measured: {r.note}")
    text = print_table(rows)
    print(
        "\nratio = ours / theirs: below 1 is better for us on latency and failover rows, above 1 "
        "on throughput rows. Ours: 3 `controlplane serve` processes (heart-beat 0.1 s, election "
        "timeout 1.0 s randomized to [1.0, 2.0) s, or 0-0.2 s after the connection to the "
        "leader is lost, fsync on, uvloop if installed); writes "
        "and reads through RaftClient connected to the leader, the throughput rows through "
        f"{args.clients} {'full' if args.replica_clients else 'write-only (replica=False)'} "
        "RaftClients. etcd: 3 members, defaults (heart-beat 100 ms, "
        "election 1000 ms, fsync on), JSON gateway over keep-alive HTTP/1.1 to the leader. "
        f"PySyncObj {PYSYNCOBJ.split('==')[1]}: 3 processes, SyncObjConf() defaults (election "
        "0.4-1.4 s), writes are counter increments from inside the leader's process; its "
        "log is in memory and never fsynced."
    )
    for k in ("CPU during our runs", "CPU during etcd's runs"):
        if k in info:
            print(f"{k}: {info[k]}")
    for label, t in ours.tput.items():
        print(f"our {label} x{args.concurrency}: {t.cpu}")
    if etcd is not None:
        for label, t in etcd.tput.items():
            print(f"etcd {label} x{args.concurrency}: {t.cpu}")
    if peer is not None:
        for (conf, callers), cpu in peer.cpu.items():
            print(f"PySyncObj {conf} x{callers}: {cpu}")
    for note in ours.notes:
        print(f"note: {note}")
    print(load_at_end(t_start))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows, "table": text}, indent=2))
    return rows


if __name__ == "__main__":
    run()
