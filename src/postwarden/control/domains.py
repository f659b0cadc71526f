"""Sending domains: DKIM key generation and rotation, the records to publish, checks."""

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
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.config import Config
from postwarden.dns.records import DkimPublic, DomainPlan, Record, expected_records
from postwarden.mta.dkim import SigningKey, generate_key, parse_key
from postwarden.store.models import DkimKey, Domain
from postwarden.store.secrets import SecretBox

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")


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
