"""The /v1 API's shared part: the registry every resource module declares its
operations on (``api``), the change feed's note, paging and the lookup that answers 404.

One module per resource declares its operations: tenants.py, pools.py, keys.py,
domains_api.py, suppressions.py, contacts.py, lists.py, topics.py, message_list.py,
messages.py, shaping_api.py, imports.py and data_sources.py.
app.py imports each of them, in the order the route table, /openapi.json and /docs
list them, before it builds the routes."""

from __future__ import annotations

from typing import Any

from postwarden.control.errors import not_found
from postwarden.control.routing import Api
from postwarden.control.schemas import decode_cursor, encode_cursor
from postwarden.store.feed import record_change

api = Api("Postwarden", "1")


async def changed(session: Any, kind: str, tenant_id: int | None, ref: str = "") -> None:
    await record_change(session, kind, tenant_id, ref)


def page_of(rows: list[Any], limit: int) -> str | None:
    return encode_cursor(rows[-1].id) if len(rows) == limit else None


async def page(s: Any, stmt: Any, model: Any, cursor: str | None, limit: int) -> list[Any]:
    """One page of ``stmt`` (already filtered by tenant) in id order, after ``cursor``."""
    stmt = stmt.where(model.id > decode_cursor(cursor)).order_by(model.id).limit(limit)
    return list((await s.execute(stmt)).scalars())


async def one_or_404(s: Any, stmt: Any, what: str) -> Any:
    row = (await s.execute(stmt)).scalar_one_or_none()
    if row is None:
        raise not_found(what)
    return row
