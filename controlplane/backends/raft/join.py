"""Joining a running cluster through its leader (``raft.join``, ``serve --join``).

A member whose configuration does not include it yet connects as a client to the members at
``raft.join`` and asks their leader to add it as a non-voting learner, with its advertised
peer address (recorded in the replicated configuration, so every member can reach it). The
leader then replicates the log (or a snapshot) to it; once the configuration that adds it
has reached it and the leader counts it caught up, it asks to be promoted to voter, retrying
with backoff while the leader answers "not caught up" or "busy". The whole procedure is
bounded by ``raft.join_timeout``.

It is idempotent, so a member that crashed while joining just starts again: a voter does
nothing, a learner only asks for its promotion, and an "already a member" answer to the
addition counts as done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ...config import RaftConfig
from ...errors import (
    ClosedError,
    InvalidConfigError,
    InvalidRequestError,
    UnavailableError,
)
from .client import RaftClient, connect
from .node import RaftNode

__all__ = ["JoinError", "join_cluster"]

_log = logging.getLogger("controlplane.raft.join")

_BACKOFF_INITIAL = 0.05
_BACKOFF_MAX = 1.0
_POLL = 0.05


class JoinError(UnavailableError):
    """A member did not become a voter of the cluster it was told to join in time."""


async def join_cluster(node: RaftNode, raft: RaftConfig) -> None:
    """Make the started ``node`` a voter of the cluster at ``raft.join`` (see the module).

    Returns at once if it already is one. Raises :class:`JoinError` when that does not
    happen within ``raft.join_timeout`` seconds, ``PermissionDeniedError`` when the members
    refuse the connection (cluster id, TLS).
    """
    if node.id in node.conf.voters:
        _log.info("member %s is a voter of the cluster: not joining", node.id)
        return
    address = node.advertise_address
    if address is None:
        raise InvalidConfigError(
            f"raft.advertise_address: is required to join: member {node.id} listens on a "
            "wildcard address, which the other members cannot dial"
        )
    joiner = _Joiner(node, raft, address)
    await joiner.run()


class _Joiner:
    def __init__(self, node: RaftNode, raft: RaftConfig, address: str) -> None:
        self.node = node
        self.raft = raft
        self.address = address
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + raft.join_timeout
        self.last_error = "none"

    async def run(self) -> None:
        node, raft = self.node, self.raft
        _log.info(
            "member %s: joining the cluster through %s, reachable at %s",
            node.id,
            ", ".join(raft.join),
            self.address,
        )
        client = await self._connect()
        try:
            if node.id not in node.conf.learners:
                await self._retry(
                    lambda: client.member_add(node.id, self.address), done_if_invalid=True
                )
                await self._until(lambda: self._in_conf(learner=True), "to receive its addition")
            _log.info("member %s: added as a learner; catching up", node.id)
            await self._retry(lambda: client.member_promote(node.id), done_if_invalid=True)
            await self._until(lambda: self._in_conf(learner=False), "to become a voter")
        finally:
            await client.stop()
        _log.info("member %s: joined the cluster as a voter", node.id)

    async def _connect(self) -> RaftClient:
        raft = self.raft
        try:
            return await connect(
                list(raft.join),
                cluster_id=raft.cluster_id,
                tls=raft.tls,
                request_timeout=min(10.0, raft.join_timeout),
                start_timeout=self._remaining(),
                max_frame_bytes=raft.max_frame_bytes,
            )
        except UnavailableError as exc:
            self.last_error = exc.message
            raise self._failure("to reach a member") from None

    def _in_conf(self, *, learner: bool) -> bool:
        conf = self.node.conf
        return self.node.id in conf.voters or (learner and self.node.id in conf.learners)

    async def _retry(self, call: Callable[[], Awaitable[None]], *, done_if_invalid: bool) -> None:
        """Call until it succeeds, backing off while the leader is busy or unknown. An
        invalid request means the change was made already (by an earlier attempt, or before
        a crash); if it was not, the wait for the configuration that follows times out."""
        delay = _BACKOFF_INITIAL
        while True:
            try:
                await call()
                return
            except InvalidRequestError as exc:
                if done_if_invalid and not isinstance(exc, InvalidConfigError):
                    self.last_error = exc.message
                    return
                raise
            except ClosedError:
                raise
            except UnavailableError as exc:  # not caught up, busy, no leader, lost connection
                self.last_error = exc.message
                _log.debug("member %s: joining: %s; retrying", self.node.id, exc.message)
            if self._remaining() <= delay:
                raise self._failure("to become a voter")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _until(self, condition: Callable[[], bool], what: str) -> None:
        while not condition():
            if self.node.failure is not None:
                raise UnavailableError(
                    f"member {self.node.id} stopped while joining: {self.node.failure}"
                )
            if self._remaining() <= 0:
                raise self._failure(what)
            await asyncio.sleep(_POLL)

    def _remaining(self) -> float:
        return self.deadline - self.loop.time()

    def _failure(self, what: str) -> JoinError:
        node, raft = self.node, self.raft
        return JoinError(
            f"member {node.id} waited {raft.join_timeout} s (raft.join_timeout) {what} while "
            f"joining through {', '.join(raft.join)}; last answer: {self.last_error}. Check "
            f"that those are client addresses of running members with a quorum up, that the "
            f"members can reach this member's peer address {self.address} (else set "
            f"raft.advertise_address), and that no other member has the id {node.id!r}; "
            f"raise raft.join_timeout if a large state takes longer to copy. Starting again "
            f"resumes the join."
        )
