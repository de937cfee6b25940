"""The log as the core sees it: what ``Storage`` holds durably plus what is not yet persisted.

:class:`Storage` is the read-only interface the core needs from the driver's durable log;
:class:`RaftLog` layers the *unstable* part on top (entries, or a snapshot from a leader, that
the core has accepted but the driver has not yet persisted) and tracks the commit and apply
positions. Indices are 1-based; index 0 with term 0 is the empty log's sentinel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from controlplane.backends.raft.records import ConfState, Entry, HardState, SnapshotMeta

__all__ = (
    "ENTRY_OVERHEAD",
    "CompactedError",
    "RaftError",
    "RaftLog",
    "Storage",
    "StorageError",
    "UnavailableError",
    "entry_size",
    "limit_size",
)

ENTRY_OVERHEAD = 16
"""Bytes counted per entry on top of its data when sizing messages and batches."""


def entry_size(entry: Entry) -> int:
    """The size an entry counts for in every byte limit of the core."""
    return len(entry.data) + ENTRY_OVERHEAD


def limit_size(entries: list[Entry], max_bytes: int | None) -> list[Entry]:
    """The longest prefix of ``entries`` within ``max_bytes`` (always at least one entry)."""
    if max_bytes is None or len(entries) <= 1:
        return entries
    total = 0
    for i, entry in enumerate(entries):
        total += len(entry.data) + ENTRY_OVERHEAD
        if total > max_bytes and i > 0:
            return entries[:i]
    return entries


class RaftError(Exception):
    """Root of every exception the Raft core raises."""


class StorageError(RaftError):
    """Raised by a :class:`Storage` when asked for entries it does not hold."""


class CompactedError(StorageError):
    """Raised when the index was compacted into a snapshot (it is before ``first_index()-1``)."""


class UnavailableError(StorageError):
    """Raised when the index is after ``last_index()``."""


class Storage(Protocol):
    """A read-only view of what is durable; the driver writes it, the core only reads it.

    Every value returned must already be durable (synced): the core reads an entry from here
    only after the driver has persisted it and called ``RaftCore.advance``. The log holds the
    entries ``first_index() .. last_index()``; everything before was compacted into the snapshot
    described by ``snapshot_meta()``, whose index is ``first_index() - 1``. A fresh log has
    ``first_index() == 1`` and ``last_index() == 0``.
    """

    def initial_state(self) -> tuple[HardState, ConfState]:
        """The durable hard state, and the configuration as of the snapshot (or bootstrap).

        Later configurations are carried by ``CONF_CHANGE`` entries, which the core reads from
        the log on start-up.
        """
        ...

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries ``[lo, hi)``; with ``max_bytes``, a non-empty prefix within that size
        (:func:`limit_size`). Raises :class:`CompactedError` / :class:`UnavailableError`."""
        ...

    def term(self, index: int) -> int:
        """The term of the entry at ``index``, valid for ``first_index()-1 .. last_index()``
        (the first of those is the snapshot's term). Raises :class:`CompactedError` below and
        :class:`UnavailableError` above that range."""
        ...

    def first_index(self) -> int:
        """The index of the first entry still in the log (the snapshot index plus one)."""
        ...

    def last_index(self) -> int:
        """The index of the last durable entry (the snapshot index when the log is empty)."""
        ...

    def snapshot_meta(self) -> SnapshotMeta:
        """The most recent durable snapshot (index 0 and the bootstrap configuration if none)."""
        ...


