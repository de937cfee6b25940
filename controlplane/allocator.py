"""Shard placement: which data node receives an unassigned shard copy (DESIGN 3.3).

The rule, identical on every replica: among ACTIVE data nodes that hold no copy of the shard,
prefer a node whose zone holds no copy of it yet, then the node with the fewest copies, then the
smallest node id. :class:`Placement` answers that in O(log n) with a heap of (load, node id),
kept alongside the state by :class:`~controlplane.state.StateMachine`; it is derived data,
rebuilt from the state after a restore, never part of a snapshot.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

from .types import Index, Node, NodeStatus

__all__ = ["Placement", "ShardKey", "eligible"]

ShardKey = tuple[str, int]
"""(index name, shard number)."""


def eligible(node: Node) -> bool:
    """Whether ``node`` may receive new shard copies."""
    return node.is_data and node.status is NodeStatus.ACTIVE


class Placement:
    """Copies held per node plus a heap to find the least-loaded eligible node."""

    __slots__ = ("_eligible", "_heap", "_zone", "held")

    def __init__(self, nodes: Mapping[str, Node], indices: Iterable[Index]) -> None:
        self.held: dict[str, set[ShardKey]] = {}
        """Shards each node holds a copy of (including relocation targets)."""
        self._eligible: set[str] = set()
        self._zone: dict[str, str] = {}
        for index in indices:
            for routing in index.routing:
                for copy in routing.copies:
                    for node_id in (copy.node_id, copy.relocating_to):
                        if node_id is not None:
                            self.held.setdefault(node_id, set()).add((index.name, routing.shard))
        for node in nodes.values():
            self._track(node)
        self._rebuild_heap()

    def load(self, node_id: str) -> int:
        """Number of shard copies on ``node_id``."""
        held = self.held.get(node_id)
        return len(held) if held else 0

    def node_changed(self, node: Node) -> None:
        """Record a registered or updated node."""
        was = node.id in self._eligible
        self._track(node)
        if not was and node.id in self._eligible:
            heapq.heappush(self._heap, (self.load(node.id), node.id))

    def node_removed(self, node_id: str) -> None:
        """Forget a node (its copies must have been removed with :meth:`remove`)."""
        self._eligible.discard(node_id)
        self._zone.pop(node_id, None)
        self.held.pop(node_id, None)

    def add(self, node_id: str, key: ShardKey) -> None:
        """Record a copy of ``key`` on ``node_id``."""
        held = self.held.setdefault(node_id, set())
        held.add(key)
        if node_id in self._eligible:
            heap = self._heap
            load = len(held)
            if heap and heap[0] == (load - 1, node_id):
                # The usual case (the node just chosen): its entry moves down, none goes stale.
                heapq.heapreplace(heap, (load, node_id))
                return
            heapq.heappush(heap, (load, node_id))
            if len(heap) > 4 * len(self._eligible) + 64:
                self._rebuild_heap()

    def remove(self, node_id: str, key: ShardKey) -> None:
        """Forget the copy of ``key`` on ``node_id``."""
        held = self.held.get(node_id)
        if held is None:
            return
        held.discard(key)
        if node_id in self._eligible:
            heapq.heappush(self._heap, (len(held), node_id))

    def choose(self, holders: set[str], zones: set[str], exclude: str | None = None) -> str | None:
        """The node for a new copy of a shard held by ``holders`` in ``zones``, or None.

        A node in an unused zone wins over a less loaded node in a used zone; when every
        candidate is in a used zone, the least loaded of them is chosen.
        """
        heap = self._heap
        held = self.held
        skipped: list[tuple[int, str]] = []
        fallback: str | None = None
        found: str | None = None
        while heap:
            load, node_id = heap[0]
            if node_id not in self._eligible or len(held.get(node_id, ())) != load:
                heapq.heappop(heap)  # stale entry
                continue
            if node_id in holders or node_id == exclude:
                skipped.append(heapq.heappop(heap))
                continue
            zone = self._zone.get(node_id, "")
            if zone and zone in zones:
                if fallback is None:
                    fallback = node_id
                skipped.append(heapq.heappop(heap))
                continue
            found = node_id
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found if found is not None else fallback

    def zone_of(self, node_id: str) -> str:
        """The zone of a tracked node ("" when it has none)."""
        return self._zone.get(node_id, "")

    def _track(self, node: Node) -> None:
        self._zone[node.id] = node.zone
        if eligible(node):
            self._eligible.add(node.id)
        else:
            self._eligible.discard(node.id)

    def _rebuild_heap(self) -> None:
        self._heap: list[tuple[int, str]] = [(self.load(n), n) for n in self._eligible]
        heapq.heapify(self._heap)
