"""Durable storage for one Raft member: log, hard state, snapshots and identity in one directory.

Layout of a data directory::

    identity            cluster id, member id, bootstrap configuration (written once)
    hardstate           term, vote, commit (replaced atomically when term or vote change)
    wal/*.log           the segmented log (see :mod:`.wal`)
    snap/*.snap         the newest snapshots (see :mod:`.snapshots`)

Durability contract
-------------------
* :meth:`DiskStorage.save` and :meth:`DiskStorage.sync` return only when the entries and
  hard state given are on stable storage (fdatasync; fsync of the directory whenever a file is
  created, renamed or removed). One call is one fsync of the log however many entries it
  carries (group commit), plus an atomic rewrite of ``hardstate`` if the term or vote changed.
  The hard state file is written before the entries, so the log never holds a term newer
  than the durable current term.
* A commit index that changes without the term or vote is recorded in the log record instead
  of ``hardstate`` (one fsync instead of three). The commit index is volatile state in Raft,
  so the value restored on start-up may be lower than the last one saved (never higher); the
  leader re-sends it.
* Truncating a suffix (appending at or below the last index) is durable when the call
  returns; a crash before that leaves the old log or a prefix of it, never old entries after
  new ones.
* A snapshot (:meth:`DiskStorage.save_snapshot`, :meth:`DiskStorage.install_snapshot`, a
  receiver's ``commit()``) is durable when the call returns. If a crash interrupts the log
  changes that follow, start-up completes them (a log that does not hold the snapshot's last
  entry is discarded).
* Any ``OSError`` marks the storage failed and every later call raises
  :class:`StorageError`: the member must stop. An fsync is never retried. The record whose
  fsync failed is cut off again (best effort), so that a restart does not claim it.
* Readers (:meth:`entries`, :meth:`term`, ...) see only durable data and may run on another
  thread while one writer thread saves; writes must not be issued concurrently.

Not guaranteed: damage to the last record of the log is indistinguishable from a torn write
and is cut off (losing that record); disks that lie about fsync defeat all of the above.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from controlplane.backends.raft.hardstate import (
    REPAIR_ADVICE,
    CorruptionError,
    DiskIO,
    FsyncFn,
    Identity,
    IdentityMismatchError,
    StorageError,
    load_hard_state,
    load_identity,
    save_hard_state,
    save_identity,
)
from controlplane.backends.raft.raftlog import CompactedError, UnavailableError
from controlplane.backends.raft.records import ConfState, Entry, HardState, SnapshotMeta
from controlplane.backends.raft.snapshots import (
    BadSnapshotError,
    SnapshotReader,
    SnapshotReceiver,
    SnapshotStore,
    snapshot_index,
    snapshot_name,
)
from controlplane.backends.raft.wal import SegmentedLog, oldest_segment

if TYPE_CHECKING:
    from controlplane.backends.raft.raftlog import Storage

__all__ = (
    "BadSnapshotError",
    "CompactedError",
    "CorruptionError",
    "DiskStorage",
    "Identity",
    "IdentityMismatchError",
    "SnapshotReader",
    "SnapshotReceiver",
    "StorageError",
    "UnavailableError",
)

log = logging.getLogger(__name__)


class DiskStorage:
    """The durable state of one Raft member, in the data directory ``path``.

    Opening recovers: it verifies the newest snapshot (falling back to an older one only if
    the log still holds every entry in between), deletes unread the log segments the snapshot
    made obsolete (finishing an interrupted :meth:`compact`), reads the rest, cuts off a torn
    tail and raises :class:`CorruptionError` for anything worse. The read side implements the
    core's ``Storage`` protocol (``raftlog.Storage``).

    Options: ``sync=False`` skips every fsync (tests only); ``fsync`` replaces
    ``os.fdatasync``/``os.fsync`` (fault injection); ``segment_size`` is the size at which the
    log moves to a new segment, and how much is preallocated when ``preallocate``;
    ``keep_entries`` is how many entries :meth:`compact` keeps behind the snapshot (needed to
    fall back to an older snapshot if the newest one is damaged); ``keep_snapshots`` how many
    snapshot files are kept; ``cache_entries`` how many recent entries stay in memory.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sync: bool = True,
        fsync: FsyncFn | None = None,
        segment_size: int = 64 << 20,
        preallocate: bool = True,
        keep_entries: int = 5000,
        keep_snapshots: int = 2,
        cache_entries: int = 16384,
    ) -> None:
        self.path = Path(path)
        self._io = DiskIO(sync=sync, fsync=fsync)
        self._keep_entries = keep_entries
        self._pending: list[Entry] = []
        self._pending_state: HardState | None = None
        for d in (self.path / "wal", self.path / "snap"):
            self._io.make_dirs(d)
        with self._io.guard(f"reading {self.path}"):
            self._identity = load_identity(self.path / "identity")
            self._state = load_hard_state(self.path / "hardstate") or HardState()
        self._snaps = SnapshotStore(self.path / "snap", self._io, keep=keep_snapshots)
        self._snaps.clean()
        self._log = SegmentedLog(
            self.path / "wal",
            self._io,
            segment_size=segment_size,
            prealloc=preallocate,
            cache=cache_entries,
        )
        try:
            self._snapshot = self._recover()
        except BaseException:
            self._log.close()
            raise
        # Commit is volatile: take the highest recorded, within what the snapshot and the log
        # prove (a torn last record can leave the hard state ahead of the log).
        commit = max(self._state.commit, self._log.max_commit, self._snapshot.index)
        self._state = HardState(
            self._state.term, self._state.vote, min(commit, self._log.last_index)
        )
        log.info(
            "opened %s: snapshot %d, entries %d..%d in %d segments, term %d",
            self.path,
            self._snapshot.index,
            self._log.first_index,
            self._log.last_index,
            self._log.segment_count,
            self._state.term,
        )

    def _recover(self) -> SnapshotMeta:
        """Pick the newest valid snapshot the log can back up, then load the log after it."""
        with self._io.guard(f"listing {self.path / 'wal'}"):
            wal_first = oldest_segment(self.path / "wal")
        corrupt: list[tuple[Path, CorruptionError]] = []
        snapshot = SnapshotMeta()
        for path in self._snaps.paths():
            try:
                snapshot = self._snaps.verify(path)
                break
            except CorruptionError as exc:
                corrupt.append((path, exc))
        if corrupt:
            newest = snapshot_index(corrupt[0][0])
            if wal_first is None or wal_first > snapshot.index + 1:
                raise CorruptionError(
                    f"{corrupt[0][1]}; the log does not reach back to the older snapshot at "
                    f"index {snapshot.index}, so entries up to {newest} exist nowhere on this "
                    f"member. {REPAIR_ADVICE}"
                )
        self._log.recover(snapshot, self._keep_entries)
        if corrupt:
            newest = snapshot_index(corrupt[0][0])
            if self._log.last_index < newest:
                raise CorruptionError(
                    f"{corrupt[0][1]}; the log ends at {self._log.last_index}, before it, so "
                    f"entries up to {newest} exist nowhere on this member. {REPAIR_ADVICE}"
                )
            for path, error in corrupt:
                log.warning("%s; set aside as %s", error, self._snaps.set_aside(path).name)
        if self._identity is not None and snapshot.index == 0:
            snapshot = SnapshotMeta(conf=self._identity.initial_conf)
        return snapshot

    # -- the core's Storage protocol (read side) ----------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        """The durable hard state and the configuration of the snapshot (or bootstrap).

        Configurations in ``CONF_CHANGE`` entries after the snapshot are the core's to replay.
        """
        self._io.check()
        return self._state, self._snapshot.conf

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Durable entries ``[lo, hi)``; with ``max_bytes``, a prefix within that many bytes
        (``len(data) + 16`` per entry) but at least one entry.

        Raises ``CompactedError`` if ``lo <= snapshot index`` and ``UnavailableError`` if
        ``hi > last_index() + 1``. Recent entries come from memory; older ones from disk.
        """
        self._io.check()
        return self._log.entries(lo, hi, max_bytes)

    def term(self, index: int) -> int:
        """The term of entry ``index``; the snapshot's term for its index.

        Raises ``CompactedError`` below the snapshot and ``UnavailableError`` after the last
        entry.
        """
        self._io.check()
        return self._log.term(index)

    def first_index(self) -> int:
        """The first entry after the snapshot: ``snapshot_meta().index + 1``."""
        self._io.check()
        return self._log.first_index

    def last_index(self) -> int:
        """The last durable entry (the snapshot index when the log is empty)."""
        self._io.check()
        return self._log.last_index

    def snapshot_meta(self) -> SnapshotMeta:
        """The newest durable snapshot; index 0 with the bootstrap configuration if none."""
        self._io.check()
        return self._snapshot

    # -- writing ------------------------------------------------------------------------------

    def set_hard_state(self, hard_state: HardState) -> None:
        """Buffer a hard state for the next :meth:`sync`."""
        self._io.check()
        self._pending_state = hard_state

    def append(self, entries: Sequence[Entry]) -> None:
        """Buffer entries for the next :meth:`sync`; nothing is durable or readable before.

        Entries must have contiguous indexes and may start at or below the last index, which
        replaces that suffix; entries covered by the snapshot are skipped. Raises
        ``ValueError`` for a gap, for overwriting a committed entry or for a term going down.
        """
        self._io.check()
        if not entries:
            return
        first = entries[0].index
        if entries[-1].index != first + len(entries) - 1:
            raise ValueError(f"entries {first}..{entries[-1].index} are not contiguous")
        floor = self._snapshot.index
        if first <= floor:
            entries = entries[floor + 1 - first :]
            if not entries:
                return
            first = floor + 1
        pending = self._pending
        base = pending[0].index if pending else self._log.last_index + 1
        if first > (pending[-1].index if pending else self._log.last_index) + 1:
            raise ValueError(f"entry {first} would leave a gap after the log's last entry")
        if first <= self._state.commit:
            raise ValueError(f"entry {first} is committed (commit {self._state.commit})")
        prev = pending[first - base - 1].term if first - 1 >= base else self._log.term(first - 1)
        if entries[0].term < prev:
            raise ValueError(f"entry {first} has term {entries[0].term} after term {prev}")
        if first >= base:
            del pending[first - base :]
            pending.extend(entries)
        else:
            self._pending = list(entries)

    def sync(self) -> None:
        """Write and fdatasync everything buffered, in one record: durable when it returns."""
        self._io.check()
        state, entries, current = self._pending_state, self._pending, self._state
        commit = 0
        if state is not None:
            last = entries[-1].index if entries else self._log.last_index
            if state.term < current.term or state.commit > last:
                self._pending_state = None
                raise ValueError(f"{state} goes back in term or commits past the log end {last}")
            if state.commit > current.commit:
                commit = state.commit
        self._pending_state, self._pending = None, []
        if state is not None and (state.term, state.vote) != (current.term, current.vote):
            save_hard_state(self._io, self.path / "hardstate", state)
            commit = 0
        if entries or commit:
            self._log.write(entries, commit)
        if state is not None:
            self._state = HardState(state.term, state.vote, max(state.commit, current.commit))

    def save(self, hard_state: HardState | None, entries: Sequence[Entry]) -> None:
        """:meth:`append` then :meth:`sync`: entries and hard state durable when it returns."""
        self.append(entries)
        if hard_state is not None:
            self.set_hard_state(hard_state)
        self.sync()

    # -- snapshots and compaction -----------------------------------------------------------

    def save_snapshot(self, meta: SnapshotMeta, data: bytes | Iterable[bytes]) -> None:
        """Store a snapshot taken locally (``data``: bytes or an iterable of chunks); durable
        when it returns.

        The log must hold the snapshot's last entry (index and term); the entries after it
        stay, and :meth:`compact` reclaims the space of those it covers.
        """
        self._check_snapshot(meta)
        if self._log.last_index < meta.index or self._log.term(meta.index) != meta.term:
            raise ValueError(
                f"the log does not hold entry {meta.index} of term {meta.term}; a leader's "
                f"snapshot is stored with install_snapshot()"
            )
        self._snaps.save(meta, data)
        self._install(meta, keep_log=True)

    def install_snapshot(self, meta: SnapshotMeta, data: bytes | Iterable[bytes]) -> None:
        """Store a snapshot received from the leader; it replaces the whole log. Durable when
        it returns."""
        self._check_snapshot(meta)
        self._snaps.save(meta, data)
        self._install(meta, keep_log=False)

    def receive_snapshot(self) -> SnapshotReceiver:
        """A receiver for a snapshot streamed from the leader (the chunks of its
        :meth:`SnapshotReader.chunks`); ``commit()`` verifies it, installs it as
        :meth:`install_snapshot` does and returns its metadata."""
        self._io.check()
        return self._snaps.receiver(
            self._check_snapshot, lambda meta: self._install(meta, keep_log=False)
        )

    def _check_snapshot(self, meta: SnapshotMeta) -> None:
        self._io.check()
        if self._pending or self._pending_state is not None:
            raise ValueError("sync() buffered writes before storing a snapshot")
        if meta.index <= self._snapshot.index:
            raise ValueError(
                f"snapshot {meta.index} is not newer than the current one at {self._snapshot.index}"
            )

    def _install(self, meta: SnapshotMeta, *, keep_log: bool) -> None:
        with self._log.lock:
            self._check_snapshot(meta)
            self._log.apply_snapshot(meta, keep_log=keep_log)
            self._snapshot = meta
            if meta.index > self._state.commit:
                self._state = HardState(self._state.term, self._state.vote, meta.index)
        self._snaps.prune()

    def load_snapshot(self) -> tuple[SnapshotMeta, bytes] | None:
        """The newest snapshot and its verified data; ``None`` if there is none.

        Raises :class:`CorruptionError` if the file was damaged since it was opened.
        """
        reader = self.open_snapshot()
        if reader is None:
            return None
        with reader:
            return reader.meta, reader.read_data()

    def open_snapshot(self) -> SnapshotReader | None:
        """The newest snapshot, open for reading in chunks (InstallSnapshot); ``None`` if
        there is none. The caller closes it."""
        self._io.check()
        if self._snapshot.index == 0:
            return None
        return self._snaps.open(self.path / "snap" / snapshot_name(self._snapshot))

    def compact(self, index: int | None = None) -> int:
        """Delete log segments whose entries are all at or before ``index - keep_entries``.

        ``index`` defaults to, and must not exceed, the snapshot's index. Only whole segments
        go, and never the last one. Returns the number of segments deleted.
        """
        self._io.check()
        snap = self._snapshot.index
        if index is None:
            index = snap
        if index > snap:
            raise ValueError(f"cannot compact to {index}, past the snapshot at {snap}")
        return self._log.compact(index - self._keep_entries)

    # -- identity -----------------------------------------------------------------------------

    def identity(self) -> Identity | None:
        """The identity written at bootstrap, if any."""
        return self._identity

    def write_identity(
        self, cluster_id: str, member_id: str, initial_conf: ConfState | None = None
    ) -> None:
        """Record which cluster and member this directory belongs to (at bootstrap or join).

        ``initial_conf`` is the configuration of a cluster being bootstrapped (what
        :meth:`snapshot_meta` reports until the first snapshot). Idempotent for the same
        identity; raises :class:`IdentityMismatchError` for a different one.
        """
        self._io.check()
        if self._identity is not None:
            self.check_identity(cluster_id, member_id)
            return
        identity = Identity(cluster_id, member_id, initial_conf or ConfState())
        save_identity(self._io, self.path / "identity", identity)
        self._identity = identity
        if self._snapshot.index == 0:
            self._snapshot = SnapshotMeta(conf=identity.initial_conf)

    def check_identity(self, cluster_id: str, member_id: str) -> None:
        """Raise :class:`IdentityMismatchError` unless this directory belongs to ``member_id``
        of ``cluster_id``."""
        found = self._identity
        if found is None:
            raise IdentityMismatchError(
                f"{self.path} has no identity file: it was never bootstrapped or joined. "
                f"Bootstrap or join the member first."
            )
        if (found.cluster_id, found.member_id) != (cluster_id, member_id):
            raise IdentityMismatchError(
                f"{self.path} belongs to member {found.member_id!r} of cluster "
                f"{found.cluster_id!r}, not to member {member_id!r} of cluster {cluster_id!r}. "
                f"Point this member at its own data directory, or move this one aside to "
                f"start afresh."
            )

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        """Whether an I/O error has stopped this storage."""
        return self._io.failure is not None

    def close(self) -> None:
        """Release files. Buffered, unsynced entries are dropped. Idempotent."""
        self._pending = []
        self._pending_state = None
        self._log.close()

    def __enter__(self) -> DiskStorage:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


if TYPE_CHECKING:

    def _implements_the_core_storage_protocol(storage: DiskStorage) -> Storage:
        return storage
