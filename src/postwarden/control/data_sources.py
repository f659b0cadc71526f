"""/v1/data-sources: a CSV or JSON URL pulled on a schedule into contacts (issue 20).

Each pull is an import of its own (``GET /v1/imports?data_source_id=…``), with the
source's mapping and options. A pull never connects inward: the URL's host must
resolve only to globally routable addresses, or to networks
``delivery.allowed_private_networks`` names (the rule delivery follows,
``mta.destinations``; the lab and the tests name 127.0.0.0/8), and the connection goes
to the address that was checked. Redirects are followed only on the same host (each
hop checked again); the body is capped at :data:`MAX_SOURCE_BYTES`; connect, read and
the whole pull have time limits.

JSON: an array of objects, or ``{"data": [...]}``; each object's keys are the columns
(the first object's order, then new keys as they appear), a list of strings is
written as ``a|b``, numbers and booleans as text, ``null`` as an empty cell.
"""

import asyncio
import csv
import datetime as dt
import io
import json
import logging
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field, ValidationError, field_validator
from sqlalchemy import select, update

from postwarden.control.api import api, one_or_404, page, page_of
from postwarden.control.errors import from_validation
from postwarden.control.imports import (
    Delimiter,
    Encoding,
    ImportOptions,
    OnConflict,
    check_refs,
)
from postwarden.control.routing import Call
from postwarden.control.safe_http import UnsafeUrl, checked
from postwarden.control.schemas import Deleted, Page, Strict
from postwarden.mta.destinations import parse_networks
from postwarden.store.import_models import DataSource
from postwarden.store.imports import BodyWriter, failed_import
from postwarden.store.models import utcnow

log = logging.getLogger("postwarden.control.imports")

#: Largest body a pull takes.
MAX_SOURCE_BYTES = 32 * 1024 * 1024
#: Shortest interval between pulls, longest (30 days), in seconds.
MIN_INTERVAL = 60
MAX_INTERVAL = 30 * 86400
MAX_REDIRECTS = 5
#: Seconds to connect, between bytes, and for a whole pull.
TIMEOUT = httpx.Timeout(10.0, connect=5.0)
PULL_DEADLINE = 120.0


class PullError(Exception):
    """Why a pull failed (the message is the failed import's error)."""


def _url(value: str) -> str:
    try:
        u = httpx.URL(value)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise ValueError("an http:// or https:// URL with a host")
    return str(u)


class DataSourceFields(ImportOptions):
    name: str = Field("", max_length=200)
    format: Literal["csv", "json"] = "csv"
    interval: int = Field(3600, ge=MIN_INTERVAL, le=MAX_INTERVAL, description="seconds")
    enabled: bool = True


class DataSourceCreate(DataSourceFields):
    url: str = Field(max_length=2000)

    _url = field_validator("url")(_url)


class DataSourceUpdate(Strict):
    name: str | None = Field(None, max_length=200)
    url: str | None = Field(None, max_length=2000)
    format: Literal["csv", "json"] | None = None
    interval: int | None = Field(None, ge=MIN_INTERVAL, le=MAX_INTERVAL)
    enabled: bool | None = None
    mapping: dict[str, str] | None = None
    dry_run: bool | None = None
    on_conflict: OnConflict | None = None
    encoding: Encoding | None = None
    delimiter: Delimiter | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        return None if v is None else _url(v)


class DataSourceOut(BaseModel):
    id: int
    name: str
    url: str
    format: str
    options: dict[str, Any]
    interval: int
    enabled: bool
    next_run_at: str
    last_import_id: int | None
    created_at: str


class DataSourceList(BaseModel):
    data: list[DataSourceOut]
    next_cursor: str | None


class RunStarted(BaseModel):
    id: int
    next_run_at: str


OPTION_KEYS = ("mapping", "dry_run", "on_conflict", "encoding", "delimiter")


def _out(x: DataSource) -> DataSourceOut:
    return DataSourceOut(
        id=x.id,
        name=x.name,
        url=x.url,
        format=x.format,
        options=x.options,
        interval=x.interval,
        enabled=x.enabled,
        next_run_at=x.next_run_at.isoformat(),
        last_import_id=x.last_import_id,
        created_at=x.created_at.isoformat(),
    )


