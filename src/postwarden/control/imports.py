"""/v1/imports: contacts from CSV, run in the background (issue 20).

``POST /v1/imports`` takes a ``text/csv`` body (options as query parameters) or a
``multipart/form-data`` upload (the file in ``file``; the options as form fields or a
JSON ``options`` part). The body is stored as it streams in, never held whole in memory
(``store.imports``: chunks in the database, up to :data:`MAX_IMPORT_BYTES`), and the
answer is ``202 {"id": …}``; the import runner (``control.import_runner``) does the rest.
``GET /v1/imports/{id}`` reports progress and rejected rows, ``…/rejects.csv`` all of
them.
"""

import io
import json
from collections.abc import AsyncIterator
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import select
from starlette.responses import StreamingResponse

from postwarden.contacts.importing import MAX_COLUMNS, parse_target
from postwarden.control.api import api, one_or_404, page, page_of
from postwarden.control.csvfile import SafeWriter
from postwarden.control.errors import ApiError, from_validation, invalid
from postwarden.control.routing import Call
from postwarden.control.schemas import Page, Strict
from postwarden.store.contacts import ON_CONFLICT
from postwarden.store.import_models import RECEIVING, Import, ImportReject
from postwarden.store.imports import CHUNK, BodyWriter, cancel, resolve_refs

#: Largest body an import takes: stored as it comes, a chunk at a time.
MAX_IMPORT_BYTES = 1024 * 1024 * 1024
#: Rejected rows ``GET /v1/imports/{id}`` lists (rejects.csv has every one).
MAX_ERRORS = 100
#: Bytes of a multipart upload's non-file fields (the options).
MAX_FIELDS = 64 * 1024
CSV_TYPES = ("text/csv", "application/csv", "text/plain")
#: A ``charset`` of the Content-Type that means encoding=latin-1 (when not given).
LATIN_1 = ("iso-8859-1", "latin-1", "latin1", "l1")

OnConflict = Literal["update", "replace", "skip"]
assert set(get_args(OnConflict)) == set(ON_CONFLICT)  # the store's rules, named here
Encoding = Literal["utf-8", "latin-1"]
Delimiter = Literal[",", ";", "\t", "|"]


