"""Node liveness from heart-beats kept as soft state (DESIGN 3.4).

Heart-beats are not replicated: whoever runs the periodic duties (the memory backend, the Raft
leader) records them here with its own monotonic clock, and only the transitions
(ACTIVE -> DOWN, DOWN -> ACTIVE) become commands. A node never heard from by this tracker is
given a full ``node_timeout`` from the moment tracking started (a new leader's grace period).
"""

from __future__ import annotations

from collections.abc import Callable

from .commands import Command, RegisterNode, UnregisterNode
from .types import ClusterState, NodeStatus

__all__ = ["Liveness", "track_liveness"]


class Liveness:
    """Last heart-beat per node, on a monotonic clock supplied by the caller."""

    __slots__ = ("_last", "_since")

    def __init__(self, now: float) -> None:
        self._since = now
        self._last: dict[str, float] = {}

    def reset(self, now: float) -> None:
        """Forget every heart-beat and grant every node a fresh timeout (e.g. a new leader)."""
        self._since = now
        self._last.clear()

    def beat(self, node_id: str, now: float) -> None:
        """Record a heart-beat from ``node_id``."""
        self._last[node_id] = now

    def expired(self, state: ClusterState, now: float) -> list[str]:
        """Nodes that are not DOWN and whose last heart-beat is older than ``node_timeout``."""
        deadline = now - state.config.node_timeout
        since = self._since
        last = self._last
        return sorted(
            node_id
            for node_id, node in state.nodes.items()
            if node.status is not NodeStatus.DOWN and last.get(node_id, since) < deadline
        )

    def forget(self, node_id: str) -> None:
        """Drop a node that was unregistered."""
        self._last.pop(node_id, None)


def track_liveness(liveness: Liveness, command: Command, clock: Callable[[], float]) -> None:
    """Keep ``liveness`` in step with an applied command: registering counts as a beat.

    ``clock`` is read only for the commands that need it: this runs on every apply."""
    if isinstance(command, RegisterNode):
        liveness.beat(command.node.id, clock())
    elif isinstance(command, UnregisterNode):
        liveness.forget(command.node_id)
