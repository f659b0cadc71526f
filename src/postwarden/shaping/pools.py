"""Sources and pools: which local address a message leaves from.

Pure policy, except :func:`check_source`, which asks the resolver. A pool is weighted
sources; :func:`choose_source` picks one by weight among those that may send now
(not paused, not refused by the broker for this site); with ``overflow = "spill"`` a
source at its cap gives way to the others, with ``"wait"`` the mail waits for it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import dns.reversename

from postwarden.config import Config, PoolConfig, SourceConfig
from postwarden.dns.resolver import DnsError, Resolver


def choose_source(
    pool: PoolConfig,
    sources: Mapping[str, SourceConfig],
    rng: random.Random,
    available: Callable[[str], bool] = lambda _name: True,
) -> SourceConfig | None:
    """A source of ``pool`` by weight, among those not paused and ``available``; None
    when none may send now (the mail waits)."""
    members = [
        m for m in pool.members if sources[m.source].state != "paused" and available(m.source)
    ]
    if not members:
        return None
    total = sum(m.weight for m in members)
    pick = rng.uniform(0, total)
    for m in members:
        pick -= m.weight
        if pick <= 0:
            return sources[m.source]
    return sources[members[-1].source]


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
