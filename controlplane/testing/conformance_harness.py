"""The harness a backend provides to the conformance suite, and the helpers the checks share.

A backend joins the suite by implementing :class:`BackendHarness`: a way to open a fresh,
empty, started cluster, and control over time. Every check is an ``async`` function that
takes the harness and raises :class:`AssertionError` with a message that says what the backend
did wrong; checks use nothing but the :class:`~controlplane.protocol.ControlPlane` protocol and
the harness, never a backend's internals.

Time: a check that needs time to pass (lock TTLs, node timeouts) calls
:meth:`BackendHarness.advance_time`. A harness with a fake clock moves it and runs the
backend's periodic duties at once (``virtual_time = True``); one without (a real Raft or
Kubernetes cluster) sleeps. Checks never assert on how long anything took: effects of time are
awaited with :meth:`BackendHarness.wait_for`, bounded by :attr:`BackendHarness.timeout`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import anyio

from ..errors import ClosedError
from ..protocol import ControlPlane
from ..types import ClusterEvent, EventKind, Index, IndexSettings, Node, ShardState
from ..watch import EventStream

if TYPE_CHECKING:
    from ..backends.memory import MemoryControlPlane

__all__ = [
    "BackendHarness",
    "Check",
    "CheckFunc",
    "CheckNotApplicable",
    "FakeClock",
    "HarnessBase",
    "MemoryHarness",
    "VirtualClockHarness",
    "check",
    "collect_until_marker",
    "describe",
    "expect_error",
    "index_settings",
    "is_marker",
    "next_event",
    "nothing_written",
    "register_data_nodes",
    "registered_checks",
    "require",
    "require_equal",
    "start_all_copies",
    "version_now",
    "write_marker",
]

E = TypeVar("E", bound=BaseException)
T = TypeVar("T")


class CheckNotApplicable(Exception):
    """Raised by a check or a harness when a check cannot run against this backend.

    For example a harness whose watch history cannot be made small raises it from
    :meth:`BackendHarness.open` when given ``watch_retention``. A test runner reports the
    check as skipped, not passed.
    """


@runtime_checkable
class BackendHarness(Protocol):
    """What the conformance suite needs from a backend. Implement it once per backend."""

    @property
    def name(self) -> str:
        """A short name of the backend under test (``memory``, ``raft-3``, ...)."""

    @property
    def virtual_time(self) -> bool:
        """Whether :meth:`advance_time` is instantaneous (a fake clock) rather than a sleep.

        Checks that must make time jump past a lock's TTL while a renewing task runs are only
        possible with virtual time; they raise :class:`CheckNotApplicable` otherwise.
        """

    @property
    def timeout(self) -> float:
        """Seconds a check waits for an effect (an event, an expiry) before it fails."""

    def open(
        self, *, watch_retention: int | None = None
    ) -> AbstractAsyncContextManager[ControlPlane]:
        """A fresh, empty, started cluster; stopped (and cleaned up) when the block exits.

        ``watch_retention``: make the watch history keep about that many events, so that the
        compaction and lag checks can outrun it; raise :class:`CheckNotApplicable` if the
        backend cannot do that.
        """

    async def advance_time(self, seconds: float) -> None:
        """Let ``seconds`` of the backends' wall-clock time pass for every open cluster.

        With a fake clock, move it and run the periodic duties (liveness, lock expiry) now;
        otherwise sleep. Either way the control plane itself notices what expired: the check
        does not ask it to.
        """

    async def wait_for(
        self,
        predicate: Callable[[], Awaitable[bool]],
        *,
        timeout: float,  # noqa: ASYNC109 (its expiry is a verdict: AssertionError)
        what: str,
    ) -> None:
        """Return once ``await predicate()`` is true; ``AssertionError`` naming ``what`` after
        ``timeout`` seconds."""


@runtime_checkable
class VirtualClockHarness(BackendHarness, Protocol):
    """A harness with a fake clock it can read: needed by the model-based tests."""

    def now(self) -> float:
        """The fake wall clock (seconds since the epoch) the backends stamp commands with."""


class HarnessBase:
    """Defaults for a :class:`BackendHarness`: real time, polling waits.

    Subclass it and implement :meth:`open`; a harness with a fake clock also overrides
    :meth:`advance_time` and sets ``virtual_time``.
    """

    name: str = "backend"
    virtual_time: bool = False
    timeout: float = 10.0
    poll_interval: float = 0.005

    def open(
        self, *, watch_retention: int | None = None
    ) -> AbstractAsyncContextManager[ControlPlane]:
        """A fresh, empty, started cluster (see :meth:`BackendHarness.open`)."""
        raise NotImplementedError

    async def advance_time(self, seconds: float) -> None:
        """Sleep: real backends see real time pass."""
        await anyio.sleep(seconds)

    async def wait_for(
        self,
        predicate: Callable[[], Awaitable[bool]],
        *,
        timeout: float,  # noqa: ASYNC109 (its expiry is a verdict: AssertionError)
        what: str,
    ) -> None:
        """Poll ``predicate`` every :attr:`poll_interval` seconds."""
        with anyio.move_on_after(timeout):
            while not await predicate():  # noqa: ASYNC110 (polling a remote system)
                await anyio.sleep(self.poll_interval)
            return
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class FakeClock:
    """A wall clock that only moves when told to: pass it as a backend's ``clock``."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (>= 0)."""
        if seconds < 0:
            raise ValueError(f"a clock does not go backwards (advance by {seconds})")
        self._now += seconds


