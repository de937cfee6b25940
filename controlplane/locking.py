"""``async with cp.lock(key, ttl=...)``: hold a lock for a block, renewing it in the background.

Works over any ``ControlPlane``. Renewal happens every ``ttl / 3``; if a renewal fails because
the lock was lost (expired, taken by someone else), the block is cancelled and
:class:`~controlplane.errors.LockLostError` is raised from the ``async with``. Transient
failures (no quorum for a moment) are retried until the lock's own expiry makes it moot.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

from .errors import LockHeldError, LockLostError, LockNotHeldError, UnavailableError
from .types import Lock

if TYPE_CHECKING:
    from .protocol import ControlPlane

__all__ = ["default_holder", "hold_lock"]


def default_holder() -> str:
    """A holder identity unique to this process and call: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def hold_lock(
    cp: ControlPlane,
    key: str,
    *,
    ttl: float,
    holder: str | None = None,
    wait: float | None = None,
) -> AsyncIterator[Lock]:
    """Acquire ``key``, yield the :class:`Lock`, renew it meanwhile, release it on exit.

    ``wait``: seconds to keep retrying while someone else holds the lock (default: fail at once
    with ``LockHeldError``).
    """
    who = holder or default_holder()
    deadline = None if wait is None else time.monotonic() + wait
    delay = min(0.05, ttl / 10)
    while True:
        try:
            lock = await cp.acquire_lock(key, who, ttl)
            break
        except LockHeldError:
            if deadline is None or time.monotonic() >= deadline:
                raise
            await anyio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)

    current = lock
    lost: BaseException | None = None

    async def renew(scope: anyio.CancelScope) -> None:
        nonlocal current, lost
        expires = time.monotonic() + ttl
        while True:
            await anyio.sleep(ttl / 3)
            try:
                current = await cp.renew_lock(key, who, current.token, ttl)
                expires = time.monotonic() + ttl
            except LockNotHeldError as exc:
                lost = exc
                scope.cancel()
                return
            except UnavailableError as exc:
                if time.monotonic() >= expires:
                    lost = exc
                    scope.cancel()
                    return

    async with anyio.create_task_group() as tg:
        tg.start_soon(renew, tg.cancel_scope)
        try:
            yield lock
        finally:
            tg.cancel_scope.cancel()
    if lost is not None:
        raise LockLostError(f"lock {key!r} was lost while its block ran: {lost}") from lost
    with contextlib.suppress(LockNotHeldError):  # it expired right at the end: nothing to do
        await cp.release_lock(key, who, current.token)
