"""The k8s backend of ``ControlPlane``: the cluster state in custom resources and Leases.

State lives on the API server: an ``Index`` resource per index (spec: settings and mappings;
status: routing), a ``ClusterNode`` per node (spec: registration; status: ACTIVE / DRAINING /
DOWN), the ``Cluster`` singleton (configuration, feature flags, pinned hash ring) and a Lease
per lock. Informers keep caches of them; a *merger* applies their changes in one global
order (resourceVersions are etcd revisions, global across kinds) to a materialized, immutable
:class:`~controlplane.types.ClusterState`, deriving the watch events from what changed.

A mutation is decided by the shared state machine (:mod:`controlplane.state`) applied to the
materialized state: its validation, allocator and ring rules, its errors. What it changed is
then written (creates, replaces and status patches with the resourceVersion read as a
precondition); a 409 means someone else wrote first: re-sync and decide again. The call
returns once the materialized state includes its last write (read-your-writes), with the
stored value as the materializer sees it, so returned values, reads and events agree.

See docs/kubernetes.md ("The backend") for the version order, visibility and time rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

import aiohttp
import aiohttp.helpers
import immutables
import msgspec
from kubernetes_asyncio import client as k8s_client
from yarl import URL

from ... import commands as c
from ...config import Config, K8sConfig
from ...errors import (
    AlreadyExistsError,
    ClosedError,
    ConflictError,
    ControlPlaneError,
    InvalidConfigError,
    InvalidRequestError,
    NotFoundError,
    OperationTimeoutError,
    UnavailableError,
)
from ...health import index_health
from ...liveness import Liveness, track_liveness
from ...state import StateMachine
from ...types import (
    BackendHealth,
    ClusterConfig,
    ClusterEvent,
    ClusterState,
    EventKind,
    HashRing,
    Index,
    IndexSettings,
    Lock,
    Node,
    NodeStatus,
    ShardRouting,
)
from ...validation import check_name, coerce_settings
from ...watch import EventStream, WatchHub
from ..base import CommandBackend
from .crds import (
    API_VERSION,
    GROUP,
    VERSION,
    ClusterSpec,
    IndexSpec,
    IndexState,
    IndexStatus,
)
from .election import Elector, Term
from .errors import call_json
from .informer import Change, ChangeType, Informer, ListWatch, Object, object_key
from .leases import (
    KEY_ANNOTATION,
    LEASE_TYPE_LABEL,
    NODE_ID_LABEL,
    LeaseRecord,
    Leases,
    format_micro_time,
    lock_lease_name,
)

__all__ = ["K8sControlPlane"]

_log = logging.getLogger("controlplane.k8s")
_replace = msgspec.structs.replace

MERGE_PATCH = "application/merge-patch+json"
LOCK_ANNOTATION = "controlplane.dev/lock"
"""JSON of a lock Lease: exact ``ttl``, ``acquired``/``at`` stamps, ``writer``, ``end``."""
CREATED_ANNOTATION = "controlplane.dev/created-version"
BEACON_LABEL = "controlplane.dev/progress-beacon"
"""Marks the objects the backend writes only to show its informers' progress (never state)."""
BEACON_ANNOTATION = "controlplane.dev/progress"
BEACON_PREFIX = "controlplane-progress-"
MARK_PATIENCE = 1.0
"""Seconds a writer waits for its progress marks' events before it also probes."""
PUMP_DELAY = 0.05
"""Seconds changes wait for a writer's progress marks before the pump probes (writes by hand)."""
PROBE_AGAIN = 1.0

INDEX, NODE, CLUSTER, LEASE = "index", "node", "cluster", "lease"
_KINDS = (INDEX, NODE, CLUSTER, LEASE)
_PLURALS = {INDEX: "indices", NODE: "clusternodes", CLUSTER: "clusters"}
_KIND_NAMES = {INDEX: "Index", NODE: "ClusterNode", CLUSTER: "Cluster"}


_NOTHING = -1
"""What a ``_write_*`` method returns when it wrote nothing (0: a deletion, revision unknown)."""


class _Stale(Exception):
    """A write found the object changed (409, or 404/AlreadyExists from a concurrent writer)."""


def _ring_members(nodes: immutables.Map[str, Node]) -> tuple[str, ...]:
    return tuple(
        sorted(n.id for n in nodes.values() if n.is_data and n.status is not NodeStatus.DOWN)
    )


def _meta(obj: Object) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _rv(obj: Object) -> str:
    return str(_meta(obj).get("resourceVersion", ""))


def _generation(obj: Object) -> int:
    value = _meta(obj).get("generation")
    return value if isinstance(value, int) else 0


def _status(obj: Object) -> Mapping[str, Any]:
    status = obj.get("status")
    return status if isinstance(status, Mapping) else {}


