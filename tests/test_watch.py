"""Tests of controlplane.watch: the WatchHub history and its watchers."""

from __future__ import annotations

import asyncio
import gc
import random
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.errors import (
    ClosedError,
    CompactedError,
    InvalidRequestError,
    LaggedError,
    WatchError,
)
from controlplane.types import ClusterEvent, EventKind, HashRing
from controlplane.watch import EventStream, Watch, WatchHub

K = EventKind


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def events(version: int, *kinds: EventKind) -> list[ClusterEvent]:
    """Distinct events of one version (``key`` tells them apart)."""
    return [
        ClusterEvent(version=version, kind=k, key=f"{version}.{i}") for i, k in enumerate(kinds)
    ]


def publish(hub: WatchHub, version: int, n: int = 1, kind: EventKind = K.FLAG_CHANGED) -> None:
    hub.publish(version, events(version, *([kind] * n)))


async def take(stream: EventStream, n: int) -> list[ClusterEvent]:
    with anyio.fail_after(5):
        return [await anext(stream) for _ in range(n)]


async def assert_waits(stream: EventStream) -> None:
    """The stream has nothing to deliver now: ``__anext__`` blocks (and is cancelled)."""
    with anyio.move_on_after(0):
        event = await anext(stream)
        pytest.fail(f"expected no event, got {event}")


def keys(evs: Iterable[ClusterEvent]) -> list[str]:
    return [e.key for e in evs]


# --- basics --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_live_watch_starts_after_head() -> None:
    hub = WatchHub()
    publish(hub, 1)
    async with hub.watch() as w:
        assert w.resume_version == 1
        await assert_waits(w)
        publish(hub, 2)
        assert keys(await take(w, 1)) == ["2.0"]
        assert w.resume_version == 2


@pytest.mark.anyio
async def test_resume_from_version_then_live() -> None:
    hub = WatchHub()
    for v in range(1, 6):
        publish(hub, v)
    async with hub.watch(since=2) as w:
        assert keys(await take(w, 3)) == ["3.0", "4.0", "5.0"]
        await assert_waits(w)
        publish(hub, 6)
        assert keys(await take(w, 1)) == ["6.0"]


@pytest.mark.anyio
async def test_empty_hub_at_initial_version() -> None:
    hub = WatchHub(version=100)
    assert (hub.head, hub.oldest) == (100, 101)
    with pytest.raises(CompactedError):
        hub.watch(since=99)  # the events up to 100 were never in this history
    async with hub.watch(since=100) as w:
        publish(hub, 101)
        assert keys(await take(w, 1)) == ["101.0"]


@pytest.mark.anyio
async def test_non_consecutive_versions() -> None:
    hub = WatchHub()
    for v in (10, 20, 35):
        publish(hub, v)
    assert hub.head == 35
    for since, want in [(0, [10, 20, 35]), (10, [20, 35]), (15, [20, 35]), (34, [35]), (35, [])]:
        async with hub.watch(since=since) as w:
            got = await take(w, len(want))
            assert [e.version for e in got] == want
            await assert_waits(w)


@pytest.mark.anyio
async def test_since_ahead_of_head_waits_for_later_versions() -> None:
    hub = WatchHub()
    publish(hub, 10)
    async with hub.watch(since=50) as w:
        await assert_waits(w)
        publish(hub, 30)
        publish(hub, 50)
        await assert_waits(w)
        publish(hub, 60)
        assert [e.version for e in await take(w, 1)] == [60]


@pytest.mark.anyio
async def test_watch_ahead_of_head_outlives_the_history_it_skips() -> None:
    hub = WatchHub(retention=1)
    ahead = hub.watch(since=100)
    for v in range(1, 101):
        publish(hub, v)  # each evicts the one before; evicted slots are dropped in bulk
    hub.reset(100)
    publish(hub, 101)
    assert [e.version for e in await take(ahead, 1)] == [101]
    await assert_waits(ahead)


@pytest.mark.anyio
async def test_version_without_events_only_advances_head() -> None:
    hub = WatchHub()
    hub.publish(1, [])
    assert (hub.head, hub.retained) == (1, 0)
    async with hub.watch(since=0) as w:
        await assert_waits(w)


