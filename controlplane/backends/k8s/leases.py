"""Locks and node heartbeats as ``coordination.k8s.io/v1`` Leases.

**Writes.** Every change of a Lease is a ``PUT`` carrying the ``resourceVersion`` that was
read (optimistic concurrency): when another process wrote in between, the API server answers
409 Conflict and the operation re-reads the Lease and decides again, at most ``max_attempts``
times (then :class:`~controlplane.errors.ConflictError`). A Lease that does not exist is
created (409 AlreadyExists from a concurrent creator: re-read and decide again).

**Expiry is judged by observed time, as client-go's leader election does.** The
``renewTime`` in a Lease is another process's wall clock and is never compared with ours.
Instead, a :class:`LeaseObserver` remembers, per Lease, when *this process* (its monotonic
clock) first saw the current ``(holderIdentity, renewTime, resourceVersion)``; the Lease is
expired when ``leaseDurationSeconds`` have passed on our clock since then without that triple
changing. Clock skew between processes therefore changes nothing, and a process that sees a
Lease for the first time waits a full duration before taking it over (it cannot know how long
the Lease was already stale). Writes this process makes count as observed at the moment the
request was *sent* -- earlier than anyone else can observe them -- so a holder believes its
lease ends no later than any other process does. A Lease with a holder but no valid
``leaseDurationSeconds`` (absent, not a positive integer) counts as expired; one without a
holder is free.

**Fencing tokens.** The token of a lock is the Lease's ``spec.leaseTransitions`` after the
acquisition, and every acquisition increments it -- a take-over, and also a re-acquisition by
the same holder after a release (client-go increments it only when the holder changes; we
increment on every acquisition, so that each acquisition has a token of its own). The first
acquisition creates the Lease with ``leaseTransitions: 1``. A release clears
``holderIdentity`` and keeps the object, so the counter survives; the library never deletes
lock Leases (deleting one by hand restarts its counter at 1, which would let an old token
compare as new: the least-privilege Role must not grant ``delete`` on Leases for that reason).
Renewal and release check both the holder and the token.

**Names.** A lock on ``key`` is the Lease ``lock-<slug>-<hash>`` (the slug is the key made a
DNS label, the hash tells keys apart that slug alike), labelled
``controlplane.dev/lease-type: lock`` and annotated with the key; a node's heart-beat is the
Lease ``node-<node id>``, labelled ``controlplane.dev/lease-type: node`` and
``controlplane.dev/node-id``, held by the node id with ``leaseDurationSeconds`` = the node
timeout (rounded up to whole seconds, the Lease's unit, as are lock TTLs).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from controlplane.errors import (
    AlreadyExistsError,
    ConflictError,
    InvalidRequestError,
    LockHeldError,
    LockNotHeldError,
    NotFoundError,
)
from controlplane.types import Lock
from controlplane.validation import check_holder, check_lock_key, check_name, check_positive

from .crds import LABELS
from .errors import call_json

__all__ = [
    "KEY_ANNOTATION",
    "LEASE_TYPE_LABEL",
    "NODE_ID_LABEL",
    "LeaseObserver",
    "LeaseRecord",
    "Leases",
    "NodeLiveness",
    "format_micro_time",
    "lock_lease_name",
    "node_lease_name",
    "parse_micro_time",
]

logger = logging.getLogger("controlplane.k8s.leases")

LEASE_API_VERSION = "coordination.k8s.io/v1"
LEASE_TYPE_LABEL = "controlplane.dev/lease-type"
NODE_ID_LABEL = "controlplane.dev/node-id"
KEY_ANNOTATION = "controlplane.dev/lock-key"
MAX_INT32 = 2**31 - 1

# -- MicroTime ---------------------------------------------------------------------------------


def format_micro_time(moment: datetime.datetime) -> str:
    """A ``metav1.MicroTime``: RFC 3339 in UTC with exactly six fractional digits
    (``2026-01-02T03:04:05.123456Z``); a naive ``moment`` is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})"
)


def parse_micro_time(value: object) -> datetime.datetime | None:
    """An RFC 3339 timestamp (any number of fractional digits up to nine, ``Z`` or an
    offset) as an aware datetime; ``None`` for anything else."""
    if not isinstance(value, str):
        return None
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        return None
    day, clock, fraction, zone = match.groups()
    micros = (fraction or "").ljust(6, "0")[:6]
    zone = "+00:00" if zone in ("Z", "z") else zone
    try:
        return datetime.datetime.fromisoformat(f"{day}T{clock}.{micros}{zone}")
    except ValueError:
        return None


