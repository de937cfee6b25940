"""Conformance checks of locks: TTL, fencing tokens, renewal, expiry by the control plane, and
the ``async with cp.lock(...)`` helper."""

from __future__ import annotations

import itertools
import math

import anyio

from ..errors import (
    InvalidRequestError,
    LockHeldError,
    LockLostError,
    LockNotHeldError,
    NotFoundError,
)
from ..protocol import ControlPlane
from ..types import ClusterConfig, EventKind, Lock
from .conformance_harness import (
    BackendHarness,
    CheckNotApplicable,
    check,
    collect_until_marker,
    describe,
    expect_error,
    next_event,
    nothing_written,
    require,
    require_equal,
    version_now,
    write_marker,
)

__all__: tuple[str, ...] = ()

AREA = "locks"


async def _is_free(cp: ControlPlane, key: str) -> bool:
    try:
        await cp.get_lock(key)
    except NotFoundError:
        return True
    return False


async def _wait_free(harness: BackendHarness, cp: ControlPlane, key: str, what: str) -> None:
    async def free() -> bool:
        return await _is_free(cp, key)

    await harness.wait_for(free, timeout=harness.timeout, what=what)


async def _held_by(cp: ControlPlane, key: str, what: str) -> Lock:
    try:
        return await cp.get_lock(key)
    except NotFoundError:
        raise AssertionError(
            f"{what}: lock {key!r} must be held, get_lock says it is free"
        ) from None


@check(AREA)
async def check_lock_acquire_get_release(harness: BackendHarness) -> None:
    """acquire/get/release, ``LockHeldError`` for another holder, ``LockNotHeldError`` for a
    wrong holder or token or a released lock; events carry the lock."""
    key = "locks/orders:7"
    async with harness.open() as cp:
        v0 = await version_now(cp)
        lock = await cp.acquire_lock(key, "alice", 30)
        require_equal((lock.key, lock.holder, lock.ttl), (key, "alice", 30), "the acquired lock")
        require(lock.token > 0, f"a fencing token must be positive, got {lock.token}")
        require(
            math.isclose(lock.expires_at - lock.acquired_at, 30, abs_tol=1e-6),
            f"expires_at - acquired_at must be the TTL: {lock}",
        )
        require_equal(await cp.get_lock(key), lock, "get_lock of a held lock")
        await expect_error(LockHeldError, cp.acquire_lock(key, "bob", 30), "acquire a held lock")
        await expect_error(
            LockNotHeldError, cp.release_lock(key, "bob", lock.token), "release by another holder"
        )
        await expect_error(
            LockNotHeldError,
            cp.release_lock(key, "alice", lock.token + 1),
            "release with a wrong token",
        )
        await expect_error(
            LockNotHeldError,
            cp.renew_lock(key, "alice", lock.token + 1),
            "renew with a wrong token",
        )
        await expect_error(
            LockNotHeldError, cp.renew_lock(key, "bob", lock.token), "renew by another holder"
        )
        require_equal(await cp.get_lock(key), lock, "the lock after rejected calls")
        await cp.release_lock(key, "alice", lock.token)
        await expect_error(NotFoundError, cp.get_lock(key), "get_lock of a released lock")
        await expect_error(
            LockNotHeldError, cp.release_lock(key, "alice", lock.token), "release twice"
        )
        await expect_error(
            LockNotHeldError, cp.renew_lock(key, "alice", lock.token), "renew after release"
        )
        await expect_error(
            LockNotHeldError, cp.release_lock("locks/never", "alice", 1), "release a free key"
        )
        marker = await write_marker(cp)
        async with cp.watch(since=v0) as stream:
            events = await collect_until_marker(stream, marker, harness.timeout)
        require_equal(
            [(e.kind, e.key) for e in events],
            [(EventKind.LOCK_ACQUIRED, key), (EventKind.LOCK_RELEASED, key)],
            "events of acquire then release",
        )
        require_equal(events[0].lock, lock, "the LOCK_ACQUIRED event's lock")
        require(events[1].version > events[0].version, "release must produce a new version")