@pytest.mark.anyio
async def test_events_of_one_version_stay_together_and_in_order() -> None:
    hub = WatchHub()
    w = hub.watch()
    hub.publish(1, events(1, K.INDEX_CREATED, K.SHARD_ALLOCATED, K.SHARD_ALLOCATED))
    publish(hub, 2)
    assert keys(await take(w, 4)) == ["1.0", "1.1", "1.2", "2.0"]


def test_publish_rejects_bad_versions() -> None:
    hub = WatchHub()
    publish(hub, 5)
    with pytest.raises(ValueError, match="not greater"):
        publish(hub, 5)
    with pytest.raises(ValueError, match="does not carry version 6"):
        hub.publish(6, events(7, K.FLAG_CHANGED))
    assert (hub.head, hub.retained) == (5, 1)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidRequestError):
        WatchHub(retention=0)
    with pytest.raises(InvalidRequestError, match="kinds is empty"):
        WatchHub().watch(kinds=[])


# --- retention, compaction, lag ------------------------------------------------------------


@pytest.mark.anyio
async def test_compacted_error_names_the_way_out() -> None:
    hub = WatchHub(retention=3)
    for v in range(1, 6):
        publish(hub, v)
    assert (hub.oldest, hub.retained) == (3, 3)
    with pytest.raises(CompactedError, match=r"get_cluster_state\(\)") as info:
        hub.watch(since=1)
    assert (info.value.since, info.value.oldest) == (1, 3)
    async with hub.watch(since=hub.oldest - 1) as w:
        assert [e.version for e in await take(w, 3)] == [3, 4, 5]


def test_history_is_trimmed_by_whole_versions() -> None:
    hub = WatchHub(retention=3)
    publish(hub, 1, n=2)
    publish(hub, 2, n=2)  # 4 events > 3: version 1 goes as a whole
    assert (hub.oldest, hub.retained) == (2, 2)
    publish(hub, 3, n=5)  # the newest version is kept even when it alone is too big
    assert (hub.oldest, hub.retained) == (3, 5)


@pytest.mark.anyio
async def test_a_large_ring_counts_for_more_than_one_event() -> None:
    # A ring that follows membership is a new copy of the member list at every join: 1,000
    # joins of a 5,000-node cluster must not keep 1,000 copies.
    hub = WatchHub(retention=41)
    nodes = tuple(f"n{i}" for i in range(640))
    for v in range(1, 5):  # 639 nodes and fewer: 1 + 639 // 64 = 10 each, 40 in all
        ring = HashRing(nodes=nodes[: 640 - v], version=v)
        hub.publish(v, [ClusterEvent(version=v, kind=K.RING_UPDATED, ring=ring)])
    assert (hub.oldest, hub.retained) == (1, 40)
    ring = HashRing(nodes=nodes, version=5)  # 640 nodes: 11, so version 1 goes
    hub.publish(5, [ClusterEvent(version=5, kind=K.RING_UPDATED, ring=ring)])
    assert (hub.oldest, hub.retained) == (2, 41)
    publish(hub, 6)  # an event without a ring counts once: version 2 goes
    assert (hub.oldest, hub.retained) == (3, 32)
    with pytest.raises(CompactedError):
        hub.watch(since=1)
    async with hub.watch(since=2) as w:
        got = await take(w, 4)
    assert [e.version for e in got] == [3, 4, 5, 6]
    assert got[2].ring == ring


@pytest.mark.anyio
async def test_history_compaction_keeps_positions() -> None:
    # Enough publishes to trigger the bulk removal of evicted slots, with a watcher that
    # reads as it goes: it must see every version exactly once, in order.
    hub = WatchHub(retention=10)
    w = hub.watch()
    for v in range(1, 1001):
        publish(hub, v)
        assert [e.version for e in await take(w, 1)] == [v]
    assert (hub.oldest, hub.retained) == (991, 10)


