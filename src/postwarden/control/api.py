"""The /v1 API: tenants and keys (operator keys too), sending domains, suppressions
(messages: messages.py and message_list.py)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from typing import Any, get_args

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from starlette.responses import Response

from postwarden.config import PoolConfig
from postwarden.control import domains as dom
from postwarden.control.csvfile import SafeWriter, unescape_cell
from postwarden.control.errors import ApiError, invalid, not_found
from postwarden.control.routing import Api, Call
from postwarden.control.schemas import (
    POOL_NAME,
    Deleted,
    DkimKeyOut,
    DomainCreate,
    DomainList,
    DomainOut,
    ImportResult,
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    OperatorKeyCreate,
    OperatorKeyCreated,
    OperatorKeyList,
    OperatorKeyOut,
    Page,
    PoolCreate,
    PoolList,
    PoolMemberIn,
    PoolMemberOut,
    PoolOut,
    PoolUpdate,
    Reason,
    RecordOut,
    SuppressionCreate,
    SuppressionList,
    SuppressionOut,
    SuppressionQuery,
    TenantCreate,
    TenantList,
    TenantOut,
    TenantUpdate,
    decode_cursor,
    encode_cursor,
    parse_timestamp,
)
from postwarden.dns.records import all_required_ok, verify
from postwarden.mail.addresses import AddressError, normalize_address, suppression_key
from postwarden.store import keys
from postwarden.store.feed import record_change
from postwarden.store.keys import revoke
from postwarden.store.models import ApiKey, DkimKey, Domain, Pool, Suppression, Tenant, utcnow
from postwarden.store.secrets import new_api_key
from postwarden.store.suppress import upsert_suppression

api = Api("Postwarden", "1")

#: Every reason a suppression can have, the appliance's own (hard_bounce, soft_bounce,
#: complaint) included: what the export writes, the import takes back.
REASONS: tuple[str, ...] = get_args(Reason)


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


# ---------------------------------------------------------------- tenants (operator)


def tenant_out(t: Tenant) -> TenantOut:
    return TenantOut.model_validate(t)


async def check_tenant_pools(
    s: Any, c: Call, default_pool: str | None, allowed_pools: list[str] | None
) -> None:
    """Each pool a tenant is given must exist (422 naming the field)."""
    if default_pool is None and not allowed_pools:
        return
    names = set(c.ctx.config_pools) | set((await s.execute(select(Pool.name))).scalars())
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
        await c.ctx.reload_pools()
    return tenant_out(t)


@api.op(
    "GET", "/v1/tenants", summary="List tenants", scope="admin", query=Page, response=TenantList
)
async def list_tenants(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        rows = await page(s, select(Tenant), Tenant, c.query.cursor, c.query.limit)
    return TenantList(data=[tenant_out(t) for t in rows], next_cursor=page_of(rows, c.query.limit))


async def _tenant(s: Any, tenant_id: int) -> Tenant:
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
        return tenant_out(await _tenant(s, c.path["tenant_id"]))


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
        t = await _tenant(s, c.path["tenant_id"])
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
        await c.ctx.reload_pools()
    return tenant_out(t)


# ---------------------------------------------------------------- pools (operator)


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
        if m.source not in c.ctx.sources:
            raise invalid(f"members[{i}].source", f"no source named {m.source!r}")
        if m.source in seen:
            raise invalid(f"members[{i}].source", f"source {m.source!r} is listed twice")
        seen.add(m.source)
    return [{"source": m.source, "weight": m.weight} for m in members]


def refuse_config_pool(c: Call, name: str) -> None:
    if name in c.ctx.config_pools:
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
    await c.ctx.reload_pools()
    return pool_out(row)


@api.op(
    "GET",
    "/v1/pools",
    summary="List pools (the configuration's and those made here)",
    scope="admin",
    response=PoolList,
)
async def list_pools(c: Call) -> Any:
    config = c.ctx.config_pools
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
    if name in c.ctx.config_pools:
        return config_pool_out(c.ctx.config_pools[name])
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
    await c.ctx.reload_pools()
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
        tenants = (
            await s.execute(
                select(Tenant.name, Tenant.default_pool, Tenant.allowed_pools).order_by(Tenant.id)
            )
        ).all()
        users = [t for t, default, allowed in tenants if default == name or name in (allowed or ())]
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
    await c.ctx.reload_pools()
    return Deleted(deleted=True)


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
        t = await _tenant(s, c.path["tenant_id"])
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
        t = await _tenant(s, c.path["tenant_id"])
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
        t = await _tenant(s, c.path["tenant_id"])
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
)
async def create_key(c: Call) -> Any:
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


# ---------------------------------------------------------------- domains


async def _domain(s: Any, c: Call) -> Domain:
    stmt = select(Domain).where(Domain.id == c.path["domain_id"], Domain.tenant_id == c.tenant_id)
    d: Domain = await one_or_404(s, stmt, "domain")
    return d


def domain_out(cfg: Any, d: Domain, keys: list[DkimKey]) -> DomainOut:
    signing = dom.signing_generation(keys)
    return DomainOut(
        id=d.id,
        name=d.name,
        created_at=d.created_at,
        verified=d.verified_at is not None,
        verified_at=d.verified_at,
        checked_at=d.checked_at,
        return_path=dom.return_path(cfg, d.name),
        dkim=[
            DkimKeyOut.model_validate(
                {
                    "selector": k.selector,
                    "algorithm": k.algorithm,
                    "generation": k.generation,
                    "state": dom.key_state(k, signing),
                    "verified_at": k.verified_at,
                }
            )
            for k in keys
        ],
        records=[RecordOut.model_validate(r.as_dict()) for r in dom.records(cfg, d, keys)],
    )


@api.op(
    "POST",
    "/v1/domains",
    summary="Add a sending domain (generates its DKIM keys)",
    scope="manage",
    body=DomainCreate,
    response=DomainOut,
    status=201,
    errors=(409,),
)
async def create_domain(c: Call) -> Any:
    """Creates RSA-2048 and Ed25519 DKIM keys (private keys encrypted at rest) and
    answers with every DNS record to publish; then call verify."""
    async with c.ctx.sessions() as s:
        d = Domain(tenant_id=c.tenant_id, name=c.body.name)
        s.add(d)
        try:
            await s.flush()
        except IntegrityError:
            raise ApiError(409, "conflict", f"{c.body.name} is already registered") from None
        keys = await dom.add_generation(s, d, 1, c.ctx.box)
        await changed(s, "domain", c.tenant_id, d.name)
        await s.commit()
    return domain_out(c.ctx.cfg, d, keys)


@api.op(
    "GET",
    "/v1/domains",
    summary="List sending domains",
    scope="read",
    query=Page,
    response=DomainList,
)
async def list_domains(c: Call) -> Any:
    stmt = select(Domain).where(Domain.tenant_id == c.tenant_id)
    async with c.ctx.sessions() as s:
        rows = await page(s, stmt, Domain, c.query.cursor, c.query.limit)
        out = [domain_out(c.ctx.cfg, d, await dom.domain_keys(s, d.id)) for d in rows]
    return DomainList(data=out, next_cursor=page_of(rows, c.query.limit))


@api.op(
    "GET",
    "/v1/domains/{domain_id:int}",
    summary="Show a domain and its DNS records",
    scope="read",
    response=DomainOut,
    errors=(404,),
)
async def get_domain(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        d = await _domain(s, c)
        return domain_out(c.ctx.cfg, d, await dom.domain_keys(s, d.id))


@api.op(
    "POST",
    "/v1/domains/{domain_id:int}/verify",
    summary="Look up each record in DNS and report ok, missing or mismatch",
    scope="manage",
    response=DomainOut,
    errors=(404,),
)
async def verify_domain(c: Call) -> Any:
    """A domain is verified when every required record is ok: the DKIM keys of the
    newest generation, SPF, and the return path's MX and SPF. DMARC and the tracking
    CNAME are reported but optional. A DNS failure (timeout, SERVFAIL) is ``error``
    and changes nothing."""
    async with c.ctx.sessions() as s:
        d = await _domain(s, c)
        keys = await dom.domain_keys(s, d.id)
        recs = await verify(c.ctx.fresh_resolver, dom.records(c.ctx.cfg, d, keys))
        now = dom.now()
        status = {r.name: r.status for r in recs if r.purpose == "dkim"}
        for k in keys:
            st = status.get(f"{k.selector}._domainkey.{d.name}")
            if st == "ok" and k.verified_at is None:
                k.verified_at = now
        # Required-ness depends on which generation signs, now that keys may be verified.
        recs_now = dom.records(c.ctx.cfg, d, keys)
        by_key = {(r.type, r.name, r.value): r for r in recs}
        for r in recs_now:
            checked = by_key[(r.type, r.name, r.value)]
            r.status, r.found, r.detail = checked.status, checked.found, checked.detail
        errors = any(r.status == "error" for r in recs_now if r.required)
        if all_required_ok(recs_now):
            d.verified_at = d.verified_at or now
        elif not errors:
            d.verified_at = None
        d.checked_at = now
        d.last_check = {"records": [r.as_dict() for r in recs_now]}
        await changed(s, "domain", c.tenant_id, d.name)
        await s.commit()
        return domain_out(c.ctx.cfg, d, keys)


@api.op(
    "POST",
    "/v1/domains/{domain_id:int}/dkim/rotate",
    summary="Start a new DKIM key generation (new selectors)",
    scope="manage",
    response=DomainOut,
    errors=(404, 409),
)
async def rotate_dkim(c: Call) -> Any:
    """The new keys sign once their records verify; the old ones stay published (and
    valid for mail already sent) until removed with DELETE .../dkim/{selector}."""
    async with c.ctx.sessions() as s:
        d = await _domain(s, c)
        keys = await dom.domain_keys(s, d.id)
        signing = dom.signing_generation(keys)
        top = max((k.generation for k in keys), default=0)
        if signing is None or top > signing:
            raise ApiError(409, "conflict", "a key generation is still waiting for verification")
        keys += await dom.add_generation(s, d, top + 1, c.ctx.box)
        await changed(s, "domain", c.tenant_id, d.name)
        await s.commit()
        return domain_out(c.ctx.cfg, d, keys)


@api.op(
    "DELETE",
    "/v1/domains/{domain_id:int}/dkim/{selector}",
    summary="Remove a retired DKIM key",
    scope="manage",
    response=DomainOut,
    errors=(404, 409),
)
async def delete_dkim(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        d = await _domain(s, c)
        keys = await dom.domain_keys(s, d.id)
        key = next((k for k in keys if k.selector == c.path["selector"]), None)
        if key is None:
            raise not_found("DKIM key")
        if dom.key_state(key, dom.signing_generation(keys)) != "retired":
            raise ApiError(409, "conflict", "only a retired key (an older generation) is removed")
        await s.delete(key)
        keys.remove(key)
        await changed(s, "domain", c.tenant_id, d.name)
        await s.commit()
        return domain_out(c.ctx.cfg, d, keys)


@api.op(
    "DELETE",
    "/v1/domains/{domain_id:int}",
    summary="Remove a sending domain",
    scope="manage",
    response=Deleted,
    errors=(404,),
)
async def delete_domain(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        d = await _domain(s, c)
        await s.execute(delete(DkimKey).where(DkimKey.domain_id == d.id))
        await s.delete(d)
        await changed(s, "domain", c.tenant_id, d.name)
        await s.commit()
    return Deleted(deleted=True)


# ---------------------------------------------------------------- suppressions


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
        await s.delete(row)
        await changed(s, "suppression", c.tenant_id, row.address)
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
    try:
        text = c.raw.decode("utf-8-sig")
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
    created = updated = 0
    async with c.ctx.sessions() as s:
        for addr, reason, source, note, expires, created_at in good.values():
            entry, how = await upsert_suppression(
                s, c.tenant_id, addr, reason, source, note, expires
            )
            if created_at is not None:
                entry.created_at = created_at
            new = how == "created"
            created += new
            updated += not new
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
