"""Damaged files and failing disks: recovery cuts torn writes, refuses corruption, fails stop.

The promise under test: no acknowledged entry is ever lost or changed, no entry that was not
acknowledged is claimed after a failure, and real corruption stops the member with a message
naming the file and the byte offset.
"""

from __future__ import annotations

import errno
import logging
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.backends.raft.records import ConfState, Entry, HardState, SnapshotMeta
from controlplane.backends.raft.storage import CorruptionError, DiskStorage, StorageError
from controlplane.backends.raft.wal import _encode_record, _scan
from controlplane.errors import ControlPlaneError

CONF = ConfState(voters=("m1",))


def ents(lo: int, hi: int, term: int = 1, size: int = 100) -> list[Entry]:
    return [
        Entry(i, term, data=f"{i}:{term}:".encode().ljust(size, b"~")) for i in range(lo, hi + 1)
    ]


def segment_files(path: Path) -> list[Path]:
    return sorted((path / "wal").glob("*.log"))


def record_spans(path: Path) -> list[tuple[int, int]]:
    """``(start, end)`` byte offsets of each record in a segment file."""
    scan = _scan(path.read_bytes())
    starts = [offset for offset, _ in scan.records]
    return list(zip(starts, [*starts[1:], scan.end], strict=True))


def write_log(path: Path, n: int = 10, **kw: Any) -> list[Entry]:
    """``n`` records of one entry each; returns the entries."""
    with DiskStorage(path, **kw) as s:
        for i in range(1, n + 1):
            s.save(HardState(1, "m1", max(0, i - 5)), ents(i, i))
    return ents(1, n)


def flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def reopen(path: Path, **kw: Any) -> DiskStorage:
    kw.setdefault("sync", False)
    return DiskStorage(path, **kw)


# -- torn writes are cut off ------------------------------------------------------------------


@pytest.mark.parametrize("preallocate", [False, True])
def test_cutting_the_last_record_anywhere_recovers_the_previous_ones(
    tmp_path: Path, preallocate: bool
) -> None:
    opts = {"segment_size": 8192, "preallocate": preallocate}
    log = write_log(tmp_path, **opts)
    [seg] = segment_files(tmp_path)
    original = seg.read_bytes()
    start, end = record_spans(seg)[-1]
    assert len(original) == (8192 if preallocate else end)
    for cut in range(start, end):
        # Without preallocation the file is cut; with it, the unwritten part reads as zeros.
        tail = b"\0" * (len(original) - cut) if preallocate else b""
        seg.write_bytes(original[:cut] + tail)
        with reopen(tmp_path, **opts) as s:
            assert s.last_index() == 9, cut
            assert s.entries(1, 10) == log[:9]
        with reopen(tmp_path, **opts) as s:  # the repair itself is durable and clean
            s.save(None, ents(10, 10, term=2))
        with reopen(tmp_path, **opts) as s:
            assert s.entries(1, 11) == [*log[:9], *ents(10, 10, term=2)]


def test_a_torn_write_is_logged_and_a_clean_end_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_log(tmp_path, segment_size=8192)
    [seg] = segment_files(tmp_path)
    with caplog.at_level(logging.WARNING), reopen(tmp_path, segment_size=8192):
        pass
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    start, _ = record_spans(seg)[-1]
    data = bytearray(seg.read_bytes())
    data[start : start + 12] = bytes(12)  # the page holding the header never reached the disk
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING), reopen(tmp_path, segment_size=8192) as s:
        assert s.last_index() == 9
    assert f"{seg}: no record header at byte {start}" in caplog.text
    assert "torn tail" in caplog.text


def test_flipped_bits_in_the_last_record_count_as_a_torn_write(tmp_path: Path) -> None:
    log = write_log(tmp_path, segment_size=8192, preallocate=False)
    [seg] = segment_files(tmp_path)
    original = seg.read_bytes()
    start, end = record_spans(seg)[-1]
    for offset in range(start, end):
        seg.write_bytes(original)
        flip(seg, offset, bit=offset % 8)
        with reopen(tmp_path, segment_size=8192, preallocate=False) as s:
            assert s.entries(1, s.last_index() + 1) == log[:9], offset


# -- corruption is refused --------------------------------------------------------------------


@pytest.mark.parametrize("where", [0, 5, 9, 20, 60])  # magic, length, crc, payload
@pytest.mark.parametrize("record", [0, 4, 8])
def test_flipped_bits_in_a_middle_record_refuse_to_start(
    tmp_path: Path, record: int, where: int
) -> None:
    write_log(tmp_path, segment_size=8192)
    [seg] = segment_files(tmp_path)
    start, _ = record_spans(seg)[record]
    flip(seg, start + where)
    with pytest.raises(CorruptionError) as info:
        reopen(tmp_path, segment_size=8192)
    message = str(info.value)
    assert f"{seg}:" in message
    assert f"at byte {start}," in message
    assert "intact record follows" in message
    assert "re-add the member" in message  # says what to do
    assert isinstance(info.value, ControlPlaneError)


