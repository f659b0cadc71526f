"""/v1/domains: a tenant's sending domains, their DNS records and DKIM keys (the
domain logic is in domains.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from postwarden.control import domains as dom
from postwarden.control.api import api, one_or_404, page, page_of
from postwarden.control.errors import ApiError, not_found
from postwarden.control.routing import Call
from postwarden.control.schemas import (
    Deleted,
    DkimKeyOut,
    DomainCreate,
    DomainList,
    DomainOut,
    Page,
    RecordOut,
)
from postwarden.store.models import DkimKey, Domain


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
        try:
            d, keys = await dom.create(s, c.tenant_id, c.body.name, c.ctx.box)
        except dom.DomainExists:
            raise ApiError(409, "conflict", f"{c.body.name} is already registered") from None
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
        keys = await dom.check(s, c.ctx.cfg, c.ctx.fresh_resolver, d)
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
        try:
            keys = await dom.rotate(s, d, c.ctx.box)
        except dom.RotationPending as exc:
            raise ApiError(409, "conflict", str(exc)) from None
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
        try:
            keys = await dom.remove_key(s, d, c.path["selector"])
        except dom.KeyNotRetired as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        if keys is None:
            raise not_found("DKIM key")
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
        await dom.remove(s, await _domain(s, c))
        await s.commit()
    return Deleted(deleted=True)
