"""The operations endpoints of a Raft member: health, readiness, metrics, the state as JSON.

Served over HTTP on a port of their own (``raft.http_host``/``raft.http_port``):

``GET /healthz``
    200 ``ok`` while the member runs and has not failed; 503 and the reason otherwise.
``GET /readyz``
    200 ``ok`` when the member knows a leader and has applied everything up to the commit
    index it last heard of; 503 and the reason otherwise.
``GET /metrics``
    The Prometheus text exposition (format 0.0.4) of the member's metrics.
``GET /v1/state``
    This member's replica of the cluster state as JSON (:func:`~controlplane.codec.state_to_json`);
    with ``?consistent=true``, after a ReadIndex round (linearizable; 503 without a quorum).

The server is deliberately tiny: HTTP/1.1 on asyncio streams, GET and HEAD only, one request
per connection (``Connection: close``), the request head bounded in bytes, header lines and
time. Anything else gets a 4xx: 400 (malformed), 404, 405, 408 (too slow), 431 (head too big).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from ...codec import state_to_json
from ...errors import ControlPlaneError
from ...metrics import CONTENT_TYPE, MetricFamily, Registry
from .coretypes import Role
from .framing import stop_listening

if TYPE_CHECKING:
    from ...types import ClusterState
    from .backend import RaftControlPlane
    from .node import RaftNode

__all__ = [
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "OpsServer",
    "Request",
    "Response",
    "member_registry",
    "parse_request",
]

_log = logging.getLogger("controlplane.raft.ops")

MAX_HEAD_BYTES = 8192
"""Largest request head (request line and headers) accepted; larger ones get 431."""
MAX_HEADERS = 64
"""Most header lines accepted; more get 431."""
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1 << 20
_TEXT = "text/plain; charset=utf-8"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TRUE = frozenset({"", "1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request head."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: tuple[tuple[str, str], ...]
    """``(name in lower case, value)`` in arrival order."""


@dataclass(frozen=True, slots=True)
class Response:
    """A complete response: status, body and the headers that differ per response."""

    status: int
    body: bytes
    content_type: str = _TEXT
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, head_only: bool = False) -> bytes:
        """The response on the wire; ``head_only`` leaves the body out (HEAD)."""
        lines = [
            f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


def _text(status: int, message: str, *headers: tuple[str, str]) -> Response:
    return Response(status, (message + "\n").encode("utf-8"), headers=headers)


def parse_request(head: bytes) -> Request | Response:
    """Parse a request head (up to and including the blank line); a :class:`Response` is the
    error to answer with when it is malformed (400), too big (431) or not HTTP/1.x (505)."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return _text(400, "the request head is not ASCII")
    if not text.endswith("\r\n\r\n"):
        return _text(400, "the request head does not end with an empty line")
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return _text(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        return _text(400, "malformed method")
    match = _VERSION.fullmatch(version)
    if match is None:
        return _text(400, "malformed HTTP version")
    if match[1] != "1":
        return _text(505, "only HTTP/1.x is supported")
    if len(lines) - 1 > MAX_HEADERS:
        return _text(431, f"more than {MAX_HEADERS} header lines")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        # A token right before the colon: this refuses white space there and folded lines.
        if not sep or not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            return _text(400, "malformed header line")
        headers.append((name.lower(), value.strip(" \t")))
    # The origin form (/path?query), or the absolute form that proxies send.
    if not target.startswith("/") and not target.lower().startswith(("http://", "https://")):
        return _text(400, "malformed request target")
    url = urlsplit(target)
    try:
        query = parse_qs(url.query, keep_blank_values=True, max_num_fields=32)
    except ValueError:
        return _text(400, "malformed query string")
    return Request(method, url.path or "/", query, tuple(headers))


# --- metrics ----------------------------------------------------------------------------------


class _NodeMetrics:
    """The histograms and counters the member records, found through the backend at scrape
    time (a backend gets a new node when a failed start is retried)."""

    def __init__(self, backend: RaftControlPlane) -> None:
        self._backend = backend

    def collect(self) -> Iterable[MetricFamily]:
        node = self._backend._node
        if node is None:
            return
        metrics = node.metrics
        yield from metrics.proposal_seconds.collect()
        yield from metrics.fsync_seconds.collect()
        yield from metrics.leader_changes.collect()
        yield from metrics.snapshot_bytes.collect()


def member_registry(backend: RaftControlPlane) -> Registry:
    """The metrics of the member ``backend`` runs, most of them read live at scrape time."""
    registry = Registry()

    def node() -> RaftNode | None:
        return backend._node

    def scalar(read: Callable[[RaftNode], float]) -> Callable[[], float | None]:
        def fn() -> float | None:
            n = node()
            return None if n is None else read(n)

        return fn

    def info() -> list[tuple[Mapping[str, str], float]]:
        n = node()
        return [] if n is None else [({"member": n.id, "cluster": n.cluster_id}, 1.0)]

    def roles() -> list[tuple[Mapping[str, str], float]]:
        n = node()
        if n is None:
            return []
        return [({"role": r.value}, 1.0 if n.role == r.value else 0.0) for r in Role]

    def snapshots() -> list[tuple[Mapping[str, str], float]]:
        n = node()
        if n is None:
            return []
        return [
            ({"kind": "taken"}, n.metrics.snapshots_taken.value),
            ({"kind": "installed"}, n.snapshots_installed),
            ({"kind": "sent"}, n.snapshots_sent),
        ]

    def lag() -> list[tuple[Mapping[str, str], float]]:
        n = node()
        core = None if n is None else n.core
        if n is None or core is None or not n.is_leader:
            return []
        last = core.log.last_index()
        return [
            ({"peer": peer}, max(0, last - progress.match))
            for peer, progress in sorted(core.tracker.progress.items())
            if peer != n.id
        ]

    def transport(field: str) -> Callable[[], list[tuple[Mapping[str, str], float]]]:
        def fn() -> list[tuple[Mapping[str, str], float]]:
            n = node()
            if n is None:
                return []
            peers = n.transport.stats().peers
            return [({"peer": p}, getattr(s, field)) for p, s in sorted(peers.items())]

        return fn

    raft = "controlplane_raft_"
    registry.callback(
        raft + "member_info",
        "This member's id and cluster (always 1).",
        info,
        labelnames=("member", "cluster"),
    )
    registry.callback(raft + "term", "The current Raft term.", scalar(lambda n: n.term))
    registry.callback(
        raft + "role",
        "1 for this member's current Raft role, 0 for the others.",
        roles,
        labelnames=("role",),
    )
    registry.callback(
        raft + "has_leader",
        "1 when this member knows a leader.",
        scalar(lambda n: float(n.leader_id is not None)),
    )
    registry.callback(
        raft + "commit_index",
        "The highest log index this member knows to be committed.",
        scalar(lambda n: n.commit_index),
    )
    registry.callback(
        raft + "applied_index",
        "The highest log index applied to this member's state machine.",
        scalar(lambda n: n.applied_index),
    )
    registry.register(_NodeMetrics(backend))
    registry.callback(
        raft + "snapshots_total",
        "Snapshots taken of this member's state, installed from a leader, sent to followers.",
        snapshots,
        type="counter",
        labelnames=("kind",),
    )
    registry.callback(
        raft + "peer_lag_entries",
        "On the leader: entries a peer is behind (last log index minus the peer's match).",
        lag,
        labelnames=("peer",),
    )
    registry.callback(
        "controlplane_state_version",
        "Version of the cluster state in this member's replica.",
        lambda: backend._fsm.machine.state.version,
    )
    transport_counters = [
        ("sent_frames", "Frames handed to the socket to a peer."),
        ("received_frames", "Frames received from a peer."),
        ("dropped_frames", "Frames to a peer dropped before sending (queue full, closed)."),
        ("sent_bytes", "Bytes handed to the socket to a peer."),
        ("received_bytes", "Bytes received from a peer."),
        ("connection_errors", "Failed connects, refused handshakes and lost connections."),
    ]
    for field, help in transport_counters:
        registry.callback(
            f"controlplane_transport_{field}_total",
            help,
            transport(field),
            type="counter",
            labelnames=("peer",),
        )
    return registry


# --- the server ---------------------------------------------------------------------------------


class OpsServer:
    """The operations HTTP server of one member (see the module docstring).

    ``port`` 0 picks a free port; :attr:`port` tells which once started. Every request is
    bounded: the head must arrive within ``read_timeout`` seconds, the response be taken
    within ``write_timeout``; a ``?consistent=true`` read gives up after
    ``consistent_timeout``. Beyond ``max_connections`` open connections new ones get 503.
    """

    def __init__(
        self,
        backend: RaftControlPlane,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        read_timeout: float = 5.0,
        write_timeout: float = 5.0,
        consistent_timeout: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        self._backend = backend
        self._host = host
        self._port = port
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.consistent_timeout = consistent_timeout
        self.max_connections = max_connections
        self.registry = member_registry(backend)
        """The metrics served at ``/metrics``; more can be registered."""
        self._server: asyncio.Server | None = None
        self._closing = False
        self._connections: set[asyncio.Task[None]] = set()
        self._routes: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/v1/state": self._state,
        }

    @property
    def host(self) -> str:
        """The host (address) it listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The port it listens on (the one picked, once started with port 0)."""
        return self._port

    @property
    def serving(self) -> bool:
        """Whether it is started and not closed."""
        return self._server is not None

    async def start(self) -> None:
        """Listen. Raises ``OSError`` if the address is taken. Does nothing if serving."""
        if self._server is not None:
            return
        self._closing = False
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=MAX_HEAD_BYTES
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and drop the connections in progress. Idempotent."""
        server, self._server = self._server, None
        self._closing = True
        if server is not None:
            await stop_listening(server)
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    # --- connections -------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closing or task is None:  # accepted while closing
            writer.close()
            return
        self._connections.add(task)
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # Cancelled by close(): end quietly (3.11's streams report a cancelled handler
            # task as an unhandled exception).
            task.uncancel()
        finally:
            self._connections.discard(task)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if len(self._connections) > self.max_connections:
                answer: tuple[Response, bool] | None = (_text(503, "too many connections"), False)
            else:
                answer = await self._answer(reader)
            if answer is not None:
                response, head_only = answer
                writer.write(response.encode(head_only=head_only))
                async with asyncio.timeout(self.write_timeout):
                    await writer.drain()
                await self._linger(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away, or does not read
        except Exception:  # never let a request take the server down
            _log.exception("the operations server failed on a request")
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.write_timeout):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Response, bool] | None:
        """The response and whether it is to a HEAD request; None: nothing was asked."""
        try:
            async with asyncio.timeout(self.read_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return _text(408, "the request took too long to arrive"), False
        except asyncio.LimitOverrunError:
            return _text(431, f"the request head is larger than {MAX_HEAD_BYTES} bytes"), False
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                return None  # connected and left (a TCP probe)
            return _text(400, "the connection ended inside the request head"), False
        request = parse_request(head)
        if isinstance(request, Response):
            return request, False
        route = self._routes.get(request.path)
        if route is None:
            return _text(404, f"no such endpoint: {request.path}"), False
        head_only = request.method == "HEAD"
        if request.method != "GET" and not head_only:
            return _text(405, f"{request.method} is not allowed", ("Allow", "GET, HEAD")), False
        try:
            return await route(request), head_only
        except Exception:
            _log.exception("the operations endpoint %s failed", request.path)
            return _text(500, "internal error (see the member's log)"), head_only

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Closing with unread input makes the kernel reset the connection, which may destroy
        # the response before the client reads it: half-close, then drain what is left
        # (bounded) until the client closes its end.
        if writer.can_write_eof():
            writer.write_eof()
        budget = _LINGER_BYTES
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(_LINGER_SECONDS):
                while budget > 0:
                    chunk = await reader.read(min(budget, 65536))
                    if not chunk:
                        break
                    budget -= len(chunk)

    # --- endpoints ---------------------------------------------------------------------------

    def _health_problem(self) -> str | None:
        backend = self._backend
        node = backend._node
        if backend._stopped:
            return "the member is stopped"
        if node is None:
            return "the member is not started"
        if node.failure is not None:
            return f"member {node.id} stopped after a failure: {node.failure}"
        return None

    async def _healthz(self, request: Request) -> Response:
        problem = self._health_problem()
        return _text(503, problem) if problem else _text(200, "ok")

    async def _readyz(self, request: Request) -> Response:
        problem = self._health_problem()
        if problem:
            return _text(503, problem)
        node = self._backend.node
        if node.leader_id is None:
            return _text(503, f"member {node.id} knows no leader (term {node.term})")
        applied, commit = node.applied_index, node.commit_index
        if applied < commit:
            return _text(
                503, f"member {node.id} applied up to {applied}, behind the commit index {commit}"
            )
        return _text(200, "ok")

    async def _metrics(self, request: Request) -> Response:
        return Response(200, self.registry.render().encode("utf-8"), CONTENT_TYPE)

    async def _state(self, request: Request) -> Response:
        values = request.query.get("consistent", ["false"])
        value = values[-1].lower()
        if len(values) > 1 or value not in _TRUE | _FALSE:
            return _text(400, "consistent must be true or false")
        state: ClusterState
        if value in _TRUE:
            problem = self._health_problem()
            if problem:
                return _text(503, problem)
            try:
                async with asyncio.timeout(self.consistent_timeout):
                    state = await self._backend.get_cluster_state(consistent=True)
            except TimeoutError:
                return _text(
                    503,
                    f"no linearizable read within {self.consistent_timeout} s: "
                    f"is a quorum of the members reachable?",
                )
            except ControlPlaneError as exc:
                return _text(503, f"no linearizable read: {exc}")
        else:
            state = self._backend._fsm.machine.state
        return Response(200, state_to_json(state), "application/json")
