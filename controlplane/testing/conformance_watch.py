"""Conformance checks of ``ControlPlane.watch`` (DESIGN 2.2): order, exactly-once, resume,
compaction, lag, kinds, closing."""

from __future__ import annotations

import itertools

import anyio
import anyio.lowlevel

from ..errors import ClosedError, CompactedError, LaggedError
from ..protocol import ControlPlane
from ..types import ClusterEvent, EventKind, Node
from .conformance_harness import (
    BackendHarness,
    check,
    collect_until_marker,
    describe,
    expect_error,
    index_settings,
    is_marker,
    next_event,
    require,
    require_equal,
    version_now,
    write_marker,
)

__all__: tuple[str, ...] = ()

AREA = "watch"


async def _first_event(cp: ControlPlane, since: int, within: float) -> ClusterEvent:
    """Open ``watch(since=since)`` and read one event (a backend may fail at either step)."""
    async with cp.watch(since=since) as stream:
        return await next_event(stream, within, f"the first event after version {since}")


@check(AREA)
async def check_watch_replays_history_then_live(harness: BackendHarness) -> None:
    """``watch(since=v)`` delivers every event with version > v in order, then live events."""
    async with harness.open() as cp:
        v0 = await version_now(cp)
        created = [await cp.create_index(f"replay-{i}", index_settings(1, 0)) for i in range(5)]
        versions = [index.created_version for index in created]
        require(
            all(a < b for a, b in zip([v0, *versions], versions, strict=False)),
            f"versions of successive writes must increase from {v0}: got {versions}",
        )
        require_equal(await version_now(cp), versions[-1], "state version after the writes")
        async with cp.watch(since=v0) as stream:
            replayed = [
                await next_event(stream, harness.timeout, f"replayed event {i}") for i in range(5)
            ]
            require_equal(
                [(e.version, e.kind, e.key) for e in replayed],
                [(v, EventKind.INDEX_CREATED, f"replay-{i}") for i, v in enumerate(versions)],
                f"events replayed by watch(since={v0})",
            )
            marker = await write_marker(cp)
            live = await next_event(stream, harness.timeout, "a live event after the replay")
            require(
                is_marker(live, marker),
                f"after the replay the watch must deliver the next write ({marker}), "
                f"got {describe([live])}",
            )
            require(live.version > versions[-1], "a live event's version must exceed history")
        async with cp.watch(since=versions[2]) as stream:
            first = await next_event(stream, harness.timeout, "the first event")
            require_equal(
                (first.version, first.key),
                (versions[3], "replay-3"),
                f"the first event of watch(since={versions[2]}) (events > since only)",
            )


@check(AREA)
async def check_watch_default_starts_now(harness: BackendHarness) -> None:
    """``watch()`` without ``since`` delivers only events of writes made after the call."""
    async with harness.open() as cp:
        await cp.create_index("before-watch", index_settings(1, 0))
        async with cp.watch() as stream:
            marker = await write_marker(cp)
            event = await next_event(stream, harness.timeout, "the first live event")
            require(
                is_marker(event, marker),
                f"watch() must start after the current version; it delivered {describe([event])}",
            )


