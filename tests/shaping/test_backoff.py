"""Backoff in the broker (a driven clock): a site without a rate backs off from what
it was seen to deliver, connections are paced while a site pushes back, refusals say
honestly when to come back, and full rate returns once the push-back stops."""

from __future__ import annotations

import pytest

from postwarden.config import SourceConfig
from postwarden.shaping.broker import UNLIMITED_RATE, Broker
from postwarden.shaping.grants import Choice
from postwarden.shaping.rules import parse_rules, shipped_rules
from tests.shaping.test_broker import Clock

RULES = parse_rules(
    '[sites.lab]\nmx_suffixes = ["lab.test"]\nconnection_limit = 3\n'
    'max_message_rate = "120/min"\n'
    '[sites.slow]\nmx_suffixes = ["slow.test"]\nmax_message_rate = "120/min"\n'
    'backoff_rate = 0.25\nbackoff_retry_interval = "4s"\nbackoff_to_normal_after = "20s"\n',
    "t.toml",
    shipped_rules(),
)
SOURCES = {ip: SourceConfig(ip, ip) for ip in ("10.0.0.1", "10.0.0.2")}
SITE = "mx:mx.unrated.test"  # a site the rules give no rate


def connect(b: Broker, holder: str = "w0", source: str = "10.0.0.1", site: str = SITE) -> Choice:
    return b.choose(holder, "p", [(source, 1)], "wait", site)


def refused(b: Broker, source: str = "10.0.0.1", site: str = SITE) -> None:
    b.report(source, site, 421, "4.7.0", "Try again later, closing connection")


def test_an_unrated_site_answering_421_gets_a_few_attempts_a_minute() -> None:
    clock = Clock()
    b = Broker(RULES, clock=clock, sources=SOURCES)
    c = connect(b)
    assert c.ok and not c.metered  # no rate: costs nothing per message
    b.release("w0", "p", "10.0.0.1", SITE)
    attempts = 0
    start = clock.t
    while clock.t < start + 60:  # a scheduler asking again whenever it may
        c = connect(b)
        if c.ok:
            attempts += 1
            refused(b)
            b.release("w0", "p", "10.0.0.1", SITE)
        else:
            assert c.kind == "connection_rate" and "backoff" in c.reason
            assert clock.t < c.retry_at <= clock.t + 10  # honest, never a minute
        clock.t += 0.02
    # Without pacing, this loop would have connected 3000 times.
    assert attempts <= 7, attempts
    p = b.pair("10.0.0.1", SITE)
    assert p.state.rate == pytest.approx(0.1)  # the floor: one message per 10 s
    status = b.status()[0]
    assert status["rate_limited"] and status["backoff"]
    assert status["rate_per_min"] == 6.0 and status["backoff_normal_in"] > 0


def test_an_unrated_site_starts_from_its_observed_rate_and_tokens_apply() -> None:
    clock = Clock()
    b = Broker(RULES, clock=clock, sources=SOURCES)
    for _ in range(200):  # 20 messages a second for 10 s, unmetered
        b.report("10.0.0.1", SITE, 250, "2.0.0", "ok")
        clock.t += 0.05
    refused(b)
    p = b.pair("10.0.0.1", SITE)
    assert p.state.limit_rate == UNLIMITED_RATE
    assert p.state.rate == pytest.approx(10.0, rel=0.05)  # half the 20/s it delivered
    c = connect(b)
    assert c.ok and c.metered  # tokens apply now
    granted = c.tokens
    for _ in range(20):  # 2 s of a greedy connection
        granted += b.take("w0", "10.0.0.1", SITE, 50).tokens
        clock.t += 0.1
    assert 15 <= granted <= 32, granted  # ~10/s plus the one-second burst


def test_a_refusal_comes_back_when_the_backoff_ends_not_later() -> None:
    clock = Clock()
    b = Broker(RULES, clock=clock, sources=SOURCES)
    for _ in range(8):  # push-back for 8 s: the lab pair at its floor
        refused(b, site="lab")
        clock.t += 1.0
    p = b.pair("10.0.0.1", "lab")
    assert p.state.rate == pytest.approx(0.1)
    last = p.state.pushback_at
    clock.t = last + 25.5  # quiet since; the backoff ends at last + 30
    while b.take("w0", "10.0.0.1", "lab", 1).ok:  # use up the bucket
        pass
    g = b.take("w0", "10.0.0.1", "lab", 1)
    assert not g.ok and g.kind == "message_rate"
    assert g.retry_at <= last + 30  # not 10 s at the floor's pace
    clock.t = g.retry_at
    g = b.take("w0", "10.0.0.1", "lab", 5)
    assert g.ok  # the full rate is back, and so is the next message
    assert p.state.rate == 2.0 and not b.status()[0]["backoff"]


def test_recovery_reaches_the_limit_within_a_minute_of_the_last_push_back() -> None:
    clock = Clock()
    b = Broker(RULES, clock=clock, sources=SOURCES)
    for _ in range(10):
        refused(b, site="lab")
        clock.t += 1.0
    p = b.pair("10.0.0.1", "lab")
    last = p.state.pushback_at
    rates = []
    # Mail flows as the broker allows it; every message is delivered.
    while p.state.rate < 2.0:
        g = b.take("w0", "10.0.0.1", "lab", 1)
        if g.ok:
            b.report("10.0.0.1", "lab", 250, "2.0.0", "ok")
            rates.append(p.state.rate)
        clock.t += 0.05
    assert clock.t - last <= 30.5  # at worst when the backoff ends
    assert sorted(rates) == rates  # it only ever went up


def test_site_backoff_settings_apply_to_its_pairs() -> None:
    clock = Clock()
    b = Broker(RULES, clock=clock, sources=SOURCES)
    refused(b, site="slow")
    p = b.pair("10.0.0.1", "slow")
    assert p.state.rate == pytest.approx(0.5)  # 2/s times backoff_rate 0.25
    for _ in range(5):
        clock.t += 1.0
        refused(b, site="slow")
    assert p.state.rate == pytest.approx(0.25)  # floor: one per backoff_retry_interval 4 s
    assert connect(b, site="slow").ok
    c = connect(b, site="slow")
    assert not c.ok and c.retry_at == pytest.approx(clock.t + 4.0)
    clock.t = p.state.pushback_at + 20  # backoff_to_normal_after
    b.release("w0", "p", "10.0.0.1", "slow")
    assert connect(b, site="slow").ok and p.state.rate == 2.0


def test_a_paced_source_gives_way_to_the_others_of_the_pool() -> None:
    clock = Clock()
    b = Broker(RULES, clock=clock, sources=SOURCES)
    members = [("10.0.0.1", 1), ("10.0.0.2", 1)]
    c = b.choose("w0", "p", members, "spill", SITE)
    assert c.ok
    refused(b, source=c.source)
    b.release("w0", "p", c.source, SITE)
    other = next(n for n, _w in members if n != c.source)
    for _ in range(5):  # the paced one is passed over, not waited for
        d = b.choose("w0", "p", members, "spill", SITE)
        assert d.ok and d.source == other
        b.release("w0", "p", other, SITE, sent=1)


def test_a_reload_keeps_the_backoff() -> None:
    clock = Clock()
    b = Broker(RULES, clock=clock, sources=SOURCES)
    refused(b)
    assert connect(b).ok
    b.reconfigure(RULES)
    p = b.pair("10.0.0.1", SITE)
    assert p.state.backoff_since and p.state.rate == pytest.approx(0.1)
    assert not connect(b).ok  # still paced
