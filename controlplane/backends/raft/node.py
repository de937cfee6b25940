"""The node driver: runs a :class:`RaftCore` with real storage, transport and time.

One asyncio task (the loop) owns the core: it feeds ticks, received messages, proposals and
reads into it, and carries out each :class:`Ready` in the order the core's contract demands:
send a leader's early messages (Appends, Heartbeats: the leader's fsync then overlaps with the
followers'), persist (in the storage thread, so a slow disk never delays heart-beats), send
the rest, apply, answer reads, and acknowledge the persist (``core.advance``). Inputs that
arrive while a Ready is being persisted queue up and go into the next one, which is how
entries are group-committed: many proposals, one fsync.

A member that is not the leader forwards proposals to the leader; the leader answers with the
index and term the entry got, and the follower waits until its own state machine applies that
index: apply is deterministic, so its result there is the result.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import random
import ssl
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from ...config import parse_address
from ...errors import (
    ClosedError,
    ControlPlaneError,
    InvalidRequestError,
    NotLeaderError,
    OperationTimeoutError,
    StorageError,
    UnavailableError,
)
from ...metrics import NodeMetrics, timed
from . import batching, framing
from .core import (
    Busy,
    ConfChangeType,
    CoreConfig,
    InvalidRequest,
    LeadershipTransferInProgress,
    NotLeader,
    RaftCore,
    RaftError,
    Ready,
    Role,
)
from .messages import Append, AppendResponse, Heartbeat, InstallSnapshot, Message
from .records import ConfState, Entry, EntryType, SnapshotMeta
from .snapshots import SnapshotReader
from .storage import DiskStorage
from .storage_thread import StorageThread, save_traced
from .transport import PeerTransport, TransportOptions

__all__ = ["Fsm", "MessageFilter", "NodeOptions", "PeerMessage", "RaftNode"]

_log = logging.getLogger("controlplane.raft.node")


class Fsm(Protocol):
    """The replicated state machine a :class:`RaftNode` drives (the application)."""

    def apply(self, index: int, data: bytes) -> Any:
        """Apply one proposal's data; return the result for the proposer. Must not raise.

        Proposals the leader had waiting together share one entry (and ``index``); they are
        applied one by one, in order. Data starting with byte 0xC1 (never used by msgpack)
        is reserved for such batches.
        """

    def snapshot(self) -> Callable[[], bytes]:
        """Capture the current state now; the returned function serializes it (in a thread)."""

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's data."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeOptions:
    """Timing and thresholds of a node. Times are in seconds."""

    heartbeat_interval: float = 0.1
    """One tick of the core; the leader heart-beats every tick."""
    election_timeout: float = 1.0
    """Followers campaign after a random time in [election_timeout, 2 * election_timeout)."""
    campaign_on_leader_loss: bool = True
    """A follower whose connection to the leader is lost campaigns within
    ``CoreConfig.leader_loss_ticks`` ticks; False: after the election timeout."""
    snapshot_entries: int = 10_000
    """Take a snapshot after this many entries were applied since the last one (each command
    of a batch entry counts), once their data is also ``snapshot_log_ratio`` times the last
    snapshot's size..."""
    snapshot_bytes: int = 64 << 20
    """...or after this many bytes of entry data."""
    snapshot_log_ratio: float = 1.0
    """Encoding a snapshot costs in proportion to the state: with this, a large state is
    encoded once per that much log, not every ``snapshot_entries`` whatever its size (at
    40,000 indices, ~10 µs of each command's CPU on every member went to snapshots). 0: entry
    count only."""
    request_timeout: float = 10.0
    """Default deadline of a proposal or a linearizable read."""
    snapshot_chunk_bytes: int = 256 << 10
    max_uncommitted_bytes: int = 64 << 20
    pre_vote: bool = True
    check_quorum: bool = True
    lazy_commit_delay: float = 0.002
    """The longest a leader holds a commit index back from a follower that said nothing there
    waits for it (see the ``consumers`` of :class:`RaftNode`): under load the next Append
    carries it sooner; after the last write, this bounds how stale that follower's state is."""

    def core_config(self) -> CoreConfig:
        """The core's configuration in ticks."""
        ticks = max(2, round(self.election_timeout / self.heartbeat_interval))
        config = CoreConfig(
            election_tick=ticks,
            heartbeat_tick=1,
            pre_vote=self.pre_vote,
            check_quorum=self.check_quorum,
            max_uncommitted_entries_size=self.max_uncommitted_bytes,
        )
        if self.campaign_on_leader_loss:
            return config
        return msgspec.structs.replace(config, leader_loss_ticks=0)


# --- driver-level messages, on the same connections as the Raft messages ------------------------


class _DriverMessage(msgspec.Struct, frozen=True, array_like=True, gc=False):
    term: int
    src: str
    dst: str


class ForwardProposal(_DriverMessage, frozen=True, tag=32):
    """A follower asks the leader to propose ``data``."""

    request: int
    data: bytes


class ForwardReply(_DriverMessage, frozen=True, tag=33):
    """The leader's answer: the entry's index and term, or why it was not proposed."""

    request: int
    index: int = 0
    entry_term: int = 0
    error: str = ""
    error_code: str = ""
    leader: str | None = None


class LeaderNotice(_DriverMessage, frozen=True, tag=34):
    """Soft state for the leader (node heart-beats): not replicated.

    A non-zero ``request`` asks the leader to acknowledge it with a ``ForwardReply``.
    """

    payload: bytes
    request: int = 0


class SnapshotChunk(_DriverMessage, frozen=True, tag=35):
    """Part of a snapshot the leader streams to a follower before an ``InstallSnapshot``."""

    meta: SnapshotMeta
    offset: int
    data: bytes
    done: bool = False
    crc: int = 0
    """On the last chunk: CRC-32 of the whole data."""


class LeaderAddress(_DriverMessage, frozen=True, tag=36):
    """The leader's peer address (``host:port``), for a member that may not know it: one
    that joined with no peer list answers the leader only once it knows where to, and it
    learns the addresses from the log only once it can answer."""

    address: str


