"""The DNS records a sending domain publishes, and checking what is published.

Building the records and judging an answer are plain functions; :func:`verify` does
the lookups through the appliance's resolver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from postwarden.dns.resolver import DnsError, Resolver


@dataclass(frozen=True)
class DkimPublic:
    selector: str
    algorithm: str  # rsa-sha256 | ed25519-sha256
    public_key: str  # base64, the p= value


@dataclass(frozen=True)
class DomainPlan:
    """Everything needed to say which records a domain must publish."""

    domain: str
    dkim: Sequence[DkimPublic]
    spf_mechanisms: Sequence[str]  # e.g. ("ip4:192.0.2.10",) or ("include:spf.example.net",)
    return_path: str  # the bounce subdomain, e.g. "pwb.example.com"
    bounce_mx: str  # host receiving bounces for the return path
    tracking: str  # e.g. "track.example.com"
    tracking_target: str  # its CNAME target


@dataclass
class Record:
    purpose: str  # dkim | spf | dmarc | return_path_mx | return_path_spf | tracking
    type: str
    name: str
    value: str
    required: bool
    status: str = "unchecked"  # ok | missing | mismatch | error | unchecked
    found: list[str] = field(default_factory=list)
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def dkim_txt(key: DkimPublic) -> str:
    k = "rsa" if key.algorithm == "rsa-sha256" else "ed25519"
    return f"v=DKIM1; k={k}; p={key.public_key}"


def spf_txt(mechanisms: Sequence[str], all_: str = "~all") -> str:
    return " ".join(["v=spf1", *mechanisms, all_])


def expected_records(plan: DomainPlan) -> list[Record]:
    d = plan.domain
    recs = [
        Record("dkim", "TXT", f"{k.selector}._domainkey.{d}", dkim_txt(k), True) for k in plan.dkim
    ]
    recs += [
        Record("spf", "TXT", d, spf_txt(plan.spf_mechanisms), True),
        Record("dmarc", "TXT", f"_dmarc.{d}", "v=DMARC1; p=none", False),
        Record("return_path_mx", "MX", plan.return_path, f"10 {plan.bounce_mx}", True),
        Record(
            "return_path_spf", "TXT", plan.return_path, spf_txt(plan.spf_mechanisms, "-all"), True
        ),
        Record("tracking", "CNAME", plan.tracking, plan.tracking_target, False),
    ]
    return recs


# ---------------------------------------------------------------- judging answers


def _tags(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            out[name.strip().lower()] = "".join(value.split())
    return out


def judge_dkim(expected: Record, found: list[str]) -> tuple[str, str]:
    want = _tags(expected.value)
    keys = [t for t in found if _tags(t).get("p") is not None or "DKIM1" in t]
    if not keys:
        return "missing", "no DKIM key record at this name"
    for text in keys:
        tags = _tags(text)
        if tags.get("p") == want["p"] and tags.get("k", "rsa") == want["k"]:
            return "ok", ""
    return "mismatch", "a key is published here, but not this one"


def _spf_terms(text: str) -> list[str]:
    return [t.lower() for t in text.split()[1:]]


def judge_spf(expected: Record, found: list[str]) -> tuple[str, str]:
    spf = [t for t in found if t.lower().split()[:1] == ["v=spf1"]]
    if not spf:
        return "missing", "no v=spf1 record"
    if len(spf) > 1:
        return "mismatch", "more than one v=spf1 record (RFC 7208 4.5: permerror)"
    have = _spf_terms(spf[0])
    need = [t for t in _spf_terms(expected.value) if not t.endswith("all")]
    lacking = [t for t in need if t not in have and f"+{t}" not in have]
    if lacking:
        return "mismatch", "the SPF record lacks " + " ".join(lacking)
    return "ok", ""


def judge_dmarc(_expected: Record, found: list[str]) -> tuple[str, str]:
    recs = [t for t in found if t.replace(" ", "").upper().startswith("V=DMARC1")]
    if not recs:
        return "missing", "no v=DMARC1 record"
    if len(recs) > 1:
        return "mismatch", "more than one DMARC record"
    policy = _tags(recs[0]).get("p")
    if policy not in ("none", "quarantine", "reject"):
        return "mismatch", "the DMARC record has no valid p= policy"
    return "ok", ""


def judge_mx(expected: Record, found: list[str]) -> tuple[str, str]:
    if not found:
        return "missing", "no MX record"
    want = expected.value.split()[-1].rstrip(".").lower()
    if any(f.split()[-1].rstrip(".").lower() == want for f in found):
        return "ok", ""
    return "mismatch", f"MX does not point at {want}"


def judge_cname(expected: Record, found: list[str]) -> tuple[str, str]:
    if not found:
        return "missing", "no CNAME record"
    want = expected.value.rstrip(".").lower()
    if any(f.rstrip(".").lower() == want for f in found):
        return "ok", ""
    return "mismatch", f"CNAME does not point at {want}"


_JUDGES = {
    "dkim": judge_dkim,
    "spf": judge_spf,
    "return_path_spf": judge_spf,
    "dmarc": judge_dmarc,
    "return_path_mx": judge_mx,
    "tracking": judge_cname,
}


def judge(record: Record, found: list[str]) -> Record:
    record.found = list(found)
    record.status, record.detail = _JUDGES[record.purpose](record, found)
    return record


def all_required_ok(records: Sequence[Record]) -> bool:
    return all(r.status == "ok" for r in records if r.required)


# ---------------------------------------------------------------- lookups


async def lookup(resolver: Resolver, rtype: str, name: str) -> list[str]:
    """The published values (presentation text; TXT strings joined); [] when none."""
    if rtype == "TXT":
        return await resolver.resolve_txt(name)
    return await resolver.resolve_rrset(name, rtype)


async def verify(resolver: Resolver, records: Sequence[Record]) -> list[Record]:
    """Look each record up and judge it; a failed lookup is ``error``, not ``missing``."""

    async def one(rec: Record) -> Record:
        try:
            found = await lookup(resolver, rec.type, rec.name)
        except DnsError as exc:
            if exc.permanent:  # NXDOMAIN: nothing published under this name
                return judge(rec, [])
            rec.status, rec.detail, rec.found = "error", str(exc), []
            return rec
        return judge(rec, found)

    return list(await asyncio.gather(*(one(r) for r in records)))
