"""The inbox: a durable, maildir-like store of the reports the inbound MX accepted.

Every worker process of the appliance shares one inbox (``inbound.path``, by default
``<spool.path>/inbound``); the listener of any worker delivers into it and the bounce
processor of any worker claims from it. Nothing but ``os.rename`` coordinates them.

Layout::

    <path>/tmp/<id>.<random>         being written (never read; left-overs of a crash
                                     are removed by recover())
    <path>/new/<id>                  durable, waiting to be processed
    <path>/cur/<id>+<claimed_ms>     claimed by one processor at <claimed_ms> (Unix ms)
    <path>/unparsed/<id>             kept for the operator with the reason; pruned
                                     after ``inbound.keep_unparsed``

``<id>`` is ``<received Unix ms, 13 digits>-<12 hex digits>``: ids sort by arrival.
Each file is one item: a JSON header on the first line (``v``, ``id``, ``mail_from``
("" for the null reverse-path), ``rcpt_tos``, ``peer``, ``helo``, ``received_at``,
``size``; in ``unparsed/`` also ``reason`` and ``unparsed_at``), a LF, then the
message exactly as received (CRLF line ends).

* :meth:`Inbox.deliver` writes ``tmp/<id>``, fsyncs it, renames it into ``new/`` and
  fsyncs ``new/``: when it returns the report survives a crash or power loss, so the
  listener may answer ``250``. A failure leaves nothing behind.
* :meth:`Inbox.claim` renames ``new/<id>`` to ``cur/<id>+<now>``: the process whose
  rename succeeds owns the item, any other gets ``FileNotFoundError`` and skips it. The
  claim time is in the name (not the mtime) so that :meth:`Inbox.recover` never takes
  back an item claimed a moment ago.
* :meth:`Inbox.done` removes the claimed file; :meth:`Inbox.unparsed` rewrites it
  with the reason into ``unparsed/`` (fsync'd) and removes the claimed file.
* :meth:`Inbox.recover` renames items claimed longer ago than ``stale_after`` back to
  ``new/`` (their processor died): processing is at least once. An item recovered
  under a processor that was only slow is processed twice; its ``done`` then finds
  nothing to remove, which is not an error.

Every method blocks on file I/O (and ``deliver``/``unparsed`` on fsync): from async
code call them in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
TMP_MAX_AGE = 3600.0  # a tmp/ file this old is a crashed writer's
_ID = re.compile(r"\d{13}-[0-9a-f]{12}")
_CLAIMED = re.compile(r"(\d{13}-[0-9a-f]{12})\+(\d+)")
_DIRS = ("tmp", "new", "cur", "unparsed")


def new_id(now: float | None = None) -> str:
    """A fresh item id: arrival time in ms, then 48 random bits."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:013d}-{secrets.token_hex(6)}"


def valid_id(item_id: str) -> bool:
    return _ID.fullmatch(item_id) is not None


@dataclass
class Item:
    """One stored report: its envelope, the message, and where it is now."""

    id: str
    mail_from: str  # "" for the null reverse-path
    rcpt_tos: list[str]
    peer: str
    helo: str
    received_at: float
    data: bytes
    path: Path = field(repr=False)  # the file holding it (cur/… once claimed)
    reason: str | None = None  # why it could not be parsed (unparsed/ only)
    unparsed_at: float | None = None


@dataclass(frozen=True)
class UnparsedInfo:
    """An unparsed item without its message (for listings)."""

    id: str
    reason: str
    unparsed_at: float
    received_at: float
    mail_from: str
    rcpt_tos: list[str]
    peer: str
    size: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        header: dict[str, Any] = json.loads(fh.readline())
    return header


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    with open(path, "rb") as fh:
        header: dict[str, Any] = json.loads(fh.readline())
        return header, fh.read()


def _item(header: dict[str, Any], data: bytes, path: Path) -> Item:
    return Item(
        id=str(header["id"]),
        mail_from=str(header.get("mail_from", "")),
        rcpt_tos=[str(r) for r in header.get("rcpt_tos", [])],
        peer=str(header.get("peer", "")),
        helo=str(header.get("helo", "")),
        received_at=float(header.get("received_at", 0.0)),
        data=data,
        path=path,
        reason=header.get("reason"),
        unparsed_at=header.get("unparsed_at"),
    )


