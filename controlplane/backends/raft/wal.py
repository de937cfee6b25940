"""The segmented write-ahead log of Raft entries.

Files
-----
``wal/<first index as 16 hex digits>.log``. A segment starts with a 32-byte header (magic,
version, the index of its first entry, the term of the entry before it, CRC32) and is
created atomically (temporary name, preallocate, fsync, rename, directory fsync). Then come
records::

    magic (4 bytes) | payload length (u32) | CRC32 of length and payload (u32) | payload

A payload is one msgpack-encoded batch ``[commit, [entry, ...]]``: exactly what one
:meth:`SegmentedLog.write` wrote and fdatasynced. A batch whose first index is at or below the
last index of the log replaces that suffix (a follower resolving a conflict), so truncation is
as atomic as an append. A truncation reaching into an earlier segment first deletes the later
segments (newest first, then a directory fsync), leaving a prefix of the old log if it crashes.

Recovery
--------
Because each record is synced before the next one is written, a crash can only tear the last
record of the last segment. Scanning stops at the first record that is incomplete, fails its
checksum or does not decode; what follows is:

* zeros (preallocated space) or nothing: the clean end of the log;
* anything else, with no intact record after it, in the last segment: a torn write, which was
  never acknowledged; it is cut off with a warning;
* an intact record after it, or damage in a segment that is not the last: corruption, and
  :class:`CorruptionError` names the file and byte offset.

Damage confined to the last record cannot be told apart from a torn write, so bit rot in the
newest acknowledged record is discarded like a torn write; that is the one case where this log
loses an acknowledged entry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import threading
import zlib
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from controlplane.backends.raft.hardstate import (
    REPAIR_ADVICE,
    CorruptionError,
    DiskIO,
    preallocate,
    pwrite_all,
)
from controlplane.backends.raft.raftlog import ENTRY_OVERHEAD, CompactedError, UnavailableError
from controlplane.backends.raft.records import Entry, SnapshotMeta

log = logging.getLogger(__name__)

_SEG_MAGIC = b"CPWALSEG"
_SEG_VERSION = 1
_SEG_HEADER = struct.Struct("<8sIQQI")  # magic, version, first index, previous term, crc32
_REC_MAGIC = b"\xe7\x3a\x91\x5c"
_REC_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32
_U32 = struct.Struct("<I")
_SEGMENT_NAME = re.compile(r"^[0-9a-f]{16}\.log$")


class _Batch(msgspec.Struct, array_like=True):
    commit: int
    entries: list[Entry]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Batch)


def segment_name(first: int) -> str:
    """The file name of the segment whose first entry is ``first``."""
    return f"{first:016x}.log"


def oldest_segment(directory: Path) -> int | None:
    """The first index of the oldest segment in ``directory``, by file name."""
    firsts = [int(n[:16], 16) for n in os.listdir(directory) if _SEGMENT_NAME.match(n)]
    return min(firsts, default=None)


def _crc(length: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(_U32.pack(length)))


def _encode_record(commit: int, entries: list[Entry]) -> bytearray:
    buf = bytearray(_REC_HEADER.size)
    _encoder.encode_into(_Batch(commit, entries), buf, _REC_HEADER.size)
    length = len(buf) - _REC_HEADER.size
    with memoryview(buf) as view:
        crc = _crc(length, view[_REC_HEADER.size :])
    _REC_HEADER.pack_into(buf, 0, _REC_MAGIC, length, crc)
    return buf


def _decode_at(data: memoryview, pos: int) -> tuple[_Batch, int] | str:
    """The batch at ``pos`` and the offset after it, or why there is no intact record there."""
    if pos + _REC_HEADER.size > len(data):
        return "incomplete record header"
    magic, length, crc = _REC_HEADER.unpack_from(data, pos)
    if magic != _REC_MAGIC:
        return "no record header"
    end = pos + _REC_HEADER.size + length
    if end > len(data):
        return f"record of {length} bytes runs past the end of the file"
    payload = data[pos + _REC_HEADER.size : end]
    if _crc(length, payload) != crc:
        return "checksum mismatch"
    try:
        return _decoder.decode(payload), end
    except msgspec.DecodeError:
        return "undecodable record"


@dataclass
class _Scan:
    records: list[tuple[int, _Batch]]
    end: int  # offset after the last intact record
    damage: str | None  # why scanning stopped short of the clean end of the data
    resume: int | None  # offset of an intact record found after the damage


def _scan(data: bytes) -> _Scan:
    view = memoryview(data)
    pos = _SEG_HEADER.size
    records: list[tuple[int, _Batch]] = []
    damage = None
    while pos < len(data):
        got = _decode_at(view, pos)
        if isinstance(got, str):
            damage = got
            break
        records.append((pos, got[0]))
        pos = got[1]
    if damage is None or data.count(0, pos) == len(data) - pos:
        return _Scan(records, pos, None, None)
    resume = data.find(_REC_MAGIC, pos + 1)
    while resume != -1 and isinstance(_decode_at(view, resume), str):
        resume = data.find(_REC_MAGIC, resume + 1)
    return _Scan(records, pos, damage, None if resume == -1 else resume)


@dataclass(eq=False)
class _Segment:
    first: int
    prev_term: int
    path: Path
    end: int = _SEG_HEADER.size
    # First index and byte offset of each record holding entries, for reads from disk.
    firsts: array[int] = field(default_factory=lambda: array("q"))
    offsets: array[int] = field(default_factory=lambda: array("q"))


class SegmentedLog:
    """One member's Raft log: segment files plus an in-memory window of the newest entries.

    The read side shows entries after the latest snapshot only (``first_index`` is the
    snapshot index plus one), as the Raft core's ``Storage`` protocol requires; older entries
    the files still hold (see ``keep_entries``) serve only to fall back to an older snapshot.

    One writer thread calls the mutating methods, one call at a time. Readers on other threads
    may call :meth:`entries` and :meth:`term` concurrently; they see durable entries only,
    because a write is published to the in-memory view (under :attr:`lock`) after its fsync.
    """

    def __init__(
        self, directory: Path, io: DiskIO, *, segment_size: int, prealloc: bool, cache: int
    ) -> None:
        self.lock = threading.RLock()
        self._dir = directory
        self._io = io
        self._segment_size = segment_size
        self._prealloc = prealloc
        self._cache = max(cache, 1)
        self._segments: list[_Segment] = []
        self._fd: int | None = None  # the last segment, open for writing
        self._first = 1
        self._prev_term = 0  # term of entry first - 1
        self._last = 0
        self._last_term = 0
        self._win: list[Entry] = []  # entries [win_first, last]
        self._win_first = 1
        self.max_commit = 0  # highest commit index recorded in a retained batch
        self._floor = 0  # the snapshot's index and term: reads start after it
        self._floor_term = 0

    # -- read side --------------------------------------------------------------------------

    @property
    def first_index(self) -> int:
        """The first index after the snapshot."""
        return self._floor + 1

    @property
    def last_index(self) -> int:
        """The last durable index."""
        return self._last

    @property
    def segment_count(self) -> int:
        """How many segment files the log has."""
        return len(self._segments)

    def term(self, index: int) -> int:
        """The term of entry ``index``, for ``first_index - 1 <= index <= last_index``."""
        with self.lock:
            if index <= self._floor:
                if index == self._floor:
                    return self._floor_term
                raise CompactedError(f"entry {index} is in the snapshot at {self._floor}")
            return self._term(index)

    def entries(self, lo: int, hi: int, max_bytes: int | None) -> list[Entry]:
        """Entries ``[lo, hi)``, at most ``max_bytes`` of them but at least one."""
        with self.lock:
            if lo <= self._floor:
                raise CompactedError(f"entry {lo} is in the snapshot at {self._floor}")
            if hi > self._last + 1:
                raise UnavailableError(f"entry {hi - 1} is beyond the last index {self._last}")
            if lo >= hi:
                return []
            out: list[Entry] = []
            if lo < self._win_first:
                stop = min(hi, self._win_first)
                out = self._read_disk(lo, stop, max_bytes)
                lo += len(out)
                if max_bytes is not None:
                    if lo < stop:  # the budget ran out on disk
                        return out
                    max_bytes -= _size(out)
            if lo < hi:
                window = self._win[lo - self._win_first : hi - self._win_first]
                out += _limit(window, max_bytes, allow_empty=bool(out))
            return out

    def _term(self, index: int) -> int:
        if index == self._last:
            return self._last_term
        if self._win_first <= index < self._last:
            return self._win[index - self._win_first].term
        if index == self._first - 1:
            return self._prev_term
        if index < self._first:
            raise CompactedError(f"entry {index} is compacted; the log starts at {self._first}")
        if index > self._last:
            raise UnavailableError(f"entry {index} is beyond the last index {self._last}")
        return self._read_disk(index, index + 1, None)[0].term

    def _read_disk(self, lo: int, hi: int, max_bytes: int | None) -> list[Entry]:
        out: list[Entry] = []
        fds: dict[Path, int] = {}
        try:
            while lo < hi:
                s = bisect_right(self._segments, lo, key=lambda seg: seg.first) - 1
                seg = self._segments[s]
                k = bisect_right(seg.firsts, lo) - 1
                if k + 1 < len(seg.firsts):
                    rec_end = seg.firsts[k + 1]
                elif s + 1 < len(self._segments):
                    rec_end = self._segments[s + 1].first
                else:
                    rec_end = self._last + 1
                fd = fds.get(seg.path)
                if fd is None:
                    with self._io.guard(f"reading {seg.path}"):
                        fd = fds[seg.path] = os.open(seg.path, os.O_RDONLY)
                batch = self._read_record(fd, seg, seg.offsets[k])
                start = seg.firsts[k]
                chunk = batch.entries[lo - start : min(hi, rec_end) - start]
                if not chunk or chunk[0].index != lo:
                    raise CorruptionError(
                        f"{seg.path}: the record at byte {seg.offsets[k]} does not hold entry "
                        f"{lo} any more. {REPAIR_ADVICE}"
                    )
                kept = _limit(chunk, max_bytes, allow_empty=bool(out))
                out += kept
                lo += len(kept)
                if max_bytes is not None:
                    if len(kept) < len(chunk):
                        break
                    max_bytes -= _size(kept)
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def _read_record(self, fd: int, seg: _Segment, offset: int) -> _Batch:
        with self._io.guard(f"reading {seg.path}"):
            header = os.pread(fd, _REC_HEADER.size, offset)
            length = _REC_HEADER.unpack(header)[1] if len(header) == _REC_HEADER.size else 0
            data = header + os.pread(fd, length, offset + _REC_HEADER.size)
        got = _decode_at(memoryview(data), 0)
        if isinstance(got, str):
            raise CorruptionError(
                f"{seg.path}: {got} at byte {offset}, a record that was intact when the log "
                f"was opened. {REPAIR_ADVICE}"
            )
        return got[0]

    # -- write side -------------------------------------------------------------------------

    def write(self, entries: list[Entry], commit: int) -> None:
        """Append one batch (``entries`` may replace a suffix) and fdatasync: durable on return.

        The caller has validated the batch (contiguous, not before the first index, no gap).
        """
        first = entries[0].index if entries else self._last + 1
        if first <= self._last:
            s = bisect_right(self._segments, first, key=lambda seg: seg.first) - 1
            if s < len(self._segments) - 1:
                self._drop_segments_after(s, first)
            seg = self._segments[-1]
        elif not self._segments or (
            # A segment holding no entry yet has the name a new one would get: keep using it.
            self._segments[-1].end >= self._segment_size and self._segments[-1].first != first
        ):
            seg = self._create_segment(first, self._last_term)
        else:
            seg = self._segments[-1]
        buf = _encode_record(commit, entries)
        offset = seg.end
        fd = self._fd
        assert fd is not None
        with self._io.guard(f"appending to {seg.path}"):
            try:
                pwrite_all(fd, buf, offset)
                self._io.sync_file(fd)
            except OSError:
                # Best effort, so that a restart does not claim entries never acknowledged.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, offset)
                raise
        with self.lock:
            seg.end = offset + len(buf)
            if entries:
                self._publish(seg, offset, entries)
            self.max_commit = max(self.max_commit, commit)

    def _publish(self, seg: _Segment, offset: int, entries: list[Entry]) -> None:
        first = entries[0].index
        if first <= self._last:
            self._truncate_view(first)
        seg.firsts.append(first)
        seg.offsets.append(offset)
        self._win.extend(entries)
        self._last = entries[-1].index
        self._last_term = entries[-1].term
        if len(self._win) > 2 * self._cache:
            drop = len(self._win) - self._cache
            del self._win[:drop]
            self._win_first += drop

    def _truncate_view(self, first: int) -> None:
        """Forget entries ``first`` and later (they live in the last segment only)."""
        self._last_term = self._term(first - 1)
        self._last = first - 1
        seg = self._segments[-1]
        k = bisect_left(seg.firsts, first)
        del seg.firsts[k:]
        del seg.offsets[k:]
        if first > self._win_first:
            del self._win[first - self._win_first :]
        else:
            self._win.clear()
            self._win_first = first

    def _drop_segments_after(self, s: int, first: int) -> None:
        with self.lock, self._io.guard("truncating the log"):
            self._close_fd()
            for seg in reversed(self._segments[s + 1 :]):
                os.unlink(seg.path)
            self._io.sync_dir(self._dir)
            del self._segments[s + 1 :]
            self._truncate_view(first)
            self._fd = os.open(self._segments[-1].path, os.O_RDWR)

    def _create_segment(self, first: int, prev_term: int) -> _Segment:
        path = self._dir / segment_name(first)
        tmp = path.with_name(path.name + ".tmp")
        header = _SEG_HEADER.pack(_SEG_MAGIC, _SEG_VERSION, first, prev_term, 0)
        header = header[:-4] + _U32.pack(zlib.crc32(header[:-4]))
        with self._io.guard(f"creating {path}"):
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                pwrite_all(fd, header, 0)
                if self._prealloc:
                    preallocate(fd, 0, self._segment_size)
                self._io.sync_file(fd)
                os.replace(tmp, path)
                self._io.sync_dir(self._dir)
            except OSError:
                os.close(fd)
                raise
        seg = _Segment(first, prev_term, path)
        with self.lock:
            self._close_fd()
            self._fd = fd
            self._segments.append(seg)
        return seg

    def compact(self, upto: int) -> int:
        """Delete the oldest segments whose entries are all ``<= upto``; return how many.

        The last segment is always kept. Deleting oldest first means a crash leaves the log
        contiguous.
        """
        with self.lock:
            n = self._delete_oldest(self._segments, upto)
            if n == 0:
                return 0
            self._first = self._segments[0].first
            self._prev_term = self._segments[0].prev_term
            if self._win_first < self._first:
                del self._win[: self._first - self._win_first]
                self._win_first = self._first
        return n

    def _delete_oldest(self, segments: list[_Segment], upto: int) -> int:
        n = 0
        while n < len(segments) - 1 and segments[n + 1].first - 1 <= upto:
            n += 1
        if n:
            with self._io.guard("compacting the log"):
                for seg in segments[:n]:
                    os.unlink(seg.path)
                self._io.sync_dir(self._dir)
            del segments[:n]
        return n

    def apply_snapshot(self, meta: SnapshotMeta, *, keep_log: bool = True) -> bool:
        """Make the log consistent with a newer durable snapshot; return whether it was kept.

        With ``keep_log``, if the log holds the snapshot's last entry (same index and term) the
        entries after it stay (Raft, section 7); otherwise the whole log is discarded and
        restarts after the snapshot.
        """
        with self.lock:
            if (
                keep_log
                and self._first - 1 <= meta.index <= self._last
                and self._term(meta.index) == meta.term
            ):
                self._floor, self._floor_term = meta.index, meta.term
                return True
            with self._io.guard("discarding the log"):
                self._close_fd()
                for seg in reversed(self._segments):  # newest first: a crash leaves a prefix
                    os.unlink(seg.path)
                self._io.sync_dir(self._dir)
            self._segments.clear()
            self._reset(meta.index + 1, meta.term)
            self._floor, self._floor_term = meta.index, meta.term
            return False

    def _reset(self, first: int, prev_term: int) -> None:
        self._first = first
        self._prev_term = prev_term
        self._last = first - 1
        self._last_term = prev_term
        self._win = []
        self._win_first = first

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def close(self) -> None:
        """Close the open segment. Idempotent."""
        with self.lock:
            self._close_fd()

    # -- recovery ---------------------------------------------------------------------------

    def recover(self, snapshot: SnapshotMeta, keep_entries: int) -> None:
        """Load the log after ``snapshot``: verify, cut a torn tail, refuse corruption.

        Segments wholly older than ``snapshot.index - keep_entries`` are deleted unread (an
        interrupted compaction), so opening costs the retained segments only.
        """
        segments = self._list_segments()
        self._delete_oldest(segments, snapshot.index - keep_entries)
        self._floor, self._floor_term = snapshot.index, snapshot.term
        if not segments:
            self._reset(snapshot.index + 1, snapshot.term)
            return
        if segments[0].first > snapshot.index + 1:
            raise CorruptionError(
                f"{segments[0].path}: the log starts at index {segments[0].first} but the "
                f"snapshot ends at {snapshot.index}: entries {snapshot.index + 1} to "
                f"{segments[0].first - 1} are missing. {REPAIR_ADVICE}"
            )
        self._reset(segments[0].first, segments[0].prev_term)
        for i, seg in enumerate(segments):
            if i and (seg.first != self._last + 1 or seg.prev_term != self._last_term):
                raise CorruptionError(
                    f"{seg.path}: segment starts at index {seg.first} (after term "
                    f"{seg.prev_term}) but the previous segment ends at index {self._last} (term "
                    f"{self._last_term}); a segment is missing or damaged. {REPAIR_ADVICE}"
                )
            self._segments.append(seg)
            self._recover_segment(seg, is_last=i == len(segments) - 1)
        if self._term_or_none(snapshot.index) != snapshot.term:
            log.warning(
                "%s: the log does not hold snapshot %d/%d (a snapshot install was "
                "interrupted); discarding it",
                self._dir,
                snapshot.term,
                snapshot.index,
            )
            self.apply_snapshot(snapshot)
            return
        with self._io.guard(f"opening {self._segments[-1].path}"):
            self._fd = os.open(self._segments[-1].path, os.O_RDWR)

    def _term_or_none(self, index: int) -> int | None:
        try:
            return self._term(index)
        except (CompactedError, UnavailableError):
            return None

    def _list_segments(self) -> list[_Segment]:
        segments = []
        with self._io.guard(f"listing {self._dir}"):
            names = sorted(os.listdir(self._dir))
            stale = [n for n in names if n.endswith(".tmp")]
            for name in stale:  # segments whose creation did not finish
                os.unlink(self._dir / name)
            if stale:
                self._io.sync_dir(self._dir)
            for name in names:
                if not _SEGMENT_NAME.match(name):
                    if name not in stale:
                        log.warning("%s: ignoring unexpected file %s", self._dir, name)
                    continue
                path = self._dir / name
                with open(path, "rb") as f:
                    header = f.read(_SEG_HEADER.size)
                segments.append(_check_header(path, header, int(name[:16], 16)))
        segments.sort(key=lambda seg: seg.first)
        return segments

    def _recover_segment(self, seg: _Segment, *, is_last: bool) -> None:
        with self._io.guard(f"reading {seg.path}"):
            data = seg.path.read_bytes()
        scan = _scan(data)
        for offset, batch in scan.records:
            self._load(seg, offset, batch)
        seg.end = scan.end
        if scan.damage is None:
            return
        where = f"{seg.path}: {scan.damage} at byte {scan.end}"
        if scan.resume is not None:
            raise CorruptionError(
                f"{where}, yet an intact record follows at byte {scan.resume}: the log is "
                f"damaged in the middle, not torn at its end. {REPAIR_ADVICE}"
            )
        if not is_last:
            raise CorruptionError(
                f"{where}, in a segment that was complete before the next one was started. "
                f"{REPAIR_ADVICE}"
            )
        log.warning(
            "%s; discarding the torn tail of the log (%d bytes, never acknowledged)",
            where,
            len(data) - scan.end,
        )
        with self._io.guard(f"truncating {seg.path}"):
            fd = os.open(seg.path, os.O_RDWR)
            try:
                os.ftruncate(fd, scan.end)
                if self._prealloc:
                    preallocate(fd, scan.end, self._segment_size - scan.end)
                self._io.sync_file(fd)
            finally:
                os.close(fd)

    def _load(self, seg: _Segment, offset: int, batch: _Batch) -> None:
        self.max_commit = max(self.max_commit, batch.commit)
        entries = batch.entries
        if not entries:
            return
        first = entries[0].index
        where = f"{seg.path}: the record at byte {offset}"
        if not seg.first <= first <= self._last + 1:
            raise CorruptionError(
                f"{where} starts at index {first}, but its segment starts at {seg.first} and "
                f"the log so far ends at {self._last}; entries are missing. {REPAIR_ADVICE}"
            )
        term = self._term(first - 1)
        for i, e in enumerate(entries):
            if e.index != first + i or e.term < term:
                raise CorruptionError(
                    f"{where} holds entry {e.index} (term {e.term}) after term {term} where "
                    f"entry {first + i} was expected. {REPAIR_ADVICE}"
                )
            term = e.term
        self._publish(seg, offset, entries)


def _check_header(path: Path, header: bytes, first: int) -> _Segment:
    problem = None
    if len(header) < _SEG_HEADER.size:
        problem = "the segment header is incomplete"
    else:
        magic, version, got_first, prev_term, crc = _SEG_HEADER.unpack(header)
        if magic != _SEG_MAGIC or crc != zlib.crc32(header[:-4]):
            problem = "the segment header is damaged"
        elif version != _SEG_VERSION:
            problem = f"unsupported segment version {version}"
        elif got_first != first:
            problem = f"the header says the segment starts at index {got_first}"
        else:
            return _Segment(first, prev_term, path)
    raise CorruptionError(f"{path}: {problem}. {REPAIR_ADVICE}")


def _size(entries: list[Entry]) -> int:
    return sum(len(e.data) for e in entries) + ENTRY_OVERHEAD * len(entries)


def _limit(entries: list[Entry], max_bytes: int | None, *, allow_empty: bool) -> list[Entry]:
    """The longest prefix of at most ``max_bytes``; at least one entry unless ``allow_empty``."""
    if max_bytes is None:
        return entries
    size = 0
    for n, e in enumerate(entries):
        size += len(e.data) + ENTRY_OVERHEAD
        if size > max_bytes:
            return entries[: n if n or allow_empty else 1]
    return entries