@check(AREA)
async def check_watch_concurrent_writers(harness: BackendHarness) -> None:
    """With several tasks writing while a watcher reads, the watcher sees every version the
    writers produced exactly once, in order, and nothing else."""
    writers, per_writer = 5, 20
    async with harness.open() as cp:
        v0 = await version_now(cp)
        produced: list[int] = []
        seen: list[ClusterEvent] = []

        async def writer(w: int) -> None:
            for i in range(per_writer):
                index = await cp.create_index(f"writer-{w}-{i}", index_settings(1, 0))
                produced.append(index.created_version)
                await anyio.lowlevel.checkpoint()  # let the other writers and the reader interleave

        async with cp.watch(since=v0) as stream:

            async def reader() -> None:
                while len(seen) < writers * per_writer:
                    seen.append(await next_event(stream, harness.timeout, "a writer's event"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                for w in range(writers):
                    tg.start_soon(writer, w)
            marker = await write_marker(cp)
            extra = await collect_until_marker(stream, marker, harness.timeout)
        versions = [e.version for e in seen]
        require(not extra, f"the watch delivered events nobody wrote: {describe(extra)} after {v0}")
        require(
            len(set(produced)) == len(produced),
            f"two writes returned the same version: {sorted(produced)}",
        )
        require(
            all(a < b for a, b in itertools.pairwise(versions)),
            lambda: f"versions must strictly increase (one event per write): {versions}",
        )
        require_equal(versions, sorted(produced), "versions seen by the watcher")
        require_equal(
            sorted(e.key for e in seen),
            sorted(f"writer-{w}-{i}" for w in range(writers) for i in range(per_writer)),
            "index names in the watched events",
        )


@check(AREA)
async def check_watch_resume_after_disconnect(harness: BackendHarness) -> None:
    """Close a watch, write more, watch again from ``resume_version``: nothing lost or
    duplicated, also when the watch was closed in the middle of a multi-event version."""
    async with harness.open() as cp:
        v0 = await version_now(cp)
        for i in range(3):
            await cp.set_feature_flag(f"resume-{i}", True)
        await cp.register_node(Node(id="resume-node-a"))
        await cp.register_node(Node(id="resume-node-b"))
        for i in range(3, 6):
            await cp.set_feature_flag(f"resume-{i}", True)
        end = await write_marker(cp)
        async with cp.watch(since=v0) as stream:
            reference = await collect_until_marker(stream, end, harness.timeout)
        require(len(reference) >= 8, f"expected at least 8 events, got {describe(reference)}")
        # Cut points: after every event (at a version boundary or inside a version).
        for cut in range(1, len(reference)):
            async with cp.watch(since=v0) as stream:
                first = [
                    await next_event(stream, harness.timeout, f"event {i} before the cut")
                    for i in range(cut)
                ]
                resume = stream.resume_version
            require_equal(first, reference[:cut], f"the first {cut} events of watch(since={v0})")
            if reference[cut].version != reference[cut - 1].version:
                require_equal(
                    resume,
                    reference[cut - 1].version,
                    f"resume_version after a complete version (cut {cut})",
                )
            else:
                require(
                    resume < reference[cut - 1].version,
                    f"cut {cut} is inside version {reference[cut - 1].version}: resume_version "
                    f"must be older so that version is re-delivered whole, got {resume}",
                )
            more = await write_marker(cp)
            async with cp.watch(since=resume) as resumed:
                rest = await collect_until_marker(resumed, more, harness.timeout)
            kept = [e for e in first if e.version <= resume]
            marker_event = [e for e in rest if is_marker(e, end)]
            require(
                len(marker_event) == 1,
                f"cut {cut}: the resumed watch must deliver {end} once, got {describe(rest)}",
            )
            rest_before_end = rest[: rest.index(marker_event[0])]
            require_equal(
                kept + rest_before_end,
                reference,
                f"events seen across the disconnect at cut {cut} (resume_version {resume})",
            )


@check(AREA)
async def check_watch_compacted(harness: BackendHarness) -> None:
    """``watch(since=v)`` with ``v`` older than the retained history fails with
    ``CompactedError``; re-reading the state and watching from its version works."""
    async with harness.open(watch_retention=8) as cp:
        v0 = await version_now(cp)
        for i in range(40):
            await cp.set_feature_flag(f"compact-{i}", True)
        error = await expect_error(
            CompactedError,
            _first_event(cp, v0, harness.timeout),
            f"watch(since={v0}) after 40 writes with a history of about 8 events",
        )
        require(bool(str(error)), "CompactedError must say what to do")
        state = await cp.get_cluster_state(consistent=True)
        require(state.feature_flags.get("compact-39") is True, "the re-read state has the writes")
        async with cp.watch(since=state.version) as stream:
            marker = await write_marker(cp)
            event = await next_event(stream, harness.timeout, "the first event after a re-list")
            require(
                is_marker(event, marker),
                f"re-list then watch must continue with the next write, got {describe([event])}",
            )


@check(AREA)
async def check_watch_lagged(harness: BackendHarness) -> None:
    """A watcher that falls behind is never silently skipped: it gets every event in order up
    to the gap, then ``LaggedError`` whose ``resume_version`` is the last version it got;
    watching from it resumes without loss, or fails with ``CompactedError`` (then re-list)."""
    async with harness.open(watch_retention=8) as cp:
        v0 = await version_now(cp)
        names = [f"lag-{i}" for i in range(40)]
        got: list[ClusterEvent] = []
        lag: LaggedError | None = None
        async with cp.watch(since=v0) as slow:
            for name in names:
                await cp.set_feature_flag(name, True)
            try:
                for _ in range(len(names)):
                    got.append(await next_event(slow, harness.timeout, "an event or the lag"))
            except LaggedError as exc:
                lag = exc
        require(
            lag is not None,
            f"a watcher that read nothing while 40 events passed a history of about 8 must "
            f"get LaggedError; it read {describe(got)}",
        )
        assert lag is not None
        require_equal(
            [e.key for e in got], names[: len(got)], "events delivered before LaggedError"
        )
        last = got[-1].version if got else v0
        require_equal(lag.resume_version, last, "LaggedError.resume_version")
        marker = await write_marker(cp)
        try:
            async with cp.watch(since=lag.resume_version) as resumed:
                rest = await collect_until_marker(resumed, marker, harness.timeout)
        except CompactedError:
            state = await cp.get_cluster_state(consistent=True)
            require(
                all(state.feature_flags.get(n) is True for n in names),
                "after CompactedError the re-read state must hold every write",
            )
        else:
            require_equal(
                [e.key for e in got] + [e.key for e in rest],
                names,
                f"events before the lag plus watch(since={lag.resume_version})",
            )


@check(AREA)
async def check_watch_lag_boundary(harness: BackendHarness) -> None:
    """Around the edge of the retained history a watcher that read nothing gets every event or
    a prefix of them and ``LaggedError`` -- never a gap (the off-by-one at the edge)."""
    async with harness.open(watch_retention=4) as cp:
        for count in range(1, 13):
            v0 = await version_now(cp)
            names = [f"edge-{count}-{i}" for i in range(count)]
            got: list[ClusterEvent] = []
            lagged = False
            async with cp.watch(since=v0) as stream:
                for name in names:
                    await cp.set_feature_flag(name, True)
                marker = await write_marker(cp)
                try:
                    while True:
                        event = await next_event(stream, harness.timeout, "an event or the lag")
                        if is_marker(event, marker):
                            break
                        got.append(event)
                except LaggedError as exc:
                    lagged = True
                    last = got[-1].version if got else v0
                    require_equal(exc.resume_version, last, "LaggedError.resume_version")
            keys = [e.key for e in got]
            if lagged:
                require_equal(
                    keys, names[: len(keys)], f"{count} writes: events before LaggedError"
                )
            else:
                require_equal(keys, names, f"{count} writes: events of a watch that kept up")


@check(AREA)
async def check_watch_kinds_filter(harness: BackendHarness) -> None:
    """``watch(kinds=...)`` delivers only events of those kinds, in order."""
    async with harness.open() as cp:
        v0 = await version_now(cp)
        await cp.register_node(Node(id="kinds-node"))
        await cp.set_feature_flag("kinds-flag", True)
        first = await cp.create_index("kinds-a", index_settings(1, 0))
        await cp.acquire_lock("kinds/lock", "kinds-holder", 30)
        await cp.set_feature_flag("kinds-flag", False)
        last = await cp.create_index("kinds-z", index_settings(1, 0))
        wanted = {EventKind.INDEX_CREATED, EventKind.LOCK_ACQUIRED}
        async with cp.watch(since=v0, kinds=wanted) as stream:
            events = [await next_event(stream, harness.timeout, f"filtered {i}") for i in range(3)]
        require_equal(
            [(e.kind, e.key) for e in events],
            [
                (EventKind.INDEX_CREATED, "kinds-a"),
                (EventKind.LOCK_ACQUIRED, "kinds/lock"),
                (EventKind.INDEX_CREATED, "kinds-z"),
            ],
            f"watch(kinds={sorted(wanted)})",
        )
        require_equal(events[0].version, first.created_version, "version of kinds-a's event")
        require_equal(events[2].version, last.created_version, "version of kinds-z's event")
        async with cp.watch(since=v0, kinds={EventKind.FLAG_CHANGED}) as stream:
            flags = [await next_event(stream, harness.timeout, f"flag {i}") for i in range(2)]
        require_equal(
            [(e.key, e.enabled) for e in flags],
            [("kinds-flag", True), ("kinds-flag", False)],
            "FLAG_CHANGED events (key, enabled)",
        )


@check(AREA)
async def check_watch_close_ends_iteration(harness: BackendHarness) -> None:
    """``aclose()`` ends the stream: a waiting ``async for`` finishes cleanly; idempotent."""
    async with harness.open() as cp:
        stream = cp.watch()
        received: list[ClusterEvent] = []
        finished = anyio.Event()

        async def consume() -> None:
            async for event in stream:
                received.append(event)
            finished.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            marker = await write_marker(cp)

            async def got_marker() -> bool:
                return any(is_marker(e, marker) for e in received)

            await harness.wait_for(got_marker, timeout=harness.timeout, what="the marker event")
            await stream.aclose()
            with anyio.move_on_after(harness.timeout):
                await finished.wait()
            require(finished.is_set(), "aclose() must end a waiting async for loop")
        await stream.aclose()  # idempotent
        await expect_error(StopAsyncIteration, stream.__anext__(), "__anext__ after aclose()")


@check(AREA)
async def check_stop_ends_watches(harness: BackendHarness) -> None:
    """``stop()`` ends active watches with ``ClosedError``; later calls raise ``ClosedError``;
    ``stop()`` is idempotent."""
    async with harness.open() as cp:
        require(await cp.is_healthy(), "a started backend must be healthy")
        health = await cp.health()
        require(health.healthy, f"health() of a started backend: {health}")
        stream = cp.watch()
        outcome: list[BaseException] = []
        ended = anyio.Event()

        async def consume() -> None:
            try:
                async for _ in stream:
                    pass
            except ClosedError as exc:
                outcome.append(exc)
            finally:
                ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.lowlevel.checkpoint()
            await cp.stop()
            with anyio.move_on_after(harness.timeout):
                await ended.wait()
            tg.cancel_scope.cancel()
        require(
            len(outcome) == 1,
            "stop() must end an active watch with ClosedError"
            + ("" if ended.is_set() else " (the watch did not end at all)"),
        )
        await cp.stop()  # idempotent
        await expect_error(
            ClosedError, cp.create_index("after-stop", index_settings(1, 0)), "a write after stop()"
        )
        try:
            healthy = await cp.is_healthy()
        except ClosedError:
            healthy = False
        require(not healthy, "is_healthy() must be false after stop()")
