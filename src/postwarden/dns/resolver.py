"""MX, address and TXT lookups for delivery (dnspython's async resolver).

What delivery needs from DNS, with the SMTP meaning of each outcome decided here so
that every caller treats DNS the same way (RFC 5321 section 5.1, RFC 7505):

* MX records in preference order, equal preferences shuffled, each host resolved to
  its addresses (A first, then AAAA);
* no MX but an address record → the domain itself is the implicit MX;
* a null MX (``0 .``) → permanent failure 5.1.10;
* NXDOMAIN → permanent failure 5.1.2; no MX and no address → permanent 5.4.4;
* SERVFAIL, REFUSED, timeouts → temporary failure 4.4.3 (retry later).

Answers are cached by dnspython's LRU cache, which honours each answer's TTL,
negative answers included. ``nameservers`` accepts ``"host"`` or ``"host:port"``
so the lab and the tests point the resolver at their own server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from postwarden.config import parse_hostport

#: At most this many MX hosts, and addresses per host, are offered to delivery.
MAX_MX_HOSTS = 10
MAX_ADDRESSES_PER_HOST = 5


class DnsError(Exception):
    """A lookup that gave no usable answer.

    ``permanent`` says whether retrying can help; ``enhanced`` is the RFC 3463 status
    code delivery reports for the recipients (``5.1.2``, ``5.1.10``, ``4.4.3`` ...).
    """

    def __init__(self, message: str, *, permanent: bool, enhanced: str) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.enhanced = enhanced


@dataclass(frozen=True)
class MxHost:
    """One host to try, in order, with the addresses it resolved to."""

    name: str
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class MxResult:
    """The hosts for a destination domain, best first; ``implicit`` when there was no MX."""

    domain: str
    hosts: tuple[MxHost, ...]
    implicit: bool = False


class _Temporary(Exception):
    pass


def _nameserver(spec: str) -> dns.nameserver.Do53Nameserver:
    host, port = parse_hostport(spec, "dns.nameservers", default_port=53)
    return dns.nameserver.Do53Nameserver(host, port)


def order_mx(records: list[tuple[int, str]], rng: random.Random | None = None) -> list[str]:
    """Host names by ascending preference, shuffled among equal preferences (RFC 5321 5.1)."""
    rng = rng or random.Random()
    keyed = [(pref, rng.random(), name) for pref, name in records]
    keyed.sort()
    out: list[str] = []
    for _pref, _r, name in keyed:
        if name not in out:
            out.append(name)
    return out


class Resolver:
    """Async resolver with a TTL-honouring cache; one per appliance."""

    def __init__(
        self, nameservers: list[str], *, timeout: float = 5.0, cache_size: int = 100_000
    ) -> None:
        if nameservers:
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = [_nameserver(ns) for ns in nameservers]
        else:
            res = dns.asyncresolver.Resolver()
        res.timeout = timeout
        res.lifetime = timeout
        # cache_size 0: every question goes to the server (checking what was just published).
        res.cache = dns.resolver.LRUCache(cache_size) if cache_size > 0 else None
        self._res = res

    # ------------------------------------------------------------------ primitives

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, None for NODATA; NXDOMAIN raised as such, the rest as _Temporary."""
        try:
            return await self._res.resolve(name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NXDOMAIN:
            raise
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise _Temporary(f"{rdtype} lookup for {name} failed: {exc}") from exc
        except dns.exception.DNSException as exc:
            raise _Temporary(f"{rdtype} lookup for {name} failed: {exc}") from exc

    async def resolve_addresses(self, name: str) -> tuple[str, ...]:
        """IPv4 then IPv6 addresses of ``name``; empty when it has none.

        Raises :class:`DnsError` (temporary) when either lookup failed and the other
        gave nothing, so that a broken server is never taken for a missing host.
        """
        results = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True
        )
        addrs: list[str] = []
        failure: BaseException | None = None
        for res in results:
            if isinstance(res, dns.resolver.NXDOMAIN):
                continue
            if isinstance(res, BaseException):
                failure = res
                continue
            if res is not None:
                addrs.extend(r.to_text() for r in res)
        if not addrs and failure is not None:
            raise DnsError(str(failure), permanent=False, enhanced="4.4.3")
        return tuple(addrs)

    async def resolve_txt(self, name: str) -> list[str]:
        """The text of each TXT record at ``name`` (character-strings joined)."""
        answer = await self._answer(name, "TXT")
        if answer is None:
            return []
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]

    async def resolve_rrset(self, name: str, rdtype: str) -> list[str]:
        """The records of one type at ``name`` in presentation format ([] for NODATA)."""
        answer = await self._answer(name, rdtype)
        if answer is None:
            return []
        return [r.to_text() for r in answer]

    async def _answer(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """:meth:`_query` with failures as :class:`DnsError` (NXDOMAIN permanent)."""
        try:
            return await self._query(name, rdtype)
        except dns.resolver.NXDOMAIN as exc:
            raise DnsError(f"{name}: no such domain", permanent=True, enhanced="5.1.2") from exc
        except _Temporary as exc:
            raise DnsError(str(exc), permanent=False, enhanced="4.4.3") from exc

    # ------------------------------------------------------------------ MX

    async def resolve_mx(self, domain: str) -> MxResult:
        """Where mail for ``domain`` goes; raises :class:`DnsError` when nowhere (yet)."""
        domain = domain.strip().rstrip(".").lower()
        literal = _address_literal(domain)
        if literal is not None:
            return MxResult(domain, (MxHost(domain, 0, (literal,)),), implicit=True)
        try:
            name = dns.name.from_text(domain).to_text()
        except (dns.exception.DNSException, UnicodeError) as exc:
            raise DnsError(f"{domain}: bad domain name", permanent=True, enhanced="5.1.2") from exc
        try:
            answer = await self._query(name, "MX")
        except dns.resolver.NXDOMAIN as exc:
            raise DnsError(
                f"{domain}: domain does not exist (NXDOMAIN)", permanent=True, enhanced="5.1.2"
            ) from exc
        except _Temporary as exc:
            raise DnsError(str(exc), permanent=False, enhanced="4.4.3") from exc
        if answer is None:
            addrs = await self.resolve_addresses(name)
            if not addrs:
                raise DnsError(
                    f"{domain}: no MX and no address records", permanent=True, enhanced="5.4.4"
                )
            return MxResult(domain, (MxHost(domain, 0, addrs[:MAX_ADDRESSES_PER_HOST]),), True)
        records = [(int(r.preference), r.exchange.to_text().rstrip(".").lower()) for r in answer]
        real = [(p, n) for p, n in records if n not in ("", ".")]
        if not real:
            raise DnsError(
                f"{domain}: domain does not accept mail (null MX)",
                permanent=True,
                enhanced="5.1.10",
            )
        prefs = dict((n, p) for p, n in reversed(real))
        names = order_mx(real)[:MAX_MX_HOSTS]
        resolved = await asyncio.gather(
            *(self.resolve_addresses(n) for n in names), return_exceptions=True
        )
        hosts: list[MxHost] = []
        temporary: BaseException | None = None
        for n, res in zip(names, resolved, strict=True):
            if isinstance(res, BaseException):
                temporary = res
            elif res:
                hosts.append(MxHost(n, prefs[n], res[:MAX_ADDRESSES_PER_HOST]))
        if not hosts:
            if temporary is not None:
                raise DnsError(
                    f"{domain}: MX host lookups failed: {temporary}",
                    permanent=False,
                    enhanced="4.4.3",
                )
            raise DnsError(
                f"{domain}: no MX host has an address ({', '.join(names)})",
                permanent=True,
                enhanced="5.4.4",
            )
        return MxResult(domain, tuple(hosts))


def _address_literal(domain: str) -> str | None:
    """``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` → the address; None for a domain name."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError as exc:
        raise DnsError(f"{domain}: bad address literal", permanent=True, enhanced="5.1.2") from exc