@api.op(
    "POST",
    "/v1/data-sources",
    summary="Pull contacts from a URL on a schedule",
    scope="manage",
    body=DataSourceCreate,
    response=DataSourceOut,
    status=201,
    sync=False,
)
async def create_data_source(c: Call) -> Any:
    """The first pull starts at once; then one every ``interval`` seconds."""
    b: DataSourceCreate = c.body
    options = b.model_dump(include=set(OPTION_KEYS))
    await check_refs(c, options)
    async with c.ctx.sessions() as s:
        x = DataSource(
            tenant_id=c.tenant_id,
            name=b.name,
            url=b.url,
            format=b.format,
            options=options,
            interval=b.interval,
            enabled=b.enabled,
            next_run_at=utcnow(),
        )
        s.add(x)
        await s.commit()
        out = _out(x)
    c.ctx.imports.wake()
    return out


def _mine(c: Call) -> Any:
    return select(DataSource).where(DataSource.tenant_id == c.tenant_id)


async def _source(s: Any, c: Call) -> DataSource:
    stmt = _mine(c).where(DataSource.id == c.path["source_id"])
    row: DataSource = await one_or_404(s, stmt, "data source")
    return row


@api.op(
    "GET",
    "/v1/data-sources",
    summary="List data sources",
    scope="read",
    query=Page,
    response=DataSourceList,
)
async def list_data_sources(c: Call) -> Any:
    q: Page = c.query
    async with c.ctx.sessions() as s:
        rows = await page(s, _mine(c), DataSource, q.cursor, q.limit)
    return DataSourceList(data=[_out(x) for x in rows], next_cursor=page_of(rows, q.limit))


@api.op(
    "GET",
    "/v1/data-sources/{source_id:int}",
    summary="Show a data source",
    scope="read",
    response=DataSourceOut,
    errors=(404,),
)
async def get_data_source(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        return _out(await _source(s, c))


@api.op(
    "PATCH",
    "/v1/data-sources/{source_id:int}",
    summary="Change a data source",
    scope="manage",
    body=DataSourceUpdate,
    response=DataSourceOut,
    errors=(404,),
    sync=False,
)
async def update_data_source(c: Call) -> Any:
    """Fields given are changed; the options (mapping and the rest) are checked as a
    whole once changed. A new interval counts from now."""
    b: DataSourceUpdate = c.body
    given = b.model_dump(exclude_unset=True)
    async with c.ctx.sessions() as s:
        x = await _source(s, c)
        opts = {**x.options, **{k: v for k, v in given.items() if k in OPTION_KEYS}}
        try:
            options = ImportOptions.model_validate(opts).model_dump()
        except ValidationError as exc:
            raise from_validation(exc) from None
        await check_refs(c, options)
        x.options = options
        for k in ("name", "url", "format", "enabled"):
            if given.get(k) is not None:
                setattr(x, k, given[k])
        if given.get("interval") is not None:
            x.interval = given["interval"]
            x.next_run_at = utcnow() + dt.timedelta(seconds=x.interval)
        await s.commit()
        return _out(x)


@api.op(
    "DELETE",
    "/v1/data-sources/{source_id:int}",
    summary="Delete a data source (its imports stay)",
    scope="manage",
    response=Deleted,
    errors=(404,),
    sync=False,
)
async def delete_data_source(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        await s.delete(await _source(s, c))
        await s.commit()
    return Deleted(deleted=True)


@api.op(
    "POST",
    "/v1/data-sources/{source_id:int}/run",
    summary="Pull a data source now",
    scope="manage",
    response=RunStarted,
    status=202,
    errors=(404,),
    sync=False,
)
async def run_data_source(c: Call) -> Any:
    """The pull starts within a moment; its import is listed at
    ``GET /v1/imports?data_source_id=…``."""
    async with c.ctx.sessions() as s:
        x = await _source(s, c)
        x.next_run_at = utcnow()
        await s.commit()
        out = RunStarted(id=x.id, next_run_at=x.next_run_at.isoformat())
    c.ctx.imports.wake()
    return out


# ---------------------------------------------------------------------- pulling


async def fetch(url: str, resolver: Any, allowed: Any) -> bytes:
    """The body at ``url`` (GET), under the rules of this module; PullError says why
    not."""
    first = httpx.URL(url)
    for _hop in range(MAX_REDIRECTS + 1):
        u = httpx.URL(url)
        try:
            target = await checked(u, resolver, allowed)
        except UnsafeUrl as exc:
            raise PullError(str(exc)) from None
        async with (
            httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False, trust_env=False) as client,
            client.stream(
                "GET", target.url, headers=target.headers, extensions=target.extensions
            ) as resp,
        ):
            if resp.is_redirect:
                nxt = u.join(resp.headers.get("location", ""))
                if nxt.host != first.host:
                    raise PullError(f"{url}: redirected to another host ({nxt.host}); not followed")
                url = str(nxt)
                continue
            if resp.status_code != 200:
                raise PullError(f"{url}: HTTP {resp.status_code}")
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_SOURCE_BYTES:
                raise PullError(f"{url}: larger than {MAX_SOURCE_BYTES} bytes")
            data = bytearray()
            async for piece in resp.aiter_bytes():
                data += piece
                if len(data) > MAX_SOURCE_BYTES:
                    raise PullError(f"{url}: larger than {MAX_SOURCE_BYTES} bytes")
            return bytes(data)
    raise PullError(f"{url}: more than {MAX_REDIRECTS} redirects")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "|".join(value)
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False)


