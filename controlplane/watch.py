"""Watch streams: the :class:`EventStream` contract and :class:`WatchHub`, its in-process source.

Every backend serves ``ControlPlane.watch()`` with an :class:`EventStream`. Backends that hold the
state in this process (memory, a Raft member, the k8s informer cache) publish each mutation's
events to a :class:`WatchHub`, which serves any number of watchers from one shared, bounded
history; a network client implements :class:`EventStream` over its own transport.

The contract (DESIGN 2.2), for every implementation:

* ``watch(since=v)`` delivers every event with version > ``v``, in order, exactly once, then live
  events. All events of one version are delivered consecutively, in publication order.
* If an event with version > ``v`` is no longer retained, ``watch`` raises
  :class:`~controlplane.errors.CompactedError`: re-read the state with ``get_cluster_state()``
  and watch from its version.
* A watcher is never silently skipped. One that falls so far behind that events it has not read
  yet leave the history gets :class:`~controlplane.errors.LaggedError` (after every event before
  the gap) carrying ``resume_version``.
* ``aclose()`` (or leaving ``async with``) ends the stream: iteration stops cleanly. Stopping the
  backend ends active streams with :class:`~controlplane.errors.ClosedError` instead, so that a
  consumer notices that no more events will come.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
import weakref
from collections.abc import Collection, Sequence
from types import TracebackType
from typing import Self

from .errors import ClosedError, CompactedError, InvalidRequestError, LaggedError
from .types import ClusterEvent, EventKind

__all__ = ["EventStream", "Watch", "WatchHub"]

_STOPPED = "the control plane was stopped"

RING_NODES_PER_EVENT = 64
"""An event carrying a ring of n nodes counts as ``1 + n // 64`` events against retention."""


def _weight(batch: Sequence[ClusterEvent]) -> int:
    """What ``batch`` counts for against the retention (see :class:`WatchHub`)."""
    weight = len(batch)
    for event in batch:
        if event.ring is not None:
            weight += len(event.ring.nodes) // RING_NODES_PER_EVENT
    return weight


