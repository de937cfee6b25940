"""Durable small files and the I/O discipline shared by every storage file.

Every write in the storage layer goes through :class:`DiskIO`, which enforces fail-stop: the
first ``OSError`` from a write, an fsync, a rename or a read marks the storage failed, and every
later call raises :class:`StorageError`. An fsync is never retried: after a failed fsync the
kernel may already have dropped the dirty pages, so a retry that succeeds proves nothing
(PostgreSQL's "fsyncgate", 2018).

Small files (the hard state, the member identity) are replaced atomically: written to a
temporary file, fsynced, renamed over the old one, and the directory fsynced. Each carries a
magic, its length and a CRC32, so a damaged file is detected rather than misread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from controlplane.backends.raft.records import ConfState, HardState
from controlplane.errors import CorruptionError, StorageError

__all__ = (
    "REPAIR_ADVICE",
    "CorruptionError",
    "DiskIO",
    "FsyncFn",
    "Identity",
    "IdentityMismatchError",
    "StorageError",
    "decode_small",
    "encode_small",
    "load_hard_state",
    "load_identity",
    "preallocate",
    "pwrite_all",
    "save_hard_state",
    "save_identity",
)

FsyncFn = Callable[[int], None]

REPAIR_ADVICE = (
    "Do not edit the files by hand: stop this member, move its data directory aside and "
    "re-add the member to the cluster so that it copies the state from a peer (or restore the "
    "directory from a backup)."
)


class IdentityMismatchError(StorageError):
    """Raised when a data directory belongs to another cluster or another member."""

    code = "identity_mismatch"


class DiskIO:
    """Fail-stop file operations with an injectable fsync.

    ``sync=False`` skips every fsync (tests that do not need durability). ``fsync``, when
    given, replaces both ``os.fdatasync`` (files) and ``os.fsync`` (directories), so a test can
    make it fail.
    """

    def __init__(self, *, sync: bool = True, fsync: FsyncFn | None = None) -> None:
        self.sync = sync
        self._fsync_file: FsyncFn = fsync if fsync is not None else os.fdatasync
        self._fsync_dir: FsyncFn = fsync if fsync is not None else os.fsync
        self.failure: str | None = None

    def check(self) -> None:
        """Raise :class:`StorageError` if an earlier operation failed."""
        if self.failure is not None:
            raise StorageError(f"storage failed earlier ({self.failure}); the member must stop")

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn an ``OSError`` inside the block into a fail-stop :class:`StorageError`."""
        self.check()
        try:
            yield
        except OSError as exc:
            self.failure = f"{what}: {exc}"
            raise StorageError(f"{what} failed ({exc}); the member must stop") from exc

    def sync_file(self, fd: int) -> None:
        """Make the file's data (and the metadata needed to read it) durable."""
        if self.sync:
            self._fsync_file(fd)

    def sync_dir(self, path: Path) -> None:
        """Make the directory's entries (creations, renames, removals) durable."""
        if not self.sync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._fsync_dir(fd)
        finally:
            os.close(fd)

    def make_dirs(self, path: Path) -> None:
        """Create ``path`` and missing parents, syncing each parent that gained an entry."""
        missing: list[Path] = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        with self.guard(f"creating directory {path}"):
            for d in reversed(missing):
                d.mkdir()
                self.sync_dir(d.parent)

    def atomic_write(self, path: Path, data: bytes) -> None:
        """Replace ``path`` with ``data``: durable and all-or-nothing when it returns."""
        tmp = path.with_name(path.name + ".tmp")
        with self.guard(f"writing {path}"):
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    pwrite_all(fd, data, 0)
                    self.sync_file(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self.sync_dir(path.parent)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[n:]
        offset += n


def preallocate(fd: int, offset: int, length: int) -> None:
    """Reserve blocks so appends do not allocate; a no-op where the filesystem cannot."""
    if length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


# Small-file framing: magic, payload length, CRC32 of the payload.
_SMALL_HEADER = struct.Struct("<8sII")


def encode_small(magic: bytes, payload: bytes) -> bytes:
    """Frame ``payload`` for :func:`decode_small`."""
    return _SMALL_HEADER.pack(magic, len(payload), zlib.crc32(payload)) + payload


def decode_small(path: Path, magic: bytes, data: bytes) -> bytes:
    """Return the payload framed by :func:`encode_small`; raise :class:`CorruptionError`."""
    problem = None
    if len(data) < _SMALL_HEADER.size:
        problem = f"only {len(data)} bytes long"
    else:
        got_magic, length, crc = _SMALL_HEADER.unpack_from(data)
        payload = data[_SMALL_HEADER.size :]
        if got_magic != magic:
            problem = "wrong magic (not a file of this kind)"
        elif length != len(payload):
            problem = f"length {len(payload)}, header says {length}"
        elif zlib.crc32(payload) != crc:
            problem = "checksum mismatch"
        else:
            return payload
    raise CorruptionError(f"{path} is corrupt: {problem}. {REPAIR_ADVICE}")


_HARD_STATE_MAGIC = b"CPHARD\x00\x01"
_hard_state_decoder = msgspec.msgpack.Decoder(HardState)


def load_hard_state(path: Path) -> HardState | None:
    """Read the hard state file; ``None`` if there is none yet.

    Raises :class:`CorruptionError` for a damaged file: a member that does not know its term
    and vote could vote twice in one term, so it must not start.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    payload = decode_small(path, _HARD_STATE_MAGIC, data)
    try:
        return _hard_state_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise CorruptionError(f"{path} is corrupt: {exc}. {REPAIR_ADVICE}") from exc


def save_hard_state(io: DiskIO, path: Path, state: HardState) -> None:
    """Replace the hard state file atomically; durable when it returns."""
    io.atomic_write(path, encode_small(_HARD_STATE_MAGIC, msgspec.msgpack.encode(state)))


class Identity(msgspec.Struct, frozen=True):
    """Which cluster and member a data directory belongs to (written once, at bootstrap)."""

    cluster_id: str
    member_id: str
    initial_conf: ConfState = ConfState()
    """The configuration a new cluster was bootstrapped with (empty for a joining member)."""


_IDENTITY_MAGIC = b"CPIDENT\x01"
_identity_decoder = msgspec.msgpack.Decoder(Identity)


def load_identity(path: Path) -> Identity | None:
    """Read the identity file; ``None`` if there is none. Raises :class:`CorruptionError`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    payload = decode_small(path, _IDENTITY_MAGIC, data)
    try:
        return _identity_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise CorruptionError(f"{path} is corrupt: {exc}. {REPAIR_ADVICE}") from exc


def save_identity(io: DiskIO, path: Path, identity: Identity) -> None:
    """Write the identity file atomically; durable when it returns."""
    io.atomic_write(path, encode_small(_IDENTITY_MAGIC, msgspec.msgpack.encode(identity)))