class Inbox:
    """The store at ``path`` (directories made on construction unless ``create`` is
    False; a missing directory then reads as empty)."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        self.tmp, self.new, self.cur, self.unparsed_dir = (self.path / d for d in _DIRS)
        if create:
            for d in (self.tmp, self.new, self.cur, self.unparsed_dir):
                d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ writing

    def _write(self, name: str, header: dict[str, Any], data: bytes) -> Path:
        """``tmp/<name>.<random>`` with ``header`` and ``data``, fsync'd; removed on
        failure."""
        tmp = self.tmp / f"{name}.{secrets.token_hex(4)}"
        line = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            with os.fdopen(fd, "wb") as fh:
                fh.write(line + b"\n")
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return tmp

    def deliver(
        self, envelope_from: str, rcpt_tos: list[str], data: bytes, peer: str, helo: str
    ) -> str:
        """Store a report durably; returns its id. Nothing is left behind on failure."""
        now = time.time()
        item_id = new_id(now)
        header = {
            "v": FORMAT_VERSION,
            "id": item_id,
            "mail_from": "" if envelope_from in ("<>", None) else envelope_from,
            "rcpt_tos": list(rcpt_tos),
            "peer": peer,
            "helo": helo,
            "received_at": now,
            "size": len(data),
        }
        tmp = self._write(item_id, header, data)
        try:
            os.rename(tmp, self.new / item_id)
            _fsync_dir(self.new)
        except BaseException:
            # Not durable: take it back (from wherever it is) so that the sender's
            # retry is the only copy.
            for p in (tmp, self.new / item_id):
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
        return item_id

    # ------------------------------------------------------------------ processing

    def claim(self, limit: int = 100) -> list[Item]:
        """Take up to ``limit`` items from ``new/``, oldest first; each is handed to
        exactly one caller, in this process or any other."""
        out: list[Item] = []
        try:
            names = sorted(n for n in os.listdir(self.new) if _ID.fullmatch(n))
        except FileNotFoundError:
            return out
        for name in names:
            if len(out) >= limit:
                break
            dest = self.cur / f"{name}+{int(time.time() * 1000)}"
            try:
                os.rename(self.new / name, dest)
            except FileNotFoundError:
                continue  # another process took it
            try:
                header, data = _read(dest)
                out.append(_item(header, data, dest))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # A file that is not an item (damaged): set aside, never lost.
                self._set_aside(dest, name, f"unreadable inbox file: {exc}")
        return out

    def done(self, item: Item) -> None:
        """The item was processed: forget it."""
        with contextlib.suppress(FileNotFoundError):
            item.path.unlink()

    def unparsed(self, item: Item, reason: str) -> None:
        """Keep the item in ``unparsed/`` with ``reason`` (one line, shortened)."""
        reason = " ".join(str(reason).split())[:1000]
        now = time.time()
        header = {
            "v": FORMAT_VERSION,
            "id": item.id,
            "mail_from": item.mail_from,
            "rcpt_tos": item.rcpt_tos,
            "peer": item.peer,
            "helo": item.helo,
            "received_at": item.received_at,
            "size": len(item.data),
            "reason": reason,
            "unparsed_at": now,
        }
        tmp = self._write(item.id, header, item.data)
        try:
            os.rename(tmp, self.unparsed_dir / item.id)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(self.unparsed_dir)
        self.done(item)
        item.path = self.unparsed_dir / item.id
        item.reason, item.unparsed_at = reason, now

    def _set_aside(self, path: Path, item_id: str, reason: str) -> None:
        """A damaged file goes to ``unparsed/`` as it is, its reason in a header."""
        try:
            raw = path.read_bytes()
        except OSError:
            return
        now = time.time()
        header = {"v": FORMAT_VERSION, "id": item_id, "mail_from": "", "rcpt_tos": [],
                  "peer": "", "helo": "", "received_at": now, "size": len(raw),
                  "reason": reason[:1000], "unparsed_at": now}  # fmt: skip
        tmp = self._write(item_id, header, raw)
        os.rename(tmp, self.unparsed_dir / item_id)
        _fsync_dir(self.unparsed_dir)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def recover(self, stale_after: float, now: float | None = None) -> int:
        """Put items claimed more than ``stale_after`` seconds ago back into ``new/``
        and remove ``tmp/`` files of crashed writers; returns how many were put back."""
        now = time.time() if now is None else now
        back = 0
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.cur):
                m = _CLAIMED.fullmatch(name)
                if m is None or now - int(m.group(2)) / 1000 <= stale_after:
                    continue
                try:
                    os.rename(self.cur / name, self.new / m.group(1))
                    back += 1
                except FileNotFoundError:
                    continue  # done meanwhile, or recovered by another process
        if back:
            _fsync_dir(self.new)
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.tmp):
                with contextlib.suppress(FileNotFoundError):
                    if now - entry.stat().st_mtime > max(stale_after, TMP_MAX_AGE):
                        os.unlink(entry.path)
        return back

    # ------------------------------------------------------------------ the operator's view

    def list_unparsed(self) -> list[UnparsedInfo]:
        """Every unparsed item, oldest first (headers only)."""
        out: list[UnparsedInfo] = []
        try:
            names = sorted(n for n in os.listdir(self.unparsed_dir) if _ID.fullmatch(n))
        except FileNotFoundError:
            return out
        for name in names:
            try:
                h = _read_header(self.unparsed_dir / name)
            except FileNotFoundError:
                continue  # pruned meanwhile
            except (OSError, ValueError):
                h = {"reason": "unreadable inbox file"}
            out.append(
                UnparsedInfo(
                    id=name,
                    reason=str(h.get("reason", "")),
                    unparsed_at=float(h.get("unparsed_at", 0.0)),
                    received_at=float(h.get("received_at", 0.0)),
                    mail_from=str(h.get("mail_from", "")),
                    rcpt_tos=[str(r) for r in h.get("rcpt_tos", [])],
                    peer=str(h.get("peer", "")),
                    size=int(h.get("size", 0)),
                )
            )
        return out

    def read(self, item_id: str) -> Item | None:
        """An item by id, wherever it is (unparsed, waiting or claimed); None if gone."""
        if not valid_id(item_id):
            return None
        # An item moves new/ -> cur/ -> unparsed/ (or away) while we look: look in that
        # order, and again when it slipped between two places.
        for _ in range(5):
            candidates = [self.new / item_id]
            with contextlib.suppress(FileNotFoundError):
                candidates += [self.cur / n for n in os.listdir(self.cur) if n.startswith(item_id)]
            candidates.append(self.unparsed_dir / item_id)
            for path in candidates:
                try:
                    header, data = _read(path)
                except FileNotFoundError:
                    continue
                return _item(header, data, path)
        return None

    def requeue(self, item_id: str) -> bool:
        """Put an unparsed item back in ``new/`` to be processed again (after the
        classifier's patterns or the parser improved); False if it is not there."""
        if not valid_id(item_id):
            return False
        try:
            os.rename(self.unparsed_dir / item_id, self.new / item_id)
        except FileNotFoundError:
            return False
        _fsync_dir(self.new)
        return True

    def prune_unparsed(self, older_than: float, now: float | None = None) -> int:
        """Remove unparsed items kept longer than ``older_than`` seconds; returns how many."""
        now = time.time() if now is None else now
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.unparsed_dir):
                with contextlib.suppress(FileNotFoundError):
                    if now - entry.stat().st_mtime > older_than:
                        os.unlink(entry.path)
                        removed += 1
        return removed

    # ------------------------------------------------------------------ counts

    def pending(self) -> int:
        """Items waiting or being processed (``new/`` and ``cur/``): distinct ids, so
        that an item claimed while we count is counted once."""
        ids: set[str] = set()
        for path in (self.new, self.cur):  # in the order items move
            with contextlib.suppress(FileNotFoundError):
                ids.update(name.split("+", 1)[0] for name in os.listdir(path))
        return len(ids)

    def unparsed_count(self) -> int:
        return _count(self.unparsed_dir)


def _count(path: Path) -> int:
    try:
        with os.scandir(path) as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0
