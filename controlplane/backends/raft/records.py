"""Records shared by the Raft core, storage and transport: log entries, hard state, snapshots.

These are the durable and wire-level shapes. They are frozen ``msgspec`` structs encoded as
msgpack arrays (``array_like=True``): fields are only ever appended, with defaults.
"""

from __future__ import annotations

import enum

import msgspec


class EntryType(enum.IntEnum):
    """What a log entry carries."""

    NORMAL = 0
    """Application data (an encoded state-machine command); empty data is a leader's no-op."""
    CONF_CHANGE = 1
    """A membership change: ``data`` is an encoded :class:`ConfState` (the new configuration)."""


class Entry(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One Raft log entry."""

    index: int
    term: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


class HardState(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """State that must be durable before any message that depends on it is sent."""

    term: int = 0
    vote: str | None = None
    commit: int = 0


class ConfState(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """A cluster membership configuration: voting members and non-voting learners.

    ``addresses`` pairs member ids with the ``host:port`` of their peer listener, sorted by
    id, so that every member learns how to reach the others from the log or a snapshot. It
    may lack members (a cluster bootstrapped without a peer list records none).
    """

    voters: tuple[str, ...] = ()
    learners: tuple[str, ...] = ()
    addresses: tuple[tuple[str, str], ...] = ()

    def address_of(self, member: str) -> str | None:
        """The recorded peer address of ``member``, if any."""
        for member_id, address in self.addresses:
            if member_id == member:
                return address
        return None


class SnapshotMeta(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """What a snapshot covers: every entry up to and including ``index``."""

    index: int = 0
    term: int = 0
    conf: ConfState = ConfState()
