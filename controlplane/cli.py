"""The ``controlplane`` command line.

``controlplane serve`` runs one control-plane member until SIGTERM or SIGINT. With no
configuration at all it is a single Raft member keeping its data in ``./controlplane-data``:
the embedded default. Errors are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from .config import Config, load_config
from .errors import ControlPlaneError
from .factory import open_control_plane

__all__ = ["main"]

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
        "--join", action="store_true", help="join an existing cluster instead of forming one"
    )
    serve.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING, ...")
    return parser


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
    if args.join:
        overrides["raft__bootstrap"] = False
    return overrides


async def _serve(config: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cp = await open_control_plane(config)
    try:
        health = await cp.health()
        _log.info("serving (%s backend, mode %s): %s", health.backend, config.mode, health.detail)
        await stop.wait()
        _log.info("stopping")
    finally:
        await cp.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config, None, _overrides(args))
        logging.basicConfig(
            level=config.log_level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(config))
    except ControlPlaneError as exc:
        print(f"controlplane: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"controlplane: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
