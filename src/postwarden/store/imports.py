"""Contact imports in the control database (issue 20): the stored body, the claim that
lets one runner at a time work on an import, and the run itself.

The body is kept in ``import_chunks`` (1 MiB rows) rather than in a file: every
control process that shares the database, on any host, can run the import, and the
body goes with the database's backups. It is written a chunk per short transaction
while the upload streams in (the import is ``receiving`` and invisible meanwhile), and
deleted when the import ends.

A run reads the body twice, a chunk at a time (memory stays flat whatever the size):

1. the *scan* counts the data rows (``rows_total``), checks what would make the whole
   file unusable (encoding, header, mapping, an endless quoted cell) before anything is
   written, and finds duplicate emails: the first row with an email is the one taken,
   a later one is rejected naming it. What was seen is kept in a private SQLite file
   in a temporary directory, not in memory; the scan is repeated on a resume.
2. the *batches*: ``import_batch`` records at a time, the contacts (through
   ``store.contacts.save_contacts``: the one writer of contacts, which also gives a
   new contact of a suppressed address the suppression's status), their list and
   topic memberships, the rejected rows and the import's cursor and counters are
   committed in one transaction, guarded by the runner's claim. A process killed
   mid-import resumes after the last committed batch; a batch is never applied twice.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import datetime as dt
import logging
import os
import re
import sqlite3
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.contacts.importing import (
    MappingError,
    Reject,
    Row,
    RowRule,
    detect_delimiter,
    email_key,
    plan_columns,
)
from postwarden.store.availability import is_unavailable, short_error
from postwarden.store.contact_models import ContactList, ListMember, Topic, TopicSubscription
from postwarden.store.contacts import ContactIn, attribute_types, save_contacts
from postwarden.store.import_models import (
    FINISHED,
    RECEIVING,
    Import,
    ImportChunk,
    ImportReject,
)
from postwarden.store.leases import (  # noqa: F401 (runner_name, forget_runner: re-exported)
    forget_runner,
    is_dead,
    runner_name,
)
from postwarden.store.models import utcnow

#: Bytes per stored chunk of a body.
CHUNK = 1024 * 1024
#: Characters one CSV record may span (a quoted cell never closed would else read the
#: whole file as one record).
MAX_RECORD = 1024 * 1024
#: Rows an import writes before it refreshes PostgreSQL's statistics of contacts (then
#: four times as many, and so on).
ANALYZE_FIRST = 2000
#: Seconds an import is kept once it has ended (its report, its rejected rows).
KEEP = 30 * 86400.0
#: Seconds a claim holds without being renewed (each batch renews it).
LEASE = 60.0

Sessions = Callable[[], Any]
log = logging.getLogger("postwarden.control.imports")


class ImportFailed(Exception):
    """The file as a whole cannot be imported; the message says why (nothing of it was)."""


# ---------------------------------------------------------------------- the body


class BodyWriter:
    """Stores a body as it streams in: :meth:`write` any pieces, then :meth:`finish`
    (the import becomes ``queued``) or :meth:`abort` (it is deleted)."""

    def __init__(self, sessions: Sessions, import_id: int) -> None:
        self.sessions = sessions
        self.import_id = import_id
        self.size = 0
        self._seq = 0
        self._buf = bytearray()

    @classmethod
    async def create(
        cls,
        sessions: Sessions,
        tenant_id: int,
        options: Mapping[str, Any],
        data_source_id: int | None = None,
    ) -> BodyWriter:
        async with sessions() as s:
            imp = Import(
                tenant_id=tenant_id,
                state=RECEIVING,
                options=dict(options),
                data_source_id=data_source_id,
                lease_until=utcnow() + dt.timedelta(seconds=LEASE),
            )
            s.add(imp)
            await s.commit()
            return cls(sessions, imp.id)

    async def write(self, data: bytes) -> None:
        self._buf += data
        self.size += len(data)
        while len(self._buf) >= CHUNK:
            piece = bytes(self._buf[:CHUNK])
            del self._buf[:CHUNK]
            await self._store(piece)

    async def _store(self, piece: bytes) -> None:
        async with self.sessions() as s:
            s.add(ImportChunk(import_id=self.import_id, seq=self._seq, data=piece))
            # The upload is alive: an upload cut off by a crash is reaped after LEASE.
            await s.execute(
                update(Import)
                .where(Import.id == self.import_id)
                .values(lease_until=utcnow() + dt.timedelta(seconds=LEASE))
            )
            await s.commit()
        self._seq += 1

    async def finish(self, options: Mapping[str, Any] | None = None) -> int:
        if self._buf:
            await self._store(bytes(self._buf))
            self._buf.clear()
        values: dict[str, Any] = {"state": "queued", "size": self.size, "lease_until": None}
        if options is not None:
            values["options"] = dict(options)
        async with self.sessions() as s:
            await s.execute(update(Import).where(Import.id == self.import_id).values(**values))
            await s.commit()
        return self.import_id

    async def abort(self) -> None:
        async with self.sessions() as s:
            await s.execute(delete(Import).where(Import.id == self.import_id))
            await s.commit()


async def failed_import(
    sessions: Sessions,
    tenant_id: int,
    options: Mapping[str, Any],
    error: str,
    data_source_id: int | None = None,
) -> int:
    """An import that failed before it had a body (a data source that could not be
    fetched): recorded, so that the failure can be read like any other."""
    async with sessions() as s:
        now = utcnow()
        imp = Import(
            tenant_id=tenant_id,
            state="failed",
            options=dict(options),
            data_source_id=data_source_id,
            error=error,
            started_at=now,
            finished_at=now,
        )
        s.add(imp)
        await s.commit()
        return imp.id


async def _chunk(sessions: Sessions, import_id: int, seq: int) -> bytes | None:
    async with sessions() as s:
        data = (
            await s.execute(
                select(ImportChunk.data).where(
                    ImportChunk.import_id == import_id, ImportChunk.seq == seq
                )
            )
        ).scalar_one_or_none()
        return bytes(data) if data is not None else None


# ---------------------------------------------------------------------- records

_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


class _NeedMore(Exception):
    pass


class _Lines:
    """Decoded text cut into lines for ``csv.reader``, fed a chunk at a time. The
    reader is only asked for a record while MAX_RECORD characters are buffered (or the
    end is), so that it never runs dry in the middle of one."""

    def __init__(self) -> None:
        self.lines: deque[str] = deque()
        self.size = 0
        self.carry = ""
        self.eof = False

    def feed(self, text: str, final: bool) -> None:
        text = self.carry + text
        if final:
            complete, self.carry = text, ""
            self.eof = True
        else:
            end = len(text) - 1 if text.endswith("\r") else len(text)  # CR, then LF?
            cut = max(text.rfind("\n", 0, end), text.rfind("\r", 0, end)) + 1
            complete, self.carry = text[:cut], text[cut:]
        for line in _LINE.findall(complete):
            self.lines.append(line)
            self.size += len(line)

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if not self.lines:
            if self.eof:
                raise StopIteration
            raise _NeedMore
        line = self.lines.popleft()
        self.size -= len(line)
        return line


async def records(
    load: Callable[[int], Awaitable[bytes | None]], encoding: str, delimiter: str | None
) -> AsyncIterator[tuple[int, list[str], str]]:
    """The body's CSV records with their numbers (from 1: the header) and the
    delimiter used. Raises :class:`ImportFailed` for a body that cannot be read."""
    codec = "utf-8-sig" if encoding == "utf-8" else "latin-1"
    decoder = codecs.getincrementaldecoder(codec)(errors="strict")
    lines = _Lines()
    seq = 0
    offset = 0  # bytes decoded so far

    async def more() -> None:
        nonlocal seq, offset
        data = await load(seq)
        seq += 1
        try:
            text = decoder.decode(data or b"", final=data is None)
        except UnicodeDecodeError as exc:
            raise ImportFailed(
                f"the file is not {encoding.upper()}: byte 0x{exc.object[exc.start]:02x}"
                f" near byte {offset + exc.start} (send encoding=latin-1 for a Latin-1 file)"
            ) from None
        offset += len(data or b"")
        lines.feed(text, final=data is None)
        if len(lines.carry) > MAX_RECORD:  # no line end in sight
            raise ImportFailed(f"a line longer than {MAX_RECORD} characters: is this CSV?")

    too_long = f"a record longer than {MAX_RECORD} characters (a quote never closed?)"
    number = 0
    while not lines.lines and not lines.eof:
        await more()
    if delimiter is None:
        delimiter = detect_delimiter(lines.lines[0] if lines.lines else "")
    reader = csv.reader(lines, delimiter=delimiter)
    while True:
        while lines.size < MAX_RECORD and not lines.eof:
            await more()
        try:
            cells = next(reader)
        except StopIteration:
            return
        except _NeedMore:
            raise ImportFailed(f"row {number + 1}: {too_long}") from None
        except csv.Error as exc:
            why = str(exc)
            if "field limit" in why:
                limit = csv.field_size_limit()
                why = f"a cell longer than {limit} characters (a quote never closed?)"
            raise ImportFailed(f"row {number + 1}: {why}") from None
        number += 1
        yield number, cells, delimiter


# ---------------------------------------------------------------------- claims


async def claim(sessions: Sessions, me: str) -> int | None:
    """Take one import to run: the oldest queued, or a running one whose runner is gone
    (its lease passed, or its process on this host ended). A compare-and-set on the
    state, owner and lease: two runners never take the same import."""
    now = utcnow()
    async with sessions() as s:
        rows = (
            await s.execute(
                select(Import.id, Import.state, Import.claimed_by, Import.lease_until)
                .where(Import.state.in_(("queued", "running")))
                .order_by(Import.id)
                .limit(50)
            )
        ).all()
        for iid, state, owner, lease in rows:
            # A runner runs one import at a time: one still marked as its own was
            # left by an error, and is taken up again.
            if state == "running" and not (
                lease is None or lease < now or owner == me or is_dead(owner)
            ):
                continue
            guard = (
                Import.state == "queued"
                if state == "queued"
                else and_(
                    Import.state == "running",
                    Import.claimed_by == owner if owner else Import.claimed_by.is_(None),
                    Import.lease_until == lease if lease else Import.lease_until.is_(None),
                )
            )
            result = await s.execute(
                update(Import)
                .where(Import.id == iid, guard)
                .values(
                    state="running",
                    claimed_by=me,
                    lease_until=now + dt.timedelta(seconds=LEASE),
                    started_at=func.coalesce(Import.started_at, now),
                )
            )
            await s.commit()
            if getattr(result, "rowcount", 0) == 1:
                return int(iid)
    return None


async def reap_uploads(sessions: Sessions) -> int:
    """Delete imports whose upload stopped (a crash mid-upload): their lease passed."""
    async with sessions() as s:
        result = await s.execute(
            delete(Import).where(Import.state == RECEIVING, Import.lease_until < utcnow())
        )
        await s.commit()
        return int(getattr(result, "rowcount", 0) or 0)


async def prune_finished(sessions: Sessions, keep: float = KEEP) -> int:
    """Forget imports that ended more than ``keep`` seconds ago (their rejected rows
    with them): a data source pulled every minute makes 1 440 a day."""
    cutoff = utcnow() - dt.timedelta(seconds=keep)
    async with sessions() as s:
        result = await s.execute(
            delete(Import).where(Import.state.in_(FINISHED), Import.finished_at < cutoff)
        )
        await s.commit()
        return int(getattr(result, "rowcount", 0) or 0)


def _held(import_id: int, me: str) -> tuple[Any, ...]:
    """The import, while this runner holds it (not cancelled, not taken over)."""
    return (Import.id == import_id, Import.claimed_by == me, Import.state == "running")


async def _renew(sessions: Sessions, import_id: int, me: str) -> bool:
    async with sessions() as s:
        result = await s.execute(
            update(Import)
            .where(*_held(import_id, me))
            .values(lease_until=utcnow() + dt.timedelta(seconds=LEASE))
        )
        await s.commit()
        return getattr(result, "rowcount", 0) == 1


async def _end(
    sessions: Sessions, import_id: int, me: str, state: str, error: str | None = None
) -> None:
    async with sessions() as s:
        result = await s.execute(
            update(Import)
            .where(*_held(import_id, me))
            .values(
                state=state,
                error=error,
                finished_at=utcnow(),
                lease_until=None,
                claimed_by=None,
            )
        )
        if getattr(result, "rowcount", 0) == 1:
            await s.execute(delete(ImportChunk).where(ImportChunk.import_id == import_id))
        await s.commit()


async def cancel(sessions: Sessions, tenant_id: int, import_id: int) -> bool:
    """Stop an import after its current batch (what was committed stays): whether it
    was queued or running."""
    async with sessions() as s:
        result = await s.execute(
            update(Import)
            .where(
                Import.id == import_id,
                Import.tenant_id == tenant_id,
                Import.state.in_(("queued", "running")),
            )
            .values(state="cancelled", finished_at=utcnow(), lease_until=None, claimed_by=None)
        )
        await s.execute(delete(ImportChunk).where(ImportChunk.import_id == import_id))
        await s.commit()
        return getattr(result, "rowcount", 0) == 1


# ---------------------------------------------------------------------- the run


class _Seen:
    """Emails seen in a file (first row of each) and the later rows that repeat one,
    in a private SQLite file: memory stays flat however many rows the file has."""

    def __init__(self, directory: str) -> None:
        self.db = sqlite3.connect(os.path.join(directory, "seen.db"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY, first INTEGER) WITHOUT ROWID")
        self.db.execute("CREATE TABLE dup (row INTEGER PRIMARY KEY, first INTEGER)")
        self.db.execute("BEGIN")

    def add(self, keys: Sequence[tuple[str, int]]) -> None:
        cur = self.db.cursor()
        for key, row in keys:
            cur.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (key, row))
            if cur.rowcount == 0:
                (first,) = cur.execute("SELECT first FROM seen WHERE key = ?", (key,)).fetchone()
                cur.execute("INSERT INTO dup VALUES (?, ?)", (row, first))

    def done(self) -> None:
        self.db.execute("COMMIT")

    def dups(self, first_row: int, last_row: int) -> dict[int, int]:
        rows = self.db.execute(
            "SELECT row, first FROM dup WHERE row BETWEEN ? AND ?", (first_row, last_row)
        )
        return dict(rows.fetchall())

    def close(self) -> None:
        self.db.close()


@dataclass
class _Plan:
    tenant_id: int
    options: dict[str, Any]
    next_record: int


async def _plan(sessions: Sessions, import_id: int) -> _Plan:
    async with sessions() as s:
        imp = await s.get(Import, import_id)
        assert imp is not None
        return _Plan(imp.tenant_id, dict(imp.options or {}), imp.next_record)


async def resolve_refs(
    session: AsyncSession, tenant_id: int, refs: set[str]
) -> tuple[dict[str, int], dict[str, int]]:
    """The lists and topics that ``refs`` (``list:<name or id>``, ``topic:…``) name
    and the tenant has: two maps (lists, topics) of name or id as given → id."""
    found: tuple[dict[str, int], dict[str, int]] = ({}, {})
    for ref in refs:
        kind, _, arg = ref.partition(":")
        model: Any = ContactList if kind == "list" else Topic
        cond = model.name == arg
        if arg.isdigit() and int(arg) < 2**63:
            cond = or_(cond, model.id == int(arg))
        rid = (
            await session.execute(
                select(model.id).where(model.tenant_id == tenant_id, cond).limit(1)
            )
        ).scalar_one_or_none()
        if rid is not None:
            found[0 if kind == "list" else 1][arg] = rid
    return found


def _insert(session: AsyncSession) -> Any:
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


async def _memberships(
    session: AsyncSession,
    tenant_id: int,
    pairs: Sequence[tuple[int, Row]],
    list_ids: Mapping[str, int],
    topic_ids: Mapping[str, int],
) -> None:
    join: list[dict[str, Any]] = []
    leave: list[tuple[int, int]] = []
    subs: dict[tuple[int, int], bool] = {}
    now = utcnow()
    for cid, row in pairs:
        for ref, member in row.lists.items():
            lid = list_ids[ref]
            if member:
                join.append({"list_id": lid, "contact_id": cid, "tenant_id": tenant_id})
            else:
                leave.append((lid, cid))
        for ref, opted in row.topics.items():
            subs[(topic_ids[ref], cid)] = opted
    insert = _insert(session)
    if join:
        unique = list({(j["list_id"], j["contact_id"]): j for j in join}.values())
        for j in unique:
            j["added_at"] = now
        await session.execute(
            insert(ListMember).on_conflict_do_nothing(index_elements=["list_id", "contact_id"]),
            unique,
        )
    for lid, cid in leave:
        await session.execute(
            delete(ListMember).where(ListMember.list_id == lid, ListMember.contact_id == cid)
        )
    if subs:
        stmt = insert(TopicSubscription)
        stmt = stmt.on_conflict_do_update(
            index_elements=["topic_id", "contact_id"],
            set_={"opted_in": stmt.excluded.opted_in, "changed_at": stmt.excluded.changed_at},
        )
        await session.execute(
            stmt,
            [
                {
                    "topic_id": tid,
                    "contact_id": cid,
                    "tenant_id": tenant_id,
                    "opted_in": opted,
                    "changed_at": now,
                }
                for (tid, cid), opted in subs.items()
            ],
        )


@dataclass
class _Batch:
    good: list[tuple[int, Row, list[str]]]
    bad: list[tuple[int, Reject, list[str]]]
    next_record: int


@dataclass
class _Writer:
    """Writes one run's batches."""

    sessions: Sessions
    import_id: int
    me: str
    plan: _Plan
    seen: _Seen
    list_ids: Mapping[str, int]
    topic_ids: Mapping[str, int]
    # on_conflict=replace: the file's attribute columns are the contact's attributes
    # whole, even when a row's cells are all empty.
    whole: bool = False

    async def flush(self, batch: _Batch) -> bool:
        """The batch's rows that repeat an earlier email rejected, then the batch
        committed (:func:`_commit`)."""
        rows = [n for n, _, _ in batch.good]
        dups = self.seen.dups(min(rows), max(rows)) if rows else {}
        if dups:
            keep = []
            for n, row, cells in batch.good:
                if n in dups:
                    reason = f"duplicate of row {dups[n]}: the first row with an email is taken"
                    batch.bad.append((n, Reject("email", reason), _cells(cells)))
                else:
                    keep.append((n, row, cells))
            batch.good = keep
        return await _commit(self, batch)


