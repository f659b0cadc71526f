"""/v1/suppressions: a tenant's suppressed addresses, one by one and as CSV (import
and export)."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable
from typing import Any, get_args

from sqlalchemy import select
from starlette.responses import Response

from postwarden.control.api import api, one_or_404, page_of
from postwarden.control.csvfile import SafeWriter, unescape_cell
from postwarden.control.errors import invalid
from postwarden.control.routing import Call
from postwarden.control.schemas import (
    Deleted,
    ImportResult,
    Reason,
    SuppressionCreate,
    SuppressionList,
    SuppressionOut,
    SuppressionQuery,
    decode_cursor,
    parse_timestamp,
)
from postwarden.mail.addresses import AddressError, normalize_address, suppression_key
from postwarden.store.contacts import follow_suppression
from postwarden.store.models import Suppression
from postwarden.store.suppress import remove_suppression, upsert_suppression

#: Every reason a suppression can have, the appliance's own (hard_bounce, soft_bounce,
#: complaint) included: what the export writes, the import takes back.
REASONS: tuple[str, ...] = get_args(Reason)


def supp_out(x: Suppression) -> SuppressionOut:
    return SuppressionOut.model_validate(x)


@api.op(
    "POST",
    "/v1/suppressions",
    summary="Suppress an address (or replace its entry)",
    scope="manage",
    body=SuppressionCreate,
    response=SuppressionOut,
    status=201,
)
async def create_suppression(c: Call) -> Any:
    b: SuppressionCreate = c.body
    async with c.ctx.sessions() as s:
        row, _how = await upsert_suppression(
            s, c.tenant_id, b.address, b.reason, b.source, b.note, b.expires_at
        )
        await s.commit()
    # In force in this process before the answer; in the others within a poll.
    await c.ctx.suppressions.refresh([(c.tenant_id, row.address)])
    return supp_out(row)


@api.op(
    "GET",
    "/v1/suppressions",
    summary="List or search suppressions",
    scope="read",
    query=SuppressionQuery,
    response=SuppressionList,
)
async def list_suppressions(c: Call) -> Any:
    q: SuppressionQuery = c.query
    after = decode_cursor(q.cursor)
    stmt = select(Suppression).where(Suppression.tenant_id == c.tenant_id, Suppression.id > after)
    if q.reason:
        stmt = stmt.where(Suppression.reason == q.reason)
    if q.q:
        stmt = stmt.where(Suppression.address.contains(q.q.lower(), autoescape=True))
    async with c.ctx.sessions() as s:
        rows = list((await s.execute(stmt.order_by(Suppression.id).limit(q.limit))).scalars())
    return SuppressionList(data=[supp_out(x) for x in rows], next_cursor=page_of(rows, q.limit))


async def _suppression(s: Any, c: Call) -> Suppression:
    stmt = select(Suppression).where(
        Suppression.tenant_id == c.tenant_id,
        Suppression.address == suppression_key(c.path["address"]),
    )
    row: Suppression = await one_or_404(s, stmt, "suppression")
    return row


@api.op(
    "GET",
    "/v1/suppressions/{address}",
    summary="Show one address's suppression",
    scope="read",
    response=SuppressionOut,
    errors=(404,),
)
async def get_suppression(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        return supp_out(await _suppression(s, c))


@api.op(
    "DELETE",
    "/v1/suppressions/{address}",
    summary="Remove a suppression",
    scope="manage",
    response=Deleted,
    errors=(404,),
)
async def delete_suppression(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        row = await _suppression(s, c)
        await remove_suppression(s, c.tenant_id, row.address)
        await s.commit()
    await c.ctx.suppressions.refresh([(c.tenant_id, row.address)])
    return Deleted(deleted=True)


CSV_FIELDS = ("address", "reason", "source", "note", "created_at", "expires_at")


def _csv_time(row: dict[str, Any], column: str) -> dt.datetime | None:
    text = (row.get(column) or "").strip()
    try:
        return parse_timestamp(text) if text else None
    except ValueError as exc:
        raise ValueError(f"{column}: {exc}") from None


MAX_IMPORT = 100_000

#: One good row of an import: address, reason, source, note, expires_at, created_at.
ImportRow = tuple[str, str, str, str, dt.datetime | None, dt.datetime | None]


def read_import(raw: bytes) -> tuple[dict[str, ImportRow], list[dict[str, Any]]]:
    """The good rows of an import by suppression key (a later row for an address
    wins) and the bad rows' errors by line; 422 (``body``) when the file as a whole
    cannot be taken."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise invalid("body", "the CSV is not UTF-8") from None
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    if "address" not in header:
        raise invalid("body", "the header row must name an address column")
    unknown = [h for h in header if h not in CSV_FIELDS]
    if unknown:
        raise invalid("body", f"unknown column {unknown[0]!r}")
    good: dict[str, tuple[str, str, str, str, dt.datetime | None, dt.datetime | None]] = {}
    has_source = "source" in header
    errors: list[dict[str, Any]] = []
    try:
        for row in reader:
            line = reader.line_num
            if len(good) + len(errors) >= MAX_IMPORT:
                raise invalid("body", f"more than {MAX_IMPORT} rows; split the file")
            # What the export escaped (csvfile) comes back as it was.
            row = {k: unescape_cell(v) if isinstance(v, str) else v for k, v in row.items()}
            try:
                for col, value in row.items():
                    # A NUL no database column takes (PostgreSQL refuses it in text).
                    if isinstance(value, str) and "\x00" in value:
                        raise ValueError(f"{col}: NUL is not allowed")
                addr = normalize_address((row.get("address") or "").strip())
                reason = (row.get("reason") or "manual").strip()
                if reason not in REASONS:
                    raise ValueError(f"reason must be one of {', '.join(REASONS)}")
                expires = _csv_time(row, "expires_at")
                created_at = _csv_time(row, "created_at")
                # A column that is there is taken as it is (an export's empty source
                # stays empty); too long is refused, never cut.
                source = (row.get("source") or "") if has_source else "import"
                note = row.get("note") or ""
                if len(source) > 100:
                    raise ValueError("source: longer than 100 characters")
                if len(note) > 2000:
                    raise ValueError("note: longer than 2000 characters")
            except (AddressError, ValueError) as exc:
                errors.append({"line": line, "message": str(exc)})
                continue
            good[suppression_key(addr)] = (addr, reason, source, note, expires, created_at)
    except csv.Error as exc:
        raise invalid("body", f"line {reader.line_num}: {exc}") from None
    return good, errors


