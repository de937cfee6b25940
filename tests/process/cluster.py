"""A cluster of real ``controlplane serve`` processes on 127.0.0.1, for fault tests.

:class:`ProcessCluster` writes one YAML configuration per member (ids ``cp-1`` .. ``cp-N``,
data directories under a test's ``tmp_path``, ports picked at run time) and runs each member
as ``python -m controlplane.cli serve --config ...`` in a process group of its own, its
stdout and stderr appended to ``<base>/cp-N.log``.

Peer traffic goes through :class:`~controlplane.testing.faultproxy.FaultProxy` instances, one
per ordered pair of members: the *link* ``(a, b)`` is the proxy that member ``a`` dials to
reach member ``b`` (each member's configuration lists, for every other member, the port of its
own link proxy to it). The transport keeps one outbound connection per peer and direction, so
the link ``(a, b)`` carries the messages from ``a`` to ``b`` (and only the handshake replies
back). A partition is then just switching proxies, with the processes untouched:
:meth:`~ProcessCluster.isolate`, :meth:`~ProcessCluster.partition` (groups;
``partition([i])`` isolates ``i``), :meth:`~ProcessCluster.cut` (one way: ``a`` no longer
reaches ``b``, ``b`` still reaches ``a``), :meth:`~ProcessCluster.slow` (delay) and
:meth:`~ProcessCluster.heal`. Client ports are direct unless ``proxy_clients=True``.

A member that is in no initial configuration joins with ``serve --join``:
:meth:`~ProcessCluster.add_joining_member`, then :meth:`~ProcessCluster.start_joining`.

Process faults: :meth:`~ProcessCluster.kill` (SIGKILL), :meth:`~ProcessCluster.pause` /
:meth:`~ProcessCluster.resume` (SIGSTOP / SIGCONT), :meth:`~ProcessCluster.restart`.
Readiness (:meth:`~ProcessCluster.wait_ready`) is read from the members' logs ("member cp-1:
leader is now cp-2"), their peer ports accepting connections and their ``/readyz``.
:meth:`~ProcessCluster.close` kills every process group it started; the ``process_cluster``
fixture (``conftest.py``) does so even when a test fails.

Every wait is bounded by an explicit timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

import controlplane
from controlplane.config import load_config
from controlplane.testing.faultproxy import Direction, Fault, FaultProxy

__all__ = ["Member", "MemberExitedError", "ProcessCluster", "free_ports"]

HOST = "127.0.0.1"
TIMING: dict[str, Any] = {"heartbeat_interval": 0.05, "election_timeout": 0.5}
"""Raft timing for process tests: heart-beat every 50 ms, elections after 0.5-1 s of silence
(a bit slower than the in-process tests: up to six Python processes share two cores)."""

_LEADER_LINE = re.compile(r"member (\S+): leader is now (\S+)")
_CONFIG_ENV = re.compile(
    r"CONTROL_PLANE_MODE|NODE_ID|CLUSTER_ID|DATA_DIR|K8S_NAMESPACE|RAFT_PEERS|RAFT_LISTEN"
    r"|CLIENT_LISTEN|HTTP_LISTEN|RAFT_JOIN|CONTROLPLANE_CONFIG|CONTROLPLANE__.*"
)


_SOURCE_ROOT = Path(controlplane.__file__).resolve().parent.parent


class MemberExitedError(AssertionError):
    """A member process ended without the harness killing it."""


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports that were free a moment ago (the sockets are held together).

    They are taken below the kernel's ephemeral range when there is room: a member restarted
    after SIGKILL binds its port again, and an outgoing connection (which gets an ephemeral
    port) must not have taken it meanwhile.
    """
    low = _ephemeral_low()
    candidates = list(range(10_000, low)) if low - 10_000 >= 1000 else []
    random.shuffle(candidates)
    ports: list[int] = []
    with contextlib.ExitStack() as stack:
        while len(ports) < count:
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind((host, candidates.pop() if candidates else 0))
            except OSError:
                continue
            ports.append(int(sock.getsockname()[1]))
    return ports


