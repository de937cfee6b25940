"""Raft engine benchmark: three members in one process, loopback TCP, real fsync.

Run (the documented full run, a few minutes)::

    .venv/bin/python bench/raft_bench.py

or ``--quick`` for a sanity run (small N, one failover, no peer). Measures, through the
leader's ``RaftControlPlane`` (the public API, so encoding, the state machine and the watch hub
are included):

1. sequential commit latency p50/p99: one proposer, each write awaited before the next, for
   ``set_feature_flag`` (a cheap command) and ``create_index`` (allocation included);
2. throughput: asyncio tasks writing to the leader for ``--seconds`` (5): ``set_feature_flag``
   with ``--concurrency`` (64) then ``--high-concurrency`` (10,000) tasks, then
   ``create_index`` with 64 (last: it grows the state); with the CPU this process got and the
   time it spent in the garbage collector;
3. failover, on a fresh cluster: the leader is crashed (its Raft loop, timers and transport
   are torn down without a leadership transfer or any further Raft message:
   ``RaftNode.stop(transfer=False)``), and a client starts a new write attempt every
   ``--poll`` seconds on each remaining member until one commits; the time from the crash to
   that commit, and to the first new leader seen. Repeated ``--failovers`` times, restarting
   the crashed member and waiting for a stable leader in between;
4. the same measured on PySyncObj (3 processes on loopback, default ``SyncObjConf`` and with
   ``appendEntriesUseBatch=False``; installed into a separate virtual environment under
   ``~/.cache/controlplane-bench/``), printed side by side with ratios (ours / PySyncObj's, for
   every row).

The three members share one event loop (one core for all their CPU work); their fsyncs run in
one worker thread per member. Data directories are made in a temporary directory on the
disk (``--data-dir`` to choose where). Not a test: it asserts nothing and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

from benchlib import (  # noqa: E402  (bench/, next to this script)
    BATCH,
    NO_BATCH,
    PEER_CONFS,
    PYSYNCOBJ,
    CpuMeter,
    Failover,
    GcMeter,
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
    profiled,
    rate,
    ratio,
    secs,
    timed_closed_loop,
    timed_sequence,
    verdict,
    wait_idle,
)

from controlplane.backends.raft.backend import (  # noqa: E402
    RaftControlPlane,
    local_cluster_configs,
)
from controlplane.config import Config  # noqa: E402
from controlplane.errors import ControlPlaneError  # noqa: E402

TARGET_P50 = 0.002
TARGET_TPUT = 10_000.0
TARGET_FAILOVER = 1.5


# --- our cluster ---------------------------------------------------------------------------------


class Cluster:
    """Three ``RaftControlPlane`` members on 127.0.0.1 in this process."""

    def __init__(self, base: Path, *, heartbeat: float, election: float, fsync: bool) -> None:
        configs = local_cluster_configs(
            base, 3, heartbeat_interval=heartbeat, election_timeout=election, fsync=fsync
        )
        self.configs: dict[str, Config] = {cfg.raft.node_id: cfg for cfg in configs}
        self.members: dict[str, RaftControlPlane] = {}

    async def start(self) -> None:
        for member_id in self.configs:
            await self.start_member(member_id)

    async def start_member(self, member_id: str) -> None:
        cp = RaftControlPlane(self.configs[member_id])
        await cp.start()
        self.members[member_id] = cp

    async def crash(self, member_id: str) -> None:
        """Tear the member down without a leadership transfer or any further Raft message."""
        cp = self.members.pop(member_id)
        await cp.node.stop(transfer=False)  # the part before its first await stops the loop
        await cp.stop()  # duties and watch hub; the node is already stopped

    async def stable_leader(self, within: float = 30.0) -> RaftControlPlane:
        """Wait until all members agree on one leader and have applied its commit index."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            nodes = [cp.node for cp in self.members.values()]
            leaders = [cp for cp in self.members.values() if cp.node.is_leader]
            if len(leaders) == 1:
                lead = leaders[0].node
                if all(n.leader_id == lead.id for n in nodes) and all(
                    n.applied_index >= lead.commit_index for n in nodes
                ):
                    await asyncio.wait_for(leaders[0].set_feature_flag("stable", True), 5.0)
                    return leaders[0]
            await asyncio.sleep(0.01)
        raise TimeoutError("no stable leader")

    async def stop(self) -> None:
        for cp in list(self.members.values()):
            with contextlib.suppress(Exception):
                await cp.stop()
        self.members.clear()