@pytest.mark.anyio
async def test_lagged_after_everything_before_the_gap() -> None:
    hub = WatchHub(retention=3)
    w = hub.watch(since=0)
    publish(hub, 1)
    publish(hub, 2)
    assert [e.version for e in await take(w, 1)] == [1]
    for v in range(3, 7):
        publish(hub, v)  # versions 2 and 3 leave the history unread
    with pytest.raises(LaggedError, match="fell behind") as info:
        await take(w, 1)
    assert info.value.resume_version == 1 == w.resume_version
    with pytest.raises(LaggedError):  # final
        await take(w, 1)
    with pytest.raises(CompactedError):  # version 2 is not retained here any more
        hub.watch(since=info.value.resume_version)


@pytest.mark.anyio
async def test_lagged_mid_version_resumes_from_last_complete_version() -> None:
    hub = WatchHub(retention=4)
    w = hub.watch(since=0)
    publish(hub, 1)
    publish(hub, 2, n=3)
    assert keys(await take(w, 2)) == ["1.0", "2.0"]
    assert w.resume_version == 1  # version 2 is only partly read
    publish(hub, 3, n=2)  # 6 events: versions 1 and 2 go
    with pytest.raises(LaggedError) as info:
        await take(w, 1)
    assert info.value.resume_version == 1


@pytest.mark.anyio
async def test_resume_mid_version_redelivers_that_version_from_its_start() -> None:
    hub = WatchHub()
    w = hub.watch(since=0)
    publish(hub, 1, n=3)
    assert keys(await take(w, 2)) == ["1.0", "1.1"]
    await w.aclose()
    async with hub.watch(since=w.resume_version) as again:
        assert keys(await take(again, 3)) == ["1.0", "1.1", "1.2"]


@pytest.mark.anyio
async def test_resume_after_lag_where_the_version_is_still_retained() -> None:
    # A member's hub with a short history and a replica with a long one, fed the same stream
    # (as a client failing over between members would see them).
    member, replica = WatchHub(retention=2), WatchHub(retention=100)

    def both(version: int) -> None:
        publish(member, version)
        publish(replica, version)

    w = member.watch(since=0)
    both(1)
    got = await take(w, 1)
    for v in range(2, 10):
        both(v)
    with pytest.raises(LaggedError) as info:
        await take(w, 1)
    async with replica.watch(since=info.value.resume_version) as resumed:
        got += await take(resumed, 8)
    assert [e.version for e in got] == list(range(1, 10))


@pytest.mark.anyio
async def test_kinds_filter() -> None:
    hub = WatchHub()
    w = hub.watch(kinds={K.NODE_JOINED, K.NODE_DOWN})
    assert w.kinds == frozenset({K.NODE_JOINED, K.NODE_DOWN})
    hub.publish(1, events(1, K.INDEX_CREATED, K.NODE_JOINED, K.SHARD_ALLOCATED))
    hub.publish(2, events(2, K.INDEX_DELETED))
    hub.publish(3, events(3, K.NODE_DOWN, K.NODE_JOINED))
    assert keys(await take(w, 3)) == ["1.1", "3.0", "3.1"]
    await assert_waits(w)
    hub.publish(4, events(4, K.FLAG_CHANGED))
    await assert_waits(w)
    assert w.resume_version == 4  # a filtered watch still advances past what it skipped


# --- ending ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_aclose_ends_iteration_and_wakes_a_waiting_reader() -> None:
    hub = WatchHub()
    w = hub.watch()
    got: list[ClusterEvent] = []

    async def consume() -> None:
        async for event in w:
            got.append(event)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            publish(hub, 1)
            await anyio.wait_all_tasks_blocked()
            await w.aclose()
    assert keys(got) == ["1.0"]
    await w.aclose()  # idempotent
    publish(hub, 2)
    with pytest.raises(StopAsyncIteration):
        await anext(w)


@pytest.mark.anyio
async def test_async_with_closes() -> None:
    hub = WatchHub()
    async with hub.watch() as w:
        assert isinstance(w, Watch)
    with pytest.raises(StopAsyncIteration):
        await anext(w)


