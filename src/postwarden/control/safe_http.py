"""Outbound HTTP to a URL a tenant gave (data sources, webhook endpoints) under
delivery's private-network rule: the host's addresses are resolved by the appliance's
resolver, refused when one is internal and not named in
``delivery.allowed_private_networks`` (no server-side request forgery into the host's
network), and the connection goes to the address checked — no second lookup that
could answer otherwise — with the name kept for the Host header and TLS SNI."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import httpx

from postwarden.dns.resolver import DnsError
from postwarden.mta.destinations import connectable


class UnsafeUrl(Exception):
    """The URL may not be reached: its scheme, its name, or an internal address."""


@dataclass(frozen=True)
class Target:
    url: httpx.URL  # the URL with the checked address as its host
    headers: dict[str, str]  # Host
    extensions: dict[str, Any]  # sni_hostname for https to a name


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


async def checked(url: str | httpx.URL, resolver: Any, allowed: Any) -> Target:
    """Where to connect for ``url``, or UnsafeUrl saying why not."""
    u = httpx.URL(url)
    if u.scheme not in ("http", "https") or not u.host:
        raise UnsafeUrl(f"{url}: only http:// and https:// URLs")
    literal = _literal(u.host)
    if literal is not None:
        addresses: tuple[str, ...] = (literal,)
    else:
        try:
            addresses = await resolver.resolve_addresses(u.host)
        except DnsError as exc:
            raise UnsafeUrl(f"{u.host}: the address lookup failed: {exc}") from None
        if not addresses:
            raise UnsafeUrl(f"{u.host}: no address (A or AAAA)")
    refused = [a for a in addresses if not connectable(a, allowed)]
    if refused:
        raise UnsafeUrl(
            f"{u.host}: refusing to connect to {refused[0]}, an internal address"
            " (delivery.allowed_private_networks names the ones allowed)"
        )
    ext = {"sni_hostname": u.host} if u.scheme == "https" and literal is None else {}
    return Target(u.copy_with(host=addresses[0]), {"Host": u.netloc.decode("ascii")}, ext)
