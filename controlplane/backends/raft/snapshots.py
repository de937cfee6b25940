"""Snapshot files: ``snap/<term>-<index>.snap`` (16 hex digits each), checksummed and atomic.

A file is a header, the encoded :class:`SnapshotMeta`, then the state machine's data::

    magic (8) | meta length (u32) | data length (u64) | data CRC32 (u32) | header CRC32 (u32)

The header CRC covers the fields before it and the meta bytes. A snapshot is written to a
temporary file, fsynced, renamed into place and the directory fsynced, so a crash leaves either
the whole file or none of it.

The file is also the InstallSnapshot stream: a leader sends its file verbatim
(:meth:`SnapshotReader.chunks`) and a follower's :class:`SnapshotReceiver` writes the chunks to
a temporary file, checking the header as soon as it has arrived and the data checksum before
the snapshot is committed. The transport never needs to know the format.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import msgspec

from controlplane.backends.raft.hardstate import CorruptionError, DiskIO
from controlplane.backends.raft.records import SnapshotMeta
from controlplane.errors import ControlPlaneError

_MAGIC = b"CPSNAP\x00\x01"
_HEADER = struct.Struct("<8sIQII")
_U32 = struct.Struct("<I")
_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.snap$")
_MAX_META = 16 << 20
_meta_decoder = msgspec.msgpack.Decoder(SnapshotMeta)

CHUNK_SIZE = 1 << 20
"""Default chunk size for reading a snapshot."""


class BadSnapshotError(ControlPlaneError):
    """Raised when a received snapshot stream is malformed, truncated or fails its checksum.

    The snapshot is discarded; ask the leader to send it again.
    """

    code = "bad_snapshot"


def snapshot_name(meta: SnapshotMeta) -> str:
    """The file name of the snapshot described by ``meta``."""
    return f"{meta.term:016x}-{meta.index:016x}.snap"


def snapshot_index(path: Path) -> int:
    """The index a snapshot file's name claims (readable even when its contents are not)."""
    m = _NAME.match(path.name)
    return int(m.group(2), 16) if m else -1


def _pack_header(meta_bytes: bytes, data_len: int, data_crc: int) -> bytes:
    head = _HEADER.pack(_MAGIC, len(meta_bytes), data_len, data_crc, 0)[:-4]
    return head + _U32.pack(zlib.crc32(meta_bytes, zlib.crc32(head))) + meta_bytes


def _parse_header(prefix: bytes) -> tuple[SnapshotMeta, int, int, int] | str | None:
    """``(meta, data offset, data length, data crc)``, ``None`` if ``prefix`` is too short,
    or what is wrong."""
    if len(prefix) < _HEADER.size:
        return None
    magic, meta_len, data_len, data_crc, crc = _HEADER.unpack_from(prefix)
    if magic != _MAGIC:
        return "not a snapshot (bad magic)"
    if meta_len > _MAX_META:
        return f"implausible metadata length {meta_len}"
    end = _HEADER.size + meta_len
    if len(prefix) < end:
        return None
    meta_bytes = prefix[_HEADER.size : end]
    if zlib.crc32(meta_bytes, zlib.crc32(prefix[: _HEADER.size - 4])) != crc:
        return "header checksum mismatch"
    try:
        meta = _meta_decoder.decode(meta_bytes)
    except msgspec.DecodeError as exc:
        return f"undecodable metadata ({exc})"
    return meta, end, data_len, data_crc


