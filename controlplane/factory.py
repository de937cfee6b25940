"""One factory from a configuration to a started :class:`~controlplane.protocol.ControlPlane`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import Config, load_config, override_config, resolve_mode
from .errors import NotAvailableYetError

if TYPE_CHECKING:
    from .protocol import ControlPlane

__all__ = ["open_control_plane"]

_WHY_AUTO = {
    "k8s": "this process runs inside a Kubernetes pod",
    "raft": "this process does not run inside a Kubernetes pod",
}


async def open_control_plane(
    config: Config | None = None,
    *,
    clock: Callable[[], float] | None = None,
    **overrides: Any,
) -> ControlPlane:
    """Build the backend ``config`` asks for, start it and return it.

    Without ``config``, the configuration is read with :func:`~controlplane.config.load_config`
    (the file named by ``CONTROLPLANE_CONFIG``, then the environment). ``overrides`` are
    applied on top, keyed by field path (``mode="memory"``, ``raft__node_id="cp-2"``).
    Stop the result with ``await cp.stop()``, or use it as ``async with``. ``clock`` replaces
    the wall clock the backend stamps its commands with (tests; default ``time.time``).

    Raises :class:`~controlplane.errors.InvalidConfigError` for a bad configuration and
    :class:`~controlplane.errors.NotAvailableYetError` for a mode this version lacks.
    """
    if config is None:
        config = load_config(overrides=overrides)
    else:
        config = override_config(config, overrides)
    mode = resolve_mode(config)
    cp: ControlPlane
    if mode == "memory":
        from .backends.memory import MemoryControlPlane  # noqa: PLC0415 (imported on demand)

        cp = MemoryControlPlane(config, clock=clock)
    elif mode == "raft":
        from .backends.raft.backend import RaftControlPlane  # noqa: PLC0415

        cp = RaftControlPlane(config, clock=clock)
    else:
        chosen = f"mode {mode!r}"
        if config.mode == "auto":
            chosen = f"mode 'auto' chose {mode!r} ({_WHY_AUTO[mode]}), and {mode!r}"
        raise NotAvailableYetError(
            f"{chosen} is not available in this version of controlplane; use mode: raft "
            "(a single member needs only a data directory) or mode: memory for tests"
        )
    try:
        await cp.start()
    except BaseException:
        await cp.stop()  # release whatever a partial start took
        raise
    return cp
