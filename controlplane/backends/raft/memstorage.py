"""An in-memory :class:`~controlplane.backends.raft.raftlog.Storage` for tests and simulation.

Writes are *staged* and become durable (visible to readers, and surviving :meth:`crash`) only
on :meth:`MemoryStorage.sync`, which mirrors a disk log: a crash keeps a prefix of what was
written since the last sync — possibly with a torn last append — and loses the rest.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from controlplane.backends.raft.raftlog import (
    CompactedError,
    UnavailableError,
    limit_size,
)
from controlplane.backends.raft.records import ConfState, Entry, HardState, SnapshotMeta

__all__ = ("MemoryStorage",)

_Op = tuple[str, tuple[Entry, ...]] | tuple[str, HardState] | tuple[str, SnapshotMeta, bytes]


class MemoryStorage:
    """A durable-on-sync in-memory log, hard state and latest snapshot.

    The reading side is the ``Storage`` protocol; the writing side is for the driver:
    :meth:`append`, :meth:`set_hard_state`, :meth:`apply_snapshot` (a snapshot received from a
    leader replaces the log) and :meth:`compact` (a snapshot taken locally drops the log
    prefix), each staged until :meth:`sync`.
    """

    def __init__(self, conf: ConfState | None = None) -> None:
        """An empty log. ``conf`` bootstraps a new cluster (every founding member gets the same
        one); a member that will join an existing cluster starts with none."""
        self._hard = HardState()
        self._snap = SnapshotMeta(conf=conf or ConfState())
        self._snap_data = b""
        self._entries: list[Entry] = []
        """Entries after the snapshot: ``_entries[i].index == _snap.index + 1 + i``."""
        self._staged: list[_Op] = []

    # -- Storage protocol (durable view) -----------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard, self._snap.conf

    def first_index(self) -> int:
        return self._snap.index + 1

    def last_index(self) -> int:
        return self._snap.index + len(self._entries)

    def term(self, index: int) -> int:
        base = self._snap.index
        if index == base:
            return self._snap.term
        if index < base:
            raise CompactedError(f"index {index} is compacted (snapshot at {base})")
        if index > base + len(self._entries):
            raise UnavailableError(f"index {index} is after the last index {self.last_index()}")
        return self._entries[index - base - 1].term

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        base = self._snap.index
        if lo <= base:
            raise CompactedError(f"index {lo} is compacted (snapshot at {base})")
        if hi > base + len(self._entries) + 1:
            raise UnavailableError(f"entries up to {hi - 1} requested, last is {self.last_index()}")
        return limit_size(self._entries[lo - base - 1 : hi - base - 1], max_bytes)

    def snapshot_meta(self) -> SnapshotMeta:
        return self._snap

    # -- extras ------------------------------------------------------------------------------------

    def hard_state(self) -> HardState:
        return self._hard

    def snapshot_data(self) -> bytes:
        """The application data stored with the latest durable snapshot."""
        return self._snap_data

    @property
    def unsynced(self) -> int:
        """The number of staged writes."""
        return len(self._staged)

    # -- writing (staged until sync) ---------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> None:
        """Append, replacing any entries at and after ``entries[0].index``."""
        if entries:
            self._staged.append(("append", tuple(entries)))

    def set_hard_state(self, hard: HardState) -> None:
        self._staged.append(("hard", hard))

    def apply_snapshot(self, meta: SnapshotMeta, data: bytes = b"") -> None:
        """Replace the whole log by a snapshot received from the leader."""
        self._staged.append(("install", meta, data))

    def compact(self, meta: SnapshotMeta, data: bytes = b"") -> None:
        """Record a locally taken snapshot and drop the entries it covers."""
        self._staged.append(("compact", meta, data))

    def sync(self) -> None:
        """Make every staged write durable, in order."""
        staged, self._staged = self._staged, []
        for op in staged:
            self._apply(op)

    def crash(self, rng: random.Random | None = None) -> None:
        """Lose unsynced writes. With ``rng``, a random prefix of them survives, the last one
        possibly torn (an append keeping only some of its entries)."""
        staged, self._staged = self._staged, []
        if rng is None or not staged:
            return
        keep = rng.randrange(len(staged) + 1)
        for op in staged[:keep]:
            self._apply(op)
        if keep < len(staged):
            op = staged[keep]
            if op[0] == "append" and isinstance(op[1], tuple) and len(op[1]) > 1:
                torn = op[1][: rng.randrange(1, len(op[1]))]
                self._apply(("append", torn))

    def _apply(self, op: _Op) -> None:
        kind = op[0]
        if kind == "append":
            assert isinstance(op[1], tuple)
            self._do_append(op[1])
        elif kind == "hard":
            assert isinstance(op[1], HardState)
            self._hard = op[1]
        else:
            assert len(op) == 3 and isinstance(op[1], SnapshotMeta)
            meta, data = op[1], op[2]
            if kind == "install":
                self._snap, self._snap_data, self._entries = meta, data, []
            else:
                self._do_compact(meta, data)

    def _do_append(self, entries: tuple[Entry, ...]) -> None:
        base = self._snap.index
        first = entries[0].index
        if first <= base:  # the part already covered by the snapshot
            entries = entries[base - first + 1 :]
            if not entries:
                return
            first = entries[0].index
        if first > base + len(self._entries) + 1:
            raise ValueError(f"append at {first} leaves a gap after {self.last_index()}")
        del self._entries[first - base - 1 :]
        self._entries.extend(entries)

    def _do_compact(self, meta: SnapshotMeta, data: bytes) -> None:
        base = self._snap.index
        if meta.index <= base:
            return
        if meta.index > self.last_index():
            raise ValueError(f"cannot compact to {meta.index}: last index {self.last_index()}")
        if self.term(meta.index) != meta.term:
            raise ValueError(f"snapshot term {meta.term} does not match the log at {meta.index}")
        del self._entries[: meta.index - base]
        self._snap, self._snap_data = meta, data
