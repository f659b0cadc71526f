"""Which addresses delivery may connect to: never inward unless the operator says so.

An MX record (or an address literal that reached the queue) can point anywhere,
including this host, its private network, link-local metadata services or
multicast. Delivery connects only to globally routable unicast addresses, and to the
networks ``delivery.allowed_private_networks`` names (the lab and the tests name
127.0.0.0/8). Pure functions, no I/O: called once per session with the MX answer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import replace

from postwarden.dns.resolver import MxHost

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: NAT64's well-known prefix (RFC 6052): the IPv4 address it reaches is embedded.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def parse_networks(specs: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs as networks (``10.0.0.1`` alone is a /32); ValueError for a bad one."""
    return tuple(ipaddress.ip_network(s, strict=False) for s in specs)


def _reached(ip: Address) -> Address:
    """The IPv4 address an IPv6 one actually reaches, when it embeds one (mapped,
    NAT64, 6to4); else the address itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def is_internal(ip: Address) -> bool:
    """Not a globally routable unicast address: loopback, private (RFC 1918, fc00::/7),
    shared (100.64.0.0/10), link-local, multicast, unspecified, reserved,
    documentation... (``is_global`` alone lets multicast through)."""
    return not ip.is_global or ip.is_multicast


def connectable(address: str, allowed: tuple[Network, ...]) -> bool:
    """Whether delivery may connect to ``address``: a global unicast address, or one
    inside a network the operator allowed. An unparsable address never is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    reached = _reached(ip)
    if not (is_internal(ip) or is_internal(reached)):
        return True
    return any(a in net for net in allowed for a in (ip, reached) if a.version == net.version)


def allowed_hosts(
    hosts: Iterable[MxHost], allowed: tuple[Network, ...]
) -> tuple[tuple[MxHost, ...], list[str]]:
    """The MX hosts with only their connectable addresses (hosts left with none are
    dropped), and the addresses refused."""
    keep: list[MxHost] = []
    refused: list[str] = []
    for host in hosts:
        ok = tuple(a for a in host.addresses if connectable(a, allowed))
        if len(ok) != len(host.addresses):
            refused.extend(a for a in host.addresses if a not in ok)
        if ok:
            keep.append(host if len(ok) == len(host.addresses) else replace(host, addresses=ok))
    return tuple(keep), refused