Op = Callable[[RaftControlPlane, int, int], Awaitable[object]]


async def op_flag(cp: RaftControlPlane, worker: int, i: int) -> None:
    # Toggles one flag per worker: every write changes the state, and the state stays small.
    await cp.set_feature_flag(f"bench-{worker}", bool(i & 1))


_run_id = iter(range(1_000_000))


def op_create_index() -> Op:
    prefix = f"r{next(_run_id)}"

    async def create(cp: RaftControlPlane, worker: int, i: int) -> None:
        await cp.create_index(f"{prefix}-w{worker}-{i}")

    return create


async def sequential(cp: RaftControlPlane, op: Op, n: int, warmup: int) -> list[float]:
    return await timed_sequence(lambda i: op(cp, 0, i), n, warmup)


async def throughput(
    cp: RaftControlPlane, op: Op, concurrency: int, seconds: float
) -> tuple[float, list[float], int]:
    """(commits per second, per-write latencies, failed writes) with ``concurrency`` writers."""
    call = functools.partial(op, cp)
    latencies, failed, wall = await timed_closed_loop(call, concurrency, seconds, ControlPlaneError)
    return len(latencies) / wall, latencies, failed


async def failover_once(
    cluster: Cluster, poll: float, deadline: float, attempt_timeout: float
) -> Failover:
    leader_cp = await cluster.stable_leader()
    old = leader_cp.node.id
    survivors = [cp for mid, cp in cluster.members.items() if mid != old]
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    attempts: set[asyncio.Task[None]] = set()
    count = 0

    async def attempt(cp: RaftControlPlane, k: int) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(cp.set_feature_flag("failover", bool(k & 1)), attempt_timeout)
            if not done.done():
                done.set_result(time.monotonic())

    t0 = time.monotonic()
    crash = loop.create_task(cluster.crash(old))
    leader_at: float | None = None
    while not done.done() and time.monotonic() - t0 < deadline:
        for cp in survivors:
            task = loop.create_task(attempt(cp, count))
            attempts.add(task)
            task.add_done_callback(attempts.discard)
            count += 1
        end = time.monotonic() + poll
        while not done.done() and time.monotonic() < end:  # watch for the new leader
            if leader_at is None and any(cp.node.is_leader for cp in survivors):
                leader_at = time.monotonic()
            await asyncio.wait([done], timeout=0.002)
    if leader_at is None and any(cp.node.is_leader for cp in survivors):
        leader_at = time.monotonic()
    commit_at = done.result() if done.done() else None
    for task in list(attempts):
        task.cancel()
    await asyncio.gather(*attempts, return_exceptions=True)
    await crash
    await cluster.start_member(old)
    return Failover(
        None if leader_at is None else leader_at - t0,
        None if commit_at is None else commit_at - t0,
        count,
    )


@dataclass
class Results:
    seq: dict[str, list[float]] = field(default_factory=dict)
    tput: dict[tuple[str, int], tuple[float, list[float]]] = field(default_factory=dict)
    tput_cpu: dict[tuple[str, int], str] = field(default_factory=dict)
    tput_failed: dict[tuple[str, int], int] = field(default_factory=dict)
    tput_cores: dict[tuple[str, int], float] = field(default_factory=dict)
    state_sizes: dict[tuple[str, int], str] = field(default_factory=dict)
    failovers: list[Failover] = field(default_factory=list)


