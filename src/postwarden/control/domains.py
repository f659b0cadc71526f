"""Sending domains: DKIM key generation and rotation, the records to publish, checks.

The functions that change a domain work in the caller's session, record the change
for the feed and leave the commit to the caller (domains_api.py, the HTTP side)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.config import Config
from postwarden.dns.records import (
    DkimPublic,
    DomainPlan,
    Record,
    all_required_ok,
    expected_records,
    verify,
)
from postwarden.dns.resolver import Resolver
from postwarden.mta.dkim import SigningKey, generate_key, parse_key
from postwarden.store.feed import record_change
from postwarden.store.models import DkimKey, Domain
from postwarden.store.secrets import SecretBox

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")


class DomainExists(Exception):
    """The name is registered already (by this tenant or another)."""


class RotationPending(Exception):
    """A key generation is still waiting for verification."""


class KeyNotRetired(Exception):
    """The DKIM key signs, or will once verified: only a retired one is removed."""


@dataclass(frozen=True)
class NewKeyMaterial:
    selector: str
    algorithm: str
    sealed: bytes
    public: str


def _public_value(key: SigningKey) -> str:
    return key.public_txt().rpartition("p=")[2]


def make_keys(domain: str, generation: int, box: SecretBox) -> list[NewKeyMaterial]:
    """RSA-2048 and Ed25519 keys for one generation (blocking: RSA takes ~0.1 s)."""
    tag = secrets.token_hex(2)
    out = []
    for alg in ALGORITHMS:
        pem = generate_key(alg)  # type: ignore[arg-type]
        selector = f"pw{generation}-{tag}-{'rsa' if alg == 'rsa-sha256' else 'ed'}"
        key = parse_key(domain, selector, pem, alg)  # type: ignore[arg-type]
        if isinstance(key.private, ed25519.Ed25519PrivateKey):
            raw = key.private.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            material = base64.b64encode(raw)
        else:
            material = pem
        out.append(NewKeyMaterial(selector, alg, box.seal(material), _public_value(key)))
    return out


async def add_generation(
    session: AsyncSession, domain: Domain, generation: int, box: SecretBox
) -> list[DkimKey]:
    made = await asyncio.to_thread(make_keys, domain.name, generation, box)
    rows = [
        DkimKey(
            domain_id=domain.id,
            selector=m.selector,
            algorithm=m.algorithm,
            generation=generation,
            private_key=m.sealed,
            public_key=m.public,
        )
        for m in made
    ]
    session.add_all(rows)
    return rows


def signing_generation(keys: Sequence[DkimKey]) -> int | None:
    """The newest generation whose keys are all verified in DNS."""
    gens: dict[int, list[DkimKey]] = {}
    for k in keys:
        gens.setdefault(k.generation, []).append(k)
    ok = [g for g, ks in gens.items() if all(k.verified_at is not None for k in ks)]
    return max(ok) if ok else None


def key_state(key: DkimKey, signing: int | None) -> str:
    if signing is None or key.generation > signing:
        return "pending"
    return "signing" if key.generation == signing else "retired"


def spf_mechanisms(cfg: Config) -> list[str]:
    if cfg.control.spf_include:
        return [f"include:{cfg.control.spf_include}"]
    if cfg.delivery.source_address:
        ip = ipaddress.ip_address(cfg.delivery.source_address)
        return [f"ip{ip.version}:{ip}"]
    return [f"a:{cfg.server.hostname}"]


def return_path(cfg: Config, domain: str) -> str:
    return f"{cfg.control.return_path_label}.{domain}"


def plan(cfg: Config, domain: Domain, keys: Sequence[DkimKey]) -> DomainPlan:
    return DomainPlan(
        domain=domain.name,
        dkim=[
            DkimPublic(k.selector, k.algorithm, k.public_key)
            for k in sorted(keys, key=lambda k: (k.generation, k.algorithm))
        ],
        spf_mechanisms=spf_mechanisms(cfg),
        return_path=return_path(cfg, domain.name),
        bounce_mx=cfg.control.bounce_mx_host or cfg.server.hostname,
        tracking=f"{cfg.control.tracking_label}.{domain.name}",
        tracking_target=cfg.control.tracking_host or cfg.server.hostname,
    )


def records(cfg: Config, domain: Domain, keys: Sequence[DkimKey]) -> list[Record]:
    """The records to publish, with the last check's results where there was one."""
    signing = signing_generation(keys)
    recs = expected_records(plan(cfg, domain, keys))
    by_sel = {k.selector: k for k in keys}
    last = {
        (r.get("type"), r.get("name"), r.get("value")): r
        for r in domain.last_check.get("records", [])
    }
    for rec in recs:
        if rec.purpose == "dkim":
            sel = rec.name.split("._domainkey.")[0]
            key = by_sel.get(sel)
            # Required: the keys that sign, or the first generation before any signs. A
            # retired key stays published until removed; a rotation's new keys are checked
            # (to promote them) but their absence never unverifies a domain that signs.
            state = key_state(key, signing) if key is not None else "retired"
            rec.required = state == "signing" or (state == "pending" and signing is None)
        prev = last.get((rec.type, rec.name, rec.value))
        if prev is not None:
            rec.status = prev.get("status", "unchecked")
            rec.found = list(prev.get("found", []))
            rec.detail = prev.get("detail", "")
    return recs


