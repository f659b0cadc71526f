"""Segment files: the append-only records holding message bodies, written in batches
with one fdatasync (docs/decisions/0001), and what their writes can fail with."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path

from postwarden.values import Envelope, SpoolError, SpoolFull

log = logging.getLogger("postwarden.spool")

RECORD_MAGIC = b"PWS1"


# The errno values that mean "no room": the filesystem is full, or the user's quota is.
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# SQLite's answer when a write hits a full disk (primary code; extended codes keep it
# in the low byte). Growing the WAL index (-shm) on a full disk fails as SHMSIZE.
_SQLITE_NO_SPACE = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_SHMSIZE})


def is_no_space(exc: BaseException) -> bool:
    """Whether an error from a segment write or the index means "the disk is full"."""
    if isinstance(exc, OSError):
        return exc.errno in _NO_SPACE_ERRNOS
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and (code in _SQLITE_NO_SPACE or code & 0xFF == sqlite3.SQLITE_FULL)
    return False


def spool_error(what: str, exc: BaseException) -> SpoolError:
    """The spool's error for a failed write: :class:`SpoolFull` when there is no space."""
    cls = SpoolFull if is_no_space(exc) else SpoolError
    return cls(f"{what}: {exc}")


# At most this many buffers in one writev (Linux's IOV_MAX is 1024).
_IOV_MAX = 1000


def write_all(fd: int, chunks: Sequence[bytes | memoryview]) -> None:
    """Write every chunk at the file's end: one ``writev`` per ``_IOV_MAX`` buffers,
    carrying on after a short count (a filesystem may write part of a request when it
    runs out of room; the next call then reports why)."""
    pending: Sequence[bytes | memoryview] = chunks
    while pending:
        part = pending[:_IOV_MAX]
        want = sum(len(c) for c in part)
        done = os.writev(fd, part)
        if done == want:
            pending = pending[_IOV_MAX:]
            continue
        if done == 0:  # a regular file does not do that; never spin on it
            raise OSError(errno.ENOSPC, "segment write made no progress")
        i = 0
        while done >= len(part[i]):
            done -= len(part[i])
            i += 1
        pending = [memoryview(part[i])[done:], *part[i + 1 :], *pending[_IOV_MAX:]]