def _spec(obj: Object) -> Mapping[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def _is_beacon(obj: Object) -> bool:
    labels = _meta(obj).get("labels")
    return isinstance(labels, Mapping) and labels.get(BEACON_LABEL) == "true"


def _visible(obj: Object) -> bool:
    """Whether the control plane's status describes the current spec (else: in flight)."""
    return _status(obj).get("observedGeneration") == _generation(obj)


def _index_spec(index: Index) -> Any:
    return IndexSpec(settings=index.settings, mappings=index.mappings)


def _node_spec(node: Node) -> dict[str, Any]:
    spec: dict[str, Any] = msgspec.to_builtins(node)
    for field in ("id", "status", "registered_version"):
        spec.pop(field, None)
    return spec


def _cluster_spec(state: ClusterState) -> dict[str, Any]:
    ring = state.hash_ring
    stored_ring = _replace(ring, version=0, nodes=() if ring.follow_membership else ring.nodes)
    spec = ClusterSpec(
        config=_replace(state.config, version=0),
        feature_flags=dict(state.feature_flags.items()),
        hash_ring=stored_ring,
    )
    out: dict[str, Any] = msgspec.to_builtins(spec)
    for part in (out.get("config"), out.get("hashRing")):
        if isinstance(part, dict):
            part.pop("version", None)
    return out


def _decode_cluster_spec(obj: Object) -> ClusterSpec:
    return msgspec.convert(dict(_spec(obj)), ClusterSpec, strict=False)


class K8sControlPlane(CommandBackend):
    """``ControlPlane`` on a Kubernetes API server (DESIGN 5).

    ``configuration``: a ``kubernetes_asyncio`` ``Configuration`` (tests pass the one of their
    API server); ``None`` loads in-cluster credentials inside a pod, else the kubeconfig of
    ``config.k8s``. ``clock`` stamps commands and judges lock and node expiry (tests pass a
    fake one). ``maintenance_interval``: seconds between the leader's rounds of node-down
    detection and lock reaping (default ``min(0.5, node_timeout / 4)``).
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        configuration: Any = None,
        clock: Callable[[], float] | None = None,
        identity: str | None = None,
        maintenance_interval: float | None = None,
        sync_timeout: float = 30.0,
        max_attempts: int = 8,
    ) -> None:
        super().__init__(clock)
        self._config = config or Config(mode="k8s")
        self._k8s: K8sConfig = self._config.k8s
        self._namespace = self._k8s.namespace
        self._configuration = configuration
        self._identity = identity or f"{os.uname().nodename}-{uuid.uuid4().hex[:8]}"
        self._interval = maintenance_interval
        self._sync_timeout = sync_timeout
        self._max_attempts = max_attempts
        self._api: Any = None
        self._custom: Any = None
        self._coordination: Any = None
        self._informers: dict[str, Informer] = {}
        self._elector: Elector | None = None
        self._leases: Leases | None = None
        self._hub: WatchHub | None = None
        self._state = ClusterState()
        self._objs: dict[str, dict[str, Object]] = {kind: {} for kind in _KINDS}
        self._lock_seen: dict[str, tuple[str, float]] = {}
        """Lock Lease name -> (resourceVersion, local time it was first observed)."""
        self._pending: list[tuple[int, int, str, Change]] = []
        self._seq = itertools.count()
        self._released = 0
        self._probed: dict[str, int] = dict.fromkeys(_KINDS, 0)
        self._probe_locks = {kind: asyncio.Lock() for kind in _KINDS}
        self._progressed = asyncio.Event()
        """Set whenever an informer's progress (and so maybe the watermark) advanced."""
        self._beacons: dict[str, str] = {}
        """Kind -> name of the progress beacon this replica writes."""
        self._marks = itertools.count()
        self._mark_failed: set[str] = set()
        """Kinds whose beacon could not be written (warned once; then logged at debug)."""
        self._waiting = asyncio.Event()
        """Set when changes wait for the watermark (the pump then probes idle informers)."""
        self._pump_task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._liveness = Liveness(self._clock())
        self._in_flight: dict[str, tuple[str, float]] = {}
        """Index name -> (resourceVersion, monotonic time first seen in flight)."""
        self._started = False
        self._stopped = False

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        """The namespace of the control plane's resources."""
        return self._namespace

    @property
    def elector(self) -> Elector:
        """The leader election of this replica (started by :meth:`start`)."""
        if self._elector is None:
            raise ClosedError("the backend is not started")
        return self._elector

    async def start(self) -> None:
        """Sync the informers, build the state, then run the leader election; returns once
        reads are served from the caches."""
        if self._stopped:
            raise ClosedError("this K8sControlPlane was stopped; create a new one")
        if self._started:
            return
        self._started = True
        configuration = self._configuration or await _load_configuration(self._k8s)
        self._api = k8s_client.ApiClient(configuration=configuration)
        _skip_env_lookups(self._api)
        self._custom = k8s_client.CustomObjectsApi(self._api)
        self._coordination = k8s_client.CoordinationV1Api(self._api)
        ns = self._namespace
        for kind in (INDEX, NODE, CLUSTER):
            source = ListWatch.custom_objects(
                self._api, GROUP, VERSION, _PLURALS[kind], _KIND_NAMES[kind], namespace=ns
            )
            self._informers[kind] = Informer(source)
        self._informers[LEASE] = Informer(
            ListWatch.leases(
                self._api, ns, label_selector=f"{LEASE_TYPE_LABEL} in (lock,node,progress)"
            )
        )
        for kind, informer in self._informers.items():
            informer.add_handler(functools.partial(self._on_change, kind))
            informer.add_progress_handler(self._on_progress)
            informer.start()
        self._pump_task = asyncio.create_task(self._pump(), name="k8s-merger-pump")
        try:
            async with asyncio.timeout(self._sync_timeout):
                for informer in self._informers.values():
                    await informer.synced.wait()
        except TimeoutError:
            errors = "; ".join(
                f"{k}: {i.stats.last_error}" for k, i in self._informers.items() if not i.has_synced
            )
            raise UnavailableError(
                f"could not list the control plane's resources in namespace {ns} within "
                f"{self._sync_timeout} s ({errors}); are the CRDs installed (deploy/crds/) "
                "and the RBAC of deploy/rbac.yaml granted?"
            ) from None
        if self._informers[CLUSTER].get(self._k8s.cluster_name, ns) is None:
            await self._create_cluster()
        await self._sync_to(await self._current_revision())
        self._hub = WatchHub(self._config.watch_retention, version=self._state.version)
        self._leases = Leases(self._api, ns)
        self._elector = Elector(
            self._leases,
            f"{self._k8s.cluster_name}-leader",
            self._identity,
            lease_duration=self._k8s.lease_duration,
            renew_deadline=self._k8s.renew_deadline,
            retry_period=self._k8s.retry_period,
            on_started_leading=self._started_leading,
        )
        self._elector.add_reconciler(self._maintenance_loop)
        self._elector.start()

    async def stop(self) -> None:
        """Stop: end watches with ``ClosedError``, release leadership, close the informers and
        the client session. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._hub is not None:
            self._hub.close()
        if self._elector is not None:
            await self._elector.close()
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
        for informer in self._informers.values():
            await informer.close()
        if self._api is not None:
            await self._api.close()

    async def health(self) -> BackendHealth:
        """Healthy while started with every informer synced; role leader or standby."""
        synced = bool(self._informers) and all(i.has_synced for i in self._informers.values())
        elector = self._elector
        leading = elector is not None and elector.is_leader
        return BackendHealth(
            healthy=self._started and not self._stopped and synced,
            backend="k8s",
            role="leader" if leading else "standby",
            leader=elector.leader if elector is not None else None,
            version=self._state.version,
        )

    def _check_open(self) -> None:
        if self._stopped:
            raise ClosedError("the control plane was stopped")
        if self._hub is None:
            raise ClosedError("the control plane is not started; call start() first")

    # --- reads -------------------------------------------------------------------------------

    def _local_state(self) -> ClusterState:
        return self._state

    async def _linearizable_state(self) -> ClusterState:
        self._check_open()
        await self._sync_to(await self._current_revision())
        return self._state

    def watch(
        self, since: int | None = None, kinds: Collection[EventKind] | None = None
    ) -> EventStream:
        """Events with version > ``since`` (default: from now on), in order, exactly once."""
        self._check_open()
        assert self._hub is not None
        return self._hub.watch(since, kinds)

    # --- the merger: informer changes -> one ordered state --------------------------------

    def _progress(self, kind: str) -> int:
        return max(self._informers[kind].resource_version, self._probed[kind])

    @property
    def _watermark(self) -> int:
        return min(self._progress(kind) for kind in _KINDS)

    def _on_change(self, kind: str, change: Change) -> None:
        if _is_beacon(change.object):
            return  # only progress (the informer's resource_version): see _on_progress
        heapq.heappush(self._pending, (change.resource_version, next(self._seq), kind, change))
        self._release()
        if self._pending:
            self._waiting.set()

    def _on_progress(self) -> None:
        self._release()
        self._progressed.set()

    async def _pump(self) -> None:
        """Release changes that wait for idle informers. A writer's progress marks release
        its changes on every replica within a few milliseconds; changes nobody marks (written
        by hand, or by a replica that died before marking) are released by probing those
        informers after :data:`PUMP_DELAY`."""
        while True:
            await self._waiting.wait()
            self._waiting.clear()
            if not self._pending:
                continue
            target = max(entry[0] for entry in self._pending)
            await asyncio.sleep(PUMP_DELAY)
            self._release()
            if self._watermark >= target:
                continue
            try:
                await self._sync_to(target)
            except ControlPlaneError as exc:
                _log.warning("cannot establish the informers' progress: %s", exc)
                self._waiting.set()
                await asyncio.sleep(1.0)

    def _release(self) -> None:
        """Apply every pending change at or below the low watermark, in resourceVersion order
        (all changes of one resourceVersion together: one version)."""
        if not self._informers:
            return
        watermark = self._watermark
        pending = self._pending
        while pending and pending[0][0] <= watermark:
            rv = pending[0][0]
            group: list[tuple[str, Change]] = []
            while pending and pending[0][0] == rv:
                _, _, kind, change = heapq.heappop(pending)
                group.append((kind, change))
            self._apply_group(rv, group)

    async def _current_revision(self) -> int:
        """The API server's current revision (a quorum list of one object)."""
        listed = await call_json(
            self._custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self._namespace,
            _PLURALS[CLUSTER],
            limit=1,
            verb="list",
            resource=f"clusters in namespace {self._namespace}",
        )
        return int((listed.get("metadata") or {}).get("resourceVersion") or 0)

    async def _sync_to(self, target: int, *, patience: float = 0.0) -> None:
        """Wait until the materialized state includes every change up to ``target``.

        The watermark moves with the informers' events (a writer's progress marks among
        them); informers still behind after ``patience`` seconds are probed (all at once),
        and again every :data:`PROBE_AGAIN` seconds."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + self._sync_timeout
        probe_at = now + patience
        while True:
            self._release()
            if self._watermark >= target:
                return
            now = loop.time()
            if now > deadline:
                raise OperationTimeoutError(
                    f"the caches did not reach resourceVersion {target} within "
                    f"{self._sync_timeout} s (at {self._watermark}); is the API server slow?"
                )
            if now >= probe_at:
                behind = [kind for kind in _KINDS if self._progress(kind) < target]
                await asyncio.gather(*(self._probe(kind, target) for kind in behind))
                probe_at = loop.time() + PROBE_AGAIN
                continue
            self._progressed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(probe_at, deadline) - now):
                    await self._progressed.wait()

    async def _sync_after_write(self, written: Mapping[str, int], deleted: bool) -> None:
        """Read-your-writes: wait until the state includes this replica's last writes.

        The kinds that were written up to the last write's resourceVersion get there by
        their own events. Every other informer is idle below it, and the API server cannot
        say quickly that it has nothing more (see :meth:`_probe`), so this replica *marks*
        those kinds: one write to its progress beacon of each (concurrently), whose events,
        later than the last write, carry every informer past it -- on every replica."""
        if deleted:  # a deletion's revision is not known: mark every kind after it
            await self._catch_up()
            return
        if not written:
            return
        last = max(written.values())
        kinds = [k for k in _KINDS if written.get(k, 0) < last and self._progress(k) < last]
        marked = await self._mark_kinds(kinds)
        await self._sync_to(last, patience=MARK_PATIENCE if len(marked) == len(kinds) else 0.0)

    async def _catch_up(self) -> None:
        """Wait until the state includes every change made before this call (after a 409 or
        a deletion): mark every kind, and wait for the earliest of the marks."""
        marked = await self._mark_kinds(_KINDS)
        if len(marked) == len(_KINDS):
            await self._sync_to(min(marked.values()), patience=MARK_PATIENCE)
        else:
            await self._sync_to(await self._current_revision())

    async def _mark_kinds(self, kinds: Collection[str]) -> dict[str, int]:
        """Write the progress beacon of each kind (concurrently): kind -> its new
        resourceVersion, for the kinds whose write succeeded (a failure is logged: the
        caller probes instead)."""
        if not kinds:
            return {}
        kinds = list(kinds)
        results = await asyncio.gather(
            *(self._mark(kind) for kind in kinds), return_exceptions=True
        )
        marked: dict[str, int] = {}
        for kind, result in zip(kinds, results, strict=True):
            if isinstance(result, ControlPlaneError):
                log = _log.debug if kind in self._mark_failed else _log.warning
                self._mark_failed.add(kind)
                log(
                    "cannot write the progress beacon of %s (probing instead, which is slower): %s",
                    _PLURALS.get(kind, "leases"),
                    result,
                )
            elif isinstance(result, BaseException):
                raise result
            else:
                self._mark_failed.discard(kind)
                marked[kind] = result
        return marked

    async def _mark(self, kind: str) -> int:
        """Write this kind's progress beacon: a new annotation value (a write that changes
        nothing would not make an event); create the beacon if there is none. Returns the
        write's resourceVersion."""
        stamp = f"{self._identity}/{next(self._marks)}"
        name = self._beacon_name(kind)
        if name is not None:
            patch = {"metadata": {"annotations": {BEACON_ANNOTATION: stamp}}}
            try:
                if kind == LEASE:
                    written = await call_json(
                        self._coordination.patch_namespaced_lease,
                        name,
                        self._namespace,
                        patch,
                        _content_type=MERGE_PATCH,
                        verb="patch",
                        resource=f"leases/{name} in namespace {self._namespace}",
                    )
                else:
                    written = await call_json(
                        self._custom.patch_namespaced_custom_object,
                        *self._custom_args(kind),
                        name,
                        patch,
                        _content_type=MERGE_PATCH,
                        verb="patch",
                        resource=self._where(kind, name),
                    )
                return int(_rv(written))
            except NotFoundError:  # deleted by hand: make another
                self._beacons.pop(kind, None)
        labels = {**_labels(), BEACON_LABEL: "true"}
        if kind == LEASE:
            labels[LEASE_TYPE_LABEL] = "progress"
        metadata = {
            "generateName": BEACON_PREFIX,
            "labels": labels,
            "annotations": {BEACON_ANNOTATION: stamp},
        }
        if kind == LEASE:
            body: dict[str, Any] = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": metadata,
                "spec": {},
            }
            written = await call_json(
                self._coordination.create_namespaced_lease,
                self._namespace,
                body,
                verb="create",
                resource=f"leases in namespace {self._namespace}",
            )
        else:
            body = {
                "apiVersion": API_VERSION,
                "kind": _KIND_NAMES[kind],
                "metadata": metadata,
                "spec": _beacon_spec(kind),
            }
            written = await call_json(
                self._custom.create_namespaced_custom_object,
                *self._custom_args(kind),
                body,
                verb="create",
                resource=f"{_PLURALS[kind]} in namespace {self._namespace}",
            )
        self._beacons[kind] = str(_meta(written).get("name"))
        return int(_rv(written))

    def _beacon_name(self, kind: str) -> str | None:
        """The beacon this replica writes: the one it made, else the first (by name) in the
        cache, so that replicas share one after the first has made it."""
        name = self._beacons.get(kind)
        if name is not None:
            return name
        found = sorted(
            str(_meta(obj).get("name")) for obj in self._informers[kind] if _is_beacon(obj)
        )
        if found:
            self._beacons[kind] = found[0]
            return found[0]
        return None

    async def _probe(self, kind: str, target: int) -> None:
        """Establish that an informer has every change of its kind up to ``target``.

        An informer that saw no event since ``target`` has no watermark of its own (bookmarks
        come about once a minute): list its kind consistently and compare with its cache. The
        same keys at the same resourceVersions mean it has all changes up to the list's.

        Slow when repeated: the API server serves the list from its watch cache once the
        cache has caught up with etcd's current revision, and an idle resource's cache learns
        that only from a progress notification, which kube-apiserver requests at most every
        100 ms per resource (``ConditionalProgressRequester``); so a probe within 100 ms of
        the previous one of that resource waits for the rest of those 100 ms.
        """
        async with self._probe_locks[kind]:
            if self._progress(kind) >= target:
                return
            informer = self._informers[kind]
            source = informer.source
            listed = await call_json(
                source.function,
                **source.selectors(),
                verb="list",
                resource=source.resource,
            )
            at = int((listed.get("metadata") or {}).get("resourceVersion") or 0)
            items = {object_key(i): _rv(i) for i in listed.get("items") or ()}
            for _ in range(400):
                if informer.resource_version >= at:
                    return
                cached = {key: _rv(obj) for key, obj in informer.cache.items()}
                if cached == items:
                    self._probed[kind] = max(self._probed[kind], at)
                    self._on_progress()
                    return
                await asyncio.sleep(0.005)

    # --- materialization -------------------------------------------------------------------

    def _apply_group(self, rv: int, group: list[tuple[str, Change]]) -> None:
        state = self._state
        fields: dict[str, Any] = {}
        events: list[ClusterEvent] = []
        late = rv <= self._released
        for kind, change in group:
            name = change.key.name
            obj = change.new if change.type is not ChangeType.DELETED else None
            if obj is None:
                self._objs[kind].pop(name, None)
            else:
                self._objs[kind][name] = obj
            try:
                if kind == INDEX:
                    self._index_changed(rv, name, obj, fields, events)
                elif kind == NODE:
                    self._node_changed(rv, name, obj, fields, events)
                elif kind == CLUSTER and name == self._k8s.cluster_name:
                    self._cluster_changed(rv, obj, fields, events)
                elif kind == LEASE:
                    self._lease_changed(rv, name, obj, fields, events)
            except (msgspec.ValidationError, ValueError, TypeError) as exc:
                _log.warning("skipped %s %s: not a valid resource: %s", kind, name, exc)
            except Exception:  # never lose the rest of the group to one object
                _log.exception("skipped %s %s: materializing it failed", kind, name)
        self._refresh_ring(rv, fields, events)
        if not events:
            if fields:  # bookkeeping only (versions of the first config and ring seen)
                self._state = _replace(state, **fields)
            return
        if late:
            _log.warning(
                "a change at resourceVersion %d arrived after the state moved to %d; applied "
                "without events",
                rv,
                self._released,
            )
            self._state = _replace(state, **fields)
            return
        self._released = rv
        self._state = _replace(state, version=rv, **fields)
        if self._hub is not None:
            self._hub.publish(rv, events)

    @staticmethod
    def _get(state: ClusterState, fields: dict[str, Any], name: str) -> Any:
        return fields.get(name, getattr(state, name))

    def _index_changed(
        self,
        rv: int,
        name: str,
        obj: Object | None,
        fields: dict[str, Any],
        events: list[ClusterEvent],
    ) -> None:
        indices: immutables.Map[str, Index] = self._get(self._state, fields, "indices")
        old = indices.get(name)
        if obj is None:
            if old is not None:
                fields["indices"] = indices.delete(name)
                events.append(
                    ClusterEvent(version=rv, kind=EventKind.INDEX_DELETED, key=name, index=old)
                )
            return
        status = _status(obj)
        if not _visible(obj) or status.get("state") != IndexState.ACTIVE.value:
            return  # in flight (spec written, status not yet) or not the control plane's yet
        spec = msgspec.convert(dict(_spec(obj)), IndexSpec, strict=False)
        routing = msgspec.convert(
            list(status.get("routing") or ()), tuple[ShardRouting, ...], strict=False
        )
        if old is not None:
            created = old.created_version
        else:
            created = int((_meta(obj).get("annotations") or {}).get(CREATED_ANNOTATION) or 0) or rv
        index = Index(
            name=name,
            settings=spec.settings,  # type: ignore[attr-defined]
            mappings=spec.mappings,  # type: ignore[attr-defined]
            routing=routing,
            created_version=created,
            updated_version=rv,
        )
        if old is not None and _replace(old, updated_version=rv) == index:
            return
        fields["indices"] = indices.set(name, index)
        if old is None:
            events.append(
                ClusterEvent(version=rv, kind=EventKind.INDEX_CREATED, key=name, index=index)
            )
        elif old.settings != index.settings or old.mappings != index.mappings:
            events.append(
                ClusterEvent(version=rv, kind=EventKind.INDEX_UPDATED, key=name, index=index)
            )
        else:
            events.extend(_shard_events(rv, name, old.routing, index.routing))

    def _node_changed(
        self,
        rv: int,
        name: str,
        obj: Object | None,
        fields: dict[str, Any],
        events: list[ClusterEvent],
    ) -> None:
        nodes: immutables.Map[str, Node] = self._get(self._state, fields, "nodes")
        old = nodes.get(name)
        if obj is None:
            if old is not None:
                fields["nodes"] = nodes.delete(name)
                self._liveness.forget(name)
                events.append(
                    ClusterEvent(version=rv, kind=EventKind.NODE_LEFT, key=name, node=old)
                )
            return
        status = _status(obj)
        if not _visible(obj) or not status.get("state"):
            return
        registered = old.registered_version if old is not None else 0
        registered = registered or int(status.get("registeredVersion") or 0) or rv
        node = msgspec.convert(
            {
                **_spec(obj),
                "id": name,
                "status": status.get("state"),
                "registered_version": registered,
            },
            Node,
            strict=False,
        )
        if node == old:
            return
        fields["nodes"] = nodes.set(name, node)
        if old is None:
            kind = EventKind.NODE_JOINED
        elif node.status is NodeStatus.DOWN and old.status is not NodeStatus.DOWN:
            kind = EventKind.NODE_DOWN
        else:
            kind = EventKind.NODE_UPDATED
        if old is None or (old.status is NodeStatus.DOWN and node.status is not NodeStatus.DOWN):
            self._liveness.beat(name, self._clock())
        events.append(ClusterEvent(version=rv, kind=kind, key=name, node=node))

    def _cluster_changed(
        self, rv: int, obj: Object | None, fields: dict[str, Any], events: list[ClusterEvent]
    ) -> None:
        if obj is None:
            return  # the singleton is never deleted by the control plane; keep the last state
        spec = _decode_cluster_spec(obj)
        old_config: ClusterConfig = self._get(self._state, fields, "config")
        config = _replace(spec.config, version=old_config.version)
        if config != old_config or old_config.version == 0:
            config = _replace(config, version=rv)
            fields["config"] = config
            if old_config.version != 0:
                events.append(
                    ClusterEvent(version=rv, kind=EventKind.CONFIG_CHANGED, config=config)
                )
        flags: immutables.Map[str, bool] = self._get(self._state, fields, "feature_flags")
        new_flags = flags
        for flag, enabled in sorted(spec.feature_flags.items()):
            if flags.get(flag) is not enabled:
                new_flags = new_flags.set(flag, enabled)
                events.append(
                    ClusterEvent(version=rv, kind=EventKind.FLAG_CHANGED, key=flag, enabled=enabled)
                )
        for flag in sorted(set(flags.keys()) - set(spec.feature_flags)):
            new_flags = new_flags.delete(flag)  # removed by hand: no event kind for it
        if new_flags is not flags:
            fields["feature_flags"] = new_flags
        fields["_stored_ring"] = spec.hash_ring

    def _refresh_ring(self, rv: int, fields: dict[str, Any], events: list[ClusterEvent]) -> None:
        stored: HashRing | None = fields.pop("_stored_ring", None)
        old: HashRing = self._state.hash_ring
        if stored is None and "nodes" not in fields and old.version != 0:
            return
        base = stored if stored is not None else old
        nodes = self._get(self._state, fields, "nodes")
        ring = _replace(base, version=old.version)
        if ring.follow_membership:
            ring = _replace(ring, nodes=_ring_members(nodes))
        if ring != old or old.version == 0:
            quiet = old.version == 0 and _replace(ring, version=0) == _replace(old, version=0)
            ring = _replace(ring, version=rv)
            fields["hash_ring"] = ring
            if not quiet:
                events.append(ClusterEvent(version=rv, kind=EventKind.RING_UPDATED, ring=ring))

    def _lease_changed(
        self,
        rv: int,
        name: str,
        obj: Object | None,
        fields: dict[str, Any],
        events: list[ClusterEvent],
    ) -> None:
        source = obj if obj is not None else None
        if source is not None:
            labels = _meta(source).get("labels") or {}
            if labels.get(LEASE_TYPE_LABEL) == "node":
                node_id = labels.get(NODE_ID_LABEL)
                if isinstance(node_id, str):
                    self._liveness.beat(node_id, self._clock())
                return
        locks: immutables.Map[str, Lock] = self._get(self._state, fields, "locks")
        key = None
        if source is not None:
            key = (_meta(source).get("annotations") or {}).get(KEY_ANNOTATION)
            if not isinstance(key, str) or lock_lease_name(key) != name:
                return
        else:
            key = next((k for k, v in locks.items() if lock_lease_name(k) == name), None)
            if key is None:
                return
        old = locks.get(key)
        lock, end = self._lock_of(key, source) if source is not None else (None, "released")
        if lock is None:
            self._lock_seen.pop(name, None)
            if old is not None:
                fields["locks"] = locks.delete(key)
                kind = EventKind.LOCK_EXPIRED if end == "expired" else EventKind.LOCK_RELEASED
                events.append(ClusterEvent(version=rv, kind=kind, key=key, lock=old))
            return
        if lock == old:
            return
        fields["locks"] = locks.set(key, lock)
        if old is None:
            events.append(
                ClusterEvent(version=rv, kind=EventKind.LOCK_ACQUIRED, key=key, lock=lock)
            )
        elif old.token == lock.token:
            events.append(ClusterEvent(version=rv, kind=EventKind.LOCK_RENEWED, key=key, lock=lock))
        else:
            events.append(ClusterEvent(version=rv, kind=EventKind.LOCK_EXPIRED, key=key, lock=old))
            events.append(
                ClusterEvent(version=rv, kind=EventKind.LOCK_ACQUIRED, key=key, lock=lock)
            )

    def _lock_of(self, key: str, obj: Object) -> tuple[Lock | None, str]:
        """The lock a Lease holds (``None`` if free) and, when free, how it ended."""
        record = LeaseRecord.from_object(obj)
        raw = (_meta(obj).get("annotations") or {}).get(LOCK_ANNOTATION)
        info = json.loads(raw) if isinstance(raw, str) else {}
        if not isinstance(info, dict):
            info = {}
        if record.holder is None:
            return None, str(info.get("end") or "released")
        ttl = info.get("ttl")
        if not isinstance(ttl, int | float) or ttl <= 0:
            ttl = float(record.duration or 0)
        # Expiry by observed time: our own write counts from the moment we stamped it; a
        # write by another process from the moment this one first saw it.
        seen = self._lock_seen.get(record.name)
        if seen is None or seen[0] != record.resource_version:
            at = info.get("at")
            if info.get("writer") == self._identity and isinstance(at, int | float):
                observed = float(at)
            else:
                observed = self._clock()
            seen = (record.resource_version, observed)
            self._lock_seen[record.name] = seen
        acquired = info.get("acquired")
        return (
            Lock(
                key=key,
                holder=record.holder,
                token=record.transitions,
                ttl=float(ttl),
                acquired_at=float(acquired) if isinstance(acquired, int | float) else seen[1],
                expires_at=seen[1] + float(ttl),
            ),
            "",
        )

    # --- writes ------------------------------------------------------------------------------

    async def _execute(self, command: c.Command) -> Any:
        self._check_open()
        async with self._write_lock:
            for _ in range(self._max_attempts):
                self._check_open()
                state = self._state
                machine = StateMachine(state)
                outcome = machine.apply(command)
                if outcome.error is not None:
                    raise outcome.error
                if not outcome.events:
                    return outcome.value
                try:
                    written, deleted = await self._write(state, machine.state, command)
                except _Stale:
                    await self._catch_up()
                    continue
                await self._sync_after_write(written, deleted)
                track_liveness(self._liveness, command, self._clock)
                return self._result(command, outcome.value)
        raise ConflictError(
            f"{type(command).__name__}: the resources kept changing under this replica "
            f"({self._max_attempts} attempts); retry"
        )

    def _result(self, command: c.Command, value: Any) -> Any:
        """What the call returns: the stored value, as the materialized state has it."""
        state = self._state
        if isinstance(command, c.CreateIndex | c.UpdateIndexSettings):
            return state.indices.get(command.name, value)
        if isinstance(command, c.RegisterNode):
            return state.nodes.get(command.node.id, value)
        if isinstance(command, c.UpdateNodeStatus):
            return state.nodes.get(command.node_id, value)
        if isinstance(command, c.AllocateShard | c.DeallocateShard | c.UpdateShardState):
            index = state.indices.get(command.index)
            if index is not None and command.shard < len(index.routing):
                return index.routing[command.shard]
            return value
        if isinstance(command, c.AcquireLock | c.RenewLock):
            return state.locks.get(command.key, value)
        if isinstance(command, c.UpdateHashRing):
            return state.hash_ring
        if isinstance(command, c.SetClusterConfig):
            return state.config
        return value

    async def _write(
        self, old: ClusterState, new: ClusterState, command: c.Command
    ) -> tuple[dict[str, int], bool]:
        """Write what ``command`` changed from ``old`` to ``new``. Returns the last
        resourceVersion written per kind, and whether something was deleted (a deletion's
        revision is not known)."""
        written: dict[str, int] = {}
        deleted = False

        def wrote(kind: str, rv: int) -> None:
            nonlocal deleted
            if rv > 0:
                written[kind] = max(written.get(kind, 0), rv)
            elif rv == 0:  # a deletion
                deleted = True

        try:
            if old.nodes is not new.nodes:
                for node_id in sorted(set(old.nodes.keys()) | set(new.nodes.keys())):
                    before, after = old.nodes.get(node_id), new.nodes.get(node_id)
                    if before != after:
                        wrote(NODE, await self._write_node(node_id, after))
            if old.indices is not new.indices:
                for name in sorted(set(old.indices.keys()) | set(new.indices.keys())):
                    before_i, after_i = old.indices.get(name), new.indices.get(name)
                    if before_i != after_i:
                        wrote(INDEX, await self._write_index(name, after_i))
            if old.locks is not new.locks:
                end = "expired" if isinstance(command, c.ExpireLocks) else "released"
                for key in sorted(set(old.locks.keys()) | set(new.locks.keys())):
                    before_l, after_l = old.locks.get(key), new.locks.get(key)
                    if before_l != after_l:
                        wrote(
                            LEASE,
                            await self._write_lock_lease(key, before_l, after_l, end, command),
                        )
            if _cluster_spec(old) != _cluster_spec(new):
                wrote(CLUSTER, await self._write_cluster(new))
        except (ConflictError, AlreadyExistsError, NotFoundError) as exc:
            _log.info("%s: %s; deciding again", type(command).__name__, exc)
            raise _Stale from exc
        return written, deleted

    def _custom_args(self, kind: str) -> tuple[str, str, str, str]:
        return (GROUP, VERSION, self._namespace, _PLURALS[kind])

    def _where(self, kind: str, name: str) -> str:
        return f"{_PLURALS[kind]}/{name} in namespace {self._namespace}"

    async def _create(self, kind: str, name: str, spec: Any) -> dict[str, Any]:
        body = {
            "apiVersion": API_VERSION,
            "kind": _KIND_NAMES[kind],
            "metadata": {"name": name, "labels": _labels()},
            "spec": spec,
        }
        beacon = self._informers[kind].get(name, self._namespace) if kind in _PLURALS else None
        if beacon is not None and _is_beacon(beacon):
            # The API server generated a beacon's name; an index or node wants it: give it up.
            _log.info("deleting the progress beacon %s: its name is wanted", name)
            self._beacons.pop(kind, None)
            with contextlib.suppress(NotFoundError):
                await call_json(
                    self._custom.delete_namespaced_custom_object,
                    *self._custom_args(kind),
                    name,
                    verb="delete",
                    resource=self._where(kind, name),
                )
        return await call_json(
            self._custom.create_namespaced_custom_object,
            *self._custom_args(kind),
            body,
            verb="create",
            resource=self._where(kind, name),
        )

    async def _replace_spec(self, kind: str, raw: Object, spec: Any) -> dict[str, Any]:
        name = str(_meta(raw).get("name"))
        body = {
            "apiVersion": API_VERSION,
            "kind": _KIND_NAMES[kind],
            "metadata": {**_meta(raw)},
            "spec": spec,
        }
        body.pop("status", None)
        return await call_json(
            self._custom.replace_namespaced_custom_object,
            *self._custom_args(kind),
            name,
            body,
            verb="update",
            resource=self._where(kind, name),
        )

    async def _patch_status(self, kind: str, raw: Object, status: Mapping[str, Any]) -> int:
        name = str(_meta(raw).get("name"))
        body = {"metadata": {"resourceVersion": _rv(raw)}, "status": status}
        written = await call_json(
            self._custom.patch_namespaced_custom_object_status,
            *self._custom_args(kind),
            name,
            body,
            _content_type=MERGE_PATCH,
            verb="patch",
            resource=self._where(kind, name) + " (status)",
        )
        return int(_rv(written))

    async def _delete(self, kind: str, raw: Object) -> int:
        name = str(_meta(raw).get("name"))
        await call_json(
            self._custom.delete_namespaced_custom_object,
            *self._custom_args(kind),
            name,
            body={"preconditions": {"resourceVersion": _rv(raw)}},
            verb="delete",
            resource=self._where(kind, name),
        )
        # The answer is the object as it was (or a Status): neither carries the revision of
        # the deletion, so the caller reads the current one.
        return 0

    async def _write_node(self, node_id: str, node: Node | None) -> int:
        raw = self._objs[NODE].get(node_id)
        if node is None:
            if raw is None:
                return _NOTHING
            return await self._delete(NODE, raw)
        spec = _node_spec(node)
        if raw is None:
            raw = await self._create(NODE, node_id, spec)
        elif not _visible(raw) or _node_spec(self._node_of(raw)) != spec:
            raw = await self._replace_spec(NODE, raw, spec)
        status = {
            "observedGeneration": _generation(raw),
            "state": node.status.value,
            "registeredVersion": self._state.nodes[node_id].registered_version
            if node_id in self._state.nodes
            else 0,
        }
        return await self._patch_status(NODE, raw, status)

    def _node_of(self, raw: Object) -> Node:
        return msgspec.convert(
            {**_spec(raw), "id": str(_meta(raw).get("name"))}, Node, strict=False
        )

    async def _write_index(self, name: str, index: Index | None) -> int:
        raw = self._objs[INDEX].get(name)
        if index is None:
            if raw is None:
                return _NOTHING
            return await self._delete(INDEX, raw)
        spec = _index_spec(index)
        if raw is None:
            raw = await self._create(INDEX, name, msgspec.to_builtins(spec))
        else:
            current = msgspec.convert(dict(_spec(raw)), IndexSpec, strict=False)
            if current != spec or not _visible(raw):
                raw = await self._replace_spec(INDEX, raw, msgspec.to_builtins(spec))
        status = IndexStatus(
            observed_generation=_generation(raw),
            state=IndexState.ACTIVE,
            health=index_health(index).status,
            routing=index.routing,
        )
        body: dict[str, Any] = msgspec.to_builtins(status)
        body.setdefault("routing", [])
        return await self._patch_status(INDEX, raw, body)

    async def _write_lock_lease(
        self, key: str, before: Lock | None, after: Lock | None, end: str, command: c.Command
    ) -> int:
        name = lock_lease_name(key)
        raw = self._objs[LEASE].get(name)
        record = LeaseRecord.from_object(raw) if raw is not None else None
        stamp = float(getattr(command, "time", self._clock()))
        now = format_micro_time(_utcnow())
        if after is None:
            if record is None:
                return _NOTHING
            spec = {k: v for k, v in record.spec.items() if k != "holderIdentity"}
            spec["renewTime"] = now
            info = {"end": end, "writer": self._identity, "at": stamp}
        else:
            acquired = before is None or before.token != after.token
            transitions = (record.transitions if record is not None else 0) + (1 if acquired else 0)
            spec = {
                "holderIdentity": after.holder,
                "leaseDurationSeconds": max(1, math.ceil(after.ttl)),
                "leaseTransitions": transitions,
                "renewTime": now,
                "acquireTime": now
                if acquired or record is None
                else record.spec.get("acquireTime", now),
            }
            info = {
                "ttl": after.ttl,
                "at": stamp,
                "acquired": stamp if acquired or before is None else before.acquired_at,
                "writer": self._identity,
            }
        annotations = {KEY_ANNOTATION: key, LOCK_ANNOTATION: json.dumps(info)}
        labels = {**_labels(), LEASE_TYPE_LABEL: "lock"}
        where = f"leases/{name} in namespace {self._namespace}"
        if raw is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "labels": labels, "annotations": annotations},
                "spec": spec,
            }
            written = await call_json(
                self._coordination.create_namespaced_lease,
                self._namespace,
                body,
                verb="create",
                resource=where,
            )
        else:
            meta = dict(_meta(raw))
            meta["annotations"] = {**(meta.get("annotations") or {}), **annotations}
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": meta,
                "spec": spec,
            }
            written = await call_json(
                self._coordination.replace_namespaced_lease,
                name,
                self._namespace,
                body,
                verb="update",
                resource=where,
            )
        return int(_rv(written))

    async def _write_cluster(self, new: ClusterState) -> int:
        raw = self._objs[CLUSTER].get(self._k8s.cluster_name)
        spec = _cluster_spec(new)
        if raw is None:
            written = await self._create(CLUSTER, self._k8s.cluster_name, spec)
        else:
            written = await self._replace_spec(CLUSTER, raw, spec)
        return int(_rv(written))

    async def _create_cluster(self) -> None:
        with contextlib.suppress(AlreadyExistsError):
            await self._create(CLUSTER, self._k8s.cluster_name, _cluster_spec(ClusterState()))

    # --- nodes' heart-beats and the leader's duties -----------------------------------------

    async def heartbeat(self, node_id: str) -> None:
        """Renew the node's Lease; a DOWN node comes back ACTIVE (the only write to state)."""
        self._check_open()
        check_name("node", node_id)
        node = self._state.nodes.get(node_id)
        if node is None:
            raise NotFoundError(f"node {node_id!r} is not registered; register it first")
        self._liveness.beat(node_id, self._clock())
        assert self._leases is not None
        await self._leases.heartbeat(node_id, self._state.config.node_timeout)
        if node.status is NodeStatus.DOWN:
            await self._run(
                c.UpdateNodeStatus(node_id=node_id, status=NodeStatus.ACTIVE, time=self._stamp())
            )

    ADOPT_AFTER = 2.0
    """Seconds an Index made by hand stays in flight before the leader adopts it."""

    def _started_leading(self, term: Term) -> None:
        _log.info("leading (term %d): node-down detection and lock reaping", term.term)
        self._liveness.reset(self._clock())

    async def run_maintenance(self) -> None:
        """The leader's duties, now: mark silent nodes DOWN (their shards re-placed), reap
        expired locks. A standby does nothing."""
        self._check_open()
        if self._elector is None or not self._elector.is_leader:
            return
        now = self._clock()
        down = self._liveness.expired(self._state, now)
        if down:
            await self._run(c.MarkNodesDown(node_ids=tuple(down), time=now))
        if any(lock.expires_at <= now for lock in self._state.locks.values()):
            await self._run(c.ExpireLocks(time=now))
        await self._adopt_indices()

    async def _adopt_indices(self) -> None:
        """Route Index resources made by hand (``kubectl apply``): an Index whose status does
        not describe its generation, unchanged for :attr:`ADOPT_AFTER` seconds (so that a
        replica's own create, between its two writes, is not taken over), is created or
        updated through the state machine; one it refuses gets ``state: invalid`` and a
        ``Valid=False`` condition saying why."""
        now = time.monotonic()
        seen = self._in_flight
        for name, raw in list(self._objs[INDEX].items()):
            if _visible(raw) or _meta(raw).get("deletionTimestamp"):
                seen.pop(name, None)
                continue
            first = seen.setdefault(name, (_rv(raw), now))
            if first[0] != _rv(raw):
                seen[name] = (_rv(raw), now)
                continue
            if now - first[1] < self.ADOPT_AFTER:
                continue
            seen.pop(name, None)
            try:
                spec = msgspec.convert(dict(_spec(raw)), IndexSpec, strict=False)
                settings = coerce_settings(spec.settings)  # type: ignore[attr-defined]
                command: c.Command
                if name in self._state.indices:
                    command = c.UpdateIndexSettings(
                        name=name, settings=settings, time=self._stamp()
                    )
                else:
                    command = c.CreateIndex(
                        name=name,
                        settings=settings,
                        mappings=dict(spec.mappings),  # type: ignore[attr-defined]
                        time=self._stamp(),
                    )
                await self._run(command)
                _log.info("adopted the Index %s made by hand", name)
            except (InvalidRequestError, msgspec.ValidationError, ValueError, TypeError) as exc:
                _log.warning("the Index %s made by hand is invalid: %s", name, exc)
                with contextlib.suppress(ControlPlaneError):
                    await self._mark_invalid(raw, str(exc))

    async def _mark_invalid(self, raw: Object, message: str) -> None:
        generation = _generation(raw)
        condition = {
            "type": "Valid",
            "status": "False",
            "observedGeneration": generation,
            "lastTransitionTime": _utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
            "reason": "Invalid",
            "message": message[:32000],
        }
        status = {"observedGeneration": generation, "state": "invalid", "conditions": [condition]}
        await self._patch_status(INDEX, raw, status)

    async def _maintenance_loop(self, term: Term) -> None:
        while True:
            interval = self._interval
            if interval is None:
                interval = min(0.5, self._state.config.node_timeout / 4)
            await asyncio.sleep(interval)
            try:
                await self.run_maintenance()
            except ControlPlaneError as exc:
                _log.warning("leader duties failed (term %d): %s", term.term, exc)


