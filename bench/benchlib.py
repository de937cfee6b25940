"""Helpers shared by the benchmarks that print comparison tables (``raft_bench.py``,
``service_bench.py``): percentiles and formats, the machine and its load, CPU and GC meters,
the disk's fsync floor, PySyncObj as a peer (a separate virtual environment, three member
processes driven over stdio) and the table with ratios.

Not part of controlplane; the scripts import it from their own directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import datetime
import gc
import importlib
import io
import json
import os
import platform
import pstats
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout

from controlplane.backends.raft.backend import free_port  # noqa: E402

PYSYNCOBJ = "pysyncobj==0.3.17"
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "pysyncobj_node.py"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "controlplane-bench"


# --- small helpers -------------------------------------------------------------------------------


def pct(samples: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``samples``."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def secs(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f} s"


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}/s"


@contextlib.contextmanager
def profiled(path: Path | None, label: str, stream: TextIO | None = None) -> Iterator[None]:
    """cProfile the enclosed code (the event loop's thread) into ``path``/``label``.pstats;
    the top of it is printed to ``stream`` (default stdout)."""
    if path is None:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        path.mkdir(parents=True, exist_ok=True)
        out = path / f"{label}.pstats"
        profiler.dump_stats(out)
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
        stats.print_stats(25)
        print(f"\n--- profile of {label} (event-loop thread, by own time) -> {out}", file=stream)
        print("\n".join(text.getvalue().splitlines()[:45]), file=stream)


def event_loop(no_uvloop: bool) -> tuple[Any, str]:
    """(the uvloop module, or None for asyncio's loop; a description of the loop used)."""
    uvloop: Any = None
    if not no_uvloop:
        with contextlib.suppress(ImportError):
            uvloop = importlib.import_module("uvloop")
    if uvloop is not None:
        return uvloop, f"uvloop {uvloop.__version__}"
    return None, "asyncio (default)" + ("" if no_uvloop else "; uvloop not installed")


# --- load ----------------------------------------------------------------------------------------


async def timed_sequence(
    call: Callable[[int], Awaitable[object]], n: int, warmup: int
) -> list[float]:
    """Latencies of ``call(i)`` for ``warmup + n`` calls in a row (the first ``warmup``
    are not kept)."""
    samples = []
    clock = time.perf_counter
    for i in range(warmup + n):
        t0 = clock()
        await call(i)
        if i >= warmup:
            samples.append(clock() - t0)
    return samples


async def timed_closed_loop(
    call: Callable[[int, int], Awaitable[object]],
    callers: int,
    seconds: float,
    errors: type[BaseException] | tuple[type[BaseException], ...],
    seen: dict[str, int] | None = None,
) -> tuple[list[float], int, float]:
    """``callers`` tasks, each awaiting ``call(worker, i)`` after the other for ``seconds``:
    (latencies of the calls that succeeded, calls that raised ``errors``, elapsed seconds).
    ``seen`` counts the failures by error type and message."""
    clock = time.perf_counter
    end = clock() + seconds
    latencies: list[float] = []
    failed = [0]

    async def worker(w: int) -> None:
        i = 0
        while clock() < end:
            t0 = clock()
            try:
                await call(w, i)
            except errors as exc:  # e.g. a timeout: counted, not a commit
                failed[0] += 1
                if seen is not None:
                    what = f"{type(exc).__name__}: {str(exc)[:120]}"
                    seen[what] = seen.get(what, 0) + 1
            else:
                latencies.append(clock() - t0)
            i += 1

    start = clock()
    await asyncio.gather(*(worker(w) for w in range(callers)))
    return latencies, failed[0], clock() - start


# --- the machine ---------------------------------------------------------------------------------


def machine(data_dir: Path, loop_name: str) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = "?"
    with contextlib.suppress(OSError):
        best = ""
        target = str(data_dir.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind = line.split()[:3]
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                best
            ):
                best, fs = mnt, f"{kind} on {dev} (mounted at {mnt})"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        "cpu model": cpu,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "event loop": loop_name,
        "kernel": platform.release(),
        "data dir": f"{data_dir} ({fs})",
        "load average at start": load,
        "CPU pressure at start": cpu_pressure(),
    }


def preamble(base: Path, loop_name: str, settings: str, idle: str | None = None) -> dict[str, str]:
    """The machine, the disk's fsync floor in ``base`` and the settings: printed, returned."""
    info = machine(base, loop_name)
    if idle:
        info["before the start"] = idle
    fs50, fs99 = fsync_probe(base)
    info["fsync of 256 B (disk floor)"] = f"p50 {ms(fs50)}, p99 {ms(fs99)}"
    info["settings"] = settings
    for k, v in info.items():
        print(f"{k:>28}: {v}")
    print(flush=True)
    return info


def cpu_pressure() -> str:
    """The kernel's CPU pressure: the share of time runnable tasks waited for a CPU."""
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return "n/a"
    values = dict(item.split("=") for item in some[1:] if "=" in item)
    return f"tasks waited for a CPU {values.get('avg10')}% (10 s), {values.get('avg60')}% (60 s)"


def load_at_end(t_start: float) -> str:
    return (
        f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"CPU pressure at end: {cpu_pressure()}; total {time.monotonic() - t_start:.0f} s"
    )


class CpuMeter:
    """Cores used, over an interval, by the whole machine and by this process (+ reaped children).

    Other engineers' or CI jobs share small machines: the difference tells how much of the CPU
    the benchmark really had.
    """

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0, self.total0 = self._machine()
        self.own0 = self._own()

    @staticmethod
    def _machine() -> tuple[float, float]:
        try:
            fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except (OSError, ValueError):
            return 0.0, 0.0
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        total = sum(fields[:8])  # guest time is already in user
        return total - idle, total

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def measure(self) -> tuple[float, float]:
        """(cores the machine was busy, cores this process and its reaped children used)."""
        wall = time.monotonic() - self.t0
        busy, total = self._machine()
        cpus = os.cpu_count() or 1
        if total <= self.total0 or wall <= 0:
            return float("nan"), float("nan")
        machine = (busy - self.busy0) / (total - self.total0) * cpus
        return machine, (self._own() - self.own0) / wall

    def report(self, own: float | None = None, who: str = "this benchmark") -> str:
        machine, mine = self.measure()
        own = mine if own is None else own
        return (
            f"machine busy {machine:.2f} of {os.cpu_count()} cores; {who} {own:.2f}; "
            f"other processes ~{max(0.0, machine - own):.2f}"
        )


class GcMeter:
    """Time this process spends in the cyclic garbage collector (all threads), via gc.callbacks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.full += info.get("generation") == 2

    def __enter__(self) -> GcMeter:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def report(self, wall: float) -> str:
        return f"GC {self.seconds:.2f} s of {wall:.1f} s ({self.full} full collections)"


def wait_idle(limit: float, busy_max: float = 0.3) -> str:
    """Wait up to ``limit`` seconds for other processes to use under ``busy_max`` cores."""
    deadline = time.monotonic() + limit
    seen = []
    while True:
        busy0, total0 = CpuMeter._machine()
        time.sleep(2.0)
        busy1, total1 = CpuMeter._machine()
        cores = (busy1 - busy0) / max(total1 - total0, 1.0) * (os.cpu_count() or 1)
        seen.append(cores)
        if cores < busy_max:
            return f"machine idle enough ({cores:.2f} cores busy) after {2 * len(seen)} s"
        if time.monotonic() >= deadline:
            return (
                f"gave up waiting after {2 * len(seen)} s: other processes kept "
                f"{min(seen):.2f}-{max(seen):.2f} cores busy"
            )


def fsync_probe(directory: Path, n: int = 200) -> tuple[float, float]:
    """(p50, p99) seconds of a 256-byte append + fsync in ``directory``: the disk's floor."""
    path = directory / "fsync-probe"
    samples = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 256)
            os.fsync(fd)
            samples.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return pct(samples, 50), pct(samples, 99)


