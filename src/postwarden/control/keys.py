"""API keys: a tenant's keys (by the operator under /v1/tenants/{id}/keys, by the
tenant itself under /v1/keys) and the operator keys (/v1/operator-keys)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from postwarden.control.api import api, changed, one_or_404, page, page_of
from postwarden.control.errors import ApiError, not_found
from postwarden.control.routing import Call
from postwarden.control.schemas import (
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    OperatorKeyCreate,
    OperatorKeyCreated,
    OperatorKeyList,
    OperatorKeyOut,
    Page,
)
from postwarden.control.tenants import tenant_or_404
from postwarden.store import keys
from postwarden.store.keys import revoke
from postwarden.store.models import ApiKey
from postwarden.store.secrets import new_api_key


def key_out(k: ApiKey, cls: type[KeyOut] = KeyOut, **extra: Any) -> Any:
    return cls(
        id=k.id,
        prefix=k.prefix,
        name=k.name,
        scopes=k.scopes.split(),
        tenant_id=k.tenant_id,
        created_at=k.created_at,
        revoked_at=k.revoked_at,
        last_used_at=k.last_used_at,
        **extra,
    )


async def _new_key(
    s: Any, tenant_id: int | None, name: str, scopes: list[str]
) -> tuple[ApiKey, str]:
    """A new key in ``s``'s transaction, and its secret (for the answer only)."""
    new = new_api_key()
    k = ApiKey(
        tenant_id=tenant_id,
        prefix=new.prefix,
        secret_hash=new.secret_hash,
        name=name,
        scopes=" ".join(dict.fromkeys(scopes)),
    )
    s.add(k)
    await s.flush()
    await changed(s, "api_key", tenant_id, new.prefix)
    return k, new.plaintext