def _shard_events(
    rv: int, name: str, old: tuple[ShardRouting, ...], new: tuple[ShardRouting, ...]
) -> list[ClusterEvent]:
    """Events for what changed in a routing table (as the state machine names them)."""
    events: list[ClusterEvent] = []
    for shard in new:
        before = old[shard.shard] if shard.shard < len(old) else None
        if before is not None and before == shard:
            continue
        old_copies = {c.node_id: c for c in (before.copies if before else ()) if c.node_id}
        new_nodes = {c.node_id for c in shard.copies if c.node_id}
        for gone in old_copies.values():
            if gone.node_id not in new_nodes:
                events.append(_shard(rv, EventKind.SHARD_UNASSIGNED, name, shard.shard, gone))
        for copy in shard.copies:
            if copy.node_id is None:
                continue
            was = old_copies.get(copy.node_id)
            if was is None:
                events.append(_shard(rv, EventKind.SHARD_ALLOCATED, name, shard.shard, copy))
            elif copy.primary and not was.primary:
                events.append(_shard(rv, EventKind.SHARD_PROMOTED, name, shard.shard, copy))
            elif copy.relocating_to is not None and was.relocating_to is None:
                events.append(_shard(rv, EventKind.SHARD_RELOCATED, name, shard.shard, copy))
            elif copy != was:  # started, or a relocation completed
                events.append(_shard(rv, EventKind.SHARD_STARTED, name, shard.shard, copy))
    return events