def test_damage_at_the_end_of_an_earlier_segment_refuses(tmp_path: Path) -> None:
    write_log(tmp_path, n=30, segment_size=600)
    first = segment_files(tmp_path)[0]
    start, end = record_spans(first)[-1]
    flip(first, end - 3)
    with pytest.raises(CorruptionError, match=rf"{first}: checksum mismatch at byte {start}, in a"):
        reopen(tmp_path, segment_size=600)


def test_a_missing_segment_refuses(tmp_path: Path) -> None:
    write_log(tmp_path, n=30, segment_size=600)
    files = segment_files(tmp_path)
    assert len(files) >= 3
    files[1].unlink()
    with pytest.raises(CorruptionError, match=rf"{files[2]}: .* a segment is missing"):
        reopen(tmp_path, segment_size=600)


def test_a_missing_first_segment_refuses(tmp_path: Path) -> None:
    write_log(tmp_path, n=30, segment_size=600)
    files = segment_files(tmp_path)
    files[0].unlink()
    with pytest.raises(CorruptionError, match=r"entries 1 to .* are missing"):
        reopen(tmp_path, segment_size=600)


def test_a_damaged_segment_header_refuses(tmp_path: Path) -> None:
    write_log(tmp_path, n=30, segment_size=600)
    files = segment_files(tmp_path)
    flip(files[1], 12)
    with pytest.raises(CorruptionError, match=rf"{files[1]}: the segment header is damaged"):
        reopen(tmp_path, segment_size=600)


@pytest.mark.parametrize(
    ("batch", "problem"),
    [
        (ents(12, 12), "starts at index 12, .* entries are missing"),
        ([Entry(11, 1), Entry(13, 1)], "holds entry 13 .* where entry 12 was expected"),
        (ents(11, 11, term=0), "holds entry 11 \\(term 0\\) after term 1"),
    ],
)
def test_indexes_or_terms_out_of_order_refuse(
    tmp_path: Path, batch: list[Entry], problem: str
) -> None:
    write_log(tmp_path, segment_size=8192)
    [seg] = segment_files(tmp_path)
    _, end = record_spans(seg)[-1]
    with seg.open("r+b") as f:
        f.seek(end)
        f.write(_encode_record(0, batch))
    with pytest.raises(CorruptionError, match=rf"{seg}: the record at byte {end} {problem}"):
        reopen(tmp_path, segment_size=8192)


# -- snapshots and hard state -------------------------------------------------------------------


def snapshot_files(path: Path) -> list[Path]:
    return sorted((path / "snap").glob("*.snap"), key=lambda p: p.name[-21:])


def test_a_corrupt_newest_snapshot_falls_back_when_the_log_covers_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    opts = {"segment_size": 1024, "keep_entries": 1000}
    log = write_log(tmp_path, n=100, **opts)
    with reopen(tmp_path, **opts) as s:
        s.save_snapshot(SnapshotMeta(50, 1, CONF), b"at 50")
        s.save_snapshot(SnapshotMeta(90, 1, CONF), b"at 90")
        s.compact()
    newest = snapshot_files(tmp_path)[-1]
    flip(newest, newest.stat().st_size - 1)
    with caplog.at_level(logging.WARNING), reopen(tmp_path, **opts) as s:
        assert s.snapshot_meta() == SnapshotMeta(50, 1, CONF)
        assert s.load_snapshot() == (SnapshotMeta(50, 1, CONF), b"at 50")
        assert s.entries(51, 101) == log[50:]
    assert "data checksum mismatch" in caplog.text
    assert newest.with_name(newest.name + ".corrupt").exists()


@pytest.mark.parametrize("damage", ["data", "header"])
def test_a_corrupt_newest_snapshot_refuses_when_the_log_was_compacted(
    tmp_path: Path, damage: str
) -> None:
    opts = {"segment_size": 1024, "keep_entries": 0}
    write_log(tmp_path, n=100, **opts)
    with reopen(tmp_path, **opts) as s:
        s.save_snapshot(SnapshotMeta(50, 1, CONF), b"at 50")
        s.save_snapshot(SnapshotMeta(90, 1, CONF), b"at 90")
        assert s.compact() > 0
    newest = snapshot_files(tmp_path)[-1]
    flip(newest, newest.stat().st_size - 1 if damage == "data" else 30)
    with pytest.raises(CorruptionError, match=rf"snapshot {newest} is corrupt.* exist nowhere"):
        reopen(tmp_path, **opts)
    assert newest.exists()  # left in place for the operator


def test_a_corrupt_snapshot_installed_from_the_leader_refuses(tmp_path: Path) -> None:
    with DiskStorage(tmp_path) as s:
        s.install_snapshot(SnapshotMeta(500, 3, CONF), b"from the leader")
        s.save(HardState(3, None, 500), ents(501, 510, term=3))
    [snap] = snapshot_files(tmp_path)
    flip(snap, snap.stat().st_size - 2)
    with pytest.raises(CorruptionError, match=r"data checksum mismatch.* exist nowhere"):
        reopen(tmp_path)