class MemoryHarness(HarnessBase):
    """The harness of the in-memory reference backend, with a :class:`FakeClock`.

    ``background_maintenance``: keep the backend's own periodic task running (every 10 ms of
    real time) besides the explicit run in :meth:`advance_time`. Turn it off when the test
    must know exactly when the duties run (the model-based tests).
    """

    name = "memory"
    virtual_time = True

    def __init__(self, *, start: float = 1_700_000_000.0, background_maintenance: bool = True):
        self.clock = FakeClock(start)
        self._background = background_maintenance
        self._open: list[MemoryControlPlane] = []

    def now(self) -> float:
        """The fake clock."""
        return self.clock()

    @asynccontextmanager
    async def _open_cm(self, watch_retention: int | None) -> AsyncIterator[ControlPlane]:
        from ..backends.memory import MemoryControlPlane  # noqa: PLC0415 (optional backend)
        from ..config import Config  # noqa: PLC0415

        config = Config(mode="memory")
        if watch_retention is not None:
            config = Config(mode="memory", watch_retention=watch_retention)
        cp = MemoryControlPlane(
            config,
            clock=self.clock,
            maintenance_interval=0.01 if self._background else 1e9,
        )
        async with cp:
            self._open.append(cp)
            try:
                yield cp
            finally:
                self._open.remove(cp)

    def open(
        self, *, watch_retention: int | None = None
    ) -> AbstractAsyncContextManager[ControlPlane]:
        """A fresh started :class:`~controlplane.backends.memory.MemoryControlPlane`."""
        return self._open_cm(watch_retention)

    async def advance_time(self, seconds: float) -> None:
        """Move the fake clock, then run every open backend's periodic duties."""
        self.clock.advance(seconds)
        for cp in list(self._open):
            with contextlib.suppress(ClosedError):  # a check stopped it itself
                await cp.run_maintenance()


# --- the registry of checks ----------------------------------------------------------------

CheckFunc = Callable[[BackendHarness], Awaitable[None]]


@dataclass(frozen=True)
class Check:
    """One conformance check: ``await check(harness)`` raises ``AssertionError`` on failure."""

    name: str
    area: str
    func: CheckFunc

    @property
    def doc(self) -> str:
        """What the check verifies (the function's docstring)."""
        return (self.func.__doc__ or "").strip()

    async def __call__(self, harness: BackendHarness) -> None:
        """Run the check; any failure is an ``AssertionError`` naming the check.

        An unexpected exception from the backend (an error where the call should succeed, a
        crash) is re-raised as ``AssertionError`` with the original as its cause.
        """
        try:
            await self.func(harness)
        except (AssertionError, CheckNotApplicable):
            raise
        except Exception as exc:
            found = _find(exc, (AssertionError, CheckNotApplicable))  # from a task group
            if found is not None:
                raise found from exc
            raise AssertionError(
                f"check {self.name!r}: the backend raised {type(exc).__name__}: {exc}"
            ) from exc


def _find(exc: BaseException, types: tuple[type[Exception], ...]) -> Exception | None:
    """The first exception of ``types`` in ``exc`` or the exception groups it nests."""
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, types)
            if found is not None:
                return found
    return None


_REGISTRY: list[Check] = []


def check(area: str) -> Callable[[CheckFunc], CheckFunc]:
    """Register an ``async def check_<name>(harness)`` function as a conformance check."""

    def register(func: CheckFunc) -> CheckFunc:
        name = func.__name__.removeprefix("check_")
        if any(c.name == name for c in _REGISTRY):
            raise ValueError(f"two conformance checks are named {name!r}")
        _REGISTRY.append(Check(name=name, area=area, func=func))
        return func

    return register


def registered_checks() -> tuple[Check, ...]:
    """Every check registered so far, in registration order."""
    return tuple(_REGISTRY)


# --- helpers shared by the checks --------------------------------------------------------------


