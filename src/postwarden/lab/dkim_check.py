"""DKIM at the lab's sinks: each signature of a received message verified against
the lab's own DNS table (no network), as a receiving MX would before writing
``Authentication-Results`` — ``pass``, ``fail`` or ``permerror``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dkim
import dns.exception
import dns.rdata
import dns.rdataclass
import dns.rdatatype
from dkim.util import parse_tag_value

if TYPE_CHECKING:
    from postwarden.lab.dnsserver import DNSServer


@dataclass(frozen=True)
class DkimVerdict:
    """One DKIM signature's result at the sink."""

    result: str  # pass, fail, permerror
    algorithm: str
    domain: str
    selector: str

    def __str__(self) -> str:
        return f"{self.result} {self.algorithm} d={self.domain} s={self.selector}"

    @classmethod
    def parse(cls, text: str) -> DkimVerdict:
        result, _, rest = text.partition(" ")
        algorithm, domain, selector = "", "", ""
        for part in rest.split():
            if part.startswith("d="):
                domain = part[2:]
            elif part.startswith("s="):
                selector = part[2:]
            elif not algorithm:
                algorithm = part
        return cls(result, algorithm, domain, selector)

    def as_dict(self) -> dict[str, str]:
        return {
            "result": self.result,
            "algorithm": self.algorithm,
            "domain": self.domain,
            "selector": self.selector,
        }


def _signatures(message: bytes) -> list[dict[str, str]]:
    """The tags of each DKIM-Signature header (``{}`` for one that cannot be parsed)."""
    head = message.split(b"\r\n\r\n", 1)[0]
    if b"dkim-signature" not in head.lower():
        return []
    try:
        headers = dkim.DKIM(message).headers
    except dkim.DKIMException:
        return [{}]
    out = []
    for name, value in headers:
        if name.lower() != b"dkim-signature":
            continue
        try:
            tags = parse_tag_value(value)
            out.append({k.decode(): v.decode(errors="replace") for k, v in tags.items()})
        except Exception:  # dkimpy raises several kinds for a malformed tag list
            out.append({})
    return out


def verify_dkim(message: bytes, keys: dict[str, bytes]) -> list[DkimVerdict]:
    """Each DKIM signature's verdict, with the TXT records in ``keys``
    (``"selector._domainkey.domain"`` lower case, no trailing dot → record text)."""
    verdicts = []
    for i, tags in enumerate(_signatures(message)):
        algorithm = tags.get("a", "")
        domain, selector = tags.get("d", ""), tags.get("s", "")
        if not tags or not domain or not selector:
            verdicts.append(DkimVerdict("permerror", algorithm, domain, selector))
            continue
        record = keys.get(f"{selector}._domainkey.{domain}".lower().rstrip("."))
        ok = False
        if record is not None:
            try:
                ok = bool(dkim.DKIM(message).verify(idx=i, dnsfunc=lambda *_a, _r=record, **_k: _r))
            except dkim.DKIMException:
                ok = False
        verdicts.append(DkimVerdict("pass" if ok else "fail", algorithm, domain, selector))
    return verdicts


def lab_keys(dns_server: DNSServer, message: bytes) -> dict[str, bytes]:
    """The TXT records the message's DKIM signatures name, from the lab's DNS table."""
    keys: dict[str, bytes] = {}
    for tags in _signatures(message):
        domain, selector = tags.get("d", ""), tags.get("s", "")
        if not domain or not selector:
            continue
        name = f"{selector}._domainkey.{domain}".lower().rstrip(".")
        try:
            texts = dns_server.records(name, "TXT")
        except dns.exception.DNSException:  # a name dnspython refuses: no key
            continue
        if texts:
            rdata: Any = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, texts[0])
            keys[name] = b"".join(rdata.strings)
    return keys