class RaftLog:
    """Stable entries (in :class:`Storage`) followed by unstable ones (in memory).

    Invariants: ``applied <= committed``; committed entries are never truncated; entries at or
    after ``offset`` live in ``unstable`` and shadow anything the storage holds at those
    indices (a truncation the driver has not yet persisted).
    """

    __slots__ = (
        "applied",
        "committed",
        "in_progress",
        "offset",
        "persisted",
        "snapshot",
        "snapshot_in_progress",
        "storage",
        "unstable",
    )

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        last = storage.last_index()
        self.snapshot: SnapshotMeta | None = None
        """A snapshot received from a leader, not yet persisted by the driver."""
        self.snapshot_in_progress = False
        self.unstable: list[Entry] = []
        self.offset = last + 1
        """The index of ``unstable[0]``."""
        self.in_progress = last + 1
        """Unstable entries before this index were handed to the driver to persist."""
        self.persisted = last
        """Every entry up to here is known durable."""
        self.committed = storage.first_index() - 1
        self.applied = self.committed

    # -- reading -----------------------------------------------------------------------------------

    def first_index(self) -> int:
        if self.snapshot is not None:
            return self.snapshot.index + 1
        return self.storage.first_index()

    def last_index(self) -> int:
        if self.unstable:
            return self.offset + len(self.unstable) - 1
        if self.snapshot is not None:
            return self.snapshot.index
        return self.storage.last_index()

    def term(self, index: int) -> int:
        """The term at ``index``; raises :class:`CompactedError` / :class:`UnavailableError`."""
        offset = self.offset
        if index >= offset:
            pos = index - offset
            if pos < len(self.unstable):
                return self.unstable[pos].term
            raise UnavailableError(f"index {index} is after the last index {self.last_index()}")
        snap = self.snapshot
        if snap is not None:
            if index == snap.index:
                return snap.term
            raise CompactedError(f"index {index} is covered by a pending snapshot")
        return self.storage.term(index)

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        try:
            return self.term(index) == term
        except StorageError:
            return False

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Whether a log ending at ``(last_index, last_term)`` is as up to date as ours (§5.4.1)."""
        my_term = self.last_term()
        return last_term > my_term or (last_term == my_term and last_index >= self.last_index())

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries ``[lo, hi)`` from storage and/or the unstable tail, limited in bytes."""
        if lo >= hi:
            return []
        offset = self.offset
        if lo < offset:
            stable = self.storage.entries(lo, min(hi, offset), max_bytes)
            if hi <= offset or len(stable) < offset - lo:
                return stable
            return limit_size(stable + self.unstable[: hi - offset], max_bytes)
        return limit_size(self.unstable[lo - offset : hi - offset], max_bytes)

    def find_conflict(self, entries: Sequence[Entry]) -> int:
        """The index of the first entry whose term differs from the log's, or of the first one
        past the end of the log; 0 if the log already holds all of them."""
        if not entries:
            return 0
        last = self.last_index()
        tail = entries[-1]
        # Log matching: if the last one matches, every earlier one does too.
        if tail.index <= last and self.match_term(tail.index, tail.term):
            return 0
        for entry in entries:
            if entry.index > last or not self.match_term(entry.index, entry.term):
                return entry.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The last entry at or before ``index`` whose term is at most ``term``, as
        ``(index, term)``. Terms never decrease along the log, so this is a binary search.
        Returns ``(first_index() - 2, 0)`` when even the snapshot's term is newer (the caller
        then needs entries that were compacted)."""
        lo = self.first_index() - 1
        hi = min(index, self.last_index())
        if hi < lo:
            return lo - 1, 0
        lo_term = self.term(lo)
        if lo_term > term:
            return lo - 1, 0
        hi_term = self.term(hi)
        if hi_term <= term:
            return hi, hi_term
        # Invariant: term(lo) <= term < term(hi).
        while hi - lo > 1:
            mid = (lo + hi) // 2
            mid_term = self.term(mid)
            if mid_term <= term:
                lo, lo_term = mid, mid_term
            else:
                hi = mid
        return lo, lo_term

    # -- changing ----------------------------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> None:
        """Append ``entries``, first truncating the log from ``entries[0].index`` if needed.

        The caller guarantees the truncation point is after ``committed``.
        """
        after = entries[0].index
        end = self.offset + len(self.unstable)
        if after == end:
            self.unstable.extend(entries)
            return
        if after <= self.offset:
            # Replaces the whole unstable tail, and overrides stable entries from `after` on.
            self.unstable = list(entries)
            self.offset = after
        else:
            del self.unstable[after - self.offset :]
            self.unstable.extend(entries)
        self.in_progress = min(self.in_progress, after)
        self.persisted = min(self.persisted, after - 1)

    def append_one(self, entry: Entry) -> None:
        """Append one entry at ``last_index() + 1`` (the leader's path)."""
        self.unstable.append(entry)

    def commit_to(self, index: int) -> bool:
        if index > self.committed:
            self.committed = index
            return True
        return False

    def restore(self, meta: SnapshotMeta) -> None:
        """Replace the whole log by a snapshot received from the leader."""
        self.snapshot = meta
        self.snapshot_in_progress = False
        self.unstable = []
        self.offset = meta.index + 1
        self.in_progress = meta.index + 1
        self.persisted = 0  # nothing of the new log is durable until the snapshot is installed
        self.committed = meta.index

    # -- handing work to the driver and hearing back -----------------------------------------------

    def has_unpersisted(self) -> bool:
        return self.in_progress < self.offset + len(self.unstable) or (
            self.snapshot is not None and not self.snapshot_in_progress
        )

    def take_unpersisted(self) -> tuple[SnapshotMeta | None, list[Entry]]:
        """The snapshot and entries not yet handed to the driver; marks them in progress."""
        snap = None
        if self.snapshot is not None and not self.snapshot_in_progress:
            snap = self.snapshot
            self.snapshot_in_progress = True
        start = self.in_progress - self.offset
        entries = self.unstable[start:] if start < len(self.unstable) else []
        self.in_progress = self.offset + len(self.unstable)
        return snap, entries

    def committed_limit(self) -> int:
        """The last index that may be applied: committed and durable here."""
        if self.snapshot is not None:
            return self.applied
        return min(self.committed, self.persisted)

    def has_next_committed(self) -> bool:
        return self.committed_limit() > self.applied

    def next_committed(self, max_bytes: int | None) -> list[Entry]:
        hi = self.committed_limit()
        if hi <= self.applied:
            return []
        return self.storage.entries(self.applied + 1, hi + 1, max_bytes)

    def stable_to(self, index: int, term: int) -> None:
        """The driver persisted entries up to ``(index, term)``."""
        pos = index - self.offset
        if pos < 0 or pos >= len(self.unstable) or self.unstable[pos].term != term:
            return  # that tail was truncated or replaced in the meantime; it is written again
        del self.unstable[: pos + 1]
        self.offset = index + 1
        self.in_progress = max(self.in_progress, self.offset)
        self.persisted = max(self.persisted, index)

    def stable_snapshot(self, index: int) -> None:
        """The driver installed the snapshot at ``index``."""
        snap = self.snapshot
        if snap is not None and snap.index == index:
            self.snapshot = None
            self.snapshot_in_progress = False
            self.persisted = max(self.persisted, index)
            self.applied = max(self.applied, index)

    def applied_to(self, index: int) -> None:
        self.applied = max(self.applied, index)
