"""One factory from a configuration to a started :class:`~controlplane.protocol.ControlPlane`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import Config, load_config, override_config, resolve_mode

if TYPE_CHECKING:
    from .protocol import ControlPlane

__all__ = ["open_control_plane"]

_log = logging.getLogger("controlplane.factory")
_WHY_AUTO_K8S = "this process runs inside a Kubernetes pod, or k8s.kubeconfig is set"


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

    Raises :class:`~controlplane.errors.InvalidConfigError` for a bad configuration, and what
    the backend's start raises (e.g. :class:`~controlplane.errors.UnavailableError` when the
    Kubernetes API server cannot be reached).
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
        from .backends.k8s.backend import K8sControlPlane  # noqa: PLC0415

        if config.mode == "auto":
            _log.info("mode 'auto' chose 'k8s': %s", _WHY_AUTO_K8S)
        cp = K8sControlPlane(config, clock=clock)
    try:
        await cp.start()
    except BaseException:
        await cp.stop()  # release whatever a partial start took
        raise
    return cp
