"""The ``controlplane`` command line.

``controlplane serve`` runs one control-plane member until SIGTERM or SIGINT. With no
configuration at all it is a single Raft member keeping its data in ``./controlplane-data``:
the embedded default.

The other subcommands talk to a running Raft cluster as a network client (``--members``,
default ``$CONTROLPLANE_MEMBERS`` or ``127.0.0.1:7401``): ``status``, ``nodes``, ``indices``,
``routing INDEX``, ``locks``, ``watch``, ``export-state``/``import-state`` (JSON),
``snapshot save|restore`` (msgpack), ``member add|remove`` and ``transfer-leader``.
Errors are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .codec import state_from_json, state_to_json
from .config import Config, load_config
from .errors import ControlPlaneError
from .factory import open_control_plane

if TYPE_CHECKING:
    from .backends.raft.client import RaftClient
    from .protocol import ControlPlane

__all__ = ["main", "tune_collector"]

_log = logging.getLogger("controlplane.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlplane", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a control-plane member")
    serve.add_argument("--config", "-c", help="YAML configuration file")
    serve.add_argument("--mode", choices=["raft", "k8s", "memory", "auto"])
    serve.add_argument("--node-id", dest="raft__node_id", help="this member's id")
    serve.add_argument("--cluster-id", dest="raft__cluster_id")
    serve.add_argument("--data-dir", dest="raft__data_dir", help="where the log is kept")
    serve.add_argument("--listen", help="host:port for peer traffic")
    serve.add_argument(
        "--peers", help="every initial member, this one included: id=host:port,id=host:port"
    )
    serve.add_argument(
        "--join",
        nargs="?",
        const="",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="join a running cluster instead of forming one: through the members at these "
        "client addresses (their leader adds this member), or, without addresses, by "
        "waiting for an operator's 'member add'",
    )
    serve.add_argument(
        "--advertise",
        dest="raft__advertise_address",
        metavar="HOST:PORT",
        help="where the other members reach this one's peer listener (default: --listen)",
    )
    serve.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING, ...")
    serve.add_argument(
        "--test-clock-file",
        help="tests only: read the control plane's wall clock from this file, written by a "
        "test (controlplane.testing.file_clock); locks and node timeouts then expire only when "
        "the test moves that clock",
    )

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--members",
        default=os.environ.get("CONTROLPLANE_MEMBERS") or "127.0.0.1:7401",
        help="client addresses of the members: host:port,host:port "
        "(default: $CONTROLPLANE_MEMBERS or 127.0.0.1:7401)",
    )
    common.add_argument("--cluster-id", default="controlplane")
    common.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to connect and per request"
    )

    def sub(name: str, help: str, parent: Any = commands) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help, parents=[common])  # type: ignore[no-any-return]

    sub("status", "each member's Raft status and the cluster health")
    sub("nodes", "the registered nodes")
    sub("indices", "the indices")
    sub("routing", "the routing table of an index").add_argument("index")
    sub("locks", "the held locks")
    watch = sub("watch", "print cluster events, one a line, until Ctrl-C")
    watch.add_argument("--since", type=int, help="start after this state version")
    watch.add_argument("--count", type=int, help="stop after this many events")
    sub("export-state", "write the whole state as JSON").add_argument("file")
    sub("import-state", "replace the whole state with a JSON export").add_argument("file")
    snapshot = commands.add_parser("snapshot", help="save or restore a msgpack snapshot")
    snapshots = snapshot.add_subparsers(dest="action", required=True)
    sub("save", "write a snapshot of the state", snapshots).add_argument("file")
    sub("restore", "replace the state with a snapshot", snapshots).add_argument("file")
    member = commands.add_parser("member", help="change the Raft membership")
    members = member.add_subparsers(dest="action", required=True)
    add = sub("add", "add a member (a learner unless --voter)", members)
    add.add_argument("id")
    add.add_argument("peer_address", help="host:port of its peer listener")
    add.add_argument("--voter", action="store_true")
    sub("remove", "remove a member", members).add_argument("id")
    sub("transfer-leader", "hand leadership to ID (default: best voter)").add_argument(
        "id", nargs="?"
    )
    return parser


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(header), *([str("-" if v is None else v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


async def _status(client: RaftClient) -> None:
    rows: list[list[object]] = []
    for address, st in (await client.statuses()).items():
        if isinstance(st, ControlPlaneError):
            rows.append(["?", f"unreachable: {st}", None, None, None, address])
            continue
        progress = f"{st.commit_index}/{st.applied_index}"
        rows.append([st.member_id, st.role, st.leader_id, st.term, progress, address])
    _table(["MEMBER", "ROLE", "LEADER", "TERM", "COMMIT/APPLIED", "ADDRESS"], rows)
    health = await client.get_cluster_health()
    print(f"health: {health.status} (version {health.version}, {health.number_of_nodes} nodes)")


async def _nodes(client: RaftClient) -> None:
    rows = [
        [n.id, n.status, ",".join(sorted(n.roles)), n.zone or None, n.address or None]
        for n in await client.list_nodes()
    ]
    _table(["ID", "STATUS", "ROLES", "ZONE", "ADDRESS"], rows)


async def _indices(client: RaftClient) -> None:
    health = (await client.get_cluster_health()).indices
    rows = [
        [
            i.name,
            health[i.name].status if i.name in health else None,
            i.settings.number_of_shards,
            i.settings.number_of_replicas,
        ]
        for i in await client.list_indices()
    ]
    _table(["NAME", "HEALTH", "SHARDS", "REPLICAS"], rows)


async def _routing(client: RaftClient, index: str) -> None:
    rows = [
        [r.shard, "primary" if c.primary else "replica", c.node_id, c.state, c.relocating_to]
        for r in await client.get_shard_routing(index)
        for c in r.copies
    ]
    _table(["SHARD", "COPY", "NODE", "STATE", "RELOCATING_TO"], rows)


async def _locks(client: RaftClient) -> None:
    state = await client.get_cluster_state()
    rows = [
        [lock.key, lock.holder, lock.token, f"{lock.expires_at:.3f}"]
        for lock in sorted(state.locks.values(), key=lambda lock: lock.key)
        if lock.expires_at > state.now
    ]
    _table(["KEY", "HOLDER", "TOKEN", "EXPIRES_AT"], rows)


async def _watch(client: RaftClient, since: int | None, count: int | None) -> None:
    seen = 0
    if count is not None and count <= 0:
        return
    stream = client.watch(since=since)
    try:
        async for event in stream:
            print(f"{event.version} {event.kind} {event.key}".rstrip(), flush=True)
            seen += 1
            if count is not None and seen >= count:
                return
    finally:
        await stream.aclose()


async def _export(client: RaftClient, file: str) -> None:
    data = state_to_json(await client.get_cluster_state(consistent=True))
    await asyncio.to_thread(Path(file).write_bytes, data)


async def _import(client: RaftClient, file: str) -> None:
    await client.restore_state(state_from_json(await asyncio.to_thread(Path(file).read_bytes)))


async def _snapshot_save(client: RaftClient, file: str) -> None:
    data = await client.snapshot_save()
    await asyncio.to_thread(Path(file).write_bytes, data)


async def _snapshot_restore(client: RaftClient, file: str) -> None:
    await client.restore(await asyncio.to_thread(Path(file).read_bytes))


def _action(args: argparse.Namespace) -> Callable[[RaftClient], Awaitable[None]]:
    """What the client subcommand in ``args`` does, given a started client."""
    command = args.command
    if command in ("snapshot", "member"):
        command = f"{command} {args.action}"
    actions: dict[str, Callable[[RaftClient], Awaitable[None]]] = {
        "status": _status,
        "nodes": _nodes,
        "indices": _indices,
        "routing": lambda cl: _routing(cl, args.index),
        "locks": _locks,
        "watch": lambda cl: _watch(cl, args.since, args.count),
        "export-state": lambda cl: _export(cl, args.file),
        "import-state": lambda cl: _import(cl, args.file),
        "snapshot save": lambda cl: _snapshot_save(cl, args.file),
        "snapshot restore": lambda cl: _snapshot_restore(cl, args.file),
        "member add": lambda cl: cl.member_add(args.id, args.peer_address, voter=args.voter),
        "member remove": lambda cl: cl.member_remove(args.id),
        "transfer-leader": lambda cl: cl.transfer_leader(args.id),
    }
    return actions[command]


async def _with_client(
    args: argparse.Namespace, action: Callable[[RaftClient], Awaitable[None]]
) -> None:
    """Connect to the cluster, run ``action`` with the client, close it."""
    from .backends.raft.client import connect  # noqa: PLC0415 (optional backend)

    members = [m.strip() for m in args.members.split(",") if m.strip()]
    client = await connect(
        members,
        cluster_id=args.cluster_id,
        request_timeout=args.timeout,
        connect_timeout=args.timeout,
    )
    try:
        await action(client)
    finally:
        await client.stop()


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        key: value
        for key, value in vars(args).items()
        if value is not None and (key.startswith("raft__") or key in ("mode", "log_level"))
    }
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        overrides["raft__listen_host"] = host or "127.0.0.1"
        overrides["raft__listen_port"] = int(port) if port.isdigit() else port
    if args.peers:
        overrides["raft__peers"] = [
            {"id": item.split("=", 1)[0], "address": item.split("=", 1)[-1]}
            for item in args.peers.split(",")
            if item
        ]
    if args.join is not None:
        overrides["raft__bootstrap"] = False
        if args.join:
            overrides["raft__join"] = [a for a in args.join.split(",") if a]
    return overrides


async def _open_unless_stopped(
    config: Config, clock: Callable[[], float] | None, stop: asyncio.Event
) -> ControlPlane | None:
    """Open the control plane, or give up (``None``) when ``stop`` is set first: start-up may
    wait long, e.g. a member joining through a leader that cannot be reached yet."""
    opening = asyncio.ensure_future(open_control_plane(config, clock=clock))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({opening, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not opening.done():
            opening.cancel()  # start() cleans up what it started
    try:
        return await opening
    except asyncio.CancelledError:
        if stop.is_set():
            return None
        raise


async def _serve(config: Config, clock_file: str | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    clock = None
    if clock_file is not None:
        from .testing.file_clock import FileClock  # noqa: PLC0415 (tests only)

        clock = FileClock(clock_file)
        _log.warning("the wall clock is read from %s (a test's fake clock)", clock_file)
    cp = await _open_unless_stopped(config, clock, stop)
    if cp is None:
        _log.info("stopped before start-up completed")
        return
    follower: asyncio.Task[None] | None = None
    try:
        if clock is not None:
            follower = loop.create_task(_follow_test_clock(cp, clock, config))
        health = await cp.health()
        _log.info("serving (%s backend, mode %s): %s", health.backend, config.mode, health.detail)
        await stop.wait()
        _log.info("stopping")
    finally:
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        await cp.stop()


async def _follow_test_clock(cp: Any, clock: Any, config: Config) -> None:
    """Tests only: run the periodic duties whenever the test moves the clock."""
    from .testing.file_clock import ack_path, follow_clock  # noqa: PLC0415

    raft = config.raft
    await follow_clock(cp, clock, ack_path(clock.path, raft.cluster_id, raft.node_id))


def tune_collector(config: Config) -> None:
    """Set this process's young-generation GC threshold from ``config.gc_young_threshold``
    (for a process that runs a member, as ``serve`` does; 0 leaves Python's)."""
    if config.gc_young_threshold:
        gc.set_threshold(config.gc_young_threshold, *gc.get_threshold()[1:])


def _event_loop() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """uvloop's loop factory when uvloop is installed (the ``uvloop`` extra), else None
    (asyncio's default loop); and the loop's name for the log."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None, "asyncio (uvloop is not installed)"
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory, f"uvloop {getattr(uvloop, '__version__', '')}".strip()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command != "serve":
            logging.basicConfig(level=logging.CRITICAL)
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_with_client(args, _action(args)))
            return 0
        config = load_config(args.config, None, _overrides(args))
        logging.basicConfig(
            level=config.log_level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        tune_collector(config)
        factory, loop_name = _event_loop()
        _log.info("event loop: %s; GC thresholds %s", loop_name, gc.get_threshold())
        with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=factory) as run:
            run.run(_serve(config, args.test_clock_file))
    except ControlPlaneError as exc:
        print(f"controlplane: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"controlplane: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