def _shard(rv: int, kind: EventKind, name: str, shard: int, copy: Any) -> ClusterEvent:
    return ClusterEvent(version=rv, kind=kind, key=name, shard=shard, copy=copy)


def _skip_env_lookups(api: Any) -> None:
    """Stop kubernetes_asyncio's session from looking up ``~/.netrc`` and the proxy environment
    on every request when neither applies.

    Its aiohttp session has ``trust_env=True``, so each request reads the netrc file and the
    proxy variables in worker threads: two thread hops per request, about 40 % of this
    process's CPU per ``create_index`` (measured: 8.6 -> 4.7 ms/op), and latency on a busy
    machine. The lookups are turned off only when they cannot change anything: no netrc file
    and no proxy in the environment for the API server (behaviour otherwise unchanged)."""
    rest = getattr(api, "rest_client", None)
    session = getattr(rest, "pool_manager", None)
    if (
        not isinstance(session, aiohttp.ClientSession)
        or getattr(session, "_trust_env", None) is not True
    ):
        return
    try:
        aiohttp.helpers.get_env_proxy_for_url(URL(str(api.configuration.host)))
        return  # a proxy applies: keep aiohttp's handling of it
    except LookupError:
        pass
    except ValueError:
        return
    if aiohttp.helpers.netrc_from_env() is not None:
        return
    session._trust_env = False


