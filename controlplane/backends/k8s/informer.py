"""Informers: a local cache of one kind of Kubernetes object, kept current by list + watch.

An :class:`Informer` lists the objects (a consistent, paginated read), then watches from the
list's ``resourceVersion`` with ``allowWatchBookmarks=true``, a jittered server-side
``timeoutSeconds`` and a client-side timeout a little longer than that, and starts the next
watch from the last ``resourceVersion`` it saw (an event's or a bookmark's) when a watch ends.

* **410 Gone** -- as the HTTP status of a list or watch, or as an ``ERROR`` event whose
  ``Status`` has ``code: 410`` inside a running watch -- means the history the informer needs
  is gone: it lists again and emits exactly the differences between its cache and the new
  list (``ADDED`` for new keys, ``MODIFIED`` for keys whose ``resourceVersion`` changed,
  ``DELETED`` for keys that are gone), so a consumer sees neither a loss nor a duplicate
  across reconnects. Changes that happened and were undone while the informer was away (an
  object created and deleted) are not seen: the consumer sees the state, not every write.
* **Other errors** (connection refused or reset, 429 -- for instance "storage is
  (re)initializing" right after a CRD is installed or the API server restarted --, 5xx,
  timeouts, a malformed line) -- exponential backoff with jitter, then a new watch from the
  last ``resourceVersion`` (or a new list, if none succeeded yet). Permission errors (403)
  and a missing resource (404) are retried the same way, and logged: RBAC or a CRD may be
  fixed while the process runs.
* The watch is read as raw JSON lines (not through ``kubernetes_asyncio.watch.Watch``, which
  silently reconnects or retries a 410 once with the same resourceVersion when no
  ``timeout_seconds`` is given, and deserializes objects into models). Objects are the plain
  JSON dicts the API server sent, for custom resources and built-in kinds alike; list items
  get the ``kind``/``apiVersion`` the API server leaves out of them.

Changes reach consumers in ``resourceVersion`` order, after the cache was updated, through
synchronous handlers (:meth:`Informer.add_handler`) and through any number of
:meth:`Informer.subscribe` queues. :attr:`Informer.synced` is set after the first complete list.
The informer runs as one asyncio task; :meth:`Informer.close` cancels it and waits for it, and
every streaming response is closed. The ``ApiClient`` (its aiohttp session) belongs to the
caller, who closes it after the informer.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, NamedTuple, Self

import aiohttp
from kubernetes_asyncio import client

from controlplane.errors import (
    ClosedError,
    CompactedError,
    ControlPlaneError,
    UnavailableError,
)

from .errors import call_json, check_response, error_for_status, translate

__all__ = [
    "Backoff",
    "Change",
    "ChangeType",
    "Informer",
    "ListWatch",
    "ObjectKey",
    "Subscription",
    "object_key",
    "resource_version_of",
]

logger = logging.getLogger("controlplane.k8s.informer")

Object = Mapping[str, Any]
"""A Kubernetes object as the API server's JSON (treat it as read-only)."""


class ObjectKey(NamedTuple):
    """``(namespace, name)``; the namespace is ``""`` for cluster-scoped objects."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


def object_key(obj: Object) -> ObjectKey:
    """The key of an object (``ValueError`` without ``metadata.name``)."""
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError("object without metadata.name")
    namespace = metadata.get("namespace") if isinstance(metadata, Mapping) else None
    return ObjectKey(namespace if isinstance(namespace, str) else "", name)


def resource_version_of(obj: Object) -> int:
    """``metadata.resourceVersion`` as an integer (``ValueError`` when absent or not one).

    Resource versions are opaque strings by contract, but integers (etcd revisions) in every
    API server; the control plane's versions are these integers.
    """
    metadata = obj.get("metadata")
    value = metadata.get("resourceVersion") if isinstance(metadata, Mapping) else None
    if not isinstance(value, str):
        raise ValueError(f"no metadata.resourceVersion in {str(obj)[:200]}")
    return int(value)


class ChangeType(enum.StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True, slots=True)
class Change:
    """One change of the cache: ``old`` is ``None`` for ``ADDED``, ``new`` for ``DELETED``.

    ``resource_version`` is the object's (for a deletion seen by a watch, the deletion's);
    for a deletion found by a re-list, the list's. ``relist`` is true for changes derived
    from a (re-)list rather than from a watch event.
    """

    type: ChangeType
    key: ObjectKey
    old: Object | None
    new: Object | None
    resource_version: int
    relist: bool = False

    @property
    def object(self) -> Object:
        """The new object, or for a deletion the last one known."""
        obj = self.new if self.new is not None else self.old
        assert obj is not None
        return obj


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt ``n`` (from 0) waits a random time in
    ``[d/2, d]`` with ``d = min(maximum, initial * factor**n)``."""

    initial: float = 0.2
    maximum: float = 10.0
    factor: float = 2.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return ceiling * (0.5 + 0.5 * (rng or random).random())