@check(AREA)
async def check_lock_validation(harness: BackendHarness) -> None:
    """Bad keys, holders and TTLs (including one above ``max_lock_ttl``) are
    ``InvalidRequestError`` and write nothing."""
    async with harness.open() as cp:
        config = await cp.get_cluster_config()
        await cp.set_cluster_config(
            ClusterConfig(max_lock_ttl=60.0), expected_version=config.version
        )
        v0 = await version_now(cp)
        bad: list[tuple[str, str, float]] = [
            ("", "holder", 10),
            ("k" * 254, "holder", 10),
            ("line\nbreak", "holder", 10),
            ("key", "", 10),
            ("key", "holder", 0),
            ("key", "holder", -1),
            ("key", "holder", math.nan),
            ("key", "holder", math.inf),
            ("key", "holder", 61),
        ]
        for key, holder, ttl in bad:
            await expect_error(
                InvalidRequestError,
                cp.acquire_lock(key, holder, ttl),
                f"acquire_lock({key[:20]!r}, {holder!r}, ttl={ttl})",
            )
        await expect_error(InvalidRequestError, cp.get_lock(""), "get_lock('')")
        await nothing_written(cp, v0, "rejected lock requests", harness.timeout)
        lock = await cp.acquire_lock("key", "holder", 60)
        await expect_error(
            InvalidRequestError,
            cp.renew_lock("key", "holder", lock.token, ttl=0),
            "renew with ttl=0",
        )
        await expect_error(
            InvalidRequestError,
            cp.renew_lock("key", "holder", lock.token, ttl=61),
            "renew with a ttl above max_lock_ttl",
        )


@check(AREA)
async def check_lock_ttl_expiry(harness: BackendHarness) -> None:
    """A lock not renewed for its TTL is reaped by the control plane (``LOCK_EXPIRED``) with
    no client action; renewing or releasing it then fails with ``LockNotHeldError``."""
    key = "locks/expiring"
    async with harness.open() as cp:
        v0 = await version_now(cp)
        async with cp.watch(since=v0, kinds={EventKind.LOCK_EXPIRED}) as expired_events:
            lock = await cp.acquire_lock(key, "holder-1", 3)
            await harness.advance_time(1)
            require_equal((await _held_by(cp, key, "before the TTL")).token, lock.token, "token")
            await harness.advance_time(3)
            event = await next_event(
                expired_events, harness.timeout, "LOCK_EXPIRED after the TTL passed"
            )
        require_equal((event.kind, event.key), (EventKind.LOCK_EXPIRED, key), "expiry event")
        require(
            event.lock is not None and event.lock.token == lock.token,
            f"LOCK_EXPIRED must carry the expired lock, got {event.lock}",
        )
        await _wait_free(harness, cp, key, "get_lock NotFound after expiry")
        await expect_error(
            LockNotHeldError, cp.renew_lock(key, "holder-1", lock.token), "renew after expiry"
        )
        await expect_error(
            LockNotHeldError, cp.release_lock(key, "holder-1", lock.token), "release after expiry"
        )
        again = await cp.acquire_lock(key, "holder-2", 3)
        require(
            again.token > lock.token,
            f"token after expiry ({again.token}) must exceed the expired one ({lock.token})",
        )


@check(AREA)
async def check_lock_fencing_tokens_grow(harness: BackendHarness) -> None:
    """Every acquisition of a key gets a larger token: after release, after expiry, and with
    other keys acquired in between."""
    key = "locks/fenced"
    async with harness.open() as cp:
        tokens: list[int] = []
        for round_ in range(6):
            holder = f"holder-{round_ % 2}"
            lock = await cp.acquire_lock(key, holder, 2)
            tokens.append(lock.token)
            other = await cp.acquire_lock(f"locks/other-{round_}", holder, 30)
            require(other.token > 0, "tokens are positive")
            if round_ % 2 == 0:
                await cp.release_lock(key, holder, lock.token)
            else:
                await harness.advance_time(3)
                await _wait_free(harness, cp, key, "the lock's expiry")
        require(
            all(a < b for a, b in itertools.pairwise(tokens)),
            f"fencing tokens of {key!r} must strictly grow: {tokens}",
        )
        # Expired but maybe not reaped yet: acquiring right after the TTL also works.
        last = await cp.acquire_lock(key, "late", 1)
        await harness.advance_time(2)
        newer = await cp.acquire_lock(key, "later", 1)
        require(newer.token > last.token, f"token {newer.token} must exceed {last.token}")


