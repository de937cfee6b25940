"""A coordination node: creates an index, routes a request by the routing table, uses a lock.

It runs the data node of ``data_node.py`` in the same process so that the example is complete
on its own::

    python examples/coordination_node.py --mode memory
    python examples/coordination_node.py --mode raft --data-dir ./example-data
"""

from __future__ import annotations

import argparse
import asyncio
import zlib

from data_node import run as run_data_node

from controlplane import ControlPlane, EventKind, HealthStatus, IndexSettings, ShardRouting
from controlplane.factory import open_control_plane


def route(routing: tuple[ShardRouting, ...], doc_id: str) -> str | None:
    """The node holding the primary copy of the shard that ``doc_id`` belongs to."""
    return routing[zlib.crc32(doc_id.encode()) % len(routing)].primary.node_id


async def coordinate(cp: ControlPlane) -> None:
    """Create an index, wait for green, route documents, reindex under a lock."""
    settings = IndexSettings(number_of_shards=3, number_of_replicas=1)
    await cp.create_index("products", settings, {"properties": {"name": {"type": "text"}}})
    async with cp.watch(kinds={EventKind.SHARD_STARTED}) as started:
        while (health := await cp.get_cluster_health()).status is not HealthStatus.GREEN:
            await anext(started)
    print(f"cluster is {health.status}: {health.active_shards} active copies")
    routing = await cp.get_shard_routing("products")
    for doc_id in ("sku-1", "sku-2", "sku-3"):
        print(f"document {doc_id} -> primary on {route(routing, doc_id)}")
    async with cp.lock("reindex/products", ttl=10) as lock:
        print(f"reindexing under lock with fencing token {lock.token}")
    ring = await cp.get_hash_ring()
    print(f"hash ring owners of 'tenant-42': {ring.owners('tenant-42', 2)}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="memory", choices=["memory", "raft"])
    parser.add_argument("--data-dir", default="./example-data")
    args = parser.parse_args()
    overrides = {
        "raft__data_dir": args.data_dir,
        "raft__listen_port": 0,
        "raft__client_port": 0,
        "raft__http_port": 0,
    }
    async with await open_control_plane(mode=args.mode, **overrides) as cp:
        nodes = [
            asyncio.create_task(run_data_node(cp, f"data-{i}", zone, seconds=3.0))
            for i, zone in enumerate("abc", start=1)
        ]
        await asyncio.sleep(0.2)  # let the data nodes register
        await coordinate(cp)
        await asyncio.gather(*nodes)


if __name__ == "__main__":
    asyncio.run(main())
