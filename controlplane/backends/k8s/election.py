"""Leader election on a ``coordination.k8s.io/v1`` Lease, with client-go's semantics.

One :class:`Elector` per replica competes for one Lease (by default ``controlplane-leader``):

* **Acquire.** Every ``retry_period`` (jittered by client-go's factor 1.2: a wait in
  ``[retry, 2.2 * retry)``) a standby reads the Lease. It takes it when the Lease is absent,
  free (no holder), already its own, or expired *as observed by this process*: the Lease's
  ``(holderIdentity, renewTime, resourceVersion)`` has not changed for ``lease_duration``
  seconds on our monotonic clock (:class:`~controlplane.backends.k8s.leases.LeaseObserver`,
  the rule client-go uses; the other process's wall clock is never compared with ours). The
  write is a ``PUT`` with the ``resourceVersion`` read, so of two standbys racing only one
  wins (the other gets 409 and stays a standby).
* **Renew.** The leader writes ``renewTime`` every ``retry_period``. A renewal that fails
  (timeout, connection error, 5xx, 403) is retried every ``retry_period``; if no renewal
  succeeds within ``renew_deadline`` of the *sending* of the last successful write, the
  leader **steps down at that moment** -- its reconcilers are cancelled and awaited -- even
  if the API server is unreachable and the request never returns. Since every other process
  observed that write no earlier than it was sent, and waits ``lease_duration >
  renew_deadline`` before taking over, the old leader has stopped acting before anyone can
  take the Lease (with ``lease_duration - renew_deadline`` of margin, 5 s by default). A
  renewal answered 409 whose re-read shows another holder (or another term) steps down at
  once. (client-go measures the deadline from the start of a renewal round, which is
  ``retry_period`` later; measuring from the last successful write is stricter.)
* **Terms.** The term (a fencing token for the leader's writes) is ``spec.leaseTransitions``
  after the acquisition; as for locks (docs/kubernetes.md) *every* acquisition increments it,
  also a re-acquisition by the same identity after stepping down (client-go increments only
  on a change of holder). The Lease is never deleted, so terms only grow.
* **Release.** On a graceful stop (:meth:`Elector.close`, or cancelling :meth:`Elector.run`)
  the leader first stops its reconcilers, then clears ``holderIdentity`` (client-go's
  ``ReleaseOnCancel``; on by default here, ``release_on_stop=False`` to keep the Lease until it
  expires), so that a standby takes over at its next retry instead of after a lease duration.

Leader-only work: :meth:`Elector.add_reconciler` registers coroutine functions that run (one
task each) only while this replica leads, and are cancelled and awaited when leadership ends;
``async with elector.leading():`` waits for leadership and cancels its body with
:class:`LeadershipLostError` when it ends. :attr:`Elector.is_leader` is also judged by the
clock (false from the renew deadline on, even if the event loop was too busy to step down).

Defaults are client-go's (``LeaseDuration`` 15 s, ``RenewDeadline`` 10 s, ``RetryPeriod``
2 s), with its validation: ``lease_duration > renew_deadline > 1.2 * retry_period > 0``. The
Lease's duration is whole seconds (rounded up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from controlplane.errors import (
    AlreadyExistsError,
    ConflictError,
    ControlPlaneError,
    InvalidConfigError,
    NotFoundError,
    NotLeaderError,
)
from controlplane.validation import check_holder

from .crds import LABELS
from .leases import LEASE_TYPE_LABEL, MAX_INT32, LeaseRecord, Leases, _seconds

__all__ = [
    "DEFAULT_LEASE_DURATION",
    "DEFAULT_RENEW_DEADLINE",
    "DEFAULT_RETRY_PERIOD",
    "JITTER_FACTOR",
    "Elector",
    "LeadershipLostError",
    "Reconciler",
    "Term",
]

logger = logging.getLogger("controlplane.k8s.election")

DEFAULT_LEASE_DURATION = 15.0
"""client-go's ``LeaseDuration``: how long standbys wait after the last observed renewal."""
DEFAULT_RENEW_DEADLINE = 10.0
"""client-go's ``RenewDeadline``: how long the leader keeps acting without a renewal."""
DEFAULT_RETRY_PERIOD = 2.0
"""client-go's ``RetryPeriod``: between attempts to acquire or renew."""
JITTER_FACTOR = 1.2
"""client-go's ``JitterFactor`` for the acquire loop."""
DEFAULT_LEASE_NAME = "controlplane-leader"