@pytest.mark.anyio
async def test_hub_close_ends_watches_with_closed_error() -> None:
    hub = WatchHub()
    waiting, idle, closed_by_caller = hub.watch(), hub.watch(since=0), hub.watch()
    publish(hub, 1)
    await closed_by_caller.aclose()
    errors: list[BaseException] = []

    async def consume() -> None:
        try:
            async for _ in waiting:
                pass
        except ClosedError as exc:
            errors.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            hub.close()
            hub.close()  # idempotent
    assert [str(e) for e in errors] == ["the control plane was stopped"]
    # Stopping wins over unread events; the caller's own close wins over stopping.
    with pytest.raises(ClosedError):
        await anext(idle)
    with pytest.raises(StopAsyncIteration):
        await anext(closed_by_caller)
    with pytest.raises(ClosedError):
        hub.watch()
    with pytest.raises(ClosedError):
        publish(hub, 2)
    assert hub.closed


@pytest.mark.anyio
async def test_reset_keeps_caught_up_watches_and_ends_the_others() -> None:
    hub = WatchHub()
    publish(hub, 1)
    publish(hub, 2)
    caught_up, behind = hub.watch(since=2), hub.watch(since=1)
    hub.reset(2)  # the state was replaced at version 2
    assert (hub.head, hub.oldest, hub.retained) == (2, 3, 0)
    hub.publish(3, events(3, K.STATE_RESTORED))
    assert keys(await take(caught_up, 1)) == ["3.0"]
    with pytest.raises(CompactedError, match="replaced wholesale"):
        await take(behind, 1)

    hub.reset(10)  # a snapshot install: versions 4..10 were never seen here
    with pytest.raises(CompactedError):
        await take(caught_up, 1)
    with pytest.raises(CompactedError):
        hub.watch(since=3)
    async with hub.watch(since=10) as w:
        publish(hub, 11)
        assert keys(await take(w, 1)) == ["11.0"]
    with pytest.raises(ValueError, match="older than the head"):
        hub.reset(5)


@pytest.mark.anyio
async def test_reset_wakes_waiting_watches() -> None:
    hub = WatchHub()
    w = hub.watch()
    errors: list[WatchError] = []

    async def consume() -> None:
        try:
            await anext(w)
        except WatchError as exc:
            errors.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            hub.reset(5)
    assert [type(e) for e in errors] == [CompactedError]


# --- resources -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cancelled_reads_lose_nothing_and_leak_no_waiters() -> None:
    hub = WatchHub()
    w = hub.watch()
    for _ in range(100):
        await assert_waits(w)
    assert hub._waiters == []
    publish(hub, 1)
    assert keys(await take(w, 1)) == ["1.0"]


@pytest.mark.anyio
async def test_no_task_or_memory_leaks() -> None:
    hub = WatchHub()
    tasks_before = asyncio.all_tasks()
    streams = [hub.watch() for _ in range(20)]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for s in streams:
                tg.start_soon(anext, s)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
    assert hub._waiters == []
    assert asyncio.all_tasks() == tasks_before
    # The hub holds no reference to its watches: an abandoned one is simply collected.
    ref = weakref.ref(streams[0])
    del streams, s
    gc.collect()
    assert ref() is None