PeerMessage = (
    Message | ForwardProposal | ForwardReply | LeaderNotice | SnapshotChunk | LeaderAddress
)
MessageFilter = Callable[[PeerMessage], bool]
"""Test seam (:attr:`RaftNode.message_filter`): return False to drop a message."""
_DECODER: msgspec.msgpack.Decoder[PeerMessage] = msgspec.msgpack.Decoder(PeerMessage)


class _Waiter:
    """The proposers of one entry: one future, or one per command of a batch entry."""

    __slots__ = ("futures", "term")

    def __init__(self, term: int, *futures: asyncio.Future[Any]) -> None:
        self.term = term
        self.futures = futures


class RaftNode:
    """One Raft member: core + :class:`DiskStorage` + :class:`PeerTransport` + an :class:`Fsm`.

    ``peers`` maps other members' ids to their ``(host, port)``; it can change at run time
    with :meth:`set_peer`. ``on_role_change(leader_id, is_leader)`` is called on the loop when
    the known leader changes; ``on_notice(payload)`` is called on the leader for each
    :meth:`notify_leader` payload. ``advertise_address`` (``host:port``) is where the other
    members reach this one; by default the listen host and the bound port. ``consumers()``
    says whether anything reads this member's applied entries as they come (watches, clients'
    streams); given it, a follower with no consumer and no request of its own waiting lets
    the leader hold back commit-only Appends (``RaftCore.lazy_commit``) for up to
    ``options.lazy_commit_delay``, so that followers nobody reads from are not woken up once
    per commit: under a stream of writes the next Append carries the commit index.

    Peer addresses follow one rule. Addresses set locally -- ``peers`` and :meth:`set_peer`
    -- always win: they may route traffic through a proxy (the process tests' fault proxies)
    or override a stale address. For every other member the address recorded in the
    configuration in force (``ConfState.addresses``, from the log or a snapshot) is used, and
    updated whenever that configuration changes: at start, when a membership change is
    appended, when a snapshot is installed. No address is ever taken for this member itself,
    and the address of a member that leaves the configuration is kept (a leader replicates
    to a removed member until its removal commits).
    """

    def __init__(
        self,
        member_id: str,
        cluster_id: str,
        storage: DiskStorage,
        fsm: Fsm,
        *,
        options: NodeOptions | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        peers: dict[str, tuple[str, int]] | None = None,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        transport_options: TransportOptions | None = None,
        on_role_change: Callable[[str | None, bool], None] | None = None,
        on_notice: Callable[[bytes], None] | None = None,
        rng: random.Random | None = None,
        advertise_address: str | None = None,
        consumers: Callable[[], bool] | None = None,
    ) -> None:
        self.id = member_id
        self.cluster_id = cluster_id
        self.options = options or NodeOptions()
        self._storage = storage
        self._fsm = fsm
        self._rng = rng or random.Random()
        self._on_role_change = on_role_change
        self._on_notice = on_notice
        self._consumers = consumers
        self._storage_thread = StorageThread(f"raft-{member_id}-storage")
        if advertise_address is not None:
            parse_address(advertise_address)
        self._advertise = advertise_address
        self._pinned = set(peers or ()) - {member_id}
        """Members whose address was set locally: the replicated one never replaces it."""
        self._synced_conf: ConfState | None = None
        self.transport: PeerTransport[PeerMessage] = PeerTransport(
            member_id,
            cluster_id,
            decoder=_DECODER,
            on_message=self._receive,
            on_unreachable=self._peer_unreachable,
            host=host,
            port=port,
            peers=peers,
            accept_from=self._accept_peer,
            server_ssl=server_ssl,
            client_ssl=client_ssl,
            options=transport_options,
        )
        self.core: RaftCore | None = None
        self._inbox: collections.deque[PeerMessage] = collections.deque()
        self._unreachable: set[str] = set()
        """Peers the transport could not reach since the core was last told."""
        self._proposals: collections.deque[tuple[bytes, asyncio.Future[Any]]] = collections.deque()
        self._reads: collections.deque[tuple[bytes, asyncio.Future[int]]] = collections.deque()
        self._wake = asyncio.Event()
        self._ticks = 0
        self._waiters: dict[int, _Waiter] = {}
        self._recent: collections.OrderedDict[int, tuple[int, Any]] = collections.OrderedDict()
        self._forwarded: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self._read_waiters: dict[bytes, asyncio.Future[int]] = {}
        self._applied_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._answered = False
        """The last Ready's apply answered a waiting proposer."""
        self._request_ids = itertools.count(1)
        self._deadlines: list[tuple[float, int, asyncio.Future[Any]]] = []
        """(loop time, seq, future) of the leader's own proposals: one timer for all of them
        (``_expire``) instead of an ``asyncio.timeout`` per proposal."""
        self._deadline_seq = itertools.count()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._commit_timer: asyncio.TimerHandle | None = None
        self._read_ids = itertools.count(1)
        self._incoming: dict[str, tuple[SnapshotMeta, bytearray]] = {}
        self._ready_snapshots: dict[str, tuple[SnapshotMeta, bytes]] = {}
        self._installing: tuple[SnapshotMeta, bytes] | None = None
        """The data of the snapshot the core accepted and will ask to install."""
        self._sending_snapshot: set[str] = set()
        self._snapshot_index = 0
        self._snapshot_running = False
        self._since_snapshot_entries = 0
        self._since_snapshot_bytes = 0
        self._snapshot_size = 0
        """Bytes of the last snapshot taken, installed or loaded."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[None] | None = None
        self._leader: str | None = None
        self._role = Role.FOLLOWER
        self._stopping = False
        self._stopped = False
        self._failure: BaseException | None = None
        self._leader_changed = asyncio.Event()
        self.message_filter: MessageFilter | None = None
        """Test seam for fault injection: when set, every message this member receives and
        every message it sends (Raft and driver messages alike) is passed to it, and dropped
        unless it returns True. Dropping all of them partitions the member (it still runs:
        it ticks, campaigns and serves local reads). Not for production use."""
        self.snapshots_installed = 0
        """How many snapshots streamed from a leader this member installed."""
        self.snapshots_sent = 0
        """How many snapshots this member streamed to a follower to completion."""
        self.metrics = NodeMetrics()
        """Latencies and counts recorded as the member runs (see ``ops_http``)."""

    # --- state -----------------------------------------------------------------------------

    @property
    def leader_id(self) -> str | None:
        """The known leader, or None during an election."""
        return self._leader

    @property
    def is_leader(self) -> bool:
        """Whether this member leads."""
        return self._role is Role.LEADER

    @property
    def role(self) -> str:
        """``leader``, ``follower``, ``candidate``, ... as the core names it."""
        return self._role.value

    @property
    def term(self) -> int:
        """The current term."""
        return self.core.term if self.core else 0

    @property
    def commit_index(self) -> int:
        """The highest index known committed."""
        return self.core.log.committed if self.core else 0

    @property
    def applied_index(self) -> int:
        """The highest index applied to the state machine."""
        return self._applied

    @property
    def conf(self) -> ConfState:
        """The membership configuration in force."""
        return self.core.conf if self.core else ConfState()

    @property
    def advertise_address(self) -> str | None:
        """``host:port`` where the other members reach this one: the configured address, else
        the listen host and the bound port (None before the start, or when the listener is
        bound to a wildcard address, which peers cannot dial)."""
        if self._advertise is not None:
            return self._advertise
        try:
            host, port = self.transport.address
        except ClosedError:
            return None
        if host in ("", "0.0.0.0", "::"):
            return None
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def failure(self) -> BaseException | None:
        """Why the node stopped on its own (a storage failure), if it did."""
        return self._failure

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover from storage, start the transport and the loop."""
        loaded = await self._in_thread(self._storage.load_snapshot)
        applied = 0
        if loaded is not None:
            meta, data = loaded
            self._fsm.restore(data)
            applied = self._snapshot_index = meta.index
            self._snapshot_size = len(data)
        self._applied = applied
        self.core = RaftCore(
            self.id, self._storage, self.options.core_config(), self._rng, applied=applied
        )
        self._sync_peers(self.core.conf)
        await self.transport.start()
        loop = asyncio.get_running_loop()
        self._main = loop.create_task(self._run(), name=f"raft-loop-{self.id}")
        self._spawn(self._ticker(), "ticker")
        if self.core.conf.voters == (self.id,):
            self.core.campaign()  # a lone voter need not wait for an election timeout
            self._wake.set()

    async def stop(self, *, transfer: bool = True) -> None:
        """Stop: hand leadership to a caught-up voter first (``transfer``), then shut down.

        Also releases everything (tasks, sockets, files) of a member that stopped on its own
        after a storage failure. Idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        if (
            transfer
            and not self._stopping
            and self.is_leader
            and self.core is not None
            and len(self.conf.voters) > 1
        ):
            with contextlib.suppress(ControlPlaneError, TimeoutError, RaftError):
                async with asyncio.timeout(self.options.election_timeout * 2):
                    await self._transfer_away()
        self._stopping = True
        self._wake.set()
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.transport.close()
        self._set_soft_state(None, Role.FOLLOWER)
        self._fail_all(ClosedError("the Raft member was stopped"))
        for timer in (self._deadline_timer, self._commit_timer):
            if timer is not None:
                timer.cancel()
        self._deadline_timer = self._commit_timer = None
        self._deadlines.clear()
        await self._in_thread(self._storage.close)
        self._storage_thread.shutdown()

    async def _transfer_away(self) -> None:
        core = self.core
        assert core is not None
        candidates = [v for v in core.conf.voters if v != self.id]
        if not candidates:
            raise InvalidRequestError(f"{self.id} is the only voter: there is no one to lead")
        best = max(candidates, key=lambda v: core.tracker.progress[v].match)
        core.transfer_leadership(best)
        self._wake.set()
        while self.is_leader:
            self._leader_changed.clear()
            await self._leader_changed.wait()

    # --- requests ----------------------------------------------------------------------------

    def start_proposal(self, data: bytes) -> asyncio.Future[Any] | None:
        """On the leader, hand ``data`` to the loop now, with the default deadline, and
        return what :meth:`propose` (``started=``) then awaits: a caller that is not a task
        yet (a request just read) saves the iteration its task needs to start. None when this
        member does not lead or does not run: :meth:`propose` alone then does it all."""
        if self._leader != self.id or self._failure is not None or self._stopping:
            return None
        batching.check_data(data)
        if framing.TRACE is not None:
            framing.TRACE("n.prop")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._proposals.append((data, future))
        self._expire_at(loop, loop.time() + self.options.request_timeout, future)
        self._wake.set()
        return future

    async def propose(
        self,
        data: bytes,
        *,
        within: float | None = None,
        started: asyncio.Future[Any] | None = None,
    ) -> Any:
        """Replicate ``data``; return the state machine's result once it is applied here.

        ``started``: what :meth:`start_proposal` returned for ``data`` (its first attempt).
        Raises ``OperationTimeoutError`` when the deadline passes (the entry may or may not
        have been committed), ``UnavailableError`` when no leader can be found in time.
        """
        if framing.TRACE is not None and started is None:
            framing.TRACE("n.prop")
        batching.check_data(data)
        first = started
        started_at = time.monotonic()
        deadline = time.monotonic() + (within or self.options.request_timeout)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any]
        while True:
            self._check_running()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OperationTimeoutError("the proposal did not complete in time")
            try:
                if first is not None:
                    future, first = first, None
                    result = await future
                elif self._leader == self.id:
                    # The hot path: no timer of its own; _expire fails it at the deadline.
                    future = loop.create_future()
                    self._proposals.append((data, future))
                    self._expire_at(loop, loop.time() + remaining, future)
                    self._wake.set()
                    result = await future
                else:
                    # asyncio.timeout, never wait_for, around the waits of this class: 3.11's
                    # wait_for runs a coroutine in a task of its own, whose exception is lost
                    # (and logged) when a cancellation meets a reply; on a future it may
                    # return the result and swallow the cancellation.
                    async with asyncio.timeout(remaining):
                        result = await self._propose_once(data)
                self.metrics.proposal_seconds.observe(time.monotonic() - started_at)
                if framing.TRACE is not None:
                    framing.TRACE("n.res")
                return result
            except TimeoutError:
                raise OperationTimeoutError(
                    "the proposal did not complete in time; it may or may not have taken effect"
                ) from None
            except _Retry:
                await asyncio.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    def _expire_at(
        self, loop: asyncio.AbstractEventLoop, at: float, future: asyncio.Future[Any]
    ) -> None:
        heap = self._deadlines
        while heap and heap[0][2].done():  # answered ones, mostly in deadline order
            heapq.heappop(heap)
        heapq.heappush(heap, (at, next(self._deadline_seq), future))
        timer = self._deadline_timer
        if timer is None or at < timer.when():
            if timer is not None:
                timer.cancel()
            self._deadline_timer = loop.call_at(at, self._expire)

    def _expire(self) -> None:
        """Fail the proposals whose deadline passed; re-arm the timer for the next one."""
        self._deadline_timer = None
        heap = self._deadlines
        loop = asyncio.get_running_loop()
        now = loop.time()
        while heap and (heap[0][0] <= now or heap[0][2].done()):
            future = heapq.heappop(heap)[2]
            if not future.done():
                future.set_exception(OperationTimeoutError("the proposal did not complete in time"))
        if heap:
            self._deadline_timer = loop.call_at(heap[0][0], self._expire)

    async def _propose_once(self, data: bytes) -> Any:
        loop = asyncio.get_running_loop()
        if self._leader is None:
            await self._wait_for_leader()
        if self._leader == self.id:
            future: asyncio.Future[Any] = loop.create_future()
            self._proposals.append((data, future))
            self._wake.set()
            return await future
        leader = self._leader
        assert leader is not None
        request = next(self._request_ids)
        reply: asyncio.Future[tuple[int, int]] = loop.create_future()
        self._forwarded[request] = reply
        try:
            self._send(leader, ForwardProposal(self.term, self.id, leader, request, data))
            async with asyncio.timeout(self.options.request_timeout):
                index, term = await reply
        except TimeoutError:
            raise _unknown_outcome("the leader did not answer a forwarded proposal") from None
        except _LeaderChanged:
            raise _unknown_outcome("the leader changed before it answered") from None
        finally:
            self._forwarded.pop(request, None)
        return await self._wait_applied(index, term)

    async def _wait_applied(self, index: int, term: int) -> Any:
        recent = self._recent.get(index)
        if recent is not None:
            return _result_for(recent, term)
        if self._failure is not None:  # it failed the waiters before this one came
            raise self._failure_error(self._failure)
        if index <= self._applied:
            raise _unknown_outcome(f"entry {index} was applied before its result was awaited")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[index] = _Waiter(term, future)
        return await future

    async def _wait_for_leader(self) -> None:
        while self._leader is None:
            self._check_running()
            self._leader_changed.clear()
            await self._leader_changed.wait()

    async def read_index(self, *, within: float | None = None) -> int:
        """Wait until this member has applied everything committed before the call (ReadIndex).

        Returns the read index. A read that a leadership change swallowed is retried.
        """
        deadline = time.monotonic() + (within or self.options.request_timeout)
        loop = asyncio.get_running_loop()
        while True:
            self._check_running()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OperationTimeoutError("the linearizable read did not complete in time")
            if self._leader is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._wait_for_leader()
                continue
            ctx = next(self._read_ids).to_bytes(8, "big")
            future: asyncio.Future[int] = loop.create_future()
            self._reads.append((ctx, future))
            self._wake.set()
            try:
                async with asyncio.timeout(min(remaining, self.options.election_timeout)):
                    index = await future
            except TimeoutError:
                continue
            except _Retry:
                await asyncio.sleep(0.01)
                continue
            finally:
                self._read_waiters.pop(ctx, None)
            try:
                # Bounded too: a member cut off right after the leader answered never applies.
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._until_applied(index)
            except TimeoutError:
                raise OperationTimeoutError(
                    f"the linearizable read did not complete in time: this member has not "
                    f"applied up to the read index {index} (applied {self._applied})"
                ) from None
            return index

    async def _until_applied(self, index: int) -> None:
        if self._applied >= index:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._applied_waiters.append((index, future))
        await future

    async def notify_leader(self, payload: bytes, *, within: float | None = None) -> None:
        """Deliver soft state to the leader's ``on_notice``; return once the leader has it.

        Delivery may happen more than once (it is retried when an acknowledgement is lost), so
        the payload must be idempotent, as heart-beats are.
        """
        deadline = time.monotonic() + (within or self.options.request_timeout)
        loop = asyncio.get_running_loop()
        while True:
            self._check_running()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OperationTimeoutError("the leader did not acknowledge in time")
            if self._leader is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._wait_for_leader()
                continue
            leader = self._leader
            if leader == self.id:
                if self._on_notice is not None:
                    self._on_notice(payload)
                return
            request = next(self._request_ids)
            ack: asyncio.Future[tuple[int, int]] = loop.create_future()
            self._forwarded[request] = ack
            try:
                self._send(leader, LeaderNotice(self.term, self.id, leader, payload, request))
                async with asyncio.timeout(min(remaining, self.options.election_timeout)):
                    await ack
                return
            except (TimeoutError, _Retry):
                continue  # lost, or that member no longer leads: look again
            finally:
                self._forwarded.pop(request, None)

    async def change_membership(
        self, change: ConfChangeType, member: str, address: str | None = None
    ) -> None:
        """Add a learner or voter, promote a learner, remove a member (leader only).

        ``address`` (``host:port`` of ``member``'s peer listener) is recorded in the new
        configuration, so that every member, present and future, can reach ``member``.
        """
        core = self._require_core()
        if not self.is_leader:
            raise NotLeaderError(leader_id=self._leader)
        if address:
            parse_address(address)
        try:
            index = core.propose_conf_change(
                change, member, address, own_address=self.advertise_address
            )
        except NotLeader as exc:
            raise NotLeaderError(leader_id=self._leader) from exc
        except Busy as exc:
            raise UnavailableError(str(exc)) from exc
        except InvalidRequest as exc:
            raise InvalidRequestError(str(exc)) from exc
        self._wake.set()
        try:
            async with asyncio.timeout(self.options.request_timeout):
                await self._wait_applied(index, core.term)
        except TimeoutError:
            raise _unknown_outcome("the membership change did not complete in time") from None
        except _Retry:
            raise UnavailableError(
                "the membership change was lost to a leadership change; retry on the new leader"
            ) from None

    async def transfer_leadership(self, to: str | None = None) -> None:
        """Hand leadership to ``to`` (default: the most caught-up voter); wait until it moved."""
        core = self._require_core()
        if not self.is_leader:
            raise NotLeaderError(leader_id=self._leader)
        within = self.options.election_timeout * 2
        try:
            if to is None:
                async with asyncio.timeout(within):
                    await self._transfer_away()
                return
            core.transfer_leadership(to)
            self._wake.set()
            while self._leader == self.id:
                self._leader_changed.clear()
                async with asyncio.timeout(within):
                    await self._leader_changed.wait()
        except InvalidRequest as exc:
            raise InvalidRequestError(str(exc)) from exc
        except NotLeader as exc:
            raise NotLeaderError(leader_id=exc.leader) from exc
        except TimeoutError:
            raise OperationTimeoutError(
                f"leadership did not move within {within} s; {self.id} may still lead"
            ) from None

    def set_peer(self, member_id: str, host: str, port: int) -> None:
        """Set (or change) the address of a member: a local setting, which the addresses in
        the replicated configuration no longer replace (see the class docstring)."""
        self._pinned.add(member_id)
        self.transport.set_peer(member_id, host, port)

    def _sync_peers(self, conf: ConfState) -> None:
        """Take the addresses of ``conf`` (the configuration in force) for the members whose
        address was not set locally."""
        self._synced_conf = conf
        for member, address in conf.addresses:
            if member == self.id or member in self._pinned:
                continue
            try:
                host, port = parse_address(address)
            except ControlPlaneError:
                _log.warning(
                    "member %s: ignoring the invalid address %r of %s", self.id, address, member
                )
                continue
            if self.transport.peers.get(member) != (host, port):
                _log.info("member %s: %s is at %s", self.id, member, address)
                self.transport.set_peer(member, host, port)

    def _accept_peer(self, sender: str) -> bool:
        """Whether to accept a connection from member ``sender`` (after the handshake checked
        the cluster id, and TLS the certificate)."""
        if sender in self.transport.peers:
            return True
        conf = self.conf
        if sender in conf.voters or sender in conf.learners:
            return True
        # A member that is not in its own configuration yet (it is joining) cannot know the
        # others: the leader contacts it first, and the log it sends carries the addresses.
        return self.id not in conf.voters and self.id not in conf.learners

    # --- the loop ----------------------------------------------------------------------------

    async def _ticker(self) -> None:
        interval = self.options.heartbeat_interval
        next_at = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            now = time.monotonic()
            while next_at <= now:
                self._ticks += 1
                next_at += interval
            self._wake.set()

    def _peer_unreachable(self, member_id: str) -> None:
        # The leader then probes that peer (one Append at a time) instead of pipelining
        # Appends into a connection that is down, as etcd's ReportUnreachable.
        self._unreachable.add(member_id)
        self._wake.set()

    def _receive(self, msg: PeerMessage) -> None:
        if self.message_filter is not None and not self.message_filter(msg):
            return
        if framing.TRACE is not None:
            _trace_receive(msg)
        self._inbox.append(msg)
        self._wake.set()

    def _send(self, to: str, msg: PeerMessage) -> None:
        if self.message_filter is not None and not self.message_filter(msg):
            return
        self.transport.send(to, msg)

    async def _run(self) -> None:
        core = self._require_core()
        try:
            while not self._stopping:
                await self._wake.wait()
                self._wake.clear()
                if framing.TRACE is not None:
                    framing.TRACE("n.wake")
                self._feed(core)
                while core.has_ready():
                    rd = core.ready()
                    await self._handle_ready(core, rd)
                    core.advance(rd)
                    if framing.TRACE is not None:
                        framing.TRACE("n.adv")
                    # Here, not after the loop: a steady stream of writes keeps it going.
                    self._maybe_snapshot(core)
                    self._feed(core)
                if self._commit_timer is None and core.holds_commit():
                    self._arm_commit_timer(core)
        except Exception as exc:  # storage failed, or a bug: never carry on as if it had not
            self._fail_stop(exc)
        if self._failure is not None:
            # Fail-stop: drop the connections, so that peers see this member as down at once
            # (and nothing queues up for it); stop() releases the rest. Shielded: a stop()
            # that cancels this task waits for the same close to finish.
            await asyncio.shield(self.transport.close())

    def _arm_commit_timer(self, core: RaftCore) -> None:
        self._commit_timer = asyncio.get_running_loop().call_later(
            self.options.lazy_commit_delay, self._broadcast_commit, core.log.committed
        )

    def _broadcast_commit(self, index: int) -> None:
        self._commit_timer = None
        core = self.core
        if core is None:
            return
        if core.holds_commit(index):
            core.broadcast_commit()
            self._wake.set()
        elif core.holds_commit():  # an Append carried ``index``; a newer one waits its turn
            self._arm_commit_timer(core)

    def _fail_stop(self, exc: BaseException) -> None:
        if self._failure is None:
            if isinstance(exc, StorageError):
                _log.critical("member %s stops: %s", self.id, exc)
            else:
                _log.critical("member %s stops on an unexpected error", self.id, exc_info=exc)
            self._failure = exc
        self._stopping = True
        self._wake.set()
        self._set_soft_state(None, Role.FOLLOWER)  # it leads no more, whatever the core says
        self._fail_all(self._failure_error(exc))

    def _failure_error(self, exc: BaseException) -> ControlPlaneError:
        """What the requests a failure ends are told."""
        if isinstance(exc, ControlPlaneError):
            return exc
        return UnavailableError(f"the Raft member {self.id} stopped after an error: {exc!r}")

    def _feed(self, core: RaftCore) -> None:
        for _ in range(self._ticks):
            core.tick()
        self._ticks = 0
        if self._consumers is not None:
            core.lazy_commit = not (
                self._waiters
                or self._forwarded
                or self._read_waiters
                or self._applied_waiters
                or self._consumers()
            )
        if self._unreachable:
            for member_id in self._unreachable:
                core.report_unreachable(member_id)
            self._unreachable.clear()
        inbox = self._inbox
        while inbox:
            msg = inbox.popleft()
            try:
                self._dispatch(core, msg)
            except StorageError:
                raise
            except Exception:  # a bad message must not kill the member
                _log.exception("member %s: error handling %s", self.id, type(msg).__name__)
        proposals = self._proposals
        while (taken := batching.take(proposals)) is not None:
            data, futures = taken
            try:
                index = core.propose(data)
            except (NotLeader, LeadershipTransferInProgress):  # nothing happened: retry
                for f in futures:
                    f.set_exception(_Retry())
            except Busy as exc:
                for f in futures:
                    f.set_exception(UnavailableError(str(exc)))
            else:
                self._waiters[index] = _Waiter(core.term, *futures)
                if framing.TRACE is not None:
                    framing.TRACE("n.idx", index)
        reads = self._reads
        while reads:
            ctx, rfuture = reads.popleft()
            if rfuture.done():
                continue
            try:
                core.read_index(ctx)
            except NotLeader:
                rfuture.set_exception(_Retry())
            else:
                self._read_waiters[ctx] = rfuture

    def _dispatch(self, core: RaftCore, msg: PeerMessage) -> None:
        if isinstance(msg, ForwardProposal):
            self._handle_forward(core, msg)
        elif isinstance(msg, ForwardReply):
            future = self._forwarded.get(msg.request)
            if future is not None and not future.done():
                if msg.error:
                    future.set_exception(_Retry())
                else:
                    future.set_result((msg.index, msg.entry_term))
        elif isinstance(msg, LeaderNotice):
            if not self.is_leader:
                if msg.request:
                    self._send(
                        msg.src,
                        ForwardReply(core.term, self.id, msg.src, msg.request, error="not leader"),
                    )
            else:
                if self._on_notice is not None:
                    self._on_notice(msg.payload)
                if msg.request:
                    self._send(msg.src, ForwardReply(core.term, self.id, msg.src, msg.request))
        elif isinstance(msg, SnapshotChunk):
            self._receive_chunk(msg)
        elif isinstance(msg, LeaderAddress):
            # Only where nothing else says: the configuration's address replaces it later.
            if msg.src not in self._pinned and msg.src not in self.transport.peers:
                with contextlib.suppress(ControlPlaneError):
                    host, port = parse_address(msg.address)
                    _log.info("member %s: leader %s is at %s", self.id, msg.src, msg.address)
                    self.transport.set_peer(msg.src, host, port)
        elif isinstance(msg, InstallSnapshot):
            ready = self._ready_snapshots.get(msg.src)
            if ready is not None and ready[0] == msg.meta:
                core.step(msg)
                if core.log.snapshot == msg.meta:
                    # Accepted: keep its data with it, out of the reach of a newer stream
                    # from the same leader that may complete before the core asks for it.
                    self._installing = self._ready_snapshots.pop(msg.src)
            else:
                _log.warning(
                    "member %s: InstallSnapshot from %s without its data", self.id, msg.src
                )
        else:
            core.step(msg)

    def _handle_forward(self, core: RaftCore, msg: ForwardProposal) -> None:
        try:
            index = core.propose(msg.data)
        except (NotLeader, Busy) as exc:
            reply = ForwardReply(
                core.term,
                self.id,
                msg.src,
                msg.request,
                error=str(exc) or "not leader",
                leader=core.lead,
            )
        else:
            reply = ForwardReply(core.term, self.id, msg.src, msg.request, index, core.term)
        self._send(msg.src, reply)

    async def _handle_ready(self, core: RaftCore, rd: Ready) -> None:
        if core.conf is not self._synced_conf:  # before sending: a new member needs its address
            self._sync_peers(core.conf)
        if rd.soft_state is not None:
            self._set_soft_state(rd.soft_state.lead, rd.soft_state.role)
        # A settled leader's Appends and Heartbeats go out before its own fsync, which then
        # overlaps with the followers' (the core counts this member's log only after advance).
        trace = framing.TRACE
        last = rd.entries[-1].index if rd.entries else 0
        if trace is not None and last:
            trace("n.rd", last)
        persist = bool(rd.entries or rd.must_sync)
        # Committed entries are durable here already (the core's contract), so they need not
        # wait for this Ready's own write. A leader applies them while its storage thread
        # writes: that answers its proposers. A follower applies them after its answer has
        # gone out: applying first would hold the GIL its storage thread needs to start the
        # write, and the leader waits for that answer.
        apply_early = (
            rd.snapshot is None
            and bool(rd.committed_entries)
            and (not persist or core.role is Role.LEADER)
        )
        if apply_early and not persist:
            # Nothing to make durable (the leader learnt of a commit): apply first, and let
            # the proposers this answered reply before the messages (the commit's broadcast)
            # are sent.
            await self._apply_committed(rd)
        for msg in rd.early_messages:
            self._send(msg.dst, msg)
        if trace is not None and last and rd.early_messages:
            trace("n.early", last)
        if rd.snapshot is not None:
            await self._install_snapshot(rd.snapshot)
        if persist:
            saving = self._save(rd, trace is not None and last > 0)
            if apply_early:  # while the storage thread writes (and fsyncs) the new entries
                await self._apply_committed(rd)
            took = await saving
            if trace is not None and last:
                took, t0, t1 = took
                trace("n.p1", last)
                trace("n.t0", f"{last} {t0}")
                trace("n.t1", f"{last} {t1}")
            self.metrics.fsync_seconds.observe(took)
        for msg in rd.messages:
            if isinstance(msg, InstallSnapshot):
                self._start_snapshot_send(core, msg)
            else:
                self._send(msg.dst, msg)
        if trace is not None and last and rd.messages:
            trace("n.sent", last)
        if core.role is Role.LEADER:
            self._introduce(core, [*rd.early_messages, *rd.messages])
        if rd.committed_entries and not apply_early:
            await self._apply_committed(rd)
        for read in rd.read_states:
            future = self._read_waiters.pop(read.ctx, None)
            if future is not None and not future.done():
                future.set_result(read.index)

    async def _apply_committed(self, rd: Ready) -> None:
        if framing.TRACE is not None:
            framing.TRACE("n.apply", rd.committed_entries[-1].index)
        self._apply(rd.committed_entries)
        if self._answered:
            # One loop iteration for the proposers answered here (their replies go out now),
            # before this member works out anything else.
            self._answered = False
            await asyncio.sleep(0)

    def _save(self, rd: Ready, traced: bool) -> asyncio.Future[Any]:
        """Persist ``rd``'s entries and hard state in the storage thread; the future gets the
        seconds it took (with ``traced``: and the thread's start and end, in ns)."""
        fn = save_traced if traced else timed
        return self._storage_thread.run(fn, self._storage.save, rd.hard_state, rd.entries)

    def _introduce(self, core: RaftCore, messages: list[Message]) -> None:
        """Tell the members this leader heart-beats, that never answered it and that were
        not configured locally (they joined) where it listens: they may not know."""
        address = self.advertise_address
        if address is None:
            return
        told: set[str] = set()
        for msg in messages:
            dst = msg.dst
            if not isinstance(msg, Heartbeat) or dst in told or dst in self._pinned:
                continue
            pr = core.tracker.progress.get(dst)
            if pr is not None and pr.match == 0:
                told.add(dst)
                self._send(dst, LeaderAddress(core.term, self.id, dst, address))

    def _set_soft_state(self, leader: str | None, role: Role) -> None:
        changed = leader != self._leader or role is not self._role
        if leader is not None and leader != self._leader:
            self.metrics.leader_changes.inc()
        if leader != self._leader and self._forwarded:
            # The member requests were forwarded to no longer leads. If it is alive it still
            # answers (refused, or the index it gave the entry); if it crashed it never will:
            # give it one election timeout, then fail them rather than wait for their deadline.
            pending = [f for f in self._forwarded.values() if not f.done()]
            asyncio.get_running_loop().call_later(
                self.options.election_timeout, _fail_pending, pending
            )
        self._leader = leader
        self._role = role
        if changed:
            self._leader_changed.set()
            if self._on_role_change is not None:
                self._on_role_change(leader, role is Role.LEADER)

    def _apply(self, entries: list[Entry]) -> None:
        fsm = self._fsm
        waiters = self._waiters
        recent = self._recent
        size = 0
        count = len(entries)  # each command of a batch counts, as in its own entry
        for entry in entries:
            result: Any = None
            results: list[Any] | None = None
            data = entry.data
            if entry.type is EntryType.NORMAL and data:
                commands = batching.decode(data)
                if commands is None:
                    result = fsm.apply(entry.index, data)
                else:
                    results = [fsm.apply(entry.index, command) for command in commands]
                    count += len(commands) - 1
                size += len(data)
            recent[entry.index] = (entry.term, result)
            waiter = waiters.pop(entry.index, None)
            if waiter is None:
                continue
            self._answered = True
            if waiter.term != entry.term:  # another leader's entry took the index
                for future in waiter.futures:
                    if not future.done():
                        future.set_exception(_Retry())
            elif results is None:
                future = waiter.futures[0]
                if not future.done():
                    future.set_result(result)
            else:
                for future, value in zip(waiter.futures, results, strict=True):
                    if not future.done():
                        future.set_result(value)
        while len(recent) > 4096:
            recent.popitem(last=False)
        self._since_snapshot_entries += count
        self._since_snapshot_bytes += size
        self._set_applied(entries[-1].index)

    def _set_applied(self, index: int) -> None:
        """Record that the state machine is at ``index``; wake the reads waiting for it."""
        self._applied = index
        if self._applied_waiters:
            still = []
            for wanted, future in self._applied_waiters:
                if wanted <= index:
                    if not future.done():
                        future.set_result(None)
                else:
                    still.append((wanted, future))
            self._applied_waiters = still

    # --- snapshots ---------------------------------------------------------------------------

    def _maybe_snapshot(self, core: RaftCore) -> None:
        opts = self.options
        since = self._since_snapshot_bytes
        due = (
            self._since_snapshot_entries >= opts.snapshot_entries
            and since >= self._snapshot_size * opts.snapshot_log_ratio
        ) or since >= opts.snapshot_bytes
        if self._snapshot_running or not due:
            return
        index = self._applied
        if index <= self._snapshot_index:
            return
        serialize = self._fsm.snapshot()
        meta = core.compact(index)
        self._since_snapshot_entries = 0
        self._since_snapshot_bytes = 0
        self._snapshot_running = True
        self._spawn(self._save_snapshot(meta, serialize), "snapshot")

    async def _save_snapshot(self, meta: SnapshotMeta, serialize: Callable[[], bytes]) -> None:
        try:
            data = await asyncio.to_thread(serialize)
            if await self._in_thread(self._store_snapshot, meta, data):
                self._snapshot_index = max(self._snapshot_index, meta.index)
                self.metrics.snapshots_taken.inc()
                self.metrics.snapshot_bytes.set(len(data))
                self._snapshot_size = len(data)
                _log.info("member %s: snapshot at %d (%d bytes)", self.id, meta.index, len(data))
            else:
                _log.info(
                    "member %s: snapshot at %d dropped: a newer one from the leader was "
                    "installed while it was being taken",
                    self.id,
                    meta.index,
                )
        except StorageError as exc:
            self._fail_stop(exc)
        except Exception:  # a bug: keep the log (the next threshold tries again)
            _log.exception("member %s: taking a snapshot at %d failed", self.id, meta.index)
        finally:
            self._snapshot_running = False

    def _store_snapshot(self, meta: SnapshotMeta, data: bytes) -> bool:
        # On the storage thread, so that no install_snapshot() can come in between.
        if meta.index <= self._storage.snapshot_meta().index:
            return False
        self._storage.save_snapshot(meta, data)
        self._storage.compact(meta.index)
        return True

    async def _install_snapshot(self, meta: SnapshotMeta) -> None:
        if self._installing is None or self._installing[0] != meta:
            raise StorageError(f"the core asked to install snapshot {meta} that never arrived")
        _, data = self._installing
        self._installing = None
        source = self._leader
        await self._in_thread(self._storage.install_snapshot, meta, data)
        self._fsm.restore(data)
        self._set_applied(meta.index)  # reads waiting for entries inside it are done too
        self._snapshot_index = meta.index
        self.snapshots_installed += 1
        self.metrics.snapshot_bytes.set(len(data))
        self._snapshot_size = len(data)
        _log.info("member %s: installed snapshot at %d from %s", self.id, meta.index, source)
        for index in [i for i in self._waiters if i <= meta.index]:
            for future in self._waiters.pop(index).futures:
                if not future.done():  # it may be inside the snapshot, or overwritten
                    future.set_exception(_unknown_outcome("a snapshot replaced the log"))

    def _start_snapshot_send(self, core: RaftCore, msg: InstallSnapshot) -> None:
        if msg.dst in self._sending_snapshot:
            return
        self._sending_snapshot.add(msg.dst)
        self._spawn(self._send_snapshot(core, msg), f"snapshot-to-{msg.dst}")

    async def _send_snapshot(self, core: RaftCore, msg: InstallSnapshot) -> None:
        ok = False
        try:
            opening = self._storage_thread.run(self._storage.open_snapshot)
            try:
                reader = await asyncio.shield(opening)
            except asyncio.CancelledError:  # the member stops: the thread opens it anyway
                opening.add_done_callback(_close_opened)
                raise
            if reader is None:
                return
            try:
                meta = reader.meta
                data = await asyncio.to_thread(reader.read_data)
            finally:
                reader.close()
            crc = zlib.crc32(data)
            step = self.options.snapshot_chunk_bytes
            offsets = range(0, max(len(data), 1), step)
            for offset in offsets:
                while self.transport.pending(msg.dst) > 8:  # noqa: ASYNC110 - heart-beats first
                    await asyncio.sleep(0.005)
                done = offset + step >= len(data)
                self._send(
                    msg.dst,
                    SnapshotChunk(
                        msg.term,
                        self.id,
                        msg.dst,
                        meta,
                        offset,
                        data[offset : offset + step],
                        done,
                        crc if done else 0,
                    ),
                )
            self._send(msg.dst, InstallSnapshot(msg.term, self.id, msg.dst, meta))
            ok = True
            self.snapshots_sent += 1
        except Exception:
            _log.exception("member %s: sending a snapshot to %s failed", self.id, msg.dst)
        finally:
            self._sending_snapshot.discard(msg.dst)
            core.report_snapshot(msg.dst, success=ok)
            self._wake.set()

    def _receive_chunk(self, msg: SnapshotChunk) -> None:
        if msg.offset == 0:
            self._incoming[msg.src] = (msg.meta, bytearray())
        current = self._incoming.get(msg.src)
        if current is None or current[0] != msg.meta or len(current[1]) != msg.offset:
            self._incoming.pop(msg.src, None)
            return  # a gap: drop it; the leader retries
        current[1].extend(msg.data)
        if msg.done:
            del self._incoming[msg.src]
            data = bytes(current[1])
            if zlib.crc32(data) != msg.crc:
                _log.warning("member %s: snapshot from %s failed its checksum", self.id, msg.src)
                return
            self._ready_snapshots[msg.src] = (msg.meta, data)

    # --- helpers -----------------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._storage_thread.run(fn, *args)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"raft-{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _require_core(self) -> RaftCore:
        if self.core is None:
            raise ClosedError("the Raft member is not started")
        return self.core

    def _check_running(self) -> None:
        if self._failure is not None:
            raise UnavailableError(f"the Raft member stopped after a failure: {self._failure}")
        if self._stopping:
            raise ClosedError("the Raft member was stopped")

    def _fail_all(self, exc: BaseException) -> None:
        pending: list[asyncio.Future[Any]] = [f for w in self._waiters.values() for f in w.futures]
        pending += [f for _, f in self._proposals]
        pending += list(self._forwarded.values()) + list(self._read_waiters.values())
        pending += [f for _, f in self._reads] + [f for _, f in self._applied_waiters]
        for future in pending:
            if not future.done():
                future.set_exception(exc)
        self._waiters.clear()
        self._leader_changed.set()


def _trace_receive(msg: PeerMessage) -> None:
    assert framing.TRACE is not None
    if isinstance(msg, Append) and msg.entries:
        framing.TRACE("n.rAppend", msg.entries[-1].index)
    elif isinstance(msg, AppendResponse):
        framing.TRACE("n.rResp", f"{msg.index} {msg.src}")


class _Retry(Exception):
    """Internal: the attempt certainly did not take effect; it is safe to try again."""


class _LeaderChanged(_Retry):
    """Internal: the member a request was forwarded to stopped leading before it answered."""


def _close_opened(opening: asyncio.Future[SnapshotReader | None]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        reader = opening.result()
        if reader is not None:
            reader.close()


def _fail_pending(futures: list[asyncio.Future[tuple[int, int]]]) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(_LeaderChanged())


def _unknown_outcome(why: str) -> OperationTimeoutError:
    return OperationTimeoutError(f"{why}; the change may or may not have taken effect")


def _result_for(recent: tuple[int, Any], term: int) -> Any:
    entry_term, result = recent
    if entry_term != term:
        raise _Retry
    return result