@dataclass(frozen=True)
class ListWatch:
    """What an informer lists and watches: a generated ``list_*`` method of
    ``kubernetes_asyncio`` with its leading arguments bound (the same method watches with
    ``watch=True``), plus selectors and a description for messages."""

    function: Callable[..., Awaitable[Any]]
    resource: str
    """For messages and logs: ``leases.coordination.k8s.io in namespace ns``."""
    api_version: str
    kind: str
    label_selector: str | None = None
    field_selector: str | None = None

    @classmethod
    def custom_objects(
        cls,
        api_client: Any,
        group: str,
        version: str,
        plural: str,
        kind: str,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> ListWatch:
        """Custom resources ``plural.group/version`` (in ``namespace``, or all namespaces)."""
        api = client.CustomObjectsApi(api_client)
        if namespace is None:
            function = functools.partial(api.list_cluster_custom_object, group, version, plural)
            where = "in all namespaces"
        else:
            function = functools.partial(
                api.list_namespaced_custom_object, group, version, namespace, plural
            )
            where = f"in namespace {namespace}"
        return cls(
            function=function,
            resource=f"{plural}.{group} {where}",
            api_version=f"{group}/{version}",
            kind=kind,
            label_selector=label_selector,
        )

    @classmethod
    def leases(
        cls, api_client: Any, namespace: str, *, label_selector: str | None = None
    ) -> ListWatch:
        """``coordination.k8s.io/v1`` Leases in ``namespace``."""
        api = client.CoordinationV1Api(api_client)
        return cls(
            function=functools.partial(api.list_namespaced_lease, namespace),
            resource=f"leases.coordination.k8s.io in namespace {namespace}",
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            label_selector=label_selector,
        )

    def selectors(self) -> dict[str, str]:
        out = {}
        if self.label_selector:
            out["label_selector"] = self.label_selector
        if self.field_selector:
            out["field_selector"] = self.field_selector
        return out


class Subscription:
    """An async iterator of :class:`Change`\\ s from one informer (unbounded queue: the
    informer never waits for a consumer; the backend bounds what it keeps downstream).
    Ends when the informer or the subscription is closed."""

    _END: Any = object()

    def __init__(self, informer: Informer) -> None:
        self._informer = informer
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = False

    def _put(self, change: Change) -> None:
        if not self.closed:
            self._queue.put_nowait(change)

    def _end(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(self._END)

    def pending(self) -> int:
        """Changes queued and not yet taken."""
        return self._queue.qsize()

    def close(self) -> None:
        self._informer._subscriptions.discard(self)
        self._end()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Change:
        item = await self._queue.get()
        if item is self._END:
            self._queue.put_nowait(item)  # stays ended
            raise StopAsyncIteration
        assert isinstance(item, Change)
        return item

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class InformerStats:
    """Counters, for operations and tests."""

    lists: int = 0
    watches: int = 0
    gone: int = 0
    """410 answers (as a status or an ERROR event) that caused a re-list."""
    errors: int = 0
    bookmarks: int = 0
    events: int = 0
    last_error: ControlPlaneError | None = field(default=None, repr=False)


class _Gone(Exception):
    """Internal: the watch answered 410; list again."""


class Informer:
    """List + watch one kind of object into a local cache; see the module's documentation.

    ``async with Informer(ListWatch.leases(api, ns)) as informer:`` starts it (it does not wait
    for the first list: ``await informer.wait_synced()``) and closes it at the end.
    """

    def __init__(
        self,
        source: ListWatch,
        *,
        watch_timeout: float = 300.0,
        read_timeout_margin: float = 30.0,
        connect_timeout: float = 10.0,
        request_timeout: float = 60.0,
        page_size: int = 500,
        backoff: Backoff = Backoff(),
        rng: random.Random | None = None,
    ) -> None:
        self.source = source
        self.watch_timeout = watch_timeout
        """Base of the server-side ``timeoutSeconds``; each watch picks one in ``[t, 2t)``."""
        self.read_timeout_margin = read_timeout_margin
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.page_size = page_size
        self.backoff = backoff
        self._rng = rng or random.Random()
        self._cache: dict[ObjectKey, Object] = {}
        self._resource_version = 0
        self._handlers: list[Callable[[Change], object]] = []
        self._progress_handlers: list[Callable[[], object]] = []
        self._subscriptions: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.synced = asyncio.Event()
        """Set once the first list is complete (and stays set)."""
        self.stats = InformerStats()

    # reading ------------------------------------------------------------------------------

    @property
    def has_synced(self) -> bool:
        """Whether the first complete list is in the cache (:attr:`synced` is the event)."""
        return self.synced.is_set()

    @property
    def resource_version(self) -> int:
        """The last resourceVersion seen (of a list, an event or a bookmark), once every change
        up to it was delivered: while the changes of a (re-)list are being delivered it stays
        at the previous value, so it is never past a change still to be delivered."""
        return self._resource_version

    @property
    def cache(self) -> Mapping[ObjectKey, Object]:
        """A read-only view of the cache (it changes as the informer runs)."""
        return MappingProxyType(self._cache)

    def get(self, name: str, namespace: str = "") -> Object | None:
        return self._cache.get(ObjectKey(namespace, name))

    def __len__(self) -> int:
        return len(self._cache)

    def __iter__(self) -> Iterator[Object]:
        return iter(list(self._cache.values()))

    async def wait_synced(self, within: float | None = None) -> None:
        """Wait for the first complete list; :class:`UnavailableError` (with the last error)
        when it did not come ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                await self.synced.wait()
        except TimeoutError:
            last = self.stats.last_error
            raise UnavailableError(
                f"informer of {self.source.resource} not synced within {within} s"
                + (f"; last error: {last}" if last else "")
            ) from None

    # consumers ------------------------------------------------------------------------------

    def add_handler(self, handler: Callable[[Change], object]) -> Callable[[], None]:
        """Call ``handler(change)`` for every change, in order, right after the cache took it
        (an exception in it is logged and ignored). Returns a function that removes it."""
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler) if handler in self._handlers else None

    def add_progress_handler(self, handler: Callable[[], object]) -> Callable[[], None]:
        """Call ``handler()`` after :attr:`resource_version` advanced (a list delivered, an
        event, a bookmark); an exception in it is logged and ignored. Returns a function that
        removes it."""
        self._progress_handlers.append(handler)
        return lambda: (
            self._progress_handlers.remove(handler) if handler in self._progress_handlers else None
        )

    def subscribe(self, *, replay: bool = False) -> Subscription:
        """A new :class:`Subscription`; with ``replay`` it starts with an ``ADDED`` change for
        every object in the cache (atomically: nothing is missed or doubled in between)."""
        if self._closed:
            raise ClosedError(f"informer of {self.source.resource} is closed")
        subscription = Subscription(self)
        if replay:
            for key, obj in sorted(self._cache.items(), key=lambda kv: _rv_or_zero(kv[1])):
                subscription._put(
                    Change(ChangeType.ADDED, key, None, obj, _rv_or_zero(obj), relist=True)
                )
        self._subscriptions.add(subscription)
        return subscription

    # lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._closed:
            raise ClosedError(f"informer of {self.source.resource} is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"informer {self.source.resource}")

    async def close(self) -> None:
        """Stop watching (the task is cancelled and awaited) and end every subscription."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for subscription in list(self._subscriptions):
            subscription._end()
        self._subscriptions.clear()

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

    # the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        need_list = True
        failures = 0
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                    failures = 0
                if await self._watch():
                    failures = 0
                    continue  # the watch ended (its timeoutSeconds): the next one, at once
                # ended before delivering anything (a server shutting down): back off
            except _Gone:
                self.stats.gone += 1
                need_list = True
                if failures == 0:  # the first 410 re-lists at once; repeated ones back off
                    failures = 1
                    continue
            except CompactedError as exc:  # a 410 answered to a list's continue token
                self.stats.gone += 1
                self.stats.last_error = exc
                need_list = True
            except ControlPlaneError as exc:
                self.stats.errors += 1
                self.stats.last_error = exc
                log = logger.info if isinstance(exc, UnavailableError) else logger.warning
                log("informer of %s: %s", self.source.resource, exc)
            delay = self.backoff.delay(failures, self._rng)
            failures += 1
            await asyncio.sleep(delay)

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=seconds, connect=self.connect_timeout, sock_connect=self.connect_timeout
        )

    async def _list(self) -> None:
        """A consistent list (no resourceVersion: the latest, read from etcd), page by page;
        then the cache becomes the list and the differences are emitted."""
        self.stats.lists += 1
        items: dict[ObjectKey, Object] = {}
        token: str | None = None
        list_version = 0
        while True:
            params: dict[str, Any] = {"limit": self.page_size, **self.source.selectors()}
            if token:
                params["_continue"] = token
            body = await call_json(
                self.source.function,
                verb="list",
                resource=self.source.resource,
                _request_timeout=self._timeout(self.request_timeout),
                **params,
            )
            metadata = body.get("metadata") or {}
            if not token:
                try:
                    list_version = int(str(metadata.get("resourceVersion")))
                except (TypeError, ValueError):
                    raise UnavailableError(
                        f"list of {self.source.resource} has no integer resourceVersion"
                    ) from None
            for item in body.get("items") or ():
                if not isinstance(item, dict):
                    continue
                obj = {"apiVersion": self.source.api_version, "kind": self.source.kind, **item}
                try:
                    key = object_key(obj)
                    resource_version_of(obj)
                except ValueError as exc:
                    logger.warning("informer of %s: skipped %s", self.source.resource, exc)
                    continue
                items[key] = obj
            token = metadata.get("continue") or None
            if not token:
                break
        self._replace(items, list_version)
        self.synced.set()

    def _replace(self, items: dict[ObjectKey, Object], list_version: int) -> None:
        changes: list[Change] = []
        old_cache = self._cache
        for key, obj in items.items():
            before = old_cache.get(key)
            version = resource_version_of(obj)
            if before is None:
                changes.append(Change(ChangeType.ADDED, key, None, obj, version, relist=True))
            elif resource_version_of(before) != version:
                changes.append(Change(ChangeType.MODIFIED, key, before, obj, version, relist=True))
        for key, before in old_cache.items():
            if key not in items:
                changes.append(
                    Change(ChangeType.DELETED, key, before, None, list_version, relist=True)
                )
        changes.sort(key=lambda c: c.resource_version)
        self._cache = dict(items)
        # Deliver first, then advance: a consumer that orders several informers' changes by
        # resourceVersion (the backend's merger) reads resource_version while these are
        # delivered, and must not take it for a promise that no change below it is to come.
        for change in changes:
            self._emit(change)
        self._resource_version = max(self._resource_version, list_version)
        self._progressed()

    async def _watch(self) -> bool:
        """One watch from the last resourceVersion until the server ends it; true when it
        delivered at least one event or bookmark. Raises :class:`_Gone` on 410."""
        self.stats.watches += 1
        timeout = int(self.watch_timeout * (1.0 + self._rng.random()))
        resource = self.source.resource
        delivered = False
        try:
            response = await self.source.function(
                watch=True,
                resource_version=str(self._resource_version),
                allow_watch_bookmarks=True,
                timeout_seconds=max(1, timeout),
                _preload_content=False,
                _request_timeout=self._timeout(timeout + self.read_timeout_margin),
                **self.source.selectors(),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc, verb="watch", resource=resource) from exc
        try:
            try:
                await check_response(response, verb="watch", resource=resource)
            except CompactedError:
                raise _Gone from None
            while True:
                try:
                    line = await response.content.readline()
                except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                    return delivered  # the stream broke or went silent: watch again
                except ValueError as exc:  # a line beyond the read buffer
                    raise UnavailableError(f"watch of {resource}: {exc}") from exc
                if not line:
                    return delivered  # the server ended the watch (timeoutSeconds)
                if not line.strip():
                    continue
                self._handle_line(line)
                delivered = True
        finally:
            response.close()

    def _handle_line(self, line: bytes) -> None:
        resource = self.source.resource
        try:
            event = json.loads(line)
            kind = event["type"]
            obj = event["object"]
            if not isinstance(kind, str) or not isinstance(obj, dict):
                raise TypeError("type/object of the wrong type")
        except (ValueError, KeyError, TypeError) as exc:
            raise UnavailableError(
                f"watch of {resource}: malformed event ({exc}): {line[:200]!r}"
            ) from None
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                logger.info("watch of %s: 410 Gone (%s); re-list", resource, obj.get("message"))
                raise _Gone
            raise error_for_status(
                code if isinstance(code, int) else 500, obj, verb="watch", resource=resource
            )
        try:
            version = resource_version_of(obj)
        except ValueError as exc:
            raise UnavailableError(f"watch of {resource}: {exc}") from None
        if kind == "BOOKMARK":
            self.stats.bookmarks += 1
            if version > self._resource_version:
                self._resource_version = version
                self._progressed()
            return
        try:
            key = object_key(obj)
        except ValueError as exc:
            raise UnavailableError(f"watch of {resource}: {exc}") from None
        self.stats.events += 1
        if version <= self._resource_version:
            logger.debug("watch of %s: %s %s at %d already seen", resource, kind, key, version)
            return
        self._resource_version = version  # one change, delivered next: nothing below it waits
        before = self._cache.get(key)
        if kind in ("ADDED", "MODIFIED"):
            self._cache[key] = obj
            change_type = ChangeType.ADDED if before is None else ChangeType.MODIFIED
            self._emit(Change(change_type, key, before, obj, version))
        elif kind == "DELETED":
            if before is not None:  # else nothing to delete: never listed nor watched
                del self._cache[key]
                self._emit(Change(ChangeType.DELETED, key, before, None, version))
        else:
            logger.warning("watch of %s: unknown event type %r ignored", resource, kind)
        self._progressed()

    def _progressed(self) -> None:
        for handler in list(self._progress_handlers):
            try:
                handler()
            except Exception:
                logger.exception("informer of %s: progress handler failed", self.source.resource)

    def _emit(self, change: Change) -> None:
        for handler in list(self._handlers):
            try:
                handler(change)
            except Exception:
                logger.exception("informer of %s: handler failed", self.source.resource)
        for subscription in list(self._subscriptions):
            subscription._put(change)

    # iteration helper ---------------------------------------------------------------------

    async def changes(self, *, replay: bool = False) -> AsyncIterator[Change]:
        """Iterate over changes (a :meth:`subscribe` that closes itself)."""
        with contextlib.closing(self.subscribe(replay=replay)) as subscription:
            async for change in subscription:
                yield change


def _rv_or_zero(obj: Object) -> int:
    try:
        return resource_version_of(obj)
    except ValueError:
        return 0