def _check_mapping(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > MAX_COLUMNS:
        raise ValueError(f"at most {MAX_COLUMNS} columns")
    out = {}
    for column, target in value.items():
        if not isinstance(target, str):
            raise ValueError(f"{column!r}: a target is a string")
        out[column.strip()] = str(parse_target(target))
    return out


class ImportOptions(Strict):
    """How a file is read and where its columns go."""

    mapping: dict[str, str] | None = Field(
        None,
        description="column -> email | name | ignore | attribute:<name> | list:<list name"
        " or id> | topic:<topic name or id>; without it, columns map by header",
    )
    dry_run: bool = Field(False, description="check every row, write nothing")
    on_conflict: OnConflict = Field("update", description="what to do with existing contacts")
    encoding: Encoding = Field("utf-8", description="a BOM is skipped")
    delimiter: Delimiter | None = Field(
        None, description="detected from the header row when not given"
    )

    _mapping = field_validator("mapping")(_check_mapping)


class ImportQuery(Strict):
    """The options of a ``text/csv`` body, as query parameters (mapping as JSON)."""

    # A request line the HTTP server takes (16 KiB) even percent-encoded: a longer
    # mapping goes in a multipart upload's options.
    mapping: str | None = Field(
        None, max_length=1000, description="JSON object (longer: use a multipart upload)"
    )
    dry_run: bool = False
    on_conflict: OnConflict = "update"
    encoding: Encoding = "utf-8"
    delimiter: Delimiter | Literal["tab"] | None = None


class ImportCreated(BaseModel):
    id: int


class RowError(BaseModel):
    row: int = Field(description="CSV record number: the header is 1, the first data row 2")
    column: str
    reason: str


class ImportOut(BaseModel):
    id: int
    state: str
    data_source_id: int | None
    options: dict[str, Any]
    size: int
    rows_total: int | None = Field(description="data rows, once the file has been read once")
    rows_done: int
    rows_imported: int
    rows_rejected: int
    contacts_created: int
    contacts_updated: int
    error: str | None
    errors: list[RowError] = Field(description=f"the first {MAX_ERRORS} rejected rows")
    created_at: str
    started_at: str | None
    finished_at: str | None


class ImportSummary(BaseModel):
    id: int
    state: str
    data_source_id: int | None
    rows_total: int | None
    rows_done: int
    rows_imported: int
    rows_rejected: int
    error: str | None
    created_at: str
    finished_at: str | None


class ImportList(BaseModel):
    data: list[ImportSummary]
    next_cursor: str | None


class ImportListQuery(Page):
    data_source_id: int | None = Field(None, ge=1, le=2**63 - 1)


def options_from(raw: dict[str, Any]) -> dict[str, Any]:
    """Options as given (mapping as a JSON text or object) checked: 422 naming the
    field, else the options as stored."""
    raw = dict(raw)
    if raw.get("delimiter") == "tab":
        raw["delimiter"] = "\t"
    if isinstance(raw.get("mapping"), str):
        try:
            raw["mapping"] = json.loads(raw["mapping"])
        except ValueError:
            raise invalid("mapping", "not JSON (an object: column -> target)") from None
    try:
        return ImportOptions.model_validate(raw).model_dump()
    except ValidationError as exc:
        raise from_validation(exc) from None


async def check_refs(c: Call, options: dict[str, Any]) -> None:
    """422 when the mapping names a list or topic the tenant does not have."""
    mapping = options.get("mapping") or {}
    refs = {t for t in mapping.values() if t.startswith(("list:", "topic:"))}
    if not refs:
        return
    async with c.ctx.sessions() as s:
        lists, topics = await resolve_refs(s, c.tenant_id, refs)
    for column, target in mapping.items():
        kind, _, arg = target.partition(":")
        if kind in ("list", "topic") and arg not in (lists if kind == "list" else topics):
            raise invalid(f"mapping.{column}", f"no {kind} {arg!r} (by name or id)")


def _too_large() -> ApiError:
    return ApiError(
        413,
        "too_large",
        f"the body is larger than {MAX_IMPORT_BYTES} bytes",
        fields=[{"path": "body", "message": f"larger than {MAX_IMPORT_BYTES} bytes"}],
    )


async def _stream(c: Call) -> AsyncIterator[bytes]:
    """The request body as it comes, at most MAX_IMPORT_BYTES; the pieces it holds at
    once (a chunk and the one coming) are reserved in the body budget."""
    declared = c.request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_IMPORT_BYTES:
        raise _too_large()
    budget = getattr(c.ctx, "body_budget", None)
    if budget is not None:
        if not await budget.reserve(2 * CHUNK):
            raise ApiError(
                503,
                "busy",
                "too many large requests at once; retry shortly",
                headers={"Retry-After": "1"},
            )
        c.reserved = 2 * CHUNK
    size = 0
    async for piece in c.request.stream():
        size += len(piece)
        if size > MAX_IMPORT_BYTES:
            raise _too_large()
        if piece:
            yield piece


class _Upload:
    """A multipart/form-data upload read as it streams: the ``file`` part into the
    store, the other parts (the options) kept, at most MAX_FIELDS bytes."""

    def __init__(self, boundary: bytes) -> None:
        self.fields: dict[str, bytearray] = {}
        self.file = bytearray()  # file bytes not stored yet
        self.files = 0
        self._name = ""
        self._is_file = False
        self._hfield = bytearray()
        self._hvalue = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._field_bytes = 0
        self.error: str | None = None
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": lambda d, a, b: self._hfield.extend(d[a:b]),
                "on_header_value": lambda d, a, b: self._hvalue.extend(d[a:b]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done,
                "on_part_data": self._data,
            },
        )

    def _begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[bytes(self._hfield).lower()] = bytes(self._hvalue)
        self._hfield.clear()
        self._hvalue.clear()

    def _headers_done(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        self._is_file = self._name == "file"
        if self._is_file:
            self.files += 1
            if self.files > 1:
                self.error = "file: give one file"
        else:
            self.fields.setdefault(self._name, bytearray())

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            if self.files == 1:
                self.file += data[start:end]
            return
        self._field_bytes += end - start
        if self._field_bytes > MAX_FIELDS:
            self.error = f"the fields other than file are larger than {MAX_FIELDS} bytes"
            return
        self.fields[self._name] += data[start:end]

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in self.fields.items():
            text = value.decode("utf-8", "replace")
            if name == "options":
                try:
                    given = json.loads(text)
                except ValueError:
                    raise invalid("options", "not JSON") from None
                if not isinstance(given, dict):
                    raise invalid("options", "a JSON object")
                out.update(given)
            elif name == "dry_run":
                out[name] = text.strip().lower() in ("1", "true", "yes", "on")
            else:
                out[name] = text
        return out


async def _receive_multipart(c: Call, boundary: bytes, base: dict[str, Any]) -> int:
    upload = _Upload(boundary)
    writer: BodyWriter | None = None
    try:
        async for piece in _stream(c):
            try:
                upload.parser.write(piece)
            except Exception as exc:  # python-multipart's parse errors
                raise invalid("body", f"not a multipart/form-data body: {exc}") from None
            if upload.error:
                raise invalid("body", upload.error)
            if upload.file:
                if writer is None:
                    writer = await BodyWriter.create(c.ctx.sessions, c.tenant_id, {})
                await writer.write(bytes(upload.file))
                upload.file.clear()
        upload.parser.finalize()
        if upload.files == 0 or writer is None:
            raise invalid("file", "the upload has no (or an empty) file part named file")
        options = options_from({**base, **upload.options()})
        await check_refs(c, options)
        return await writer.finish(options)
    except BaseException:
        if writer is not None:
            await writer.abort()
        raise


async def _receive_csv(c: Call, options: dict[str, Any]) -> int:
    writer = await BodyWriter.create(c.ctx.sessions, c.tenant_id, options)
    try:
        async for piece in _stream(c):
            await writer.write(piece)
        if writer.size == 0:
            raise invalid("body", "empty: a CSV file with a header row is needed")
        return await writer.finish()
    except BaseException:
        await writer.abort()
        raise


@api.op(
    "POST",
    "/v1/imports",
    summary="Import contacts from CSV (runs in the background)",
    scope="manage",
    query=ImportQuery,
    response=ImportCreated,
    status=202,
    request_media="text/csv",
    errors=(413, 415),
    stream=True,
    sync=False,
)
async def create_import(c: Call) -> Any:
    """A ``text/csv`` body with the options as query parameters, or a
    ``multipart/form-data`` upload: the file in ``file``, the options as form fields or
    a JSON ``options`` part. Answers at once with the import's id; read its progress at
    ``GET /v1/imports/{id}``."""
    q: ImportQuery = c.query
    given = {k: v for k, v in q.model_dump(exclude_unset=True).items()}
    ctype, params = parse_options_header(c.request.headers.get("content-type", ""))
    media = ctype.decode("latin-1").lower()
    if media == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise invalid("body", "multipart/form-data without a boundary")
        iid = await _receive_multipart(c, boundary, given)
    elif media in CSV_TYPES:
        charset = params.get(b"charset", b"").decode("latin-1").lower()
        if "encoding" not in given and charset in LATIN_1:
            given["encoding"] = "latin-1"
        options = options_from(given)
        await check_refs(c, options)
        iid = await _receive_csv(c, options)
    else:
        raise ApiError(
            415, "unsupported_media_type", "send text/csv, or multipart/form-data with a file"
        )
    c.ctx.imports.wake()
    return ImportCreated(id=iid)


def _mine(c: Call) -> Any:
    return select(Import).where(Import.tenant_id == c.tenant_id, Import.state != RECEIVING)


async def _import(s: Any, c: Call) -> Import:
    row: Import = await one_or_404(s, _mine(c).where(Import.id == c.path["import_id"]), "import")
    return row


def _summary(x: Import) -> dict[str, Any]:
    return {
        "id": x.id,
        "state": x.state,
        "data_source_id": x.data_source_id,
        "rows_total": x.rows_total,
        "rows_done": x.rows_done,
        "rows_imported": x.rows_imported,
        "rows_rejected": x.rows_rejected,
        "error": x.error,
        "created_at": x.created_at.isoformat(),
        "finished_at": x.finished_at.isoformat() if x.finished_at else None,
    }


@api.op(
    "GET",
    "/v1/imports",
    summary="List imports (newest last)",
    scope="read",
    query=ImportListQuery,
    response=ImportList,
)
async def list_imports(c: Call) -> Any:
    q: ImportListQuery = c.query
    stmt = _mine(c)
    if q.data_source_id is not None:
        stmt = stmt.where(Import.data_source_id == q.data_source_id)
    async with c.ctx.sessions() as s:
        rows = await page(s, stmt, Import, q.cursor, q.limit)
    return ImportList(
        data=[ImportSummary(**_summary(x)) for x in rows], next_cursor=page_of(rows, q.limit)
    )


@api.op(
    "GET",
    "/v1/imports/{import_id:int}",
    summary="Show an import's progress and its first rejected rows",
    scope="read",
    response=ImportOut,
    errors=(404,),
)
async def get_import(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        x = await _import(s, c)
        rejects = (
            await s.execute(
                select(ImportReject.row, ImportReject.column_name, ImportReject.reason)
                .where(ImportReject.import_id == x.id)
                .order_by(ImportReject.row)
                .limit(MAX_ERRORS)
            )
        ).all()
    return ImportOut(
        **_summary(x),
        options=x.options,
        size=x.size,
        contacts_created=x.contacts_created,
        contacts_updated=x.contacts_updated,
        errors=[RowError(row=r, column=col, reason=why) for r, col, why in rejects],
        started_at=x.started_at.isoformat() if x.started_at else None,
    )


@api.op(
    "POST",
    "/v1/imports/{import_id:int}/cancel",
    summary="Cancel an import (what is committed stays)",
    scope="manage",
    response=ImportSummary,
    errors=(404, 409),
    sync=False,
)
async def cancel_import(c: Call) -> Any:
    """A queued import does not start; a running one stops after its current batch.
    The contacts of the batches committed before stay imported (the counts say how
    many)."""
    async with c.ctx.sessions() as s:
        x = await _import(s, c)
    if not await cancel(c.ctx.sessions, c.tenant_id, x.id):
        raise ApiError(409, "conflict", f"the import is {x.state}; only a queued or running one")
    async with c.ctx.sessions() as s:
        return ImportSummary(**_summary(await _import(s, c)))


@api.op(
    "GET",
    "/v1/imports/{import_id:int}/rejects.csv",
    summary="Every rejected row of an import, with its reason, as CSV",
    scope="read",
    response_media="text/csv",
    errors=(404,),
)
async def import_rejects(c: Call) -> Any:
    """Columns ``row``, ``column``, ``reason``, then the file's own columns with the
    row's cells as the file had them (formula-like cells escaped as the suppression export does)."""
    async with c.ctx.sessions() as s:
        x = await _import(s, c)
    sessions = c.ctx.sessions

    async def body() -> AsyncIterator[str]:
        out = io.StringIO()
        w = SafeWriter(out)
        w.writerow(["row", "column", "reason", *(x.header or [])])
        after = 0
        while True:
            async with sessions() as s:
                rows = (
                    await s.execute(
                        select(ImportReject)
                        .where(ImportReject.import_id == x.id, ImportReject.row > after)
                        .order_by(ImportReject.row)
                        .limit(1000)
                    )
                ).scalars()
                got = list(rows)
            for r in got:
                w.writerow([r.row, r.column_name, r.reason, *(r.cells or [])])
            yield out.getvalue()
            out.seek(0)
            out.truncate()
            if len(got) < 1000:
                return
            after = got[-1].row

    return StreamingResponse(body(), media_type="text/csv; charset=utf-8")