def _beacon_spec(kind: str) -> Any:
    """A valid spec for a custom resource that is a progress beacon (never read)."""
    if kind == INDEX:
        return msgspec.to_builtins(IndexSpec(settings=IndexSettings(), mappings={}))
    if kind == NODE:
        return _node_spec(Node(id="progress-beacon"))
    return _cluster_spec(ClusterState())


def _labels() -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "controlplane",
        "app.kubernetes.io/part-of": "controlplane",
        "app.kubernetes.io/managed-by": "controlplane",
    }


def _utcnow() -> Any:
    import datetime  # noqa: PLC0415

    return datetime.datetime.now(datetime.UTC)


async def _load_configuration(settings: K8sConfig) -> Any:
    """Credentials: in-cluster inside a pod (unless a kubeconfig is configured), else the
    kubeconfig (``k8s.kubeconfig``, ``$KUBECONFIG`` or ``~/.kube/config``)."""
    from kubernetes_asyncio import config as kube_config  # noqa: PLC0415

    configuration = k8s_client.Configuration()
    in_cluster = settings.kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    try:
        if in_cluster:
            kube_config.load_incluster_config(client_configuration=configuration)
        else:
            await kube_config.load_kube_config(
                config_file=settings.kubeconfig,
                context=settings.context,
                client_configuration=configuration,
            )
    except (kube_config.ConfigException, OSError) as exc:
        where = (
            "the pod's in-cluster credentials"
            if in_cluster
            else f"the kubeconfig {settings.kubeconfig or '$KUBECONFIG or ~/.kube/config'}"
        )
        raise InvalidConfigError(
            f"k8s.kubeconfig: cannot load {where}: {exc}. Set k8s.kubeconfig (and k8s.context) "
            "to a kubeconfig of the cluster, or run inside a pod with a service account"
        ) from None
    return configuration