# --- PySyncObj and other peer processes -----------------------------------------------------------


@dataclass
class Failover:
    leader: float | None  # crash -> a survivor leads
    commit: float | None  # crash -> first committed write
    attempts: int = 0


def peer_python(cache: Path) -> tuple[Path | None, str]:
    """The Python of a venv with PySyncObj (created on first use), or None and why not."""
    venv = cache / "peers-venv"
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import pysyncobj, sys; print(pysyncobj.__file__)"]
    if python.exists() and subprocess.run(check, check=False, capture_output=True).returncode == 0:
        return python, "cached"
    cache.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        check=False,
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        return None, f"could not create {venv}: {made.stderr.strip()[-500:]}"
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PYSYNCOBJ],
        check=False,
        capture_output=True,
        text=True,
    )
    if pip.returncode != 0:
        return None, f"pip install {PYSYNCOBJ} failed (PyPI refused?): {pip.stderr.strip()[-800:]}"
    return python, f"installed {PYSYNCOBJ} into {venv}"


class LineProcess:
    """A child process driven with one JSON object per line on its stdin and stdout (its
    stderr is appended to ``log``); the first line it writes is kept as :attr:`info`.

    It runs in a process group of its own (:meth:`kill` ends the group); a child that reads
    its stdin also ends by itself when this process dies (end of file).
    """

    def __init__(
        self, args: Sequence[str], log: Path, *, name: str = "", env: dict[str, str] | None = None
    ) -> None:
        self._args = list(args)
        self._log = log
        self._env = env
        self.name = name or Path(self._args[min(2, len(self._args) - 1)]).name
        self.info: dict[str, Any] = {}
        self.start()

    def start(self, timeout: float = 30.0) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        with self._log.open("a") as log:
            self.proc = subprocess.Popen(
                self._args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
                env=self._env,
                start_new_session=True,
            )
        threading.Thread(target=self._pump, daemon=True).start()
        self.info = self.read(timeout)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict[str, Any]:
        line = self._lines.get(timeout=timeout)
        if line is None:
            raise RuntimeError(f"{self.name} exited (see {self._log})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, cmd: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        self.send(cmd)
        return self.read(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:  # never signal a reaped process: its id may be reused
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def quit(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.call({"op": "quit"}, 5.0)
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.kill()


class PeerProcess(LineProcess):
    """One PySyncObj member (``peers/pysyncobj_node.py``) at ``addr``."""

    def __init__(self, python: Path, addr: str, partners: list[str], extra: list[str], log: Path):
        self.addr = addr
        args = [str(python), "-u", str(PEER_SCRIPT), addr, *partners, *extra]
        super().__init__(args, log, name=f"PySyncObj member {addr}")


class PeerCluster:
    def __init__(self, python: Path, extra: list[str], log: Path) -> None:
        addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        self.members = [
            PeerProcess(python, a, [b for b in addrs if b != a], extra, log) for a in addrs
        ]

    def stable_leader(self, within: float = 30.0) -> PeerProcess:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            st = [m.call({"op": "status"}) for m in self.members]
            leader = st[0]["leader"]
            if leader is not None and all(s["leader"] == leader for s in st):
                commits = {s["commit"] for s in st}
                lead = next((m for m in self.members if m.addr == leader), None)
                if lead is not None and len(commits) == 1 and all(s["ready"] for s in st):
                    return lead
            time.sleep(0.05)
        raise TimeoutError("PySyncObj: no stable leader")

    def quit(self) -> None:
        for m in self.members:
            m.quit()


BATCH = "default conf"
NO_BATCH = "appendEntriesUseBatch=False"
PEER_CONFS: tuple[tuple[str, list[str]], ...] = ((BATCH, []), (NO_BATCH, ["--no-batch"]))
"""PySyncObj as shipped (a write waits for the next append-entries period, 0.1 s), and with
each write sent at once (the arguments of ``peers/pysyncobj_node.py``)."""


def peer_setup() -> tuple[Path | None, str, Path]:
    """(the Python of PySyncObj's venv, or None; why; its members' log, emptied)."""
    python, why = peer_python(CACHE)
    print(f"PySyncObj: {why}", flush=True)
    log = CACHE / "pysyncobj-members.log"
    if python is not None:
        log.write_text("")
    return python, why, log


def peer_failovers(cluster: PeerCluster, runs: int, poll: float, deadline: float) -> list[Failover]:
    """Kill PySyncObj's leader ``runs`` times; each survivor starts a write every ``poll`` s."""
    out = []
    for i in range(runs):
        lead = cluster.stable_leader()
        survivors = [m for m in cluster.members if m is not lead]
        t0 = time.monotonic()
        lead.kill()
        cmd = {
            "op": "failover",
            "old_leader": lead.addr,
            "poll": poll,
            "deadline": deadline,
        }
        for m in survivors:
            m.send(cmd)
        answers = [m.read(deadline + 30.0) for m in survivors]
        commits = [a["success_at"] for a in answers if a["success_at"] is not None]
        leaders = [a["leader_at"] for a in answers if a["leader_at"] is not None]
        f = Failover(
            min(leaders) - t0 if leaders else None,
            min(commits) - t0 if commits else None,
            sum(a["attempts"] for a in answers),
        )
        out.append(f)
        print(
            f"PySyncObj: failover {i + 1}/{runs}: new leader after {secs(f.leader)}, "
            f"first commit after {secs(f.commit)}",
            flush=True,
        )
        lead.start()
    cluster.stable_leader()
    return out


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peer_throughput(
    cluster: PeerCluster, lead: PeerProcess, callers: int, seconds: float
) -> tuple[float, float, str]:
    """Run the throughput op on ``lead``: (commits per second, cores its members used, CPU)."""
    pids = [m.proc.pid for m in cluster.members]
    cpu0 = sum(process_cpu(p) for p in pids)
    meter = CpuMeter()
    tp = lead.call(
        {"op": "throughput", "concurrency": callers, "seconds": seconds}, seconds + 120.0
    )
    cores = (sum(process_cpu(p) for p in pids) - cpu0) / tp["elapsed"]
    if tp["errors"]:
        print(f"PySyncObj: {tp['errors']} calls failed", flush=True)
    value: float = tp["ok"] / tp["elapsed"]
    return value, cores, meter.report(cores, "PySyncObj's 3 processes")


# --- the table -----------------------------------------------------------------------------------


def ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs == 0:
        return "-"
    value = ours / theirs
    return f"{value:.2f}" if value >= 0.01 else f"{value:.1g}"


def verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value < target
    return "meets" if ok else "MISSES"


def fo_stats(fs: list[Failover], attr: str) -> list[float | None]:
    values = [getattr(f, attr) for f in fs if getattr(f, attr) is not None]
    if not values:
        return [None, None, None]
    return [min(values), statistics.median(values), max(values)]


def print_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join(lines)
    print(text)
    return text