# -- names -------------------------------------------------------------------------------------


def lock_lease_name(key: str) -> str:
    """The Lease of the lock ``key``: ``lock-<slug>-<hash>``, a DNS label."""
    slug = re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")[:40].strip("-")
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return f"lock-{slug}-{digest}" if slug else f"lock-{digest}"


def node_lease_name(node_id: str) -> str:
    """The heart-beat Lease of a node."""
    return f"node-{node_id}"


# -- reading Leases ----------------------------------------------------------------------------


def _as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class LeaseRecord:
    """What a Lease says, read defensively: fields of the wrong type or absent are ``None``
    (a hostile or hand-written Lease never makes the reader fail)."""

    name: str
    resource_version: str
    holder: str | None
    """``spec.holderIdentity``; ``None`` when empty or absent (the Lease is free)."""
    duration: int | None
    """``spec.leaseDurationSeconds`` when a positive integer, else ``None``."""
    transitions: int
    """``spec.leaseTransitions`` (0 when absent or invalid)."""
    acquire_time: datetime.datetime | None
    renew_time: datetime.datetime | None
    raw: Mapping[str, Any]

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> LeaseRecord:
        """Read a Lease (as JSON). ``ValueError`` only without ``metadata.name`` or
        ``metadata.resourceVersion``, which the API server always sets."""
        metadata = obj.get("metadata")
        if not isinstance(metadata, Mapping):
            raise ValueError("Lease without metadata")
        name, version = metadata.get("name"), metadata.get("resourceVersion")
        if not isinstance(name, str) or not isinstance(version, str):
            raise ValueError("Lease without metadata.name or metadata.resourceVersion")
        spec = obj.get("spec")
        spec = spec if isinstance(spec, Mapping) else {}
        holder = spec.get("holderIdentity")
        duration = _as_int(spec.get("leaseDurationSeconds"))
        transitions = _as_int(spec.get("leaseTransitions"))
        return cls(
            name=name,
            resource_version=version,
            holder=holder if isinstance(holder, str) and holder else None,
            duration=duration if duration is not None and duration > 0 else None,
            transitions=transitions if transitions is not None and transitions >= 0 else 0,
            acquire_time=parse_micro_time(spec.get("acquireTime")),
            renew_time=parse_micro_time(spec.get("renewTime")),
            raw=obj,
        )

    @property
    def observation(self) -> tuple[object, object, str]:
        """What must change for the Lease to count as renewed: the raw
        ``(holderIdentity, renewTime, resourceVersion)``."""
        spec = self.raw.get("spec")
        spec = spec if isinstance(spec, Mapping) else {}
        return (spec.get("holderIdentity"), spec.get("renewTime"), self.resource_version)

    @property
    def spec(self) -> dict[str, Any]:
        spec = self.raw.get("spec")
        return dict(spec) if isinstance(spec, Mapping) else {}

    def describe_holder(self) -> str:
        return repr(self.holder[:80]) if self.holder else "nobody"


class LeaseObserver:
    """Judges Lease expiry by this process's clock (see the module's documentation).

    ``clock`` is monotonic seconds (``time.monotonic`` by default; tests may pass another).
    Feed it every version of a Lease this process sees (:meth:`observe`); the leader's
    node-down detection can feed it the objects of a Lease informer.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._seen: dict[str, tuple[tuple[object, object, str], float]] = {}

    def observe(self, record: LeaseRecord, *, at: float | None = None) -> float:
        """Note ``record``; returns when (on our clock) its current content was first seen.
        ``at`` records our own write as observed when it was sent."""
        key = record.observation
        seen = self._seen.get(record.name)
        if at is not None or seen is None or seen[0] != key:
            observed = self.clock() if at is None else at
            self._seen[record.name] = (key, observed)
            return observed
        return seen[1]

    def remaining(self, record: LeaseRecord) -> float:
        """Seconds until ``record`` expires as observed here (``<= 0``: expired; ``-inf`` for
        a free Lease or one without a valid duration)."""
        observed = self.observe(record)
        if record.holder is None or record.duration is None:
            return -math.inf
        return observed + record.duration - self.clock()

    def expired(self, record: LeaseRecord) -> bool:
        """Whether ``record`` is free or expired (a holder without a valid duration too)."""
        return self.remaining(record) <= 0

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)

    def names(self) -> set[str]:
        return set(self._seen)


@dataclass(frozen=True)
class NodeLiveness:
    """A node's heart-beat Lease as judged by this process."""

    node_id: str
    alive: bool
    remaining: float
    """Seconds left before the node counts as down (``<= 0``: down)."""
    renew_time: datetime.datetime | None
    """The node's own wall-clock ``renewTime`` (informational: never used to judge)."""
    record: LeaseRecord


