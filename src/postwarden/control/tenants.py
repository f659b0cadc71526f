"""/v1/tenants: an operator's tenants, with their settings and pools."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from postwarden.control.api import api, changed, page, page_of
from postwarden.control.errors import ApiError, invalid, not_found
from postwarden.control.routing import Call
from postwarden.control.schemas import Page, TenantCreate, TenantList, TenantOut, TenantUpdate
from postwarden.store.models import Pool, Tenant


def tenant_out(t: Tenant) -> TenantOut:
    return TenantOut.model_validate(t)


async def check_tenant_pools(
    s: Any, c: Call, default_pool: str | None, allowed_pools: list[str] | None
) -> None:
    """Each pool a tenant is given must exist (422 naming the field)."""
    if default_pool is None and not allowed_pools:
        return
    names = set(c.ctx.pool_cache.config_pools) | set((await s.execute(select(Pool.name))).scalars())
    if default_pool is not None and default_pool not in names:
        raise invalid("default_pool", f"no pool named {default_pool!r}")
    for i, name in enumerate(allowed_pools or ()):
        if name not in names:
            raise invalid(f"allowed_pools[{i}]", f"no pool named {name!r}")


@api.op(
    "POST",
    "/v1/tenants",
    summary="Create a tenant",
    scope="admin",
    body=TenantCreate,
    response=TenantOut,
    status=201,
    errors=(409,),
)
async def create_tenant(c: Call) -> Any:
    body: TenantCreate = c.body
    async with c.ctx.sessions() as s:
        await check_tenant_pools(s, c, body.default_pool, body.allowed_pools)
        t = Tenant(
            name=body.name,
            settings=body.settings.model_dump(),
            default_pool=body.default_pool,
            allowed_pools=list(dict.fromkeys(body.allowed_pools)),
        )
        s.add(t)
        try:
            await s.flush()
        except IntegrityError:
            raise ApiError(409, "conflict", f"a tenant named {body.name!r} exists") from None
        await changed(s, "tenant", t.id)
        await s.commit()
    if t.default_pool or t.allowed_pools:
        await c.ctx.pool_cache.reload()
    return tenant_out(t)


@api.op(
    "GET", "/v1/tenants", summary="List tenants", scope="admin", query=Page, response=TenantList
)
async def list_tenants(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        rows = await page(s, select(Tenant), Tenant, c.query.cursor, c.query.limit)
    return TenantList(data=[tenant_out(t) for t in rows], next_cursor=page_of(rows, c.query.limit))


async def tenant_or_404(s: Any, tenant_id: int) -> Tenant:
    t = await s.get(Tenant, tenant_id)
    if t is None:
        raise not_found("tenant")
    return t


@api.op(
    "GET",
    "/v1/tenants/{tenant_id:int}",
    summary="Show a tenant",
    scope="admin",
    response=TenantOut,
    errors=(404,),
)
async def get_tenant(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        return tenant_out(await tenant_or_404(s, c.path["tenant_id"]))


@api.op(
    "PATCH",
    "/v1/tenants/{tenant_id:int}",
    summary="Disable, enable or configure a tenant",
    scope="admin",
    body=TenantUpdate,
    response=TenantOut,
    errors=(404,),
)
async def update_tenant(c: Call) -> Any:
    body: TenantUpdate = c.body
    pools_given = "default_pool" in body.model_fields_set or body.allowed_pools is not None
    async with c.ctx.sessions() as s:
        t = await tenant_or_404(s, c.path["tenant_id"])
        await check_tenant_pools(s, c, body.default_pool, body.allowed_pools)
        if body.disabled is not None:
            t.disabled = body.disabled
        if body.settings is not None:
            t.settings = body.settings.model_dump()
        if "default_pool" in body.model_fields_set:
            t.default_pool = body.default_pool
        if body.allowed_pools is not None:
            t.allowed_pools = list(dict.fromkeys(body.allowed_pools))
        await changed(s, "tenant", t.id)
        await s.commit()
    c.ctx.auth.invalidate()
    if pools_given:
        await c.ctx.pool_cache.reload()
    return tenant_out(t)