async def domain_keys(session: AsyncSession, domain_id: int) -> list[DkimKey]:
    rows = await session.execute(
        select(DkimKey).where(DkimKey.domain_id == domain_id).order_by(DkimKey.id)
    )
    return list(rows.scalars())


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def create(
    session: AsyncSession, tenant_id: int, name: str, box: SecretBox
) -> tuple[Domain, list[DkimKey]]:
    """A new domain of ``tenant_id`` with its first generation of DKIM keys;
    :class:`DomainExists` when the name is taken."""
    domain = Domain(tenant_id=tenant_id, name=name)
    session.add(domain)
    try:
        await session.flush()
    except IntegrityError:
        raise DomainExists(name) from None
    keys = await add_generation(session, domain, 1, box)
    await record_change(session, "domain", tenant_id, domain.name)
    return domain, keys


async def check(
    session: AsyncSession, cfg: Config, resolver: Resolver, domain: Domain
) -> list[DkimKey]:
    """Look each record up in DNS and keep the results on ``domain`` (its keys, which
    this returns, are verified as their records are found). The domain is verified
    when every required record is ok and unverified when one is not, unless a lookup
    failed (``error``): that changes nothing."""
    keys = await domain_keys(session, domain.id)
    recs = await verify(resolver, records(cfg, domain, keys))
    at = now()
    status = {r.name: r.status for r in recs if r.purpose == "dkim"}
    for k in keys:
        st = status.get(f"{k.selector}._domainkey.{domain.name}")
        if st == "ok" and k.verified_at is None:
            k.verified_at = at
    # Required-ness depends on which generation signs, now that keys may be verified.
    recs_now = records(cfg, domain, keys)
    by_key = {(r.type, r.name, r.value): r for r in recs}
    for r in recs_now:
        checked = by_key[(r.type, r.name, r.value)]
        r.status, r.found, r.detail = checked.status, checked.found, checked.detail
    errors = any(r.status == "error" for r in recs_now if r.required)
    if all_required_ok(recs_now):
        domain.verified_at = domain.verified_at or at
    elif not errors:
        domain.verified_at = None
    domain.checked_at = at
    domain.last_check = {"records": [r.as_dict() for r in recs_now]}
    await record_change(session, "domain", domain.tenant_id, domain.name)
    return keys


async def rotate(session: AsyncSession, domain: Domain, box: SecretBox) -> list[DkimKey]:
    """Add the next generation of keys; :class:`RotationPending` while the newest one
    does not sign yet. Returns every key of the domain."""
    keys = await domain_keys(session, domain.id)
    signing = signing_generation(keys)
    top = max((k.generation for k in keys), default=0)
    if signing is None or top > signing:
        raise RotationPending("a key generation is still waiting for verification")
    keys += await add_generation(session, domain, top + 1, box)
    await record_change(session, "domain", domain.tenant_id, domain.name)
    return keys


async def remove_key(session: AsyncSession, domain: Domain, selector: str) -> list[DkimKey] | None:
    """Remove the retired key ``selector``: the keys left, None when the domain has no
    such key, :class:`KeyNotRetired` when it is not retired."""
    keys = await domain_keys(session, domain.id)
    key = next((k for k in keys if k.selector == selector), None)
    if key is None:
        return None
    if key_state(key, signing_generation(keys)) != "retired":
        raise KeyNotRetired("only a retired key (an older generation) is removed")
    await session.delete(key)
    keys.remove(key)
    await record_change(session, "domain", domain.tenant_id, domain.name)
    return keys


async def remove(session: AsyncSession, domain: Domain) -> None:
    """Remove the domain and its DKIM keys."""
    tenant_id, name = domain.tenant_id, domain.name
    await session.execute(delete(DkimKey).where(DkimKey.domain_id == domain.id))
    await session.delete(domain)
    await record_change(session, "domain", tenant_id, name)