class LeadershipLostError(NotLeaderError):
    """The body of ``async with elector.leading():`` was cancelled: leadership ended."""

    code = "leadership_lost"


@dataclass(frozen=True)
class Term:
    """One period of leadership of this replica."""

    identity: str
    term: int
    """``spec.leaseTransitions`` after the acquisition: grows with every acquisition."""
    lease: str
    started: float
    """When it began, on the elector's monotonic clock."""


Reconciler = Callable[[Term], Awaitable[None]]
"""A leader-only coroutine function: started when leadership begins, cancelled when it ends."""


class Elector:
    """Leader election for one replica on the Lease ``name`` of ``leases.namespace``.

    ``async with Elector(leases, identity="pod-a") as elector:`` runs the election in a task
    of its own until the block ends (or call :meth:`run` in a task you own). ``leases`` (and
    its ``ApiClient``) belong to the caller; their observer's clock is the elector's clock.
    """

    def __init__(
        self,
        leases: Leases,
        name: str = DEFAULT_LEASE_NAME,
        identity: str | None = None,
        *,
        lease_duration: float = DEFAULT_LEASE_DURATION,
        renew_deadline: float = DEFAULT_RENEW_DEADLINE,
        retry_period: float = DEFAULT_RETRY_PERIOD,
        release_on_stop: bool = True,
        on_started_leading: Callable[[Term], object] | None = None,
        on_stopped_leading: Callable[[Term, str], object] | None = None,
        on_new_leader: Callable[[str | None], object] | None = None,
    ) -> None:
        if not (retry_period > 0 and math.isfinite(lease_duration)):
            raise InvalidConfigError(
                f"retry_period must be positive and lease_duration finite "
                f"(got {retry_period}, {lease_duration})"
            )
        if not renew_deadline > JITTER_FACTOR * retry_period:
            raise InvalidConfigError(
                f"renew_deadline ({renew_deadline} s) must be greater than {JITTER_FACTOR} x "
                f"retry_period ({retry_period} s), as client-go requires"
            )
        if not lease_duration > renew_deadline:
            raise InvalidConfigError(
                f"lease_duration ({lease_duration} s) must be greater than renew_deadline "
                f"({renew_deadline} s): the leader must stop acting before others may take over"
            )
        self.identity = identity or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        check_holder(self.identity)
        self.leases = leases
        self.name = name
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.release_on_stop = release_on_stop
        self._duration_seconds = _seconds("lease duration", lease_duration)
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._on_new_leader = on_new_leader
        self._clock = leases.observer.clock
        self._term: Term | None = None
        self._record: LeaseRecord | None = None
        self._valid_until = -math.inf
        self._reconcilers: list[Reconciler] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._lost_callbacks: set[Callable[[], None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self.leader: str | None = None
        """The holder last observed (this identity while leading; ``None``: nobody)."""
        self.leading_event = asyncio.Event()
        """Set while leading (from the acquisition until stepping down begins)."""
        self.standby_event = asyncio.Event()
        """Set while not leading (once stepping down finished: reconcilers stopped)."""
        self.standby_event.set()
        self.terms = 0
        """How many times this elector became leader."""

    # state -------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """Whether this replica leads now: it acquired the Lease and the renew deadline of
        its last successful write has not passed on its clock."""
        return self._term is not None and self._clock() < self._valid_until

    @property
    def term(self) -> Term | None:
        """The current term while leading."""
        return self._term if self.is_leader else None

    async def wait_leading(self) -> Term:
        """Wait until this replica leads; its term."""
        while True:
            await self.leading_event.wait()
            if self._term is not None:
                return self._term
            await asyncio.sleep(0)  # pragma: no cover - cleared meanwhile

    async def wait_standby(self) -> None:
        """Wait until this replica does not lead (its reconcilers stopped)."""
        await self.standby_event.wait()

    # leader-only work ----------------------------------------------------------------------

    def add_reconciler(self, reconciler: Reconciler) -> None:
        """Run ``reconciler(term)`` in a task of its own whenever this replica leads; it is
        cancelled (and awaited) when leadership ends. An exception is logged and the
        reconciler started again after ``retry_period`` while leading; returning ends it for
        the term."""
        self._reconcilers.append(reconciler)
        if self._term is not None:
            self._spawn(reconciler, self._term)

    def _spawn(self, reconciler: Reconciler, term: Term) -> None:
        task = asyncio.create_task(self._supervise(reconciler, term))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _supervise(self, reconciler: Reconciler, term: Term) -> None:
        while True:
            try:
                await reconciler(term)
                return
            except Exception:
                logger.exception("leader-only reconciler %r failed; restarting it", reconciler)
            await asyncio.sleep(self.retry_period)

    @contextlib.asynccontextmanager
    async def leading(self) -> AsyncIterator[Term]:
        """``async with elector.leading() as term:`` waits for leadership and runs the body
        while leading; when leadership ends the body is cancelled and
        :class:`LeadershipLostError` raised (as ``asyncio.timeout`` raises ``TimeoutError``)."""
        term = await self.wait_leading()
        task = asyncio.current_task()
        assert task is not None
        lost = False

        def on_lost() -> None:
            nonlocal lost
            if not lost:
                lost = True
                task.cancel()

        self._lost_callbacks.add(on_lost)
        if self._term is not term:
            on_lost()
        try:
            yield term
        except asyncio.CancelledError:
            if lost and task.uncancel() == 0:
                raise LeadershipLostError(
                    f"{self.identity} lost the leadership of term {term.term} (Lease {self.name})",
                    leader_id=self.leader,
                ) from None
            raise
        finally:
            self._lost_callbacks.discard(on_lost)
        if lost:  # the body swallowed the cancellation
            task.uncancel()
            raise LeadershipLostError(
                f"{self.identity} lost the leadership of term {term.term}", leader_id=self.leader
            )

    # lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def start(self) -> None:
        """Run the election in a task of this elector."""
        if self._task is not None:
            raise RuntimeError("elector already started")
        self._task = asyncio.create_task(self.run(), name=f"elector {self.identity}")

    async def close(self) -> None:
        """Stop: the reconcilers are cancelled and awaited, then (with ``release_on_stop``)
        the Lease is released. Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def run(self) -> None:
        """Compete for the Lease until cancelled: acquire, lead (renewing) until leadership
        ends, stand by again. Errors of the API server are retried, never raised."""
        if self._running:
            raise RuntimeError("elector already running")
        self._running = True
        try:
            while True:
                record = await self._acquire()
                await self._lead(record)
        finally:
            self._running = False

    # acquiring -----------------------------------------------------------------------------

    def _note_leader(self, holder: str | None) -> None:
        if holder != self.leader:
            self.leader = holder
            self._call(self._on_new_leader, holder)

    def _call(self, callback: Callable[..., object] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            logger.exception("election callback %r failed", callback)

    async def _acquire(self) -> LeaseRecord:
        while True:
            record = await self._try_acquire()
            if record is not None:
                return record
            await asyncio.sleep(self.retry_period * (1 + random.random() * JITTER_FACTOR))

    def _spec(self, record: LeaseRecord | None, transitions: int) -> dict[str, Any]:
        now = self.leases.now()
        spec = record.spec if record is not None else {}
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=self._duration_seconds,
            acquireTime=now,
            renewTime=now,
            leaseTransitions=transitions,
        )
        return spec

    async def _try_acquire(self) -> LeaseRecord | None:
        try:
            record = await self.leases.read(self.name)
            if record is None:
                labels = {
                    **LABELS,
                    "app.kubernetes.io/component": "leader-election",
                    LEASE_TYPE_LABEL: "leader",
                }
                try:
                    return await self.leases.create_lease(self.name, self._spec(None, 1), labels)
                except AlreadyExistsError:
                    return None
            self._note_leader(record.holder)
            if record.holder != self.identity and not self.leases.observer.expired(record):
                return None
            if record.transitions >= MAX_INT32:
                logger.error("Lease %s reached the largest term (%d)", self.name, MAX_INT32)
                return None
            spec = self._spec(record, record.transitions + 1)
            try:
                return await self.leases.replace_lease(record, spec)
            except (ConflictError, NotFoundError):
                return None  # another standby was first
        except ControlPlaneError as exc:
            logger.warning(
                "%s could not try to acquire Lease %s: %s", self.identity, self.name, exc
            )
            return None

    # leading -------------------------------------------------------------------------------

    async def _lead(self, record: LeaseRecord) -> None:
        term = Term(self.identity, record.transitions, self.name, self._clock())
        self._record = record
        self._valid_until = self.leases.observer.observe(record) + self.renew_deadline
        self._term = term
        self.terms += 1
        self._note_leader(self.identity)
        self.standby_event.clear()
        self.leading_event.set()
        logger.info("%s leads (Lease %s, term %d)", self.identity, self.name, term.term)
        self._call(self._on_started, term)
        for reconciler in self._reconcilers:
            self._spawn(reconciler, term)
        reason = "stopped"
        try:
            reason = await self._renew_loop(term)
        except asyncio.CancelledError:
            await self._step_down(term, reason)
            if self.release_on_stop:
                await self._release(term)
            raise
        await self._step_down(term, reason)

    async def _step_down(self, term: Term, reason: str) -> None:
        """Stop acting: no longer the leader, callbacks of ``leading()`` fire, reconcilers are
        cancelled and awaited."""
        self._term = None
        self._valid_until = -math.inf
        self.leading_event.clear()
        for callback in list(self._lost_callbacks):
            callback()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        logger.info("%s stopped leading (term %d): %s", self.identity, term.term, reason)
        self.standby_event.set()
        self._call(self._on_stopped, term, reason)

    async def _renew_loop(self, term: Term) -> str:
        """Renew every ``retry_period``; returns why leadership ended."""
        while True:
            await asyncio.sleep(self.retry_period)
            remaining = self._valid_until - self._clock()
            if remaining <= 0:
                return "the renew deadline passed (the process was too busy to renew)"
            try:
                async with asyncio.timeout(remaining):
                    while True:
                        outcome = await self._try_renew(term)
                        if outcome is True:
                            break
                        if outcome is False:
                            return f"the Lease was taken by {self.leader!r}"
                        await asyncio.sleep(self.retry_period)
            except TimeoutError:
                return f"no renewal succeeded within the renew deadline ({self.renew_deadline} s)"

    async def _try_renew(self, term: Term) -> bool | None:
        """True: renewed; False: the Lease is someone else's now; None: failed, retry."""
        record = self._record
        assert record is not None
        spec = record.spec
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=self._duration_seconds,
            renewTime=self.leases.now(),
        )
        try:
            renewed = await self.leases.replace_lease(record, spec)
        except (ConflictError, NotFoundError):
            try:
                current = await self.leases.read(self.name)
            except ControlPlaneError as exc:
                logger.warning("%s could not re-read Lease %s: %s", self.identity, self.name, exc)
                return None
            if (
                current is None
                or current.holder != self.identity
                or current.transitions != term.term
            ):
                self._note_leader(current.holder if current else None)
                return False
            self._record = current  # changed by someone else but still ours: write again
            return None
        except ControlPlaneError as exc:
            logger.warning("%s could not renew Lease %s: %s", self.identity, self.name, exc)
            return None
        self._record = renewed
        self._valid_until = self.leases.observer.observe(renewed) + self.renew_deadline
        return True

    async def _release(self, term: Term) -> None:
        """Clear the holder (bounded: at most ``renew_deadline``), if the Lease is still ours
        as last written; any failure leaves it to expire."""
        record = self._record
        if record is None or record.holder != self.identity:
            return
        spec = record.spec
        spec.pop("holderIdentity", None)
        spec["renewTime"] = self.leases.now()
        try:
            async with asyncio.timeout(self.renew_deadline):
                await self.leases.replace_lease(record, spec)
            logger.info("%s released Lease %s (term %d)", self.identity, self.name, term.term)
        except (ControlPlaneError, TimeoutError) as exc:
            logger.warning("%s could not release Lease %s: %s", self.identity, self.name, exc)
        self._record = None