async def state_size(cp: RaftControlPlane) -> str:
    state = await cp.get_cluster_state()
    return f"{len(state.indices):,} indices, {len(state.feature_flags):,} flags"


async def run_ours(args: argparse.Namespace, base: Path) -> Results:
    res = Results()
    fsync = not args.no_fsync
    hb, et = args.heartbeat, args.election_timeout
    cluster = Cluster(base / "a", heartbeat=hb, election=et, fsync=fsync)
    await cluster.start()
    try:
        leader = await cluster.stable_leader()
        print(f"ours: leader {leader.node.id}, term {leader.node.term}", flush=True)
        for label, op in (("set_feature_flag", op_flag), ("create_index", op_create_index())):
            with profiled(args.profile, f"seq-{label}"):
                res.seq[label] = await sequential(leader, op, args.n, args.warmup)
            s = res.seq[label]
            print(f"ours: sequential {label}: p50 {ms(pct(s, 50))} p99 {ms(pct(s, 99))}")
        # create_index last: the indices it adds make the state (and the GC's work) bigger.
        runs: list[tuple[str, Op, int]] = [("set_feature_flag", op_flag, args.concurrency)]
        if args.high_concurrency:
            runs.append(("set_feature_flag", op_flag, args.high_concurrency))
        runs.append(("create_index", op_create_index(), args.concurrency))
        for label, op, callers in runs:
            leader = await cluster.stable_leader()
            key = label, callers
            res.state_sizes[key] = await state_size(leader)
            meter = CpuMeter()
            t0 = time.perf_counter()
            with GcMeter() as gcm, profiled(args.profile, f"throughput-{label}-{callers}"):
                value, lat, failed = await throughput(leader, op, callers, args.seconds)
            res.tput[key] = value, lat
            res.tput_failed[key] = failed
            res.tput_cores[key] = meter.measure()[1]
            res.tput_cpu[key] = cpu = f"{meter.report()}; {gcm.report(time.perf_counter() - t0)}"
            print(
                f"ours: throughput {label}, {callers} proposers: {rate(value)}"
                + (f", {failed} writes FAILED" if failed else "")
                + f" (state before: {res.state_sizes[key]}; {cpu})",
                flush=True,
            )
    finally:
        await cluster.stop()
    if not args.failovers:
        return res
    # A fresh cluster: failover timing should not depend on what the runs above left behind.
    cluster = Cluster(base / "b", heartbeat=hb, election=et, fsync=fsync)
    await cluster.start()
    try:
        for i in range(args.failovers):
            f = await failover_once(cluster, args.poll, args.failover_deadline, 2.0)
            res.failovers.append(f)
            print(
                f"ours: failover {i + 1}/{args.failovers}: new leader after {secs(f.leader)}, "
                f"first commit after {secs(f.commit)} ({f.attempts} attempts)",
                flush=True,
            )
        await cluster.stable_leader()
    finally:
        await cluster.stop()
    return res


# --- PySyncObj -----------------------------------------------------------------------------------


class PeerResults:
    note: str = ""
    conf: dict[str, Any] = field(default_factory=dict)
    seq: dict[str, list[float]] = field(default_factory=dict)  # by configuration
    tput: dict[tuple[str, int], float] = field(default_factory=dict)  # (configuration, callers)
    tput_cpu: dict[tuple[str, int], str] = field(default_factory=dict)
    tput_cores: dict[tuple[str, int], float] = field(default_factory=dict)
    failovers: list[Failover] = field(default_factory=list)
    failovers_matched: list[Failover] = field(default_factory=list)


