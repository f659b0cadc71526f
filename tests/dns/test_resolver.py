"""The resolver against the lab's authoritative DNS server: real packets, no mocks."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from postwarden.dns.resolver import DnsError, Resolver, order_mx
from postwarden.lab import Lab


def resolver(lab: Lab, timeout: float = 2.0) -> Resolver:
    return Resolver([lab.nameserver], timeout=timeout)


def test_order_mx_sorts_by_preference_and_shuffles_equals() -> None:
    records = [(20, "b2"), (10, "a1"), (20, "b1"), (30, "c"), (10, "a2")]
    seen_first = Counter()
    for seed in range(200):
        order = order_mx(records, random.Random(seed))
        assert set(order[:2]) == {"a1", "a2"}
        assert set(order[2:4]) == {"b1", "b2"}
        assert order[4] == "c"
        seen_first[order[0]] += 1
    # Equal preferences share the load: each comes first a fair share of the time.
    assert min(seen_first.values()) > 60


async def test_mx_hosts_in_preference_order_with_addresses(lab: Lab) -> None:
    lab.dns.add("multi.test", "MX", "30 mx3.lab.test")
    lab.dns.add("multi.test", "MX", "10 mx1.lab.test")
    lab.dns.add("multi.test", "MX", "20 mx2.lab.test")
    lab.dns.add("mx2.lab.test", "AAAA", "::1")
    mx = await resolver(lab).resolve_mx("Multi.Test.")
    assert [h.name for h in mx.hosts] == ["mx1.lab.test", "mx2.lab.test", "mx3.lab.test"]
    assert [h.preference for h in mx.hosts] == [10, 20, 30]
    assert mx.hosts[0].addresses == (lab.sinks[0].host,)
    # IPv4 first, then IPv6.
    assert mx.hosts[1].addresses == (lab.sinks[1].host, "::1")
    assert not mx.implicit


async def test_implicit_mx_null_mx_nxdomain(lab: Lab) -> None:
    lab.add_implicit_mx("implicit.test", 2)
    lab.add_null_mx("nullmx.test")
    lab.dns.add("nodata.test", "TXT", "v=spf1 -all")
    res = resolver(lab)
    mx = await res.resolve_mx("implicit.test")
    assert mx.implicit and mx.hosts[0].name == "implicit.test"
    assert mx.hosts[0].addresses == (lab.sinks[2].host,)

    with pytest.raises(DnsError) as null:
        await res.resolve_mx("nullmx.test")
    assert null.value.permanent and null.value.enhanced == "5.1.10"

    with pytest.raises(DnsError) as nx:
        await res.resolve_mx("no-such-domain.test")
    assert nx.value.permanent and nx.value.enhanced == "5.1.2"

    with pytest.raises(DnsError) as nodata:
        await res.resolve_mx("nodata.test")  # exists, but neither MX nor address
    assert nodata.value.permanent and nodata.value.enhanced == "5.4.4"


async def test_mx_host_without_address_is_skipped(lab: Lab) -> None:
    lab.dns.add("half.test", "MX", "10 ghost.half.test")
    lab.dns.add("half.test", "MX", "20 mx2.lab.test")
    mx = await resolver(lab).resolve_mx("half.test")
    assert [h.name for h in mx.hosts] == ["mx2.lab.test"]
    lab.dns.add("allghost.test", "MX", "10 ghost.allghost.test")
    with pytest.raises(DnsError) as exc:
        await resolver(lab).resolve_mx("allghost.test")
    assert exc.value.permanent and exc.value.enhanced == "5.4.4"


@pytest.mark.parametrize("fault", ["servfail", "refused", "timeout"])
async def test_server_failures_are_temporary(lab: Lab, fault: str) -> None:
    lab.add_domain("broken.test")
    lab.dns.set_fault("broken.test", fault)
    with pytest.raises(DnsError) as exc:
        await resolver(lab, timeout=0.5).resolve_mx("broken.test")
    assert not exc.value.permanent and exc.value.enhanced == "4.4.3"


async def test_failing_mx_host_lookup_defers_rather_than_bounces(lab: Lab) -> None:
    lab.dns.add("deep.test", "MX", "10 mx.deep-broken.test")
    lab.dns.add("mx.deep-broken.test", "A", "127.0.1.1")
    lab.dns.set_fault("mx.deep-broken.test", "servfail")
    with pytest.raises(DnsError) as exc:
        await resolver(lab).resolve_mx("deep.test")
    assert not exc.value.permanent


async def test_cache_honours_ttl(lab: Lab) -> None:
    lab.dns.add("cached.test", "MX", "10 mx1.lab.test", ttl=1)
    res = resolver(lab)
    await res.resolve_mx("cached.test")
    after_first = lab.dns.queries
    for _ in range(5):
        await res.resolve_mx("cached.test")
    assert lab.dns.queries == after_first  # all from cache
    # Part of the scenario: the 1 s TTL must pass on the wall clock, which dnspython's
    # cache reads (time.time()); polling instead would not show the TTL was 1 s.
    await asyncio.sleep(1.2)
    await res.resolve_mx("cached.test")
    assert lab.dns.queries > after_first  # the 1 s TTL ran out: asked again


async def test_negative_answers_are_cached(lab: Lab) -> None:
    res = resolver(lab)
    for _ in range(2):
        with pytest.raises(DnsError):
            await res.resolve_mx("gone.test")
    first = lab.dns.queries
    with pytest.raises(DnsError):
        await res.resolve_mx("gone.test")
    assert lab.dns.queries == first


async def test_address_literal_and_long_txt(lab: Lab) -> None:
    res = resolver(lab)
    mx = await res.resolve_mx("[127.0.1.2]")
    assert mx.hosts[0].addresses == ("127.0.1.2",)
    with pytest.raises(DnsError):
        await res.resolve_mx("[not-an-ip]")
    long = "v=DKIM1; k=rsa; p=" + "A" * 400
    lab.dns.add("sel._domainkey.long.test", "TXT", long)
    assert await res.resolve_txt("sel._domainkey.long.test") == [long]