@check(AREA)
async def check_lock_renew_extends(harness: BackendHarness) -> None:
    """``renew_lock`` keeps the token and pushes ``expires_at`` forward (optionally with a new
    TTL); a renewed lock outlives its first TTL; a renewal after expiry fails."""
    key = "locks/renewed"
    async with harness.open() as cp:
        lock = await cp.acquire_lock(key, "holder", 3)
        await harness.advance_time(2)
        renewed = await cp.renew_lock(key, "holder", lock.token)
        require_equal((renewed.token, renewed.ttl), (lock.token, 3), "renewed (token, ttl)")
        require(
            renewed.expires_at > lock.expires_at,
            f"renewal must move expires_at forward: {lock.expires_at} -> {renewed.expires_at}",
        )
        await harness.advance_time(2)  # 4 s after acquisition: past the first TTL
        held = await _held_by(cp, key, "after a renewal, past the first TTL")
        require_equal(held.token, lock.token, "token of the renewed lock")
        longer = await cp.renew_lock(key, "holder", lock.token, ttl=6)
        require_equal(longer.ttl, 6, "ttl after renew_lock(ttl=6)")
        await harness.advance_time(4)
        await _held_by(cp, key, "4 s into a 6 s renewal")
        await harness.advance_time(4)
        await _wait_free(harness, cp, key, "expiry 8 s into a 6 s renewal")
        await expect_error(
            LockNotHeldError, cp.renew_lock(key, "holder", lock.token), "renew after expiry"
        )


@check(AREA)
async def check_lock_expiry_after_quick_renewals(harness: BackendHarness) -> None:
    """A lock renewed several times in quick succession (so some renewals give the same
    ``expires_at``) still expires once, cleanly, and the control plane keeps working."""
    async with harness.open() as cp:
        v0 = await version_now(cp)
        locks = []
        for key in ("locks/quick-a", "locks/quick-b"):
            lock = await cp.acquire_lock(key, "holder", 3)
            for _ in range(3):
                await cp.renew_lock(key, "holder", lock.token)
            locks.append(lock)
        await harness.advance_time(5)
        for lock in locks:
            await _wait_free(harness, cp, lock.key, f"expiry of {lock.key!r}")
        marker = await write_marker(cp)
        async with cp.watch(since=v0, kinds={EventKind.LOCK_EXPIRED, EventKind.FLAG_CHANGED}) as s:
            expired = await collect_until_marker(s, marker, harness.timeout)
        require_equal(
            sorted((e.key, e.lock.token if e.lock else None) for e in expired),
            sorted((lock.key, lock.token) for lock in locks),
            f"one LOCK_EXPIRED per lock ({describe(expired)})",
        )
        again = await cp.acquire_lock("locks/quick-a", "next", 3)
        require(again.token > locks[1].token, "a new acquisition after the expiry works")


@check(AREA)
async def check_concurrent_acquire_lock(harness: BackendHarness) -> None:
    """50 concurrent ``acquire_lock`` of one key: exactly one wins, 49 get ``LockHeldError``."""
    key = "locks/contended"
    async with harness.open() as cp:
        won: list[Lock] = []
        held: list[str] = []
        other: list[BaseException] = []

        async def contend(i: int) -> None:
            try:
                won.append(await cp.acquire_lock(key, f"contender-{i}", 30))
            except LockHeldError:
                held.append(f"contender-{i}")
            except Exception as exc:
                other.append(exc)

        with anyio.fail_after(harness.timeout * 5):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(contend, i)
        require(not other, f"unexpected errors: {other[:3]}")
        require_equal(len(won), 1, f"winners of 50 concurrent acquisitions ({won})")
        require_equal(len(held), 49, "LockHeldError count")
        require_equal(await cp.get_lock(key), won[0], "get_lock after the race")


@check(AREA)
async def check_lock_helper_renews(harness: BackendHarness) -> None:
    """``async with cp.lock(key, ttl=...)`` renews in the background: the lock survives three
    TTLs of time, keeps its token, and is released when the block exits."""
    key = "locks/helper"
    ttl = 1.0
    async with harness.open() as cp:
        v0 = await version_now(cp)
        with anyio.fail_after(harness.timeout * 5):
            async with cp.lock(key, ttl=ttl, holder="helper") as lock:
                require_equal(
                    (lock.key, lock.holder), (key, "helper"), "the lock the helper yields"
                )
                for step in range(6):
                    before = await _held_by(cp, key, f"inside the block, step {step}")
                    require_equal(before.token, lock.token, "token while the helper holds it")
                    await harness.advance_time(ttl / 2)

                    async def renewed(since: float = before.expires_at) -> bool:
                        try:
                            current = await cp.get_lock(key)
                        except NotFoundError:
                            return False
                        return current.expires_at > since

                    await harness.wait_for(
                        renewed,
                        timeout=harness.timeout,
                        what=f"a background renewal of {key!r} (step {step})",
                    )
        await _wait_free(harness, cp, key, "release when the block exits")
        marker = await write_marker(cp)
        async with cp.watch(since=v0) as stream:
            events = await collect_until_marker(stream, marker, harness.timeout)
        kinds = [e.kind for e in events if e.key == key]
        require(
            kinds[:1] == [EventKind.LOCK_ACQUIRED] and kinds[-1:] == [EventKind.LOCK_RELEASED],
            f"the helper's lock events must start with an acquisition and end with a release: "
            f"{describe(events)}",
        )
        require(
            EventKind.LOCK_EXPIRED not in kinds, f"the lock expired meanwhile: {describe(events)}"
        )