async def _commit(w: _Writer, batch: _Batch) -> bool:
    """One batch in one transaction, the cursor with it; False (nothing written) when
    this runner no longer holds the import (cancelled, or taken over)."""
    sessions, import_id, me, plan = w.sessions, w.import_id, w.me, w.plan
    list_ids, topic_ids = w.list_ids, w.topic_ids
    opts = plan.options
    created = updated = 0
    async with sessions() as s:
        if batch.good and not opts.get("dry_run"):
            on_conflict = opts.get("on_conflict", "update")
            items = [
                ContactIn(
                    email=r.email, name=r.name, attributes=r.attributes or ({} if w.whole else None)
                )
                for _, r, _ in batch.good
            ]
            results = await save_contacts(s, plan.tenant_id, items, on_conflict)
            counted: set[int] = set()
            pairs = []
            for res, (_, row, _) in zip(results, batch.good, strict=True):
                if res.id not in counted:
                    counted.add(res.id)
                    created += res.created
                    updated += res.changed and not res.created
                if res.created or on_conflict != "skip":
                    pairs.append((res.id, row))
            await _memberships(s, plan.tenant_id, pairs, list_ids, topic_ids)
        if batch.bad:
            await s.execute(
                _insert(s)(ImportReject).on_conflict_do_nothing(
                    index_elements=["import_id", "row"]
                ),
                [
                    {
                        "import_id": import_id,
                        "row": n,
                        "column_name": rej.column[:200],
                        "reason": rej.reason,
                        "cells": cells,
                    }
                    for n, rej, cells in batch.bad
                ],
            )
        done = len(batch.good) + len(batch.bad)
        result = await s.execute(
            update(Import)
            .where(*_held(import_id, me), Import.next_record == plan.next_record)
            .values(
                next_record=batch.next_record,
                rows_done=Import.rows_done + done,
                rows_imported=Import.rows_imported + len(batch.good),
                rows_rejected=Import.rows_rejected + len(batch.bad),
                contacts_created=Import.contacts_created + created,
                contacts_updated=Import.contacts_updated + updated,
                lease_until=utcnow() + dt.timedelta(seconds=LEASE),
            )
        )
        if getattr(result, "rowcount", 0) != 1:
            await s.rollback()
            return False
        await s.commit()
    plan.next_record = batch.next_record
    return True


