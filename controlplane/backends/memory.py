"""The memory backend: the shared state machine behind the protocol, in one process.

It is the reference implementation of ``ControlPlane`` (every other backend must behave like
it, and the conformance suite holds them to it) and a test double for users' own code. It is
not durable and not replicated: a restart loses everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from typing import Any

from .. import commands as c
from ..config import Config
from ..errors import ClosedError, NotFoundError
from ..liveness import Liveness
from ..liveness import track_liveness as _track_liveness
from ..state import StateMachine
from ..types import BackendHealth, ClusterState, EventKind, NodeStatus
from ..validation import check_name
from ..watch import EventStream, WatchHub
from .base import CommandBackend

__all__ = ["MemoryControlPlane"]

_log = logging.getLogger("controlplane.memory")


class MemoryControlPlane(CommandBackend):
    """A non-durable, single-process ``ControlPlane``.

    ``clock`` returns wall-clock seconds; it stamps commands (lock TTLs, replicated time) and
    drives node liveness. Tests pass a fake clock and call :meth:`run_maintenance` to make
    expiry instant and deterministic; otherwise a background task runs it every
    ``maintenance_interval`` seconds.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        clock: Callable[[], float] | None = None,
        maintenance_interval: float | None = None,
        state: ClusterState | None = None,
    ) -> None:
        super().__init__(clock)
        self._config = config or Config(mode="memory")
        self._sm = StateMachine(state)
        self._hub = WatchHub(self._config.watch_retention, version=self._sm.state.version)
        self._liveness = Liveness(self._clock())
        self._interval = maintenance_interval
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False

    @classmethod
    def from_state(cls, state: ClusterState, **kwargs: Any) -> MemoryControlPlane:
        """A backend that starts from ``state`` (for benchmarks and tests)."""
        return cls(state=state, **kwargs)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the periodic duties (liveness, lock expiry) in the background."""
        if self._stopped:
            raise ClosedError("this MemoryControlPlane was stopped; create a new one")
        if self._started:
            return
        self._started = True
        self._liveness.reset(self._clock())
        self._task = asyncio.create_task(self._maintenance_loop(), name="memory-maintenance")

    async def stop(self) -> None:
        """Stop: end every watch with ``ClosedError``. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._hub.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def health(self) -> BackendHealth:
        """Healthy while started."""
        return BackendHealth(
            healthy=self._started and not self._stopped,
            backend="memory",
            role="standalone",
            version=self._sm.state.version,
        )

    # --- the CommandBackend primitives -----------------------------------------------------

    async def _execute(self, command: c.Command) -> Any:
        self._check_open()
        outcome = self._sm.apply(command)
        if outcome.events:
            self._hub.publish(outcome.version, outcome.events)
        if outcome.error is None:
            _track_liveness(self._liveness, command, self._clock)
        return outcome.unwrap()

    def _local_state(self) -> ClusterState:
        return self._sm.state

    async def _linearizable_state(self) -> ClusterState:
        self._check_open()
        return self._sm.state  # one copy, applied synchronously: local is linearizable

    async def heartbeat(self, node_id: str) -> None:
        """Record a heart-beat; a DOWN node comes back ACTIVE."""
        self._check_open()
        check_name("node", node_id)
        node = self._sm.state.nodes.get(node_id)
        if node is None:
            raise NotFoundError(f"node {node_id!r} is not registered; register it first")
        self._liveness.beat(node_id, self._clock())
        if node.status is NodeStatus.DOWN:
            await self._run(
                c.UpdateNodeStatus(node_id=node_id, status=NodeStatus.ACTIVE, time=self._stamp())
            )

    def watch(
        self, since: int | None = None, kinds: Collection[EventKind] | None = None
    ) -> EventStream:
        """Events with version > ``since`` (default: from now on), in order, exactly once."""
        return self._hub.watch(since, kinds)

    # --- periodic duties -----------------------------------------------------------------------

    async def run_maintenance(self) -> None:
        """Run the periodic duties now: mark silent nodes DOWN, reap expired locks."""
        self._check_open()
        now = self._clock()
        down = self._liveness.expired(self._sm.state, now)
        if down:
            await self._run(c.MarkNodesDown(node_ids=tuple(down), time=now))
        due = self._sm.next_lock_expiry()
        if due is not None and due <= now:
            await self._run(c.ExpireLocks(time=now))

    async def _maintenance_loop(self) -> None:
        while True:
            interval = self._interval
            if interval is None:
                interval = min(0.5, self._sm.state.config.node_timeout / 4)
            await asyncio.sleep(interval)
            try:
                await self.run_maintenance()
            except Exception:  # keep the duties running; the next round retries
                _log.exception("periodic duties failed")

    def _check_open(self) -> None:
        if self._stopped:
            raise ClosedError("the control plane was stopped")
