"""A data node: registers itself, heart-beats, and starts the shard copies placed on it.

Run against a control plane of any backend::

    python examples/data_node.py --node-id data-1 --zone a --mode memory --seconds 5

With ``--mode raft`` the process is itself a single Raft member (the embedded default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from controlplane import ControlPlane, EventKind, Node, ShardState
from controlplane.factory import open_control_plane


async def start_my_copies(cp: ControlPlane, node_id: str) -> int:
    """Report every INITIALIZING copy on this node as STARTED (a real node recovers it first)."""
    started = 0
    for index in await cp.list_indices():
        for shard in index.routing:
            for copy in shard.copies:
                if copy.node_id == node_id and copy.state is ShardState.INITIALIZING:
                    await cp.update_shard_state(
                        index.name, shard.shard, node_id, ShardState.STARTED
                    )
                    started += 1
    return started


async def heartbeat_forever(cp: ControlPlane, node_id: str, every: float) -> None:
    """Tell the control plane this node is alive; only DOWN -> ACTIVE costs a write."""
    while True:
        await cp.heartbeat(node_id)
        await asyncio.sleep(every)


async def run(cp: ControlPlane, node_id: str, zone: str, seconds: float) -> None:
    """Register, then follow routing changes for ``seconds``."""
    await cp.register_node(Node(id=node_id, zone=zone, address=f"{node_id}.local:9300"))
    beats = asyncio.create_task(heartbeat_forever(cp, node_id, every=1.0))
    try:
        print(f"{node_id}: started {await start_my_copies(cp, node_id)} copies")
        kinds = {EventKind.INDEX_CREATED, EventKind.INDEX_UPDATED, EventKind.SHARD_ALLOCATED}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds), cp.watch(kinds=kinds) as events:
                async for event in events:
                    started = await start_my_copies(cp, node_id)
                    if started:
                        print(f"{node_id}: {event.kind} {event.key}: started {started} copies")
    finally:
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--node-id", default="data-1")
    parser.add_argument("--zone", default="a")
    parser.add_argument("--mode", default="memory", choices=["memory", "raft"])
    parser.add_argument("--data-dir", default="./example-data")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    overrides = {
        "raft__data_dir": args.data_dir,
        "raft__listen_port": 0,
        "raft__client_port": 0,
        "raft__http_port": 0,
    }
    async with await open_control_plane(mode=args.mode, **overrides) as cp:
        await run(cp, args.node_id, args.zone, args.seconds)


if __name__ == "__main__":
    asyncio.run(main())