async def store_import(session: Any, tenant_id: int, rows: Iterable[ImportRow]) -> tuple[int, int]:
    """Create or replace each row's entry in ``session``'s transaction (the caller
    commits): how many were created and how many updated."""
    created = updated = 0
    by_reason: dict[str, list[str]] = {}
    for addr, reason, source, note, expires, created_at in rows:
        entry, how = await upsert_suppression(
            session, tenant_id, addr, reason, source, note, expires, follow=False
        )
        by_reason.setdefault(reason, []).append(entry.address)
        if created_at is not None:
            entry.created_at = created_at
        new = how == "created"
        created += new
        updated += not new
    for reason, addresses in by_reason.items():  # the contacts' statuses, in one go
        await follow_suppression(session, tenant_id, addresses, reason)
    return created, updated


@api.op(
    "POST",
    "/v1/suppressions/import",
    summary="Import suppressions from CSV",
    scope="manage",
    response=ImportResult,
    request_media="text/csv",
    body_limit=32 * 1024 * 1024,
)
async def import_suppressions(c: Call) -> Any:
    """CSV with a header row; ``address`` is required, ``reason`` (default manual),
    ``source`` (default import), ``note``, ``created_at`` (default now) and
    ``expires_at`` (ISO 8601 with zone) are optional: the export's columns, so that an
    export imports back as it was. Bad rows are reported by line and skipped; the good
    rows are imported together."""
    good, errors = read_import(c.raw)
    async with c.ctx.sessions() as s:
        created, updated = await store_import(s, c.tenant_id, good.values())
        await s.commit()
    await c.ctx.suppressions.refresh((c.tenant_id, suppression_key(a)) for a, *_ in good.values())
    return ImportResult(created=created, updated=updated, errors=errors)


@api.op(
    "GET",
    "/v1/suppressions/export",
    summary="Export all suppressions as CSV",
    scope="read",
    response_media="text/csv",
)
async def export_suppressions(c: Call) -> Any:
    out = io.StringIO()
    w = SafeWriter(out)
    w.writerow(CSV_FIELDS)
    async with c.ctx.sessions() as s:
        result = await s.stream(
            select(Suppression).where(Suppression.tenant_id == c.tenant_id).order_by(Suppression.id)
        )
        async for x in result.scalars():
            w.writerow(
                [
                    x.address,
                    x.reason,
                    x.source,
                    x.note,
                    x.created_at.isoformat(),
                    x.expires_at.isoformat() if x.expires_at else "",
                ]
            )
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8")