@dataclass(eq=False)
class Member:
    """One member: its fixed ports and files, and its current process (if any)."""

    index: int
    id: str
    peer_port: int
    client_port: int
    http_port: int
    config_path: Path
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False
    starts: int = 0
    leader: str | None = None
    """The leader this member last logged, since its last start (None: none known)."""
    exits: list[int] = field(default_factory=list)
    """Exit statuses of processes that ended on their own (not killed by the harness)."""
    _log_offset: int = 0
    _killed: bool = False

    @property
    def running(self) -> bool:
        """The process exists and has not exited (it may be paused)."""
        return self.process is not None and self.process.poll() is None

    @property
    def live(self) -> bool:
        """Running and not paused: able to take part."""
        return self.running and not self.paused

    @property
    def client_address(self) -> str:
        """``host:port`` of its client API (direct, not proxied)."""
        return f"{HOST}:{self.client_port}"

    @property
    def http_address(self) -> str:
        """``host:port`` of its ops HTTP endpoints."""
        return f"{HOST}:{self.http_port}"


class ProcessCluster:
    """``n`` ``controlplane serve`` processes; use as ``async with ProcessCluster(...) as c``.

    Members are addressed by index (0-based) in every method. ``raft`` adds or overrides
    ``raft.*`` settings of every member (default :data:`TIMING`), ``settings`` top-level ones
    (``watch_retention``); ``serve_args`` are appended to every member's ``serve`` command.
    """

    def __init__(
        self,
        base: Path,
        n: int = 3,
        *,
        cluster_id: str = "process-test",
        proxy_clients: bool = False,
        raft: Mapping[str, Any] | None = None,
        log_level: str = "INFO",
        settings: Mapping[str, Any] | None = None,
        serve_args: Sequence[str] = (),
    ) -> None:
        if n < 1:
            raise ValueError("a cluster has at least one member")
        self.base = base
        self.n = n
        self.cluster_id = cluster_id
        self.proxy_clients = proxy_clients
        self.raft_settings = {**TIMING, **(raft or {})}
        self.log_level = log_level
        self.settings = dict(settings or {})
        """Top-level settings of every member's configuration (``watch_retention``, ...)."""
        self.serve_args = list(serve_args)
        """Extra arguments of every member's ``serve`` command line."""
        links = [(a, b) for a in range(n) for b in range(n) if a != b]
        ports = free_ports(3 * n + len(links) + (n if proxy_clients else 0))
        proxy_ports = iter(ports[3 * n :])
        self.members = [
            Member(
                index=i,
                id=f"cp-{i + 1}",
                peer_port=ports[3 * i],
                client_port=ports[3 * i + 1],
                http_port=ports[3 * i + 2],
                config_path=base / f"cp-{i + 1}.yaml",
                data_dir=base / f"cp-{i + 1}-data",
                log_path=base / f"cp-{i + 1}.log",
            )
            for i in range(n)
        ]
        self.links: dict[tuple[int, int], FaultProxy] = {
            (a, b): FaultProxy(
                HOST,
                next(proxy_ports),
                target_host=HOST,
                target_port=self.members[b].peer_port,
                name=f"link cp-{a + 1}->cp-{b + 1}",
            )
            for a, b in links
        }
        """``(a, b)``: the proxy member ``a`` dials to reach member ``b``."""
        self.client_proxies: list[FaultProxy] = (
            [
                FaultProxy(
                    HOST,
                    next(proxy_ports),
                    target_host=HOST,
                    target_port=m.client_port,
                    name=f"client {m.id}",
                )
                for m in self.members
            ]
            if proxy_clients
            else []
        )
        self._started = False
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------

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

    async def start(self) -> None:
        """Start the proxies, write the configurations and start every member."""
        if self._started:
            return
        self._started = True
        self.base.mkdir(parents=True, exist_ok=True)
        for proxy in [*self.links.values(), *self.client_proxies]:
            await proxy.start()
        for member in self.members:
            self._write_config(member)
        for member in self.members:
            self._spawn(member)

    def _write_config(self, member: Member, *, joining: bool = False) -> None:
        """Write member's YAML: the initial members list each other (through the link
        proxies); a joining member lists none and learns them from the cluster."""
        peers = [
            {
                "id": other.id,
                "address": (
                    f"{HOST}:{member.peer_port}"
                    if other is member
                    else self.links[member.index, other.index].address
                ),
            }
            for other in self.members[: self.n]
            if not joining
        ]
        document = {
            "mode": "raft",
            "log_level": self.log_level,
            **self.settings,
            "raft": {
                "node_id": member.id,
                "cluster_id": self.cluster_id,
                "data_dir": str(member.data_dir),
                "listen_host": HOST,
                "listen_port": member.peer_port,
                "client_host": HOST,
                "client_port": member.client_port,
                "http_host": HOST,
                "http_port": member.http_port,
                **({"peers": peers} if peers else {}),
                **self.raft_settings,
            },
        }
        member.config_path.write_text(yaml.safe_dump(document, sort_keys=False), "utf-8")
        load_config(member.config_path, {})  # fail here, with the field's name, if invalid

    def _spawn(self, member: Member, extra_args: Sequence[str] = ()) -> None:
        if member.running:
            raise RuntimeError(f"{member.id} is already running")
        env = {k: v for k, v in os.environ.items() if not _CONFIG_ENV.fullmatch(k)}
        env["PYTHONUNBUFFERED"] = "1"
        # The package under test, whether installed or not (the member runs in ``base``).
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(_SOURCE_ROOT), os.environ.get("PYTHONPATH")])
        )
        member.starts += 1
        with member.log_path.open("ab") as log:
            log.write(f"=== harness: start #{member.starts} of {member.id} ===\n".encode())
            log.flush()
            member._log_offset = log.tell()
            member.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "controlplane.cli",
                    "serve",
                    "--config",
                    member.config_path,
                    *self.serve_args,
                    *extra_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.base,
                start_new_session=True,  # its own process group, killed as a whole
            )
        member.paused = False
        member.leader = None
        member._killed = False

    def _signal(self, member: Member, sig: signal.Signals) -> None:
        # Never signal a process already reaped: its id (and group id) may be reused.
        if member.process is None or member.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(member.process.pid, sig)

    async def _reap(self, member: Member, within: float = 10.0) -> None:
        process = member.process
        if process is None:
            return
        deadline = time.monotonic() + within
        while process.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{member.id} (pid {process.pid}) did not exit in {within}s")
            await asyncio.sleep(0.01)

    def _note_exit(self, member: Member) -> None:
        process = member.process
        if process is not None and not member._killed and process.poll() is not None:
            member.exits.append(process.returncode)
            member._killed = True  # noted once

    async def close(self) -> None:
        """Kill every member (process group) and close every proxy. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.kill_all()
        finally:
            for proxy in [*self.links.values(), *self.client_proxies]:
                await proxy.close()

    def kill_all(self) -> None:
        """Synchronously SIGKILL every member's process group and reap it (also safe from a
        fixture's teardown without an event loop). Idempotent."""
        for member in self.members:
            self._note_exit(member)
            member._killed = True
            self._signal(member, signal.SIGKILL)
        for member in self.members:
            if member.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    member.process.wait(timeout=10)
            member.paused = False

    # --- process faults ----------------------------------------------------------------------

    def member(self, i: int) -> Member:
        """Member ``i`` (0-based)."""
        return self.members[i]

    async def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (its whole process group) and wait until it is gone."""
        member = self.members[i]
        self._note_exit(member)
        member._killed = True
        self._signal(member, signal.SIGKILL)
        await self._reap(member)
        member.paused = False
        member.leader = None

    async def terminate(self, i: int, within: float = 10.0) -> int | None:
        """SIGTERM member ``i`` (a graceful stop) and wait for it; its exit status."""
        member = self.members[i]
        self._note_exit(member)
        member._killed = True
        if member.paused:
            self.resume(i)
        self._signal(member, signal.SIGTERM)
        await self._reap(member, within)
        member.leader = None
        return None if member.process is None else member.process.returncode

    def pause(self, i: int) -> None:
        """SIGSTOP member ``i``: it stays alive (sockets open) but does nothing."""
        member = self.members[i]
        self._signal(member, signal.SIGSTOP)
        member.paused = True

    def resume(self, i: int) -> None:
        """SIGCONT member ``i``."""
        member = self.members[i]
        self._signal(member, signal.SIGCONT)
        member.paused = False

    async def start_member(self, i: int) -> None:
        """Start member ``i`` again on its data directory (it must not be running)."""
        self._spawn(self.members[i])

    async def restart(self, i: int) -> None:
        """Kill member ``i`` if it runs, then start it again on the same data directory."""
        if self.members[i].running:
            await self.kill(i)
        await self.start_member(i)

    # --- network faults ----------------------------------------------------------------------

    def cut(self, a: int, b: int, fault: Fault = Fault.BLACKHOLE) -> None:
        """Member ``a`` can no longer reach member ``b`` (one way; ``b`` still reaches ``a``)."""
        self.links[a, b].set_fault(fault)

    def slow(self, a: int, b: int, delay_ms: float) -> None:
        """Messages from ``a`` to ``b`` arrive ``delay_ms`` late."""
        self.links[a, b].delay(delay_ms)

    def partition(self, *groups: Iterable[int], fault: Fault = Fault.BLACKHOLE) -> None:
        """Cut every link between members of different groups, both ways; the members named
        in no group form one more group. ``partition([i])`` isolates ``i``,
        ``partition([0, 1])`` splits ``{0, 1}`` from the rest. Links inside a group are left as
        they are."""
        group_of: dict[int, int] = {}
        for g, members in enumerate(groups):
            for i in members:
                if i in group_of:
                    raise ValueError(f"member {i} is in two groups")
                group_of[i] = g
        for (a, b), proxy in self.links.items():
            if group_of.get(a, -1) != group_of.get(b, -1):
                proxy.set_fault(fault)

    def isolate(self, i: int, fault: Fault = Fault.BLACKHOLE) -> None:
        """Cut member ``i`` off from every other member, both ways (it keeps running, and
        clients still reach it unless ``proxy_clients`` and :meth:`isolate_clients`)."""
        for (a, b), proxy in self.links.items():
            if i in (a, b):
                proxy.set_fault(fault)

    def isolate_clients(self, i: int, fault: Fault = Fault.BLACKHOLE) -> None:
        """Clients can no longer reach member ``i`` (needs ``proxy_clients=True``)."""
        if not self.client_proxies:
            raise RuntimeError("the cluster was made without proxy_clients=True")
        self.client_proxies[i].set_fault(fault)

    def heal(self) -> None:
        """Every link and client proxy back to passing everything."""
        for proxy in [*self.links.values(), *self.client_proxies]:
            proxy.pass_through()

    @property
    def healed(self) -> bool:
        """No link or client proxy has a fault."""
        return all(
            p.fault(d) is Fault.PASS
            for p in [*self.links.values(), *self.client_proxies]
            for d in Direction
        )

    # --- observing ---------------------------------------------------------------------------

    def client_addresses(self) -> list[str]:
        """Every member's client ``host:port`` (through its proxy if ``proxy_clients``)."""
        if self.client_proxies:
            return [p.address for p in self.client_proxies]
        return [m.client_address for m in self.members]

    def check_exits(self) -> None:
        """Raise :class:`MemberExitedError` if a member ended without being killed."""
        for member in self.members:
            self._note_exit(member)
        failed = [m for m in self.members if m.exits]
        if failed:
            raise MemberExitedError(
                "; ".join(f"{m.id} exited on its own with status {m.exits}" for m in failed)
                + "\n"
                + self.logs_tail()
            )

    def refresh(self) -> None:
        """Read what the members logged since last time (updates :attr:`Member.leader`)."""
        for member in self.members:
            if member.process is None:
                continue
            try:
                with member.log_path.open("rb") as log:
                    log.seek(member._log_offset)
                    data = log.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1  # only whole lines
            member._log_offset += end
            for line in data[:end].decode("utf-8", "replace").splitlines():
                match = _LEADER_LINE.search(line)
                if match and match.group(1) == member.id:
                    leader = match.group(2)
                    member.leader = None if leader == "None" else leader

    def leader(self) -> int | None:
        """The member a majority of the cluster (counting only live members) logged as
        leader, if it is live itself; else None."""
        self.refresh()
        votes: dict[str, int] = {}
        for member in self.members:
            if member.live and member.leader is not None:
                votes[member.leader] = votes.get(member.leader, 0) + 1
        for leader_id, count in votes.items():
            index = self._index_of(leader_id)
            if count > self.n // 2 and index is not None and self.members[index].live:
                return index
        return None

    def _index_of(self, member_id: str) -> int | None:
        for member in self.members:
            if member.id == member_id:
                return member.index
        return None

    async def wait_leader(
        self, within: float = 30.0, *, other_than: int | None = None, agree: Sequence[int] = ()
    ) -> int:
        """Wait until a majority agrees on a live leader (not ``other_than``), and every member
        in ``agree`` logged that leader too; its index."""
        deadline = time.monotonic() + within
        while True:
            self.check_exits()
            leader = self.leader()
            if (
                leader is not None
                and leader != other_than
                and all(self.members[i].leader == self.members[leader].id for i in agree)
            ):
                return leader
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no leader{'' if other_than is None else ' other than ' + str(other_than)} "
                    f"within {within}s; members' last known leaders: "
                    f"{ {m.id: m.leader for m in self.members} }\n{self.logs_tail()}"
                )
            await asyncio.sleep(0.05)

    async def peer_port_open(self, i: int) -> bool:
        """Whether member ``i`` accepts connections on its (real) peer port."""
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(HOST, self.members[i].peer_port), 1.0
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def http_get(self, i: int, path: str, within: float = 5.0) -> tuple[int, bytes] | None:
        """``GET path`` from member ``i``'s ops HTTP port: ``(status, body)``, or None when
        nothing listens there (or the member does not answer within ``within`` seconds)."""
        member = self.members[i]
        try:
            async with asyncio.timeout(within):
                reader, writer = await asyncio.open_connection(HOST, member.http_port)
                try:
                    writer.write(
                        f"GET {path} HTTP/1.1\r\nHost: {member.http_address}\r\n"
                        "Connection: close\r\n\r\n".encode()
                    )
                    response = await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return None
        head, _, body = response.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)
        if len(status) < 2 or not status[1].isdigit():
            return None
        return int(status[1]), body

    async def ready(self, i: int) -> bool | None:
        """Member ``i``'s ``/readyz``: True (200), False (another status), or None when it
        serves no ops HTTP."""
        answer = await self.http_get(i, "/readyz", 2.0)
        return None if answer is None else answer[0] == 200

    async def state(self, i: int, *, consistent: bool = False) -> dict[str, Any] | None:
        """Member ``i``'s replica of the state (``/v1/state``) as JSON; None if unavailable."""
        path = "/v1/state?consistent=true" if consistent else "/v1/state"
        answer = await self.http_get(i, path)
        if answer is None or answer[0] != 200:
            return None
        document: dict[str, Any] = json.loads(answer[1])
        return document

    async def wait_ready(self, within: float = 30.0) -> int:
        """Wait until every live member accepts peer connections, has logged the leader a
        majority agrees on and, if it serves ``/readyz``, answers it with 200; the leader's
        index."""
        deadline = time.monotonic() + within
        for member in self.members:
            while member.live and not await self.peer_port_open(member.index):
                self.check_exits()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{member.id} does not listen on its peer port")
                await asyncio.sleep(0.05)
        live = [m.index for m in self.members if m.live]
        while True:
            leader = await self.wait_leader(max(0.0, deadline - time.monotonic()), agree=live)
            answers = [await self.ready(i) for i in live]
            if all(a is not False for a in answers):
                return leader
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"not every member is ready within {within}s: "
                    f"{ {self.members[i].id: a for i, a in zip(live, answers, strict=True)} }"
                )
            await asyncio.sleep(0.05)

    def log_text(self, i: int) -> str:
        """Everything member ``i`` wrote (all starts)."""
        try:
            return self.members[i].log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def logs_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of every member's log, for failure messages."""
        parts = []
        for member in self.members:
            tail = self.log_text(member.index).splitlines()[-lines:]
            state = "paused" if member.paused else "running" if member.running else "stopped"
            parts.append(f"--- {member.id} ({state}) {member.log_path} ---")
            parts.extend(tail)
        return "\n".join(parts)

    # --- members that join a running cluster -----------------------------------------------

    def add_joining_member(self) -> int:
        """Add one more member, ``cp-<index + 1>``, that is in no initial configuration (its
        ports are picked now); start it with :meth:`start_joining`. Its index.

        Its peer traffic goes through no proxy: it dials the others at the addresses the
        cluster's configuration records (the leader's view, proxies included), and they dial
        it directly. :attr:`n` still counts the initial members only.
        """
        index = len(self.members)
        peer, client, http = free_ports(3)
        member_id = f"cp-{index + 1}"
        self.members.append(
            Member(
                index=index,
                id=member_id,
                peer_port=peer,
                client_port=client,
                http_port=http,
                config_path=self.base / f"{member_id}.yaml",
                data_dir=self.base / f"{member_id}-data",
                log_path=self.base / f"{member_id}.log",
            )
        )
        return index

    def start_joining(self, i: int, via: Sequence[int]) -> None:
        """Start member ``i`` (see :meth:`add_joining_member`; again after :meth:`kill`) as
        ``serve --config ... --join`` the client addresses of members ``via``."""
        member = self.members[i]
        if member.running:
            raise RuntimeError(f"{member.id} is already running")
        self._write_config(member, joining=True)
        join = ",".join(self.members[j].client_address for j in via)
        self._spawn(member, ["--join", join])