# --- concurrency -----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("seed", range(3))
async def test_concurrent_publishers_and_watchers_exactly_once_in_order(seed: int) -> None:
    rng = random.Random(seed)
    hub = WatchHub(retention=100_000)
    published: list[ClusterEvent] = []
    next_version = 0
    kinds = [K.NODE_JOINED, K.INDEX_CREATED, K.LOCK_ACQUIRED]
    end = events(10**9, K.CONFIG_CHANGED)

    async def publisher(rounds: int) -> None:
        nonlocal next_version
        for _ in range(rounds):
            next_version += rng.randint(1, 3)
            batch = events(next_version, *rng.choices(kinds, k=rng.randint(1, 3)))
            hub.publish(next_version, batch)
            published.extend(batch)
            for _ in range(rng.randint(0, 2)):
                await anyio.lowlevel.checkpoint()

    results: list[tuple[int, frozenset[EventKind] | None, list[ClusterEvent]]] = []

    async def watcher() -> None:
        for _ in range(rng.randint(0, 20)):
            await anyio.lowlevel.checkpoint()
        since = rng.choice([None, hub.head, rng.randint(0, hub.head)])
        wanted = rng.choice([None, frozenset([*rng.sample(kinds, 2), K.CONFIG_CHANGED])])
        got: list[ClusterEvent] = []
        async with hub.watch(since=since, kinds=wanted) as w:
            start = w.resume_version
            async for event in w:
                got.append(event)
                if event.kind is K.CONFIG_CHANGED:
                    break
                if rng.random() < 0.3:
                    await anyio.lowlevel.checkpoint()
            await assert_waits(w)
        results.append((start, wanted, got))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(watcher)
            async with anyio.create_task_group() as publishers:
                for _ in range(4):
                    publishers.start_soon(publisher, 250)
            hub.publish(end[0].version, end)
            published.extend(end)

    assert len(results) == 16
    for start, wanted, got in results:
        assert got == [
            e for e in published if e.version > start and (wanted is None or e.kind in wanted)
        ]


@pytest.mark.anyio
@pytest.mark.parametrize("seed", range(3))
async def test_slow_watchers_lag_explicitly_and_resume_without_loss(seed: int) -> None:
    rng = random.Random(seed)
    hub, archive = WatchHub(retention=20), WatchHub(retention=1_000_000)
    published: list[ClusterEvent] = []
    lagged: list[bool] = []

    def publish_both(version: int, batch: list[ClusterEvent]) -> None:
        hub.publish(version, batch)
        archive.publish(version, batch)
        published.extend(batch)

    async def publisher() -> None:
        for v in range(1, 2_001):
            publish_both(v, events(v, *[K.FLAG_CHANGED] * rng.randint(1, 3)))
            if rng.random() < 0.5:
                await anyio.lowlevel.checkpoint()
        publish_both(2_001, events(2_001, K.CONFIG_CHANGED))

    async def watcher(slowness: int) -> None:
        got: list[ClusterEvent] = []
        stream: EventStream = hub.watch(since=0)
        while not got or got[-1].kind is not K.CONFIG_CHANGED:
            try:
                event = await anext(stream)
            except LaggedError as exc:
                assert exc.resume_version == stream.resume_version
                # Nothing before the gap was skipped: every event up to the resume version
                # was delivered, plus at most the first events of the next version.
                done = [e for e in published if e.version <= exc.resume_version]
                assert got[: len(done)] == done
                assert {e.version for e in got[len(done) :]} <= {exc.resume_version + 1}
                del got[len(done) :]
                stream = archive.watch(since=exc.resume_version)
                lagged.append(True)
                continue
            got.append(event)
            for _ in range(rng.randint(0, slowness)):
                await anyio.lowlevel.checkpoint()
        await stream.aclose()
        assert got == published

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for slowness in (0, 0, 1, 3, 10, 10):
                tg.start_soon(watcher, slowness)
            tg.start_soon(publisher)
    assert lagged  # the slowest watchers did fall behind


# --- model-based ------------------------------------------------------------------------------

KINDS = (K.NODE_JOINED, K.NODE_LEFT, K.FLAG_CHANGED)

Op = tuple[str, int, int, int]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 3), st.integers(0, 3), st.integers(0, 7)),
        st.tuples(st.just("watch"), st.integers(-1, 9), st.integers(0, 7), st.just(0)),
        st.tuples(st.just("next"), st.integers(0, 7), st.just(0), st.just(0)),
        st.tuples(st.just("close"), st.integers(0, 7), st.just(0), st.just(0)),
        st.tuples(st.just("reset"), st.integers(0, 3), st.just(0), st.just(0)),
    ),
    max_size=60,
)


def _kinds_of(bits: int) -> frozenset[EventKind] | None:
    return None if bits == 0 else frozenset(k for i, k in enumerate(KINDS) if bits >> i & 1)


@dataclass
class ModelWatcher:
    stream: Watch
    since: int
    kinds: frozenset[EventKind] | None
    delivered: list[ClusterEvent] = field(default_factory=list)
    doomed: bool = False  # the state was reset past it: it must raise CompactedError
    done: bool = False