class SnapshotReader:
    """An open snapshot file. The header is verified on open; the data as it is read.

    Reading to the end raises :class:`CorruptionError` *before* yielding the last chunk if the
    data does not match its checksum. A context manager; :meth:`close` releases the file.
    """

    def __init__(self, path: Path, io: DiskIO) -> None:
        self.path = path
        self._io = io
        with io.guard(f"reading {path}"):
            self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
            try:
                prefix = self._file.read(_HEADER.size)
                got = _parse_header(prefix)
                if got is None and len(prefix) == _HEADER.size:
                    prefix += self._file.read(_HEADER.unpack(prefix)[1])
                    got = _parse_header(prefix)
                self.size = os.fstat(self._file.fileno()).st_size
            except BaseException:
                self._file.close()
                raise
        if not isinstance(got, tuple):
            self._file.close()
            raise CorruptionError(f"snapshot {path} is corrupt: {got or 'truncated header'}")
        self.meta, self._data_offset, self.data_size, self._data_crc = got
        if self.size != self._data_offset + self.data_size:
            self._file.close()
            raise CorruptionError(
                f"snapshot {path} is corrupt: {self.size} bytes, the header says "
                f"{self._data_offset + self.data_size}"
            )

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The whole file, verbatim, for InstallSnapshot; see :class:`SnapshotReceiver`."""
        return self._read(0, chunk_size)

    def data_chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The state machine's data, in chunks."""
        return self._read(self._data_offset, chunk_size)

    def read_data(self) -> bytes:
        """The state machine's data, verified."""
        return b"".join(self.data_chunks())

    def _read(self, start: int, chunk_size: int) -> Iterator[bytes]:
        pos = start
        crc = 0
        while pos < self.size:
            with self._io.guard(f"reading {self.path}"):
                self._file.seek(pos)
                chunk = self._file.read(min(chunk_size, self.size - pos))
            if not chunk:
                raise CorruptionError(f"snapshot {self.path} is corrupt: truncated at {pos}")
            skip = max(0, self._data_offset - pos)
            crc = zlib.crc32(memoryview(chunk)[skip:], crc)
            pos += len(chunk)
            if pos >= self.size and crc != self._data_crc:
                raise CorruptionError(f"snapshot {self.path} is corrupt: data checksum mismatch")
            yield chunk

    def close(self) -> None:
        """Release the file."""
        self._file.close()

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SnapshotReceiver:
    """Writes a snapshot arriving in chunks (the bytes :meth:`SnapshotReader.chunks` yields).

    :meth:`write` raises :class:`BadSnapshotError` as soon as the stream is malformed, and
    whatever ``check`` raises once the header is known (say, a snapshot older than the one
    already held); either way the receiver is aborted. :meth:`commit` verifies length and data
    checksum, makes the file durable and installs it. A context manager that aborts unless
    committed.
    """

    def __init__(
        self,
        store: SnapshotStore,
        check: Callable[[SnapshotMeta], None],
        install: Callable[[SnapshotMeta], None],
    ) -> None:
        self._store = store
        self._check = check
        self._install = install
        self._tmp = store.directory / f"receive-{uuid.uuid4().hex}.tmp"
        with store.io.guard(f"creating {self._tmp}"):
            self._file: BinaryIO | None = open(self._tmp, "wb")  # noqa: SIM115
        self._prefix = b""
        self.meta: SnapshotMeta | None = None
        self._data_offset = self._data_len = self._data_crc = 0
        self._crc = 0
        self._received = 0

    def write(self, chunk: bytes) -> None:
        """Append the next chunk of the stream."""
        if self._file is None:
            raise ValueError("the snapshot receiver is closed")
        try:
            with self._store.io.guard(f"writing {self._tmp}"):
                self._file.write(chunk)
            self._received += len(chunk)
            if self.meta is None:
                self._prefix += chunk
                got = _parse_header(self._prefix)
                if isinstance(got, str):
                    raise BadSnapshotError(f"received snapshot is malformed: {got}")
                if got is None:
                    return
                self.meta, self._data_offset, self._data_len, self._data_crc = got
                self._check(self.meta)
                chunk = self._prefix[self._data_offset :]
                self._prefix = b""
            self._crc = zlib.crc32(chunk, self._crc)
            if self._received > self._data_offset + self._data_len:
                raise BadSnapshotError("received snapshot is longer than its header says")
        except BaseException:
            self.abort()
            raise

    def commit(self) -> SnapshotMeta:
        """Verify, make durable and install the snapshot; return its metadata."""
        if self._file is None:
            raise ValueError("the snapshot receiver is closed")
        try:
            if self.meta is None or self._received != self._data_offset + self._data_len:
                raise BadSnapshotError(f"received snapshot is incomplete ({self._received} bytes)")
            if self._crc != self._data_crc:
                raise BadSnapshotError("received snapshot fails its data checksum")
            with self._store.io.guard(f"writing {self._tmp}"):
                self._file.flush()
                self._store.io.sync_file(self._file.fileno())
                self._file.close()
            self._file = None
            self._store.install(self._tmp, self.meta)
        except BaseException:
            self.abort()
            raise
        self._install(self.meta)
        return self.meta

    def abort(self) -> None:
        """Discard what was received. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)

    def __enter__(self) -> SnapshotReceiver:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


class SnapshotStore:
    """The ``snap/`` directory: save, verify, open and prune snapshot files."""

    def __init__(self, directory: Path, io: DiskIO, *, keep: int) -> None:
        self.directory = directory
        self.io = io
        self._keep = max(keep, 1)

    def clean(self) -> None:
        """Remove temporary files left by a crash."""
        with self.io.guard(f"cleaning {self.directory}"):
            stale = [p for p in self.directory.iterdir() if p.name.endswith(".tmp")]
            for p in stale:
                p.unlink()
            if stale:
                self.io.sync_dir(self.directory)

    def paths(self) -> list[Path]:
        """Snapshot files, newest (highest index, then term) first."""
        with self.io.guard(f"listing {self.directory}"):
            found = []
            for p in self.directory.iterdir():
                m = _NAME.match(p.name)
                if m:
                    found.append((int(m.group(2), 16), int(m.group(1), 16), p))
        return [p for _, _, p in sorted(found, reverse=True)]

    def open(self, path: Path) -> SnapshotReader:
        """Open a snapshot for reading (header verified)."""
        return SnapshotReader(path, self.io)

    def verify(self, path: Path) -> SnapshotMeta:
        """Read the whole file and check it; raise :class:`CorruptionError` if it is damaged."""
        with self.open(path) as reader:
            for _ in reader.data_chunks():
                pass
            return reader.meta

    def save(self, meta: SnapshotMeta, data: bytes | Iterable[bytes]) -> None:
        """Write a snapshot; durable when it returns. ``data`` may be an iterable of chunks."""
        meta_bytes = msgspec.msgpack.encode(meta)
        tmp = self.directory / (snapshot_name(meta) + ".tmp")
        chunks: Iterable[bytes] = (data,) if isinstance(data, bytes | bytearray) else data
        with self.io.guard(f"writing {tmp}"), open(tmp, "wb") as f:
            try:
                f.seek(_HEADER.size + len(meta_bytes))
                crc = size = 0
                for chunk in chunks:
                    f.write(chunk)
                    crc = zlib.crc32(chunk, crc)
                    size += len(chunk)
                f.seek(0)
                f.write(_pack_header(meta_bytes, size, crc))
                f.flush()
                self.io.sync_file(f.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        self.install(tmp, meta)

    def receiver(
        self, check: Callable[[SnapshotMeta], None], install: Callable[[SnapshotMeta], None]
    ) -> SnapshotReceiver:
        """A receiver for a snapshot streamed from a leader."""
        return SnapshotReceiver(self, check, install)

    def install(self, tmp: Path, meta: SnapshotMeta) -> None:
        """Rename a complete, synced temporary file into place, durably."""
        with self.io.guard(f"installing snapshot {snapshot_name(meta)}"):
            os.replace(tmp, self.directory / snapshot_name(meta))
            self.io.sync_dir(self.directory)

    def prune(self) -> None:
        """Delete all but the newest ``keep`` snapshots."""
        doomed = self.paths()[self._keep :]
        if doomed:
            with self.io.guard(f"pruning {self.directory}"):
                for p in doomed:
                    p.unlink()
                self.io.sync_dir(self.directory)

    def set_aside(self, path: Path) -> Path:
        """Rename a corrupt snapshot to ``<name>.corrupt`` (kept for inspection)."""
        target = path.with_name(path.name + ".corrupt")
        with self.io.guard(f"renaming {path}"):
            os.replace(path, target)
            self.io.sync_dir(self.directory)
        return target
