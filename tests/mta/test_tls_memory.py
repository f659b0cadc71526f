"""The memory of failed STARTTLS handshakes is bounded and forgets after its ttl."""

from __future__ import annotations

from postwarden.mta.delivery import TLS_BROKEN_MAX, DeliveryAgent, ExpiringSet


def test_entries_expire_after_the_ttl() -> None:
    s = ExpiringSet(ttl=10.0, max_entries=100)
    s.add("192.0.2.1", now=0.0)
    assert ("192.0.2.1", 9.9) in s
    assert ("192.0.2.1", 10.0) not in s
    assert len(s) == 0  # looked up after expiry: gone


def test_it_never_holds_more_than_its_bound() -> None:
    s = ExpiringSet(ttl=3600.0, max_entries=1000)
    for i in range(50_000):
        s.add(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", now=float(i) / 1000)
    assert len(s) == 1000
    assert ("10.0.195.79", 50.0) in s  # the newest kept
    assert ("10.0.0.0", 50.0) not in s  # the oldest forgotten


def test_expired_entries_go_when_new_ones_come() -> None:
    s = ExpiringSet(ttl=1.0, max_entries=100)
    for i in range(10):
        s.add(str(i), now=0.0)
    s.add("late", now=5.0)
    assert len(s) == 1


def test_the_agent_uses_a_bounded_memory() -> None:
    from postwarden.config import load_config

    agent = DeliveryAgent(load_config(None, environ={}), resolver=None, read_body=bytes)  # type: ignore[arg-type]
    assert isinstance(agent._tls_broken, ExpiringSet)
    assert agent._tls_broken.max_entries == TLS_BROKEN_MAX