# -- the client --------------------------------------------------------------------------------


def _seconds(what: str, value: float) -> int:
    """A TTL or timeout as the Lease's whole seconds (rounded up)."""
    check_positive(what, value, maximum=MAX_INT32)
    return max(1, math.ceil(value))


class Leases:
    """Locks and node heart-beats as Leases in one namespace, through one ``ApiClient``
    (the caller's: it closes it). ``clock`` (monotonic) judges expiry, ``wall_clock`` only
    stamps ``acquireTime``/``renewTime`` for humans and tools."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
        max_attempts: int = 8,
        request_timeout: float = 10.0,
        observer: LeaseObserver | None = None,
    ) -> None:
        self.namespace = namespace
        self.observer = observer or LeaseObserver(clock)
        self.wall_clock = wall_clock
        self.max_attempts = max_attempts
        self.request_timeout = request_timeout
        self._api = client.CoordinationV1Api(api_client)
        self._known: dict[str, LeaseRecord] = {}
        """The last version of each Lease this instance wrote (the fast path of renewals)."""
        self.conflicts = 0
        """Writes answered 409 (someone wrote first) and decided again: a metric."""

    # requests ------------------------------------------------------------------------------

    def _where(self, name: str) -> str:
        return f"leases/{name} in namespace {self.namespace}"

    async def _call(
        self, function: Callable[..., Awaitable[Any]], *args: Any, verb: str, name: str, **kw: Any
    ) -> dict[str, Any]:
        return await call_json(
            function,
            *args,
            verb=verb,
            resource=self._where(name),
            _request_timeout=aiohttp.ClientTimeout(total=self.request_timeout),
            **kw,
        )

    async def read(self, name: str) -> LeaseRecord | None:
        """The Lease ``name`` now (``None`` when absent), noted by the observer."""
        try:
            obj = await self._call(
                self._api.read_namespaced_lease, name, self.namespace, verb="get", name=name
            )
        except NotFoundError:
            self._known.pop(name, None)
            return None
        record = LeaseRecord.from_object(obj)
        self.observer.observe(record)
        return record

    async def _create(
        self, name: str, spec: dict[str, Any], labels: dict[str, str], annotations: dict[str, str]
    ) -> LeaseRecord:
        body = {
            "apiVersion": LEASE_API_VERSION,
            "kind": "Lease",
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": spec,
        }
        sent = self.observer.clock()
        try:
            obj = await self._call(
                self._api.create_namespaced_lease, self.namespace, body, verb="create", name=name
            )
        except AlreadyExistsError:
            self.conflicts += 1
            raise
        return self._wrote(obj, sent)

    async def _replace(self, record: LeaseRecord, spec: dict[str, Any]) -> LeaseRecord:
        """PUT ``spec`` over ``record`` if nobody wrote since it was read (409 otherwise)."""
        body = dict(record.raw)
        metadata = dict(body.get("metadata") or {})
        metadata["resourceVersion"] = record.resource_version
        body.update(apiVersion=LEASE_API_VERSION, kind="Lease", metadata=metadata, spec=spec)
        sent = self.observer.clock()
        try:
            obj = await self._call(
                self._api.replace_namespaced_lease,
                record.name,
                self.namespace,
                body,
                verb="update",
                name=record.name,
            )
        except ConflictError:
            self.conflicts += 1
            raise
        return self._wrote(obj, sent)

    async def create_lease(
        self,
        name: str,
        spec: dict[str, Any],
        labels: Mapping[str, str],
        annotations: Mapping[str, str] | None = None,
    ) -> LeaseRecord:
        """Create the Lease ``name`` (:class:`AlreadyExistsError` when someone was first); the
        write counts as observed when it was sent (for leader election, which names its own
        Lease and keeps its own rules)."""
        return await self._create(name, spec, dict(labels), dict(annotations or {}))

    async def replace_lease(self, record: LeaseRecord, spec: dict[str, Any]) -> LeaseRecord:
        """Write ``spec`` over ``record`` if nobody wrote since it was read
        (:class:`ConflictError` otherwise, :class:`NotFoundError` when it was deleted)."""
        return await self._replace(record, spec)

    def now(self) -> str:
        """The wall clock as a ``MicroTime`` (for ``acquireTime``/``renewTime``)."""
        return self._now()

    def _wrote(self, obj: dict[str, Any], sent: float) -> LeaseRecord:
        record = LeaseRecord.from_object(obj)
        self.observer.observe(record, at=sent)
        self._known[record.name] = record
        return record

    def _now(self) -> str:
        return format_micro_time(self.wall_clock())

    # locks ---------------------------------------------------------------------------------

    def _lock(self, key: str, record: LeaseRecord) -> Lock:
        duration = record.duration or 0
        acquired = record.acquire_time or record.renew_time
        renewed = record.renew_time or acquired
        return Lock(
            key=key,
            holder=record.holder or "",
            token=record.transitions,
            ttl=float(duration),
            acquired_at=acquired.timestamp() if acquired else 0.0,
            expires_at=(renewed.timestamp() + duration) if renewed else 0.0,
        )

    def _gave_up(self, action: str, key: str) -> ConflictError:
        return ConflictError(
            f"could not {action} lock {key!r}: its Lease {lock_lease_name(key)} kept changing "
            f"under us ({self.max_attempts} conflicting attempts); try again"
        )

    async def acquire(self, key: str, holder: str, ttl: float) -> Lock:
        """Take the lock ``key`` for ``holder`` for ``ttl`` seconds (whole seconds, rounded
        up): create its Lease, or take it over when it is free or expired as observed by this
        process. The returned token is larger than every earlier token of ``key``.

        Raises :class:`LockHeldError` when it is held (also by ``holder`` itself).
        """
        check_lock_key(key)
        check_holder(holder)
        duration = _seconds("lock ttl", ttl)
        name = lock_lease_name(key)
        for _ in range(self.max_attempts):
            record = await self.read(name)
            now = self._now()
            spec = {
                "holderIdentity": holder,
                "leaseDurationSeconds": duration,
                "acquireTime": now,
                "renewTime": now,
            }
            if record is None:
                labels = {**LABELS, LEASE_TYPE_LABEL: "lock"}
                try:
                    created = await self._create(
                        name, {**spec, "leaseTransitions": 1}, labels, {KEY_ANNOTATION: key}
                    )
                except AlreadyExistsError:
                    continue
                return self._lock(key, created)
            remaining = self.observer.remaining(record)
            if remaining > 0:
                raise LockHeldError(
                    f"lock {key!r} is held by {record.describe_holder()} (token "
                    f"{record.transitions}) for up to {remaining:.1f} more seconds as observed "
                    "by this process, unless renewed"
                )
            if record.transitions >= MAX_INT32:
                raise InvalidRequestError(
                    f"lock {key!r} has reached the largest fencing token ({MAX_INT32})"
                )
            try:
                taken = await self._replace(
                    record, {**spec, "leaseTransitions": record.transitions + 1}
                )
            except (ConflictError, NotFoundError):
                continue  # written or deleted meanwhile: decide again
            return self._lock(key, taken)
        raise self._gave_up("acquire", key)

    async def _held(
        self, key: str, holder: str, token: int, record: LeaseRecord | None
    ) -> LeaseRecord:
        """``record`` if it shows ``holder`` holding ``key`` with ``token`` and not expired."""
        if record is None:
            raise LockNotHeldError(
                f"lock {key!r} is not held by {holder!r} with token {token}: it does not exist"
            )
        if record.holder != holder or record.transitions != token:
            raise LockNotHeldError(
                f"lock {key!r} is not held by {holder!r} with token {token} (holder "
                f"{record.describe_holder()}, token {record.transitions})"
            )
        if self.observer.expired(record):
            raise LockNotHeldError(
                f"lock {key!r} held by {holder!r} (token {token}) expired as observed by this "
                "process; acquire it again"
            )
        return record

    async def renew(self, key: str, holder: str, token: int, ttl: float | None = None) -> Lock:
        """Extend the lock for another ``ttl`` (default: its current duration) seconds.

        Raises :class:`LockNotHeldError` when ``holder`` does not hold it with ``token`` any
        more (taken over, released, or expired)."""
        check_lock_key(key)
        check_holder(holder)
        duration = None if ttl is None else _seconds("lock ttl", ttl)
        name = lock_lease_name(key)
        record = self._known.get(name) or await self.read(name)
        for _ in range(self.max_attempts):
            record = await self._held(key, holder, token, record)
            spec = record.spec
            spec["renewTime"] = self._now()
            spec["leaseDurationSeconds"] = duration or record.duration
            try:
                return self._lock(key, await self._replace(record, spec))
            except (ConflictError, NotFoundError):
                record = await self.read(name)
        raise self._gave_up("renew", key)

    async def release(self, key: str, holder: str, token: int) -> None:
        """Give the lock up: ``holderIdentity`` is cleared, the Lease and its counter stay.

        Raises :class:`LockNotHeldError` when ``holder`` does not hold it with ``token``."""
        check_lock_key(key)
        check_holder(holder)
        name = lock_lease_name(key)
        record = self._known.get(name) or await self.read(name)
        for _ in range(self.max_attempts):
            record = await self._held(key, holder, token, record)
            spec = record.spec
            spec.pop("holderIdentity", None)
            spec["renewTime"] = self._now()
            try:
                await self._replace(record, spec)
                return
            except (ConflictError, NotFoundError):
                record = await self.read(name)
        raise self._gave_up("release", key)

    async def get_lock(self, key: str) -> Lock | None:
        """The lock ``key`` if it is held and not expired as observed here (read now)."""
        check_lock_key(key)
        record = await self.read(lock_lease_name(key))
        if record is None or self.observer.expired(record):
            return None
        return self._lock(key, record)

    # node heart-beats ----------------------------------------------------------------------

    async def heartbeat(self, node_id: str, node_timeout: float) -> LeaseRecord:
        """Renew the heart-beat Lease of ``node_id`` (created on the first beat) with a
        duration of ``node_timeout`` (whole seconds, rounded up). A Lease of that
        name held by someone else is taken back: it belongs to the node."""
        check_name("node", node_id)
        duration = _seconds("node timeout", node_timeout)
        name = node_lease_name(node_id)
        record = self._known.get(name) or await self.read(name)
        for _ in range(self.max_attempts):
            now = self._now()
            spec: dict[str, Any]
            if record is None:
                labels = {**LABELS, LEASE_TYPE_LABEL: "node", NODE_ID_LABEL: node_id}
                spec = {
                    "holderIdentity": node_id,
                    "leaseDurationSeconds": duration,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                }
                try:
                    return await self._create(name, spec, labels, {})
                except AlreadyExistsError:
                    record = await self.read(name)
                    continue
            spec = record.spec
            if record.holder != node_id:
                spec["acquireTime"] = now
                spec["leaseTransitions"] = min(record.transitions + 1, MAX_INT32)
            spec.update(holderIdentity=node_id, leaseDurationSeconds=duration, renewTime=now)
            try:
                return await self._replace(record, spec)
            except (ConflictError, NotFoundError):
                record = await self.read(name)
        raise ConflictError(
            f"could not renew the heart-beat Lease {name}: it kept changing under us "
            f"({self.max_attempts} conflicting attempts)"
        )

    def judge_nodes(self, objects: Iterable[Mapping[str, Any]]) -> list[NodeLiveness]:
        """Judge heart-beat Leases (from a list or an informer's cache) by observed time.
        Leases that are not node heart-beats, or malformed, are skipped with a warning."""
        out = []
        for obj in objects:
            try:
                record = LeaseRecord.from_object(obj)
            except ValueError as exc:
                logger.warning("skipped a malformed Lease: %s", exc)
                continue
            labels = (obj.get("metadata") or {}).get("labels") or {}
            node_id = labels.get(NODE_ID_LABEL) if isinstance(labels, Mapping) else None
            if not isinstance(node_id, str) or record.name != node_lease_name(node_id):
                if record.name.startswith("node-"):
                    logger.warning("Lease %s is not a valid node heart-beat", record.name)
                continue
            remaining = self.observer.remaining(record)
            out.append(
                NodeLiveness(
                    node_id=node_id,
                    alive=remaining > 0,
                    remaining=remaining,
                    renew_time=record.renew_time,
                    record=record,
                )
            )
        return sorted(out, key=lambda n: n.node_id)

    async def node_liveness(self) -> list[NodeLiveness]:
        """List every node heart-beat Lease of the namespace and judge it. A node seen for the
        first time counts as alive for a full duration (as client-go judges a new Lease)."""
        listed = await call_json(
            self._api.list_namespaced_lease,
            self.namespace,
            label_selector=f"{LEASE_TYPE_LABEL}=node",
            verb="list",
            resource=f"leases in namespace {self.namespace}",
            _request_timeout=aiohttp.ClientTimeout(total=self.request_timeout),
        )
        items = [i for i in listed.get("items") or () if isinstance(i, Mapping)]
        judged = self.judge_nodes(items)
        present = {n.record.name for n in judged}
        for name in self.observer.names():  # forget heart-beats that are gone
            if name.startswith("node-") and name not in present:
                self.observer.forget(name)
        return judged

    async def expired_nodes(self) -> list[str]:
        """The ids of nodes whose heart-beat Lease expired as observed by this process."""
        return [n.node_id for n in await self.node_liveness() if not n.alive]