def run_peer(args: argparse.Namespace) -> PeerResults:
    res = PeerResults()
    python, why, log = peer_setup()
    if python is None:
        res.note = why
        return res
    for conf, extra in PEER_CONFS:
        cluster = PeerCluster(python, extra, log)
        try:
            if conf == BATCH:
                res.conf = cluster.members[0].info
            lead = cluster.stable_leader()
            print(f"PySyncObj ({conf}): leader {lead.addr}; {cluster.members[0].info}")
            # With batching on, a write waits for the next append-entries period (0.1 s).
            n = min(args.n, args.peer_batch_n) if conf == BATCH else args.n
            lead.call({"op": "seq", "n": min(args.warmup, n)}, 600.0)
            seq = lead.call({"op": "seq", "n": n}, 1200.0)["latencies"]
            res.seq[conf] = seq
            print(
                f"PySyncObj ({conf}): sequential x{n}: p50 {ms(pct(seq, 50))} "
                f"p99 {ms(pct(seq, 99))}",
                flush=True,
            )
            for callers in [c for c in (args.concurrency, args.high_concurrency) if c]:
                lead = cluster.stable_leader()
                value, cores, cpu = peer_throughput(cluster, lead, callers, args.seconds)
                res.tput[conf, callers] = value
                res.tput_cores[conf, callers] = cores
                res.tput_cpu[conf, callers] = cpu
                print(
                    f"PySyncObj ({conf}): throughput, {callers} in flight: {rate(value)} ({cpu})",
                    flush=True,
                )
            if conf == BATCH:
                res.failovers = peer_failovers(
                    cluster, args.failovers, args.poll, args.failover_deadline
                )
        finally:
            cluster.quit()
    if args.peer_matched_timing:
        timing = ["--min-timeout", str(args.election_timeout)]
        timing += ["--max-timeout", str(2 * args.election_timeout)]
        cluster = PeerCluster(python, timing, log)
        try:
            print(f"PySyncObj with election timeout as ours: {cluster.members[0].info}")
            res.failovers_matched = peer_failovers(
                cluster, args.failovers, args.poll, args.failover_deadline
            )
        finally:
            cluster.quit()
    return res


# --- the table -----------------------------------------------------------------------------------