async def _run_block_until_lost(
    harness: BackendHarness, cp: ControlPlane, key: str, steal: bool, expire: bool
) -> tuple[BaseException | None, bool]:
    """Hold ``key`` with the helper while another actor takes it away; return what the
    ``async with`` raised and whether the block ran to its end."""
    raised: BaseException | None = None
    finished = False
    try:
        with anyio.fail_after(harness.timeout * 3):
            async with cp.lock(key, ttl=1.0, holder="victim") as lock:
                if expire:
                    await harness.advance_time(3.0)
                    await _wait_free(harness, cp, key, "expiry while the block runs")
                else:
                    await cp.release_lock(key, "victim", lock.token)  # another actor
                if steal:
                    await cp.acquire_lock(key, "thief", 60)
                await anyio.sleep_forever()
                finished = True
    except LockLostError as exc:
        raised = exc
    return raised, finished


@check(AREA)
async def check_lock_helper_lost_when_released(harness: BackendHarness) -> None:
    """If another actor releases the helper's lock and takes it, the block is cancelled and
    ``LockLostError`` is raised from the ``async with``; the thief's lock is left alone."""
    key = "locks/stolen"
    async with harness.open() as cp:
        raised, finished = await _run_block_until_lost(harness, cp, key, steal=True, expire=False)
        require(not finished, "the block must be cancelled when the lock is lost")
        require(raised is not None, "LockLostError must be raised from the async with")
        thief = await _held_by(cp, key, "after the loss")
        require_equal(thief.holder, "thief", "holder after the helper lost the lock")


@check(AREA)
async def check_lock_helper_lost_on_expiry(harness: BackendHarness) -> None:
    """If time jumps past the TTL (the renewals could not run) and someone else takes the
    lock, the helper's block is cancelled with ``LockLostError``. Needs virtual time."""
    if not harness.virtual_time:
        raise CheckNotApplicable("needs a harness with virtual time to outrun the renewals")
    key = "locks/expired-under-helper"
    async with harness.open() as cp:
        raised, finished = await _run_block_until_lost(harness, cp, key, steal=True, expire=True)
        require(not finished, "the block must be cancelled when the lock is lost")
        require(raised is not None, "LockLostError must be raised from the async with")
        thief = await _held_by(cp, key, "after the loss")
        require_equal(thief.holder, "thief", "holder after the helper lost the lock")


@check(AREA)
async def check_lock_helper_held_and_wait(harness: BackendHarness) -> None:
    """The helper fails with ``LockHeldError`` when the key is held, unless ``wait`` is given:
    then it acquires as soon as the holder releases, with a larger token."""
    key = "locks/queued"
    async with harness.open() as cp:
        other = await cp.acquire_lock(key, "other", 60)

        async def enter_without_wait() -> None:
            async with cp.lock(key, ttl=5):
                raise AssertionError("the helper entered a block while the key was held")

        await expect_error(LockHeldError, enter_without_wait(), "cp.lock() of a held key")
        acquired: list[Lock] = []
        done = anyio.Event()
        release_now = anyio.Event()

        async def waiter() -> None:
            async with cp.lock(key, ttl=5, holder="waiter", wait=harness.timeout) as lock:
                acquired.append(lock)
                await release_now.wait()
            done.set()

        with anyio.fail_after(harness.timeout * 3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.sleep(0.05)
                require(not acquired, "the waiter must not get a lock that is still held")
                await cp.release_lock(key, "other", other.token)

                async def waiter_has_it() -> bool:
                    return bool(acquired)

                await harness.wait_for(
                    waiter_has_it, timeout=harness.timeout, what="the waiter acquiring the lock"
                )
                release_now.set()
                await done.wait()
        require(
            acquired[0].token > other.token,
            f"token {acquired[0].token} must exceed the previous holder's {other.token}",
        )
        await _wait_free(harness, cp, key, "release after the waiter's block")
