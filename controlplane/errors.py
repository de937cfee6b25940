"""The one exception hierarchy of controlplane, grouped by what the caller can do about it.

Every error a backend raises derives from :class:`ControlPlaneError`. Foreign exceptions (from
sockets, files, the Kubernetes client) are translated where they cross into the library. Each
class has a stable ``code`` so that an error can cross the wire (the Raft service, replicated
command results) and be rebuilt as the same class on the other side.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AlreadyExistsError",
    "ClosedError",
    "CompactedError",
    "ConflictError",
    "ControlPlaneError",
    "CorruptionError",
    "InvalidConfigError",
    "InvalidRequestError",
    "LaggedError",
    "LockHeldError",
    "LockLostError",
    "LockNotHeldError",
    "NotFoundError",
    "NotLeaderError",
    "OperationTimeoutError",
    "PermissionDeniedError",
    "StorageError",
    "UnavailableError",
    "WatchError",
    "error_from_code",
]


class ControlPlaneError(Exception):
    """Base of every error raised by controlplane."""

    code: ClassVar[str] = "internal"

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self.args[0]) if self.args else self.__class__.__name__


# --- the request itself is wrong: fix it, do not retry -------------------------------------


class InvalidRequestError(ControlPlaneError, ValueError):
    """Raised when a request is malformed: a bad name, bad settings, an out-of-range value."""

    code = "invalid_request"


class InvalidConfigError(InvalidRequestError):
    """Raised at start-up when the configuration is invalid; the message names the field."""

    code = "invalid_config"


class PermissionDeniedError(ControlPlaneError):
    """Raised when the caller's credentials do not allow the operation."""

    code = "permission_denied"


# --- the request conflicts with the current state: re-read, then decide ----------------------


class NotFoundError(ControlPlaneError, LookupError):
    """Raised when the named node, index, shard copy or lock does not exist."""

    code = "not_found"


class AlreadyExistsError(ControlPlaneError):
    """Raised when creating something whose name is already taken."""

    code = "already_exists"


class ConflictError(ControlPlaneError):
    """Raised when a precondition failed (expected version, shard copy state, ...)."""

    code = "conflict"


class LockHeldError(ConflictError):
    """Raised when acquiring a lock that another holder holds and that has not expired."""

    code = "lock_held"


class LockNotHeldError(ConflictError):
    """Raised when renewing or releasing a lock the caller does not hold (any more)."""

    code = "lock_not_held"


class LockLostError(ConflictError):
    """Raised by ``ControlPlane.lock()`` when the lock was lost while its block ran."""

    code = "lock_lost"


# --- the system cannot answer right now: retry later ------------------------------------------


class UnavailableError(ControlPlaneError):
    """Raised when the control plane cannot serve: no quorum, API server unreachable."""

    code = "unavailable"


class NotLeaderError(UnavailableError):
    """Raised inside the Raft backend when a member that is not the leader gets a write.

    Clients retry against ``leader_id`` transparently; users rarely see it.
    """

    code = "not_leader"

    def __init__(
        self, message: str = "this member is not the leader", leader_id: str | None = None
    ):
        super().__init__(message)
        self.leader_id = leader_id


class OperationTimeoutError(UnavailableError, TimeoutError):
    """Raised when an operation did not complete in time; it may or may not have taken effect."""

    code = "timeout"


class ClosedError(ControlPlaneError):
    """Raised when the backend (or the watch) was stopped by the caller and is used again."""

    code = "closed"


# --- watches --------------------------------------------------------------------------------


class WatchError(ControlPlaneError):
    """Base of errors that end a watch; re-read the state and watch from its version."""

    code = "watch"


class CompactedError(WatchError):
    """Raised when ``watch(since=v)`` asks for history older than what is retained.

    The equivalent of etcd's "required revision has been compacted" and Kubernetes' 410 Gone.
    """

    code = "compacted"

    def __init__(self, message: str, since: int = 0, oldest: int = 0):
        super().__init__(message)
        self.since = since
        self.oldest = oldest


class LaggedError(WatchError):
    """Raised when a watcher fell too far behind the live stream.

    ``resume_version`` is the version of the last event it received: ``watch(since=...)`` from
    it resumes without loss while that version is still retained.
    """

    code = "lagged"

    def __init__(self, message: str, resume_version: int = 0):
        super().__init__(message)
        self.resume_version = resume_version


# --- the member's storage failed: it stops ----------------------------------------------------


class StorageError(ControlPlaneError):
    """Raised when durable storage failed (a failed fsync): the member must stop."""

    code = "storage"


class CorruptionError(StorageError):
    """Raised at start-up when stored data is corrupt; the message names the file and offset."""

    code = "corruption"


def _all_subclasses(cls: type[ControlPlaneError]) -> list[type[ControlPlaneError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[str, type[ControlPlaneError]] = {
    c.code: c for c in _all_subclasses(ControlPlaneError)
}


def error_from_code(code: str, message: str) -> ControlPlaneError:
    """Rebuild an error from its wire ``code`` and message (unknown codes give the base class)."""
    cls = _BY_CODE.get(code, ControlPlaneError)
    return cls(message)