def table(args: argparse.Namespace, ours: Results, peer: PeerResults | None) -> list[list[str]]:
    rows: list[list[str]] = [
        ["metric", "controlplane raft", "PySyncObj", "ours/theirs", "target", "verdict"]
    ]

    def row(
        metric: str,
        value: float | None,
        fmt: Callable[[float | None], str],
        theirs: float | None = None,
        *,
        target: str = "",
        check: str = "",
    ) -> None:
        rows.append(
            [
                metric,
                fmt(value),
                fmt(theirs) if theirs is not None else "",
                ratio(value, theirs) if theirs is not None else "",
                target,
                check,
            ]
        )

    pseq = peer.seq if peer else {}
    for label in ("set_feature_flag", "create_index"):
        s = ours.seq[label]
        for q in (50, 99):
            p50 = q == 50
            row(
                f"sequential commit p{q}, {label}",
                pct(s, q),
                ms,
                target="< 2 ms" if p50 else "",
                check=verdict(pct(s, q), TARGET_P50, False) if p50 else "",
            )
            if label != "set_feature_flag":
                continue
            for conf, their in pseq.items():
                row(f"  vs PySyncObj incr, {conf}", pct(s, q), ms, pct(their, q))
    ptput = peer.tput if peer else {}
    for callers in (args.concurrency, args.high_concurrency):
        for label in ("set_feature_flag", "create_index"):
            if (label, callers) not in ours.tput:
                continue
            value, lat = ours.tput[label, callers]
            failed = ours.tput_failed.get((label, callers), 0)
            row(
                f"throughput, {callers} proposers, {label}",
                value,
                (lambda v, n=failed: f"{rate(v)} ({n} failed)") if failed else rate,
                target=">= 10,000/s" if callers == args.concurrency else "",
                check=verdict(value, TARGET_TPUT, True) if callers == args.concurrency else "",
            )
            rows.append(
                [
                    "  write latency under that load p50 / p99",
                    f"{ms(pct(lat, 50))} / {ms(pct(lat, 99))}",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            cores = ours.tput_cores.get((label, callers), 0.0)
            per_core = value / cores if cores > 0 else None
            row("  per CPU core used (commits per core-second)", per_core, rate)
            if label != "set_feature_flag":
                continue
            for (conf, their_callers), their in ptput.items():
                if their_callers != callers:
                    continue
                row(f"  vs PySyncObj incr, {conf}", value, rate, their)
                their_cores = peer.tput_cores.get((conf, callers), 0.0) if peer else 0.0
                their_per_core = their / their_cores if their_cores > 0 else None
                row("    per CPU core used", per_core, rate, their_per_core)
    n = len(ours.failovers)

    def spread(values: list[float | None]) -> str:
        return " / ".join("-" if v is None else f"{v:.3f}" for v in values) + " s"

    def failover_row(metric: str, attr: str, theirs: list[Failover] | None, **kw: str) -> None:
        o, t = fo_stats(ours.failovers, attr), fo_stats(theirs or [], attr)
        rows.append(
            [
                metric,
                spread(o),
                spread(t) if theirs else "",
                ratio(o[1], t[1]) + " (p50)" if theirs else "",
                kw.get("target", ""),
                kw.get("check", ""),
            ]
        )

    med = fo_stats(ours.failovers, "commit")[1]
    failover_row(
        f"failover: crash -> first commit, min / p50 / max of {n}",
        "commit",
        None,
        target="< 1.5 s (p50)",
        check=verdict(med, TARGET_FAILOVER, False),
    )
    et = args.election_timeout
    if peer and peer.failovers:
        failover_row("  vs PySyncObj, default conf (election 0.4-1.4 s)", "commit", peer.failovers)
    if peer and peer.failovers_matched:
        failover_row(
            f"  vs PySyncObj, election {et}-{2 * et} s like ours", "commit", peer.failovers_matched
        )
    failover_row(f"failover: crash -> new leader seen, min / p50 / max of {n}", "leader", None)
    if peer and peer.failovers:
        failover_row("  vs PySyncObj, default conf", "leader", peer.failovers)
    if peer and peer.failovers_matched:
        failover_row(f"  vs PySyncObj, election {et}-{2 * et} s", "leader", peer.failovers_matched)
    return rows


# --- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small N, 1 failover, no peer")
    parser.add_argument("-n", type=int, default=2000, help="sequential writes per kind")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured writes first")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--high-concurrency",
        type=int,
        default=10_000,
        help="a second throughput run with this many proposers (0: skip)",
    )
    parser.add_argument(
        "--peer-batch-n",
        type=int,
        default=200,
        help="sequential writes on PySyncObj with batching on (each waits ~0.1 s)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput duration")
    parser.add_argument("--failovers", type=int, default=5)
    parser.add_argument("--poll", type=float, default=0.02, help="new write attempt period")
    parser.add_argument("--failover-deadline", type=float, default=15.0)
    parser.add_argument("--heartbeat", type=float, default=0.1)
    parser.add_argument("--election-timeout", type=float, default=1.0)
    parser.add_argument("--no-fsync", action="store_true", help="diagnostic: fsync=False")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio even if present")
    parser.add_argument("--no-peers", action="store_true", help="skip PySyncObj")
    parser.add_argument(
        "--no-peer-matched-timing",
        dest="peer_matched_timing",
        action="store_false",
        help="skip the PySyncObj failover run with election timeouts set to ours",
    )
    parser.add_argument("--data-dir", type=Path, help="parent of the temporary data dirs")
    parser.add_argument("--profile", type=Path, help="cProfile each phase into this directory")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--verbose", action="store_true", help="controlplane's warnings too")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the machine to be idle (shared machines)",
    )
    args = parser.parse_args()
    if args.quick:
        args.n = min(args.n, 200)
        args.warmup = min(args.warmup, 20)
        args.seconds = min(args.seconds, 1.0)
        args.failovers = 1
        args.high_concurrency = 0
        args.no_peers = True
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(
        level=logging.WARNING if args.verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvloop, loop_name = event_loop(args.no_uvloop)
    idle = wait_idle(args.wait_idle) if args.wait_idle > 0 else None
    base = Path(tempfile.mkdtemp(prefix="raft-bench-", dir=args.data_dir))
    try:
        settings = (
            f"heartbeat {args.heartbeat} s, election timeout {args.election_timeout} s, "
            f"fsync {'off' if args.no_fsync else 'on'}, N={args.n} (+{args.warmup} warm-up), "
            f"{args.concurrency} proposers x {args.seconds} s, {args.failovers} failovers, "
            f"attempt every {args.poll} s"
        )
        info = preamble(base, loop_name, settings, idle)
        t_start = time.monotonic()
        meter = CpuMeter()
        ours = uvloop.run(run_ours(args, base)) if uvloop else asyncio.run(run_ours(args, base))
        cpu_ours = meter.report()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    meter = CpuMeter()
    peer = None if args.no_peers else run_peer(args)
    cpu_peer = meter.report()
    print()
    if peer is not None and peer.note:
        print(f"PySyncObj not measured: {peer.note}")
    rows = table(args, ours, peer)
    print_table(rows)
    print(
        "\nratio = ours / PySyncObj's on every row: below 1 is better for us on latency and "
        "failover rows, above 1 is better for us on throughput rows."
    )
    if peer is not None and not peer.note:
        conf = peer.conf
        print(
            f"PySyncObj {PYSYNCOBJ.split('==')[1]}: 3 processes on 127.0.0.1; 'default conf' is "
            f"SyncObjConf() (election timeout {conf.get('raftMinTimeout')}-"
            f"{conf.get('raftMaxTimeout')} s, append entries every "
            f"{conf.get('appendEntriesPeriod')} s and batched: a write waits for the next "
            f"period); '{NO_BATCH}' sends each write at once. journalFile "
            f"{conf.get('journalFile')}: its log is in memory and it never fsyncs, while ours "
            "fsyncs every batch on every member. Its write is a counter increment (incr), "
            "issued from the leader's process; a 'proposer' there is one call kept in flight "
            "with a callback."
        )
    print(f"CPU during our runs: {cpu_ours}")
    if peer is not None:
        for (conf, callers), cpu in peer.tput_cpu.items():
            print(f"PySyncObj throughput run, {conf} x{callers}: {cpu}")
    for (label, callers), cpu in ours.tput_cpu.items():
        size = ours.state_sizes[label, callers]
        print(f"our throughput run, {label} x{callers}: state before: {size}; {cpu}")
    if peer is not None:
        print(f"CPU during PySyncObj's runs: {cpu_peer}")
    print(load_at_end(t_start))
    info["CPU during our runs"] = cpu_ours
    if peer is not None:
        info["CPU during PySyncObj's runs"] = cpu_peer
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "rows": rows,
                    "ours": {
                        "seq": {k: [pct(v, 50), pct(v, 99)] for k, v in ours.seq.items()},
                        "tput": {f"{k[0]}/{k[1]}": v[0] for k, v in ours.tput.items()},
                        "failovers": [[f.leader, f.commit] for f in ours.failovers],
                        "tput_cpu": {f"{k[0]}/{k[1]}": v for k, v in ours.tput_cpu.items()},
                        "tput_failed": {f"{k[0]}/{k[1]}": v for k, v in ours.tput_failed.items()},
                    },
                    "pysyncobj": None
                    if peer is None
                    else {
                        "note": peer.note,
                        "seq": {k: [pct(v, 50), pct(v, 99)] for k, v in peer.seq.items()},
                        "tput": {f"{k[0]}/{k[1]}": v for k, v in peer.tput.items()},
                        "failovers": [[f.leader, f.commit] for f in peer.failovers],
                        "failovers_matched": [[f.leader, f.commit] for f in peer.failovers_matched],
                    },
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