@api.op(
    "POST",
    "/v1/tenants/{tenant_id:int}/keys",
    summary="Create a key for a tenant",
    scope="admin",
    body=KeyCreate,
    response=KeyCreated,
    status=201,
    errors=(404,),
)
async def create_tenant_key(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        t = await tenant_or_404(s, c.path["tenant_id"])
        k, secret = await _new_key(s, t.id, c.body.name, c.body.scopes)
        await s.commit()
    return key_out(k, KeyCreated, key=secret)


@api.op(
    "GET",
    "/v1/tenants/{tenant_id:int}/keys",
    summary="List a tenant's keys",
    scope="admin",
    query=Page,
    response=KeyList,
    errors=(404,),
)
async def list_tenant_keys(c: Call) -> Any:
    """Revoked keys too (with ``revoked_at``); never a secret."""
    async with c.ctx.sessions() as s:
        t = await tenant_or_404(s, c.path["tenant_id"])
        stmt = select(ApiKey).where(ApiKey.tenant_id == t.id)
        rows = await page(s, stmt, ApiKey, c.query.cursor, c.query.limit)
    return KeyList(data=[key_out(k) for k in rows], next_cursor=page_of(rows, c.query.limit))


@api.op(
    "DELETE",
    "/v1/tenants/{tenant_id:int}/keys/{key_id:int}",
    summary="Revoke a tenant's key",
    scope="admin",
    response=KeyOut,
    errors=(404,),
)
async def revoke_tenant_key(c: Call) -> Any:
    """As the tenant's own ``DELETE /v1/keys/{key_id}``: 401 for the key from the
    answer on, in every process within ``control.cache_poll``."""
    async with c.ctx.sessions() as s:
        t = await tenant_or_404(s, c.path["tenant_id"])
        stmt = select(ApiKey).where(ApiKey.id == c.path["key_id"], ApiKey.tenant_id == t.id)
        k = await one_or_404(s, stmt, "key")
        await revoke(s, k)
        await s.commit()
    c.ctx.auth.invalidate()
    return key_out(k)


# ---------------------------------------------------------------- operator keys


def operator_key_out(
    c: Call, k: ApiKey, cls: type[OperatorKeyOut] = OperatorKeyOut, **extra: Any
) -> Any:
    current = c.principal is not None and c.principal.key_id == k.id
    return key_out(k, cls, current=current, **extra)


@api.op(
    "GET",
    "/v1/operator-keys",
    summary="List operator keys",
    scope="admin",
    query=Page,
    response=OperatorKeyList,
)
async def list_operator_keys(c: Call) -> Any:
    """Revoked keys too (with ``revoked_at``); never a secret. ``current`` marks the
    key the request was made with."""
    stmt = select(ApiKey).where(ApiKey.tenant_id.is_(None))
    async with c.ctx.sessions() as s:
        rows = await page(s, stmt, ApiKey, c.query.cursor, c.query.limit)
    return OperatorKeyList(
        data=[operator_key_out(c, k) for k in rows], next_cursor=page_of(rows, c.query.limit)
    )


@api.op(
    "POST",
    "/v1/operator-keys",
    summary="Create an operator key",
    scope="admin",
    body=OperatorKeyCreate,
    response=OperatorKeyCreated,
    status=201,
)
async def create_operator_key(c: Call) -> Any:
    """Scope ``admin``; the secret is in this answer only (as ``postwarden admin
    create-key`` prints it)."""
    async with c.ctx.sessions() as s:
        k, secret = await _new_key(s, None, c.body.name, ["admin"])
        await s.commit()
    return operator_key_out(c, k, OperatorKeyCreated, key=secret)


@api.op(
    "DELETE",
    "/v1/operator-keys/{key_id:int}",
    summary="Revoke an operator key",
    scope="admin",
    response=OperatorKeyOut,
    errors=(404, 409),
)
async def revoke_operator_key(c: Call) -> Any:
    """``401`` for the key from the answer on (in every process within
    ``control.cache_poll``), the key this request is made with included. The last
    operator key not revoked is refused with ``409``: make its successor first."""
    async with c.ctx.sessions() as s:
        try:
            k = await keys.revoke_operator_key(s, c.path["key_id"])
        except keys.LastOperatorKey as exc:
            raise ApiError(409, "last_operator_key", str(exc)) from None
        if k is None:
            raise not_found("operator key")
        await s.commit()
    c.ctx.auth.invalidate()
    return operator_key_out(c, k)


# ---------------------------------------------------------------- a tenant's keys


@api.op(
    "GET",
    "/v1/keys",
    summary="List this tenant's keys",
    scope="manage",
    query=Page,
    response=KeyList,
)
async def list_keys(c: Call) -> Any:
    stmt = select(ApiKey).where(ApiKey.tenant_id == c.tenant_id)
    async with c.ctx.sessions() as s:
        rows = await page(s, stmt, ApiKey, c.query.cursor, c.query.limit)
    return KeyList(data=[key_out(k) for k in rows], next_cursor=page_of(rows, c.query.limit))


@api.op(
    "POST",
    "/v1/keys",
    summary="Create a key",
    scope="manage",
    body=KeyCreate,
    response=KeyCreated,
    status=201,
    errors=(403,),
)
async def create_key(c: Call) -> Any:
    """A key that approves campaigns is made only by a key that has ``approve`` (or by
    an operator): otherwise whoever changes a campaign could make a second key and
    approve it himself."""
    if "approve" in c.body.scopes and (c.principal is None or not c.principal.has("approve")):
        raise ApiError(
            403,
            "forbidden",
            "only a key with the approve scope, or an operator, makes a key with it",
        )
    async with c.ctx.sessions() as s:
        k, secret = await _new_key(s, c.tenant_id, c.body.name, c.body.scopes)
        await s.commit()
    return key_out(k, KeyCreated, key=secret)


@api.op(
    "DELETE",
    "/v1/keys/{key_id:int}",
    summary="Revoke a key",
    scope="manage",
    response=KeyOut,
    errors=(404,),
)
async def revoke_key(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        stmt = select(ApiKey).where(ApiKey.id == c.path["key_id"], ApiKey.tenant_id == c.tenant_id)
        k = await one_or_404(s, stmt, "key")
        await revoke(s, k)
        await s.commit()
    c.ctx.auth.invalidate()
    return key_out(k)