class ReadFd:
    """A cached read-only segment fd, closed only when no reader is using it."""

    __slots__ = ("dropped", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.dropped = False


class Segments:
    """The segment files of one spool shard: the one being appended to, and cached read
    fds of all of them. Appends, seals and unlinks happen in the spool's writer thread
    (with its index connection, for the ``segments`` rows); reads in any thread."""

    def __init__(self, directory: Path, *, size: int, fsync: bool) -> None:
        self.dir = directory
        self.size = size
        self.fsync = fsync
        self.db: sqlite3.Connection | None = None  # the index (writer thread), from open()
        self.current = 0
        self._fd = -1
        self._pos = 0
        # segment -> its read fd; a reader holds it (``users``) while it preads, so that
        # evicting or unlinking never closes an fd under a reader (the number could be
        # reused by another open, and the read would return another file's bytes).
        self._read_fds: dict[int, ReadFd] = {}
        self._read_lock = threading.Lock()

    def path(self, seg: int) -> Path:
        return self.dir / f"{seg:012d}.seg"

    def open(self, db: sqlite3.Connection) -> None:
        """After a start: seal every segment left (its tail may be torn), remove those
        with no live message, and open a new one past every id known."""
        self.db = db
        db.execute("UPDATE segments SET sealed = 1")
        db.commit()
        self.remove_dead()
        row = db.execute("SELECT COALESCE(MAX(id), 0) FROM segments").fetchone()
        on_disk = [int(p.stem) for p in self.dir.glob("*.seg") if p.stem.isdigit()]
        self.current = max([row[0], *on_disk])
        self.new()

    def close(self) -> None:
        """Close the segment being written (writer thread, at close)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def drop_read_fds(self) -> None:
        with self._read_lock:
            for seg in list(self._read_fds):
                self._drop_read_fd_locked(seg)

    def writing(self, seg: int) -> bool:
        """Whether ``seg`` is the segment open for appending (never to be unlinked)."""
        return seg == self.current and self._fd >= 0

    def seal(self) -> None:
        """Stop appending to the current segment; unlink it if no message lives in it.

        After a failed write its tail is unknown (part of a batch may be there): the
        records before it stay readable at their offsets, and the next batch starts
        in a new segment. A failure to mark it sealed in the index does no harm: only
        the open segment is ever kept empty, and a restart seals every old one."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        except OSError:
            log.warning("event=segment_close_failed segment=%d", self.current, exc_info=True)
        assert self.db is not None
        try:
            self.db.execute("UPDATE segments SET sealed = 1 WHERE id = ?", (self.current,))
            row = self.db.execute(
                "SELECT live FROM segments WHERE id = ?", (self.current,)
            ).fetchone()
            if row is not None and row[0] <= 0:
                self.db.execute("DELETE FROM segments WHERE id = ?", (self.current,))
                self.unlink(self.current)
        except sqlite3.Error as exc:
            log.warning("event=segment_seal_failed segment=%d error=%r", self.current, str(exc))

    def new(self) -> None:
        self.seal()
        assert self.db is not None
        self.current += 1
        seg_path = self.path(self.current)
        fd = os.open(seg_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if self.fsync:
                # The directory entry must be durable too, or a power loss could lose
                # the whole file behind already-acknowledged messages.
                dfd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            self.db.execute(
                "INSERT OR IGNORE INTO segments(id, live, sealed) VALUES (?, 0, 0)", (self.current,)
            )
        except BaseException:
            os.close(fd)
            seg_path.unlink(missing_ok=True)
            raise
        self._fd = fd
        self._pos = os.fstat(fd).st_size

    def append(
        self, records: Sequence[tuple[Hashable, Envelope, bytes, str]]
    ) -> dict[Hashable, tuple[int, int, int]]:
        """Write a batch's records ``(key, envelope, body, message id)`` to the segment
        and fdatasync once; return each key's (segment, body offset, body length).

        On any error the segment is sealed (its tail is unknown) and the error raised:
        none of the batch is indexed, and the next batch opens a new segment."""
        if self._fd < 0 or self._pos >= self.size:
            self.new()
        placed: dict[Hashable, tuple[int, int, int]] = {}
        chunks: list[bytes] = []
        pos = self._pos
        for key, envelope, data, msg_id in records:
            header = json.dumps(
                {
                    "id": msg_id,
                    "mail_from": envelope.mail_from,
                    "rcpt_tos": list(envelope.rcpt_tos),
                    "client_ip": envelope.client_ip,
                    "helo": envelope.helo,
                    "auth": envelope.auth,
                    "tenant": envelope.tenant,
                    "smtputf8": envelope.smtputf8,
                    "body_8bit": envelope.body_8bit,
                    "received_at": envelope.received_at,
                    "pool": envelope.pool,
                    "lane": envelope.lane,
                },
                separators=(",", ":"),
            ).encode()
            prefix = RECORD_MAGIC + len(header).to_bytes(4, "big") + len(data).to_bytes(8, "big")
            body_offset = pos + len(prefix) + len(header)
            chunks += (prefix, header, data)
            pos = body_offset + len(data)
            placed[key] = (self.current, body_offset, len(data))
        try:
            write_all(self._fd, chunks)
            if self.fsync:
                os.fdatasync(self._fd)
        except BaseException:
            self.seal()
            raise
        self._pos = pos
        return placed

    def unlink(self, seg: int) -> None:
        try:
            self.path(seg).unlink()
        except FileNotFoundError:
            pass
        with self._read_lock:
            self._drop_read_fd_locked(seg)

    def _drop_read_fd_locked(self, seg: int) -> None:
        """Forget a segment's read fd; close it now, or when its last reader is done."""
        handle = self._read_fds.pop(seg, None)
        if handle is not None:
            handle.dropped = True
            if handle.users == 0:
                os.close(handle.fd)

    def remove_dead(self) -> None:
        assert self.db is not None
        dead = [
            r[0] for r in self.db.execute("SELECT id FROM segments WHERE live <= 0 AND sealed = 1")
        ]
        live = {r[0] for r in self.db.execute("SELECT id FROM segments WHERE live > 0")}
        for seg in dead:
            self.unlink(seg)
        self.db.execute("DELETE FROM segments WHERE live <= 0 AND sealed = 1")
        # Files not in the table at all hold only records that were never indexed
        # (a crash between the segment fsync and the index commit): nothing was
        # acknowledged from them.
        for p in self.dir.glob("*.seg"):
            if p.stem.isdigit() and int(p.stem) not in live:
                p.unlink()

    def read(self, segment: int, offset: int, length: int) -> bytes:
        """Bytes of a segment (blocking ``pread``, any thread)."""
        with self.fd(segment) as fd:
            data = os.pread(fd, length, offset)
        if len(data) != length:
            raise SpoolError(f"segment {segment}: short read at {offset} ({len(data)}/{length})")
        return data

    @contextlib.contextmanager
    def fd(self, segment: int) -> Iterator[int]:
        """A read-only fd of a segment, open until the block ends (cached across reads;
        any thread). Evicting it from the cache or unlinking the segment meanwhile
        closes it only when the block is done."""
        with self._read_lock:
            handle = self._read_fds.get(segment)
            if handle is None:
                handle = ReadFd(os.open(self.path(segment), os.O_RDONLY))
                if len(self._read_fds) >= 64:
                    self._drop_read_fd_locked(next(iter(self._read_fds)))
                self._read_fds[segment] = handle
            handle.users += 1
        try:
            yield handle.fd
        finally:
            with self._read_lock:
                handle.users -= 1
                if handle.dropped and handle.users == 0:
                    os.close(handle.fd)
