"""/v1/pools: pools of sources, the configuration's (read-only here) and those made
through the API."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from postwarden.config import PoolConfig
from postwarden.control.api import api, changed, one_or_404
from postwarden.control.errors import ApiError, invalid, not_found
from postwarden.control.routing import Call
from postwarden.control.schemas import (
    POOL_NAME,
    Deleted,
    PoolCreate,
    PoolList,
    PoolMemberIn,
    PoolMemberOut,
    PoolOut,
    PoolUpdate,
)
from postwarden.store.models import Pool, Tenant, utcnow


def config_pool_out(p: PoolConfig) -> PoolOut:
    return PoolOut(
        name=p.name,
        origin="config",
        members=[PoolMemberOut(source=m.source, weight=m.weight) for m in p.members],
        overflow=p.overflow,
    )


def pool_out(row: Pool) -> PoolOut:
    return PoolOut(
        name=row.name,
        origin="api",
        members=[PoolMemberOut.model_validate(m) for m in row.members],
        overflow="spill" if row.overflow == "spill" else "wait",
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def check_members(c: Call, members: list[PoolMemberIn]) -> list[dict[str, Any]]:
    """Every member a source of the configuration, each once (422 naming it)."""
    seen: set[str] = set()
    for i, m in enumerate(members):
        if m.source not in c.ctx.pool_cache.sources:
            raise invalid(f"members[{i}].source", f"no source named {m.source!r}")
        if m.source in seen:
            raise invalid(f"members[{i}].source", f"source {m.source!r} is listed twice")
        seen.add(m.source)
    return [{"source": m.source, "weight": m.weight} for m in members]


def refuse_config_pool(c: Call, name: str) -> None:
    if name in c.ctx.pool_cache.config_pools:
        raise ApiError(
            409,
            "conflict",
            f"pool {name!r} is defined in the configuration file: change it there"
            " (pools made through the API take other names)",
        )


async def _pool(s: Any, name: str) -> Pool:
    if not re.match(POOL_NAME, name):
        raise not_found("pool")
    row: Pool = await one_or_404(s, select(Pool).where(Pool.name == name), "pool")
    return row


async def pool_users(s: Any, name: str) -> list[str]:
    """The tenants (by name, in id order) that have the pool as their default or
    among their allowed pools."""
    tenants = (
        await s.execute(
            select(Tenant.name, Tenant.default_pool, Tenant.allowed_pools).order_by(Tenant.id)
        )
    ).all()
    return [t for t, default, allowed in tenants if default == name or name in (allowed or ())]


@api.op(
    "POST",
    "/v1/pools",
    summary="Create a pool of sources",
    scope="admin",
    body=PoolCreate,
    response=PoolOut,
    status=201,
    errors=(409,),
)
async def create_pool(c: Call) -> Any:
    """Members are sources of the configuration (``[[sources]]``) with weights; a pool
    cannot take the name of one in the configuration (``default`` included)."""
    body: PoolCreate = c.body
    refuse_config_pool(c, body.name)
    members = check_members(c, body.members)
    async with c.ctx.sessions() as s:
        row = Pool(name=body.name, members=members, overflow=body.overflow)
        s.add(row)
        try:
            await s.flush()
        except IntegrityError:
            raise ApiError(409, "conflict", f"a pool named {body.name!r} exists") from None
        await changed(s, "pool", None, body.name)
        await s.commit()
    await c.ctx.pool_cache.reload()
    return pool_out(row)


@api.op(
    "GET",
    "/v1/pools",
    summary="List pools (the configuration's and those made here)",
    scope="admin",
    response=PoolList,
)
async def list_pools(c: Call) -> Any:
    config = c.ctx.pool_cache.config_pools
    async with c.ctx.sessions() as s:
        rows = list((await s.execute(select(Pool).order_by(Pool.name))).scalars())
    out = [config_pool_out(p) for p in config.values()]
    out += [pool_out(r) for r in rows if r.name not in config]
    return PoolList(data=out, next_cursor=None)


@api.op(
    "GET",
    "/v1/pools/{name}",
    summary="Show a pool",
    scope="admin",
    response=PoolOut,
    errors=(404,),
)
async def get_pool(c: Call) -> Any:
    name = c.path["name"]
    if name in c.ctx.pool_cache.config_pools:
        return config_pool_out(c.ctx.pool_cache.config_pools[name])
    async with c.ctx.sessions() as s:
        return pool_out(await _pool(s, name))


@api.op(
    "PATCH",
    "/v1/pools/{name}",
    summary="Change a pool's members or overflow",
    scope="admin",
    body=PoolUpdate,
    response=PoolOut,
    errors=(404, 409),
)
async def update_pool(c: Call) -> Any:
    """Pools of the configuration are read-only here (409)."""
    body: PoolUpdate = c.body
    name = c.path["name"]
    refuse_config_pool(c, name)
    members = check_members(c, body.members) if body.members is not None else None
    async with c.ctx.sessions() as s:
        row = await _pool(s, name)
        if members is not None:
            row.members = members
        if body.overflow is not None:
            row.overflow = body.overflow
        row.updated_at = utcnow()
        await changed(s, "pool", None, name)
        await s.commit()
    await c.ctx.pool_cache.reload()
    return pool_out(row)


@api.op(
    "DELETE",
    "/v1/pools/{name}",
    summary="Remove a pool",
    scope="admin",
    response=Deleted,
    errors=(404, 409),
)
async def delete_pool(c: Call) -> Any:
    """Refused (409) while a tenant has it as its default or allowed pool, and for
    pools of the configuration."""
    name = c.path["name"]
    refuse_config_pool(c, name)
    async with c.ctx.sessions() as s:
        row = await _pool(s, name)
        users = await pool_users(s, name)
        if users:
            shown = ", ".join(users[:10]) + (
                f" and {len(users) - 10} more" if len(users) > 10 else ""
            )
            raise ApiError(
                409,
                "conflict",
                f"pool {name!r} is the default or an allowed pool of tenant(s) {shown}:"
                " take it from them first",
            )
        await s.delete(row)
        await changed(s, "pool", None, name)
        await s.commit()
    await c.ctx.pool_cache.reload()
    return Deleted(deleted=True)