async def expect_error(exc_type: type[E], call: Awaitable[Any], what: str) -> E:
    """Await ``call`` and return the ``exc_type`` it raised; ``AssertionError`` otherwise."""
    try:
        result = await call
    except exc_type as exc:
        return exc
    except Exception as exc:
        raise AssertionError(
            f"{what}: expected {exc_type.__name__}, got {type(exc).__name__}: {exc}"
        ) from exc
    raise AssertionError(f"{what}: expected {exc_type.__name__}, but it returned {result!r}")


_markers = itertools.count(1)


async def write_marker(cp: ControlPlane) -> str:
    """Make one write that produces exactly one event (a new feature flag); return its name."""
    name = f"conformance-marker-{next(_markers)}"
    await cp.set_feature_flag(name, True)
    return name


def is_marker(event: ClusterEvent, marker: str) -> bool:
    """Whether ``event`` is the one produced by :func:`write_marker` returning ``marker``."""
    return event.kind is EventKind.FLAG_CHANGED and event.key == marker


async def next_event(stream: EventStream, within: float, what: str) -> ClusterEvent:
    """The next event of ``stream``; ``AssertionError`` if none comes within ``within`` s."""
    with anyio.move_on_after(within):
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            raise AssertionError(f"the watch ended while waiting for {what}") from None
    raise AssertionError(f"no event within {within} s while waiting for {what}")


async def collect_until_marker(
    stream: EventStream, marker: str, within: float, what: str = "the marker event"
) -> list[ClusterEvent]:
    """Read ``stream`` up to the event of ``marker``; return the events before it."""
    seen: list[ClusterEvent] = []
    with anyio.move_on_after(within):
        async for event in stream:
            if is_marker(event, marker):
                return seen
            seen.append(event)
        raise AssertionError(
            f"the watch ended before {what} ({marker}); it delivered {_brief(seen)}"
        )
    raise AssertionError(
        f"no {what} ({marker}) within {within} s; the watch delivered {_brief(seen)}"
    )


def _brief(events: Sequence[ClusterEvent], limit: int = 12) -> str:
    shown = ", ".join(f"{e.version}:{e.kind}:{e.key}" for e in events[-limit:])
    more = f"... ({len(events)} events) " if len(events) > limit else ""
    return f"[{more}{shown}]"


def describe(events: Sequence[ClusterEvent]) -> str:
    """A short rendering of events (version:kind:key) for assertion messages."""
    return _brief(events)


async def nothing_written(cp: ControlPlane, since: int, what: str, within: float = 10.0) -> None:
    """Assert that no write happened after ``since``: the state is still at ``since`` and the
    first event after it is a fresh marker's."""
    state = await cp.get_cluster_state(consistent=True)
    if state.version != since:
        raise AssertionError(
            f"{what}: the state moved from version {since} to {state.version}; a rejected "
            "request must not write anything"
        )
    async with cp.watch(since=since) as stream:
        marker = await write_marker(cp)
        before = await collect_until_marker(stream, marker, within)
    if before:
        raise AssertionError(f"{what}: a rejected request produced events {describe(before)}")


async def version_now(cp: ControlPlane) -> int:
    """The version of a linearizable read of the state."""
    return (await cp.get_cluster_state(consistent=True)).version


# --- small builders the checks share ---------------------------------------------------------


async def register_data_nodes(
    cp: ControlPlane, ids: Sequence[str], zones: Sequence[str] | None = None
) -> list[Node]:
    """Register ACTIVE data nodes with the given ids (and zones)."""
    out = []
    for i, node_id in enumerate(ids):
        zone = zones[i] if zones is not None else ""
        out.append(await cp.register_node(Node(id=node_id, address=f"{node_id}:9300", zone=zone)))
    return out


async def start_all_copies(cp: ControlPlane, index: str) -> Index:
    """Report every assigned, initializing copy of ``index`` STARTED; return the index."""
    for routing in await cp.get_shard_routing(index):
        for copy in routing.copies:
            if copy.node_id is not None and copy.state is ShardState.INITIALIZING:
                await cp.update_shard_state(index, routing.shard, copy.node_id, ShardState.STARTED)
    return await cp.get_index(index)


def index_settings(shards: int, replicas: int) -> IndexSettings:
    """Index settings with ``shards`` primaries of ``replicas`` replicas each."""
    return IndexSettings(number_of_shards=shards, number_of_replicas=replicas)


def require(condition: bool, message: str | Callable[[], str]) -> None:
    """Raise ``AssertionError(message)`` unless ``condition`` (works under ``python -O``)."""
    if not condition:
        raise AssertionError(message() if callable(message) else message)


def require_equal(actual: T, expected: T, what: str) -> None:
    """Raise ``AssertionError`` unless ``actual == expected``, showing both."""
    if actual != expected:
        raise AssertionError(f"{what}: expected {expected!r}, got {actual!r}")