def _cells(cells: Sequence[str]) -> list[str]:
    # What the database keeps of a rejected row: no NUL (PostgreSQL refuses it in text).
    return [c.replace("\x00", "\ufffd") for c in cells]


async def run_import(sessions: Sessions, import_id: int, me: str, batch_size: int) -> str:
    """Run (or resume) an import this runner has claimed, to its end: ``done``,
    ``failed`` (the reason in ``error``; nothing of the file was written), or
    ``lost`` (cancelled, or taken over by another runner: it stops at once)."""
    plan = await _plan(sessions, import_id)
    opts = plan.options

    def load(seq: int) -> Awaitable[bytes | None]:
        return _chunk(sessions, import_id, seq)

    encoding = opts.get("encoding", "utf-8")
    with tempfile.TemporaryDirectory(prefix="postwarden-import-") as tmp:
        seen = _Seen(tmp)
        try:
            # 1. The scan.
            header: list[str] = []
            email_col = 0
            total = 0
            keys: list[tuple[str, int]] = []
            delimiter = opts.get("delimiter")
            try:
                async for number, cells, used in records(load, encoding, delimiter):
                    if number == 1:
                        header, delimiter = cells, used
                        try:
                            targets = plan_columns(header, opts.get("mapping"))
                        except MappingError as exc:
                            where = f"column {exc.column!r}: " if exc.column else ""
                            raise ImportFailed(f"{where}{exc}") from None
                        email_col = next(i for i, t in enumerate(targets) if t.kind == "email")
                        continue
                    if not cells:
                        continue
                    total += 1
                    if email_col < len(cells) and cells[email_col].strip():
                        keys.append((email_key(cells[email_col]), number))
                    if len(keys) >= 1000:
                        seen.add(keys)
                        keys.clear()
                        await asyncio.sleep(0)
                    if total % 50_000 == 0 and not await _renew(sessions, import_id, me):
                        return "lost"
                seen.add(keys)
                seen.done()
                if not header:
                    raise ImportFailed("the file is empty: a header row is needed")
            except ImportFailed as exc:
                await _end(sessions, import_id, me, "failed", str(exc))
                return "failed"
            async with sessions() as s:
                result = await s.execute(
                    update(Import)
                    .where(*_held(import_id, me))
                    .values(
                        rows_total=total,
                        header=_cells(header),
                        lease_until=utcnow() + dt.timedelta(seconds=LEASE),
                    )
                )
                await s.commit()
                if getattr(result, "rowcount", 0) != 1:
                    return "lost"  # cancelled while it was read
                types = await attribute_types(s, plan.tenant_id)
                refs = {str(t) for t in targets if t.kind in ("list", "topic")}
                list_ids, topic_ids = await resolve_refs(s, plan.tenant_id, refs)
            known = {f"list:{k}" for k in list_ids} | {f"topic:{k}" for k in topic_ids}
            rule = RowRule(header, targets, types, known)
            writer = _Writer(sessions, import_id, me, plan, seen, list_ids, topic_ids)
            writer.whole = opts.get("on_conflict") == "replace" and any(
                t.kind == "attribute" for t in targets
            )

            # 2. The batches, from the cursor on.
            current = _Batch([], [], plan.next_record)
            written, analyze_at = 0, ANALYZE_FIRST
            start = plan.next_record
            async for number, cells, _ in records(load, encoding, delimiter):
                if number <= start:
                    continue
                current.next_record = number
                if number == 1 or not cells:
                    continue
                checked = rule.check(cells)
                if isinstance(checked, Reject):
                    current.bad.append((number, checked, _cells(cells)))
                else:
                    current.good.append((number, checked, cells))
                if len(current.good) + len(current.bad) >= batch_size:
                    if not await writer.flush(current):
                        return "lost"
                    written += len(current.good)
                    if written >= analyze_at:
                        analyze_at *= 4
                        await _analyze(sessions)
                    current = _Batch([], [], number)
                    await asyncio.sleep(0)
            if current.next_record > plan.next_record and not await writer.flush(current):
                return "lost"
            await _end(sessions, import_id, me, "done")
            return "done"
        finally:
            seen.close()


async def _analyze(sessions: Sessions) -> None:
    """Fresh planner statistics for ``contacts`` on PostgreSQL while an import grows
    it: with none (a new table) or old ones, the upsert's lookup of a batch's emails
    was planned as a scan of the whole table, and 20 000 rows took 20 s."""
    async with sessions() as s:
        if s.get_bind().dialect.name != "postgresql":
            return
        try:
            await s.execute(text("ANALYZE contacts"))
            await s.commit()
        except Exception as exc:  # not the table's owner: the import goes on unhelped
            if is_unavailable(exc):
                raise
            log.warning("event=import_analyze_failed error=%r", short_error(exc))
