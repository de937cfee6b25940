"""Tests of the Raft member's durable storage: log, hard state, snapshots, compaction, identity.

Damaged files and failing disks are in ``test_storage_faults.py``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.backends.raft.records import ConfState, Entry, EntryType, HardState, SnapshotMeta
from controlplane.backends.raft.storage import (
    BadSnapshotError,
    CompactedError,
    DiskStorage,
    IdentityMismatchError,
    UnavailableError,
)
from controlplane.backends.raft.wal import SegmentedLog

CONF = ConfState(voters=("m1", "m2", "m3"))


def ents(lo: int, hi: int, term: int = 1, size: int = 8) -> list[Entry]:
    """Entries ``lo..hi`` inclusive whose data names them (so a mix-up shows)."""
    return [
        Entry(i, term, data=f"{i}:{term}:".encode().ljust(size, b".")) for i in range(lo, hi + 1)
    ]


def open_storage(path: Path, **kw: Any) -> DiskStorage:
    kw.setdefault("segment_size", 4096)
    return DiskStorage(path, **kw)


class CountingFsync:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        os.fsync(fd)


def segments(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "wal").iterdir() if p.suffix == ".log")


# -- the log ----------------------------------------------------------------------------------


def test_fresh_storage_is_empty(tmp_path: Path) -> None:
    with open_storage(tmp_path) as s:
        assert (s.first_index(), s.last_index()) == (1, 0)
        assert s.term(0) == 0
        assert s.entries(1, 1) == []
        assert s.initial_state() == (HardState(), ConfState())
        assert s.snapshot_meta() == SnapshotMeta()
        assert s.load_snapshot() is None
        with pytest.raises(UnavailableError):
            s.term(1)
        with pytest.raises(UnavailableError):
            s.entries(1, 2)


def test_save_read_and_reopen(tmp_path: Path) -> None:
    log = ents(1, 10) + ents(11, 20, term=2) + [Entry(21, 2, EntryType.CONF_CHANGE, b"conf")]
    with open_storage(tmp_path) as s:
        s.save(HardState(1, "m1", 0), log[:10])
        s.save(HardState(2, None, 5), log[10:])
        assert s.entries(1, 22) == log
        assert s.entries(5, 8) == log[4:7]
        assert [s.term(i) for i in (0, 1, 10, 11, 21)] == [0, 1, 1, 2, 2]
    with open_storage(tmp_path) as s:
        assert (s.first_index(), s.last_index()) == (1, 21)
        assert s.entries(1, 22) == log
        assert s.initial_state() == (HardState(2, None, 5), ConfState())


def test_entries_bounds_and_byte_limit(tmp_path: Path) -> None:
    with open_storage(tmp_path) as s:
        s.save(None, ents(1, 10, size=100))
        assert len(s.entries(1, 11, max_bytes=0)) == 1  # at least one entry
        assert len(s.entries(1, 11, max_bytes=3 * 116)) == 3  # data + 16 bytes each
        assert len(s.entries(1, 11, max_bytes=3 * 116 - 1)) == 2
        assert s.entries(4, 4) == []
        with pytest.raises(UnavailableError):
            s.entries(5, 12)
        with pytest.raises(CompactedError):
            s.entries(0, 3)


def test_append_buffers_until_one_sync(tmp_path: Path) -> None:
    fsync = CountingFsync()
    with open_storage(tmp_path, fsync=fsync) as s:
        s.save(HardState(1, "m1", 0), ents(1, 1))  # creates the first segment
        before = fsync.calls
        s.append(ents(2, 5))
        s.append(ents(6, 9))
        s.append(ents(8, 12, term=2))  # replaces the buffered 8 and 9
        assert s.last_index() == 1  # nothing readable before sync
        s.sync()
        assert fsync.calls == before + 1  # group commit: one fdatasync
        assert s.entries(1, 13) == ents(1, 7) + ents(8, 12, term=2)
        s.save(HardState(1, "m1", 3), [])  # commit-only change: one record, one fsync
        assert fsync.calls == before + 2
        s.save(HardState(2, "m2", 3), [])  # term change: hardstate file + directory
        assert fsync.calls == before + 4


def test_truncate_suffix_in_the_same_segment(tmp_path: Path) -> None:
    with open_storage(tmp_path) as s:
        s.save(HardState(1, "m1", 3), ents(1, 10))
        s.save(None, ents(6, 8, term=2))
        assert s.last_index() == 8
        assert s.entries(1, 9) == ents(1, 5) + ents(6, 8, term=2)
    with open_storage(tmp_path) as s:
        assert s.entries(1, 9) == ents(1, 5) + ents(6, 8, term=2)
        s.save(None, ents(9, 9, term=2))
        assert s.term(9) == 2


def test_truncation_into_an_earlier_segment_deletes_later_ones(tmp_path: Path) -> None:
    with open_storage(tmp_path, segment_size=600) as s:
        for i in range(1, 61):
            s.save(None, ents(i, i, size=100))
        assert len(segments(tmp_path)) > 4
        s.save(None, ents(12, 13, term=3, size=100))
        assert s.last_index() == 13
        assert len(segments(tmp_path)) <= 3
        expected = ents(1, 11, size=100) + ents(12, 13, term=3, size=100)
        assert s.entries(1, 14) == expected
        s.save(None, ents(14, 40, term=3, size=100))
        expected += ents(14, 40, term=3, size=100)
    with open_storage(tmp_path, segment_size=600) as s:
        assert s.entries(1, 41) == expected


def test_append_rejects_gaps_committed_overwrites_and_term_regressions(tmp_path: Path) -> None:
    with open_storage(tmp_path) as s:
        s.save(HardState(2, None, 5), ents(1, 10, term=2))
        with pytest.raises(ValueError, match="gap"):
            s.append(ents(12, 12, term=2))
        with pytest.raises(ValueError, match="committed"):
            s.append(ents(5, 6, term=3))
        with pytest.raises(ValueError, match="term"):
            s.append(ents(11, 11, term=1))
        with pytest.raises(ValueError, match="contiguous"):
            s.append([Entry(11, 2), Entry(13, 2)])
        with pytest.raises(ValueError):
            s.save(HardState(1, None, 5), [])  # the term never goes down
        assert s.entries(1, 11) == ents(1, 10, term=2)


def test_segments_roll_and_are_named_by_first_index(tmp_path: Path) -> None:
    with open_storage(tmp_path, segment_size=1024) as s:
        for i in range(1, 101):
            s.save(None, ents(i, i, size=50))
    names = segments(tmp_path)
    assert len(names) > 5
    assert names[0] == "0000000000000001.log"
    firsts = [int(n[:16], 16) for n in names]
    assert firsts == sorted(firsts)
    with open_storage(tmp_path, segment_size=1024) as s:
        assert s.entries(1, 101) == [e for i in range(1, 101) for e in ents(i, i, size=50)]


def test_old_entries_are_read_from_disk(tmp_path: Path) -> None:
    expected = [e for i in range(1, 201) for e in ents(i, i)]
    with open_storage(tmp_path, segment_size=1024, cache_entries=10) as s:
        for i in range(1, 201, 5):
            s.save(None, ents(i, i + 4))
        assert s._log._win_first > 100  # the window holds recent entries only
        assert s.entries(1, 201) == expected
        assert s.entries(37, 58) == expected[36:57]
        assert [s.term(i) for i in range(1, 201)] == [1] * 200
        assert len(s.entries(1, 201, max_bytes=5 * 24)) == 5


def test_readers_on_another_thread_see_consistent_durable_entries(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()
    opts: dict[str, Any] = {"segment_size": 1024, "cache_entries": 8, "keep_entries": 0}
    with open_storage(tmp_path, sync=False, **opts) as s:

        def reader() -> None:
            while not stop.is_set():
                try:
                    first, last = s.first_index(), s.last_index()
                    got = s.entries(first, last + 1, max_bytes=None if last % 2 else 2000)
                    assert [e.index for e in got] == list(range(first, first + len(got)))
                    for e in got:
                        assert e.data.startswith(b"%d:%d:" % (e.index, e.term))
                    if got:  # (it may have been replaced since, with a newer term)
                        assert s.term(got[-1].index) >= got[-1].term
                except (CompactedError, UnavailableError):
                    pass  # the writer moved the log on between two calls
                except BaseException as exc:
                    errors.append(exc)
                    return

        thread = threading.Thread(target=reader)
        thread.start()
        term, i = 1, 1
        try:
            for n in range(300):
                if n % 7 == 6:  # a follower's conflict: replace the last few entries
                    term += 1
                    i -= 3
                s.save(HardState(term, None, max(0, i - 20)), ents(i, i + 9, term=term, size=40))
                i += 10
                if n % 50 == 49:
                    s.save_snapshot(SnapshotMeta(i - 30, s.term(i - 30), CONF), b"snap")
                    s.compact()
        finally:
            stop.set()
            thread.join()
    assert not errors, errors[0]


# -- hard state ---------------------------------------------------------------------------------


def test_hard_state_survives_reopen(tmp_path: Path) -> None:
    with open_storage(tmp_path) as s:
        s.save(HardState(3, "m2", 0), ents(1, 4, term=3))
        s.save(HardState(3, "m2", 4), [])
    with open_storage(tmp_path) as s:
        assert s.initial_state()[0] == HardState(3, "m2", 4)
        s.save(HardState(4, None, 4), [])
    with open_storage(tmp_path) as s:
        assert s.initial_state()[0] == HardState(4, None, 4)


def test_hard_state_is_replaced_atomically(tmp_path: Path) -> None:
    with open_storage(tmp_path) as s:
        s.save(HardState(1, "m1", 0), [])
    # A crash while writing the next hard state leaves only a temporary file behind.
    (tmp_path / "hardstate.tmp").write_bytes(b"half a hard st")
    with open_storage(tmp_path) as s:
        assert s.initial_state()[0] == HardState(1, "m1", 0)

    class FailOnce:
        def __call__(self, fd: int) -> None:
            raise OSError(5, "injected")

    with open_storage(tmp_path, fsync=FailOnce()) as s, pytest.raises(Exception, match="inject"):
        s.save(HardState(2, "m2", 0), [])
    with open_storage(tmp_path) as s:
        assert s.initial_state()[0] == HardState(1, "m1", 0)
    assert not (tmp_path / "hardstate.tmp").exists()


# -- snapshots ------------------------------------------------------------------------------------


def test_snapshot_round_trip_keeps_matching_log(tmp_path: Path) -> None:
    meta = SnapshotMeta(index=15, term=2, conf=CONF)
    with open_storage(tmp_path) as s:
        s.save(HardState(2, "m1", 20), ents(1, 10) + ents(11, 20, term=2))
        s.save_snapshot(meta, b"state at 15")
        assert s.snapshot_meta() == meta
        assert (s.first_index(), s.last_index()) == (16, 20)
        assert s.term(15) == 2
        assert s.entries(16, 21) == ents(16, 20, term=2)
        with pytest.raises(CompactedError):
            s.term(14)
        with pytest.raises(CompactedError):
            s.entries(15, 17)
        assert s.load_snapshot() == (meta, b"state at 15")
        assert s.initial_state() == (HardState(2, "m1", 20), CONF)
    with open_storage(tmp_path) as s:
        assert s.snapshot_meta() == meta
        assert (s.first_index(), s.last_index()) == (16, 20)
        assert s.load_snapshot() == (meta, b"state at 15")
        assert s.entries(16, 21) == ents(16, 20, term=2)


def test_a_local_snapshot_must_match_the_log(tmp_path: Path) -> None:
    with open_storage(tmp_path) as s:
        s.save(HardState(1, None, 2), ents(1, 10))
        with pytest.raises(ValueError, match="does not hold entry 8 of term 3"):
            s.save_snapshot(SnapshotMeta(8, 3, CONF), b"")
        with pytest.raises(ValueError, match="does not hold entry 11 of term 1"):
            s.save_snapshot(SnapshotMeta(11, 1, CONF), b"")
        assert s.snapshot_meta().index == 0
        assert list((tmp_path / "snap").iterdir()) == []


def test_snapshot_from_the_leader_replaces_the_log(tmp_path: Path) -> None:
    with open_storage(tmp_path) as s:
        s.save(HardState(1, None, 2), ents(1, 10))
        s.install_snapshot(SnapshotMeta(8, 3, CONF), [b"chunk1", b"chunk2"])
        assert (s.first_index(), s.last_index()) == (9, 8)
        assert segments(tmp_path) == []
        assert s.term(8) == 3
        s.save(HardState(3, None, 9), ents(9, 12, term=3))
    with open_storage(tmp_path) as s:
        assert s.load_snapshot() == (SnapshotMeta(8, 3, CONF), b"chunk1chunk2")
        assert s.entries(9, 13) == ents(9, 12, term=3)
        s.install_snapshot(SnapshotMeta(30, 4, CONF), b"far ahead")  # beyond the log
        assert (s.first_index(), s.last_index()) == (31, 30)
        with pytest.raises(ValueError, match="not newer"):
            s.install_snapshot(SnapshotMeta(30, 4, CONF), b"")
        s.save(HardState(4, None, 30), ents(31, 40, term=4))
        s.install_snapshot(SnapshotMeta(35, 4, CONF), b"matching")  # still replaces the log
        assert (s.first_index(), s.last_index()) == (36, 35)


def test_only_the_newest_snapshots_are_kept(tmp_path: Path) -> None:
    with open_storage(tmp_path, keep_snapshots=2) as s:
        s.save(HardState(1, None, 40), ents(1, 40))
        for i in (10, 20, 30, 40):
            s.save_snapshot(SnapshotMeta(i, 1, CONF), b"%d" % i)
    names = sorted(p.name for p in (tmp_path / "snap").iterdir())
    assert names == [
        "0000000000000001-000000000000001e.snap",
        "0000000000000001-0000000000000028.snap",
    ]


@pytest.mark.parametrize("chunk_size", [1, 7, 4096, 1 << 20])
def test_snapshot_streams_between_members(tmp_path: Path, chunk_size: int) -> None:
    data = os.urandom(50_000)
    meta = SnapshotMeta(100, 5, CONF)
    with open_storage(tmp_path / "leader") as leader, open_storage(tmp_path / "follower") as f:
        leader.save(HardState(5, None, 100), ents(1, 100, term=5))
        leader.save_snapshot(meta, [data[:20_000], data[20_000:]])
        f.save(HardState(4, None, 3), ents(1, 5, term=4))
        reader = leader.open_snapshot()
        assert reader is not None
        with reader, f.receive_snapshot() as receiver:
            assert reader.meta == meta
            assert b"".join(reader.data_chunks(chunk_size)) == data
            for chunk in reader.chunks(chunk_size):
                receiver.write(chunk)
            assert receiver.commit() == meta
        assert f.snapshot_meta() == meta
        assert (f.first_index(), f.last_index()) == (101, 100)
        assert f.load_snapshot() == (meta, data)
        assert [p.name for p in (tmp_path / "follower" / "snap").iterdir()] == [
            "0000000000000005-0000000000000064.snap"
        ]


def test_snapshot_receiver_rejects_bad_streams(tmp_path: Path) -> None:
    meta = SnapshotMeta(10, 1, CONF)
    with open_storage(tmp_path / "a") as a, open_storage(tmp_path / "b") as b:
        a.save(HardState(1, None, 10), ents(1, 10))
        a.save_snapshot(meta, b"x" * 1000)
        reader = a.open_snapshot()
        assert reader is not None
        with reader:
            stream = b"".join(reader.chunks())

        def feed(blob: bytes) -> None:
            with b.receive_snapshot() as r:
                r.write(blob[:100])
                r.write(blob[100:])
                r.commit()

        flipped = bytearray(stream)
        flipped[-1] ^= 1
        with pytest.raises(BadSnapshotError, match="checksum"):
            feed(bytes(flipped))
        with pytest.raises(BadSnapshotError, match="incomplete"):
            feed(stream[:-1])
        with pytest.raises(BadSnapshotError, match="longer"):
            feed(stream + b"!")
        with pytest.raises(BadSnapshotError, match="magic"):
            feed(b"garbage" * 10)
        header = bytearray(stream)
        header[30] ^= 1  # inside the metadata
        with pytest.raises(BadSnapshotError, match="header"):
            feed(bytes(header))
        assert b.snapshot_meta().index == 0
        assert list((tmp_path / "b" / "snap").iterdir()) == []  # temporary files removed
        feed(stream)
        assert b.snapshot_meta() == meta
        with pytest.raises(ValueError, match="not newer"):
            feed(stream)


# -- compaction -------------------------------------------------------------------------------


def fill(s: DiskStorage, n: int) -> None:
    for i in range(1, n + 1, 10):
        s.save(HardState(1, None, i + 9), ents(i, i + 9, size=50))


def test_compaction_deletes_whole_covered_segments(tmp_path: Path) -> None:
    with open_storage(tmp_path, segment_size=1024, keep_entries=0) as s:
        fill(s, 500)
        before = segments(tmp_path)
        s.save_snapshot(SnapshotMeta(450, 1, CONF), b"state")
        removed = s.compact()
        after = segments(tmp_path)
        assert removed == len(before) - len(after) > 10
        assert int(after[0][:16], 16) <= 451  # the segment holding 451 stays
        assert s.entries(451, 501) == [e for i in range(451, 501) for e in ents(i, i, size=50)]
        assert s.compact() == 0
        with pytest.raises(ValueError, match="past the snapshot"):
            s.compact(460)


def test_keep_entries_keeps_some_log_behind_the_snapshot(tmp_path: Path) -> None:
    with open_storage(tmp_path, segment_size=1024, keep_entries=200) as s:
        fill(s, 500)
        s.save_snapshot(SnapshotMeta(450, 1, CONF), b"state")
        s.compact()
        assert int(segments(tmp_path)[0][:16], 16) <= 250
        assert s.first_index() == 451  # the read side still starts after the snapshot


def test_startup_reads_only_segments_after_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_storage(tmp_path, segment_size=1024, keep_entries=0) as s:
        fill(s, 2000)
        total = len(segments(tmp_path))
        # Crash after the snapshot but before compact(): start-up finishes the compaction.
        s.save_snapshot(SnapshotMeta(1990, 1, CONF), b"state")
    read: list[str] = []
    original = SegmentedLog._recover_segment

    def spy(self: SegmentedLog, seg: Any, *, is_last: bool) -> None:
        read.append(seg.path.name)
        original(self, seg, is_last=is_last)

    monkeypatch.setattr(SegmentedLog, "_recover_segment", spy)
    with open_storage(tmp_path, segment_size=1024, keep_entries=0) as s:
        assert (s.first_index(), s.last_index()) == (1991, 2000)
        assert s.entries(1991, 2001) == [e for i in range(1991, 2001) for e in ents(i, i, size=50)]
    assert total >= 100
    assert len(read) <= 2
    assert read == segments(tmp_path)


# -- identity -----------------------------------------------------------------------------------


def test_identity_is_checked(tmp_path: Path) -> None:
    with open_storage(tmp_path) as s:
        assert s.identity() is None
        with pytest.raises(IdentityMismatchError, match="never bootstrapped"):
            s.check_identity("c1", "m1")
        s.write_identity("c1", "m1", CONF)
        s.write_identity("c1", "m1")  # idempotent
        assert s.snapshot_meta() == SnapshotMeta(conf=CONF)
        assert s.initial_state()[1] == CONF
    with open_storage(tmp_path) as s:
        s.check_identity("c1", "m1")
        assert s.snapshot_meta() == SnapshotMeta(conf=CONF)
        with pytest.raises(IdentityMismatchError, match=r"member 'm1' of cluster 'c1'"):
            s.check_identity("c2", "m1")
        with pytest.raises(IdentityMismatchError):
            s.check_identity("c1", "m2")
        with pytest.raises(IdentityMismatchError):
            s.write_identity("c1", "m9")


# -- model-based ----------------------------------------------------------------------------------


class Model:
    """What the storage should hold: a plain list of entries after a snapshot."""

    def __init__(self) -> None:
        self.snap = SnapshotMeta()
        self.snap_data = b""
        self.log: list[Entry] = []  # entries snap.index + 1 ..
        self.state = HardState()

    @property
    def last(self) -> int:
        return self.snap.index + len(self.log)

    def term(self, index: int) -> int:
        return (
            self.snap.term
            if index == self.snap.index
            else self.log[index - self.snap.index - 1].term
        )

    def append(self, entries: list[Entry]) -> None:
        del self.log[entries[0].index - self.snap.index - 1 :]
        self.log.extend(entries)

    def snapshot(self, meta: SnapshotMeta, data: bytes, *, install: bool) -> None:
        self.log = [] if install else self.log[meta.index - self.snap.index :]
        self.snap, self.snap_data = meta, data
        self.state = HardState(self.state.term, self.state.vote, max(self.state.commit, meta.index))


def check(s: DiskStorage, m: Model, *, reopened: bool) -> None:
    assert s.snapshot_meta() == m.snap
    assert (s.first_index(), s.last_index()) == (m.snap.index + 1, m.last)
    assert s.entries(m.snap.index + 1, m.last + 1) == m.log
    assert s.term(m.snap.index) == m.snap.term
    state = s.initial_state()[0]
    assert (state.term, state.vote) == (m.state.term, m.state.vote)
    if reopened:  # commit is volatile: never ahead, never behind the snapshot
        assert m.snap.index <= state.commit <= m.state.commit
    else:
        assert state.commit == m.state.commit
    if m.snap.index:
        assert s.load_snapshot() == (m.snap, m.snap_data)


KINDS = (
    ["append"] * 5
    + ["commit", "snapshot", "compact"] * 2
    + [
        "buffered",
        "vote",
        "install",
        "reopen",
    ]
)
OPS = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 12), st.integers(1, 8), st.integers(0, 1)),
    min_size=20,
    max_size=80,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS, segment_size=st.sampled_from([64, 300, 1 << 16]), keep=st.integers(0, 8))
def test_storage_matches_a_model(
    tmp_path: Path, ops: list[tuple[Any, ...]], segment_size: int, keep: int
) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:

        def opener() -> DiskStorage:
            return DiskStorage(
                d, sync=False, segment_size=segment_size, keep_entries=keep, cache_entries=4
            )

        m = Model()
        s = opener()
        reopened = False
        try:
            for kind, a, b, c in ops:
                term = m.state.term
                floor = max(m.state.commit, m.snap.index)
                if kind in ("append", "buffered"):
                    back, n = (a, b) if kind == "append" else (a % 4, min(b, 4))
                    first = max(floor + 1, m.last + 1 - back)
                    term = max(term + c, 1)
                    batch = ents(first, first + n - 1, term=term, size=first % 40)
                    vote = m.state.vote if term == m.state.term else None
                    m.state = HardState(term, vote, m.state.commit)
                    if kind == "append":
                        s.save(m.state, batch)
                    else:
                        s.append(batch[:1])
                        s.append(batch)
                        s.set_hard_state(m.state)
                        s.sync()
                    m.append(batch)
                elif kind == "commit":
                    commit = max(min(m.last, m.state.commit + a), m.state.commit)
                    m.state = HardState(m.state.term, m.state.vote, commit)
                    s.save(m.state, [])
                elif kind == "vote":
                    m.state = HardState(term + 1, ["m1", "m2", None][a % 3], m.state.commit)
                    s.save(m.state, [])
                elif kind == "snapshot" and m.state.commit > m.snap.index:
                    index = m.snap.index + 1 + a % (m.state.commit - m.snap.index)
                    meta = SnapshotMeta(index, m.term(index), CONF)
                    s.save_snapshot(meta, b"local@%d" % index)
                    m.snapshot(meta, b"local@%d" % index, install=False)
                elif kind == "install":
                    index = max(m.last + a % 9 - 3, m.state.commit, m.snap.index + 1)
                    meta = SnapshotMeta(index, max(term, 1) + c, CONF)
                    if a % 2:
                        s.install_snapshot(meta, [b"leader@", b"%d" % index])
                    else:
                        with s.receive_snapshot() as r:
                            for chunk in _snapshot_stream(tmp_path, meta, b"leader@%d" % index):
                                r.write(chunk)
                            r.commit()
                    m.snapshot(meta, b"leader@%d" % index, install=True)
                    if meta.term > term:
                        m.state = HardState(meta.term, None, m.state.commit)
                        s.save(m.state, [])
                elif kind == "compact":
                    s.compact()
                elif kind == "reopen":
                    s.close()
                    s = opener()
                    reopened = True
                    m.state = HardState(m.state.term, m.state.vote, s.initial_state()[0].commit)
                check(s, m, reopened=reopened and kind == "reopen")
            s.close()
            s = opener()
            check(s, m, reopened=True)
        finally:
            s.close()


def _snapshot_stream(tmp_path: Path, meta: SnapshotMeta, data: bytes) -> Iterator[bytes]:
    with tempfile.TemporaryDirectory(dir=tmp_path) as d, DiskStorage(d, sync=False) as leader:
        leader.install_snapshot(meta, data)
        reader = leader.open_snapshot()
        assert reader is not None
        with reader:
            yield from reader.chunks(chunk_size=17)