def test_snapshot_damage_after_opening_is_detected_on_load(tmp_path: Path) -> None:
    with DiskStorage(tmp_path) as s:
        s.save(HardState(1, None, 5), ents(1, 5))
        s.save_snapshot(SnapshotMeta(5, 1, CONF), b"0123456789")
        [snap] = snapshot_files(tmp_path)
        flip(snap, snap.stat().st_size - 4)
        with pytest.raises(CorruptionError, match="data checksum mismatch"):
            s.load_snapshot()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "magic"])
@pytest.mark.parametrize("name", ["hardstate", "identity"])
def test_a_corrupt_small_file_refuses_to_start(tmp_path: Path, name: str, damage: str) -> None:
    with DiskStorage(tmp_path) as s:
        s.write_identity("c1", "m1", CONF)
        s.save(HardState(7, "m2", 0), [])
    path = tmp_path / name
    data = path.read_bytes()
    path.write_bytes(
        {
            "flip": data[:-1] + bytes([data[-1] ^ 1]),
            "truncate": data[:-3],
            "empty": b"",
            "magic": b"X" + data[1:],
        }[damage]
    )
    with pytest.raises(CorruptionError, match=rf"{path} is corrupt: .* re-add the member"):
        reopen(tmp_path)


# -- fail-stop ------------------------------------------------------------------------------------


class FailingFsync:
    """Succeeds ``ok`` times (without syncing, for speed), then fails every time."""

    def __init__(self, ok: int) -> None:
        self.ok = ok
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls > self.ok:
            raise OSError(errno.EIO, "injected fsync failure")


@pytest.mark.parametrize("step", ["append", "new segment", "hard state"])
def test_a_failed_fsync_stops_the_member_and_loses_nothing_acknowledged(
    tmp_path: Path, step: str
) -> None:
    fsync = FailingFsync(ok=10**9)
    s = DiskStorage(tmp_path, fsync=fsync, segment_size=1024)
    acked: list[Entry] = []
    for i in range(1, 8):
        s.save(HardState(1, "m1", 0), ents(i, i))
        acked += ents(i, i)
    if step == "new segment":
        i = 8
        while s._log._segments[-1].end < 1024:  # until the next save starts a segment
            s.save(None, ents(i, i))
            acked += ents(i, i)
            i += 1
    fsync.ok = fsync.calls  # every later fsync fails
    n = len(acked) + 1
    state = HardState(2, "m2", 0) if step == "hard state" else None
    with pytest.raises(StorageError, match="injected fsync failure"):
        s.save(state, ents(n, n, term=2))
    assert s.failed
    for call in (
        lambda: s.save(None, ents(8, 8)),
        lambda: s.entries(1, 2),
        lambda: s.term(1),
        s.last_index,
        s.initial_state,
        s.sync,
        s.compact,
    ):
        with pytest.raises(
            StorageError, match=r"storage failed earlier \(.*injected.*\); the member must stop"
        ):
            call()
    s.close()
    with DiskStorage(tmp_path) as s:
        assert s.entries(1, s.last_index() + 1) == acked
        assert s.initial_state()[0] == HardState(1, "m1", 0)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(st.tuples(st.integers(0, 4), st.integers(1, 5), st.booleans()), max_size=25),
    fail_at=st.integers(0, 40),
)
def test_no_acknowledged_entry_is_lost_whichever_fsync_fails(
    tmp_path: Path, batches: list[tuple[int, int, bool]], fail_at: int
) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        fsync = FailingFsync(ok=10**9)
        s = DiskStorage(d, fsync=fsync, segment_size=400)
        fsync.ok = fsync.calls + fail_at
        acked: list[Entry] = []
        state = attempt = HardState()
        failed_first = None
        try:
            for back, n, new_term in batches:
                first = max(len(acked) + 1 - back, state.commit + 1)
                term = state.term + new_term
                batch = ents(first, first + n - 1, term=max(term, 1), size=30)
                attempt = HardState(max(term, 1), None, max(state.commit, first - 3))
                try:
                    s.save(attempt, batch)
                except StorageError:
                    failed_first = first
                    break
                acked = acked[: first - 1] + batch
                state = attempt
        finally:
            s.close()
        with DiskStorage(d, sync=False, segment_size=400) as s:
            got = s.entries(1, s.last_index() + 1)
            # Nothing unacknowledged is claimed: what is there is a prefix of what was acked,
            # and only a truncation that was under way may have shortened it.
            assert got == acked[: len(got)]
            floor = len(acked) if failed_first is None else min(len(acked), failed_first - 1)
            assert len(got) >= floor
            assert s.initial_state()[0].term in (state.term, attempt.term)