class EventStream(abc.ABC):
    """An async iterator of :class:`ClusterEvent` that is also an async context manager.

    Use it as ``async with cp.watch(since=v) as events: async for event in events: ...``.

    Iteration ends (``StopAsyncIteration``) only after :meth:`aclose`. Otherwise ``__anext__``
    waits for the next event, or raises:

    * :class:`~controlplane.errors.LaggedError` -- the stream fell behind the retained history;
      ``watch(since=error.resume_version)`` continues without loss while that version is still
      retained somewhere, otherwise re-read the state.
    * :class:`~controlplane.errors.CompactedError` -- the history this stream needs is gone (the
      state was replaced wholesale, e.g. by a snapshot install): re-read the state.
    * :class:`~controlplane.errors.ClosedError` -- the backend was stopped.

    These errors are final: every later ``__anext__`` raises again. Implementations are used
    from one event loop and are not thread-safe.
    """

    __slots__ = ()

    def __aiter__(self) -> Self:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> ClusterEvent:
        """Return the next event, waiting for one if needed."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """End the stream; idempotent. A task waiting in ``__anext__`` gets StopAsyncIteration."""

    @property
    @abc.abstractmethod
    def resume_version(self) -> int:
        """The version up to which every matching event has been delivered.

        ``watch(since=stream.resume_version, kinds=<same kinds>)`` continues this stream
        exactly where it is. While the consumer is in the middle of a version with several
        events, this is the previous version, so the resumed stream delivers that version's
        events again from its first one.
        """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class WatchHub:
    """A bounded history of published events, served to any number of watchers.

    The owning backend calls :meth:`publish` after each mutation, on the event loop. Watchers
    read the shared history through a cursor: publishing costs O(1) amortized whatever the
    number of watchers (waking the ones that wait is the event loop's work), and a watcher
    costs no memory of its own.

    The history keeps at most ``retention`` events and is trimmed by whole versions, oldest
    first; the newest version is always kept, even when it alone holds more events. An event
    that carries the hash ring counts once more for every :data:`RING_NODES_PER_EVENT` nodes
    in it: a ring that follows membership is a new copy of the member list at each join or
    leave, and a count alone would let a join storm of a large cluster keep thousands of them.

    Not thread-safe: call everything from the event loop that runs the watchers.
    """

    __slots__ = (
        "_batches",
        "_closed",
        "_count",
        "_floor",
        "_head",
        "_offset",
        "_open",
        "_reason",
        "_reset_at",
        "_retention",
        "_start",
        "_versions",
        "_waiters",
    )

    def __init__(self, retention: int = 10_000, *, version: int = 0) -> None:
        """Create an empty hub whose state is at ``version``."""
        if retention < 1:
            raise InvalidRequestError(f"watch retention must be at least 1, got {retention}")
        self._retention = retention
        self._head = version
        self._floor = version  # the newest version no longer available (evicted or pre-history)
        # The history: list slots [_start:] are live; slot i holds absolute position _offset + i.
        # Evicted slots are dropped in bulk once they are half the list (amortized O(1)).
        self._versions: list[int] = []
        self._batches: list[tuple[ClusterEvent, ...]] = []
        self._start = 0
        self._offset = 0
        self._count = 0
        self._reset_at = version
        self._closed = False
        self._reason = _STOPPED
        # Futures of the watchers waiting for the next publish. Not an asyncio.Event: waking
        # N of its waiters costs O(N**2) (each removes itself from a deque).
        self._waiters: list[asyncio.Future[None]] = []
        self._open: weakref.WeakSet[Watch] = weakref.WeakSet()

    @property
    def head(self) -> int:
        """The last published version (or the version given to the constructor or reset)."""
        return self._head

    @property
    def oldest(self) -> int:
        """The oldest version still retained: ``watch(since=v)`` works for every v >= oldest - 1.

        Versions need not be consecutive, so ``oldest`` itself may never have been published.
        """
        return self._floor + 1

    @property
    def retention(self) -> int:
        """The maximum number of events kept in the history (a large ring counts as more)."""
        return self._retention

    @property
    def retained(self) -> int:
        """The number of events in the history now (a large ring counts as more)."""
        return self._count

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def publish(self, version: int, events: Sequence[ClusterEvent]) -> None:
        """Record the events of the mutation that produced ``version`` and wake the watchers.

        ``version`` must be greater than :attr:`head` (gaps are fine) and every event must carry
        it. A version without events only advances :attr:`head`.
        """
        if self._closed:
            raise ClosedError(f"cannot publish to a closed watch hub: {self._reason}")
        if version <= self._head:
            raise ValueError(f"version {version} is not greater than the head {self._head}")
        if events:
            batch = tuple(events)
            for event in batch:
                if event.version != version:
                    raise ValueError(f"event {event!r} does not carry version {version}")
            self._versions.append(version)
            self._batches.append(batch)
            self._count += _weight(batch)
            if self._count > self._retention:
                self._evict()
        self._head = version
        if self._waiters:
            self._wake()

    def reset(self, version: int) -> None:
        """Drop the whole history; the state is now at ``version`` (>= :attr:`head`).

        For when the events up to ``version`` are unknown because the state was replaced
        wholesale: a follower installed a snapshot, an informer re-listed after 410 Gone.
        Watches whose :attr:`~EventStream.resume_version` is at least ``version`` missed
        nothing and go on; the others end with :class:`~controlplane.errors.CompactedError`
        and must re-read the state. (A restore that is itself a mutation with an event, such
        as ``STATE_RESTORED``, needs no reset: publishing it keeps the history truthful.)
        """
        if self._closed:
            raise ClosedError(f"cannot reset a closed watch hub: {self._reason}")
        if version < self._head:
            raise ValueError(f"version {version} is older than the head {self._head}")
        self._offset += len(self._batches)
        self._versions = []
        self._batches = []
        self._start = 0
        self._count = 0
        self._head = self._floor = self._reset_at = version
        self._wake()

    def close(self, reason: str = _STOPPED) -> None:
        """End every watch with :class:`~controlplane.errors.ClosedError`; idempotent.

        Called by the backend when it stops. ``reason`` is the error's message. Events a watch
        has not read yet are not delivered: its consumer resumes from
        :attr:`EventStream.resume_version` elsewhere (another member) or after a restart.
        """
        if not self._closed:
            self._closed = True
            self._reason = reason
            self._wake()

    def watch(self, since: int | None = None, kinds: Collection[EventKind] | None = None) -> Watch:
        """Stream the events with version > ``since`` (default: :attr:`head`), then live ones.

        ``kinds`` restricts the stream to those event kinds. ``since`` may be ahead of
        :attr:`head`: the stream then waits. Raises
        :class:`~controlplane.errors.CompactedError` if an event the stream must deliver is no
        longer retained, :class:`~controlplane.errors.ClosedError` if the hub is closed.
        """
        if self._closed:
            raise ClosedError(self._reason)
        wanted = None if kinds is None else frozenset(kinds)
        if wanted is not None and not wanted:
            raise InvalidRequestError("kinds is empty: pass None to watch every kind of event")
        if since is None:
            since = self._head
        elif since < self._floor:
            raise CompactedError(
                f"cannot watch from version {since}: the watch history now starts after "
                f"version {self._floor}; re-read the state with get_cluster_state() and "
                "watch from its version",
                since=since,
                oldest=self.oldest,
            )
        index = bisect.bisect_right(self._versions, since, lo=self._start)
        watch = Watch(self, self._offset + index, since, wanted)
        self._open.add(watch)
        return watch

    @property
    def watching(self) -> bool:
        """Whether a watch is open (created, neither closed nor garbage-collected)."""
        return bool(self._open)

    def _evict(self) -> None:
        versions, batches = self._versions, self._batches
        start, end = self._start, len(batches)
        while self._count > self._retention and end - start > 1:
            self._count -= _weight(batches[start])
            self._floor = versions[start]
            batches[start] = ()
            start += 1
        if start >= 32 and start * 2 >= end:
            del versions[:start], batches[:start]
            self._offset += start
            start = 0
        self._start = start

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            # Rare path: without this, a consumer that keeps timing out in a quiet period
            # would grow the list.
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            raise


class Watch(EventStream):
    """A watcher of a :class:`WatchHub`: a cursor into its shared history.

    Created by :meth:`WatchHub.watch`; see :class:`EventStream` for the contract. The cursor is
    where the consumer is, so a stream whose consumer stops reading holds nothing but the cursor;
    it lags once the history trims past it.
    """

    __slots__ = (
        "__weakref__",
        "_blocked",
        "_closed",
        "_hub",
        "_kinds",
        "_offset",
        "_pos",
        "_since",
    )

    def __init__(
        self, hub: WatchHub, position: int, since: int, kinds: frozenset[EventKind] | None
    ) -> None:
        self._hub = hub
        self._pos = position  # absolute history position of the next version to read
        self._offset = 0  # events of that version already read
        self._since = since  # last version read completely
        self._kinds = kinds
        self._closed = False
        self._blocked = False

    @property
    def resume_version(self) -> int:
        """See :attr:`EventStream.resume_version`."""
        return self._since

    @property
    def kinds(self) -> frozenset[EventKind] | None:
        """The event kinds this stream delivers (None: all)."""
        return self._kinds

    async def aclose(self) -> None:
        """End the stream; idempotent."""
        if not self._closed:
            self._closed = True
            self._hub._open.discard(self)
            if self._blocked:
                self._hub._wake()

    async def __anext__(self) -> ClusterEvent:
        hub = self._hub
        kinds = self._kinds
        while True:
            if self._closed:
                raise StopAsyncIteration
            if hub._closed:
                raise ClosedError(hub._reason)
            # Everything up to _since was read, and the history holds all versions > _floor
            # (evicted, or replaced by a reset): the watch is intact iff _since >= _floor.
            if self._since < hub._floor:
                if self._since < hub._reset_at:
                    raise CompactedError(
                        f"the cluster state was replaced wholesale at version {hub._reset_at}"
                        f" before this watch read past version {self._since}; re-read it with"
                        " get_cluster_state() and watch from its version",
                        since=self._since,
                        oldest=hub.oldest,
                    )
                raise LaggedError(
                    f"the watch fell behind: events after version {self._since} left the "
                    f"watch history (the last {hub._retention} events) before it read them; "
                    f"watch(since={self._since}) again where that version is still retained, "
                    "or re-read the state with get_cluster_state() and watch from its version",
                    resume_version=self._since,
                )
            slot = self._pos - hub._offset
            if slot < hub._start:
                # Only versions <= _floor <= _since left the history here (a watch that began
                # ahead of the head, or a reset it was caught up with): nothing to deliver.
                slot = hub._start
                self._pos = hub._offset + slot
            if slot < len(hub._batches):
                version = hub._versions[slot]
                if version > self._since:  # else: since was ahead of this version
                    batch = hub._batches[slot]
                    n = len(batch)
                    while self._offset < n:
                        event = batch[self._offset]
                        self._offset += 1
                        if kinds is None or event.kind in kinds:
                            if self._offset == n:
                                self._pos += 1
                                self._offset = 0
                                self._since = version
                            return event
                    self._since = version
                self._pos += 1
                self._offset = 0
                continue
            self._blocked = True
            try:
                await hub._wait()
            finally:
                self._blocked = False
