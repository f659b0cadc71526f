"""Is a source address fit to send from (``postwarden sources check``)? Its
forward-confirmed reverse DNS, and its EHLO name against the PTR name."""

from __future__ import annotations

from dataclasses import dataclass

import dns.reversename

from postwarden.config import Config, SourceConfig
from postwarden.dns.resolver import DnsError, Resolver


@dataclass(frozen=True)
class SourceCheck:
    source: str
    address: str
    ehlo: str
    ptr: list[str]
    forward_ok: bool  # the PTR name resolves back to the address
    ehlo_matches: bool  # the EHLO name is the PTR name
    problem: str  # "" when all is well

    @property
    def ok(self) -> bool:
        return not self.problem


async def check_source(resolver: Resolver, src: SourceConfig, cfg: Config) -> SourceCheck:
    """Forward-confirmed reverse DNS of a source, and its EHLO name against the PTR."""
    ehlo = (src.ehlo or cfg.server.hostname).lower().rstrip(".")
    rev = dns.reversename.from_address(src.address).to_text()
    try:
        ptr = [p.lower().rstrip(".") for p in await resolver.resolve_rrset(rev, "PTR")]
    except DnsError as exc:
        if not exc.permanent:
            return SourceCheck(
                src.name, src.address, ehlo, [], False, False, f"PTR lookup failed: {exc}"
            )
        ptr = []
    if not ptr:
        return SourceCheck(src.name, src.address, ehlo, [], False, False, "no PTR record")
    forward = False
    for name in ptr:
        try:
            if src.address in await resolver.resolve_addresses(name):
                forward = True
        except DnsError:
            continue
    matches = ehlo in ptr
    problem = ""
    if not forward:
        problem = f"{', '.join(ptr)} does not resolve back to {src.address}"
    elif not matches:
        problem = f"EHLO name {ehlo} is not the PTR name ({', '.join(ptr)})"
    return SourceCheck(src.name, src.address, ehlo, ptr, forward, matches, problem)