def json_to_csv(raw: bytes) -> bytes:
    """A JSON array of objects (or ``{"data": [...]}``) as CSV text (UTF-8)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise PullError(f"the body is not JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise PullError('JSON: expected an array of objects, or {"data": [...]}')
    columns: dict[str, None] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise PullError(f"JSON: item {i} is not an object")
        columns.update(dict.fromkeys(item))
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(list(columns))
    for item in data:
        w.writerow([_cell(item.get(k)) for k in columns])
    return out.getvalue().encode("utf-8")


async def pull(plane: Any, source: DataSource) -> int:
    """One pull of ``source`` into an import (a failed one when the pull failed)."""
    options = dict(source.options)
    try:
        async with asyncio.timeout(PULL_DEADLINE):
            allowed = parse_networks(plane.cfg.delivery.allowed_private_networks)
            body = await fetch(source.url, plane.resolver, allowed)
        if source.format == "json":
            body = json_to_csv(body)
            options["encoding"] = "utf-8"
            options["delimiter"] = ","
        if not body:
            raise PullError("the body is empty")
    except (PullError, TimeoutError, httpx.HTTPError) as exc:
        why = str(exc) or f"no answer within {PULL_DEADLINE:.0f} s"
        if isinstance(exc, httpx.HTTPError):
            why = f"{source.url}: {type(exc).__name__}: {exc}"
        log.warning("event=data_source_failed source=%d error=%r", source.id, why)
        return await failed_import(plane.sessions, source.tenant_id, options, why, source.id)
    writer = await BodyWriter.create(plane.sessions, source.tenant_id, options, source.id)
    try:
        await writer.write(body)
        return await writer.finish()
    except BaseException:
        await writer.abort()
        raise


async def pull_due(plane: Any) -> int:
    """Pull every data source that is due (each claimed by moving its next run
    forward, so that one runner pulls it): how many were pulled."""
    now = utcnow()
    async with plane.sessions() as s:
        due = list(
            (
                await s.execute(
                    select(DataSource)
                    .where(DataSource.enabled.is_(True), DataSource.next_run_at <= now)
                    .order_by(DataSource.next_run_at)
                    .limit(20)
                )
            ).scalars()
        )
    pulled = 0
    for source in due:
        async with plane.sessions() as s:
            result = await s.execute(
                update(DataSource)
                .where(DataSource.id == source.id, DataSource.next_run_at == source.next_run_at)
                .values(next_run_at=now + dt.timedelta(seconds=source.interval))
            )
            await s.commit()
        if getattr(result, "rowcount", 0) != 1:
            continue  # another runner has it
        iid = await pull(plane, source)
        async with plane.sessions() as s:
            await s.execute(
                update(DataSource).where(DataSource.id == source.id).values(last_import_id=iid)
            )
            await s.commit()
        pulled += 1
    return pulled