@dataclass
class Model:
    retention: int
    history: list[tuple[int, list[ClusterEvent]]] = field(default_factory=list)
    retained: list[tuple[int, int]] = field(default_factory=list)  # (version, n events)
    head: int = 0
    floor: int = 0

    def publish(self, version: int, evs: list[ClusterEvent]) -> None:
        self.head = version
        if not evs:
            return
        self.history.append((version, evs))
        self.retained.append((version, len(evs)))
        while sum(n for _, n in self.retained) > self.retention and len(self.retained) > 1:
            self.floor = self.retained.pop(0)[0]

    def after(self, since: int) -> list[ClusterEvent]:
        return [e for v, evs in self.history if v > since for e in evs]


async def _run_model(retention: int, script: Sequence[Op]) -> None:
    hub, model = WatchHub(retention=retention), Model(retention)
    watchers: list[ModelWatcher] = []
    for op, a, b, c in script:
        if op == "publish":
            version = model.head + a
            evs = events(version, *[KINDS[(c + i) % 3] for i in range(b)])
            hub.publish(version, evs)
            model.publish(version, evs)
        elif op == "reset":
            model.head += a
            model.retained, model.floor = [], model.head
            hub.reset(model.head)
            for w in watchers:
                w.doomed = w.doomed or w.stream.resume_version < model.head
        elif op == "watch":
            since = None if a == -1 else model.head - 6 + a
            if since is not None and since < model.floor:
                with pytest.raises(CompactedError):
                    hub.watch(since=since, kinds=_kinds_of(b))
                continue
            stream = hub.watch(since=since, kinds=_kinds_of(b))
            watchers.append(
                ModelWatcher(stream, model.head if since is None else since, stream.kinds)
            )
        elif op == "close" and watchers:
            w = watchers[a % len(watchers)]
            await w.stream.aclose()
            w.done = True
            with pytest.raises(StopAsyncIteration):
                await anext(w.stream)
        elif op == "next" and watchers:
            await _model_next(hub, model, watchers[a % len(watchers)])
    for w in watchers:  # drain: every watcher ends idle, lagged or compacted
        while await _model_next(hub, model, w):
            pass


async def _model_next(hub: WatchHub, model: Model, w: ModelWatcher) -> bool:
    """One ``__anext__`` checked against the model; False once the watcher has nothing to do."""
    if w.done:
        return False
    if w.doomed:
        with pytest.raises(CompactedError):
            await take(w.stream, 1)
        w.done = True
        return False
    unfiltered = model.after(w.since)
    expected = [e for e in unfiltered if w.kinds is None or e.kind in w.kinds]
    assert w.delivered == expected[: len(w.delivered)]
    pos = unfiltered.index(w.delivered[-1]) + 1 if w.delivered else 0
    # Lag is allowed once an event after the last delivered one left the history, and
    # required when the next event to deliver did.
    lag_allowed = pos < len(unfiltered) and unfiltered[pos].version <= model.floor
    nxt = expected[len(w.delivered)] if len(w.delivered) < len(expected) else None
    try:
        if nxt is None:
            await assert_waits(w.stream)
            return False
        (event,) = await take(w.stream, 1)
    except LaggedError as exc:
        assert lag_allowed
        r = exc.resume_version
        done = [e for e in expected if e.version <= r]
        assert w.delivered[: len(done)] == done
        later = {e.version for e in w.delivered[len(done) :]}
        assert later <= {min((v for v, _ in model.history if v > r), default=r)}
        with pytest.raises(CompactedError):
            hub.watch(since=r)
        w.done = True
        return False
    assert nxt.version > model.floor, "the next event was evicted but no LaggedError"
    assert event == nxt
    w.delivered.append(event)
    return True


@settings(max_examples=300, deadline=None)
@given(retention=st.integers(1, 8), script=ops)
def test_watch_matches_a_list_model(retention: int, script: list[Op]) -> None:
    anyio.run(_run_model, retention, script, backend="asyncio")
