"""The shaping broker as policy: limits hold whoever asks, suspensions and AIMD show in
the grants, and a holder that goes away frees its slots (a driven clock)."""

from __future__ import annotations

from postwarden.config import SourceConfig
from postwarden.shaping.broker import Broker
from postwarden.shaping.grants import Choice
from postwarden.shaping.rules import parse_rules, shipped_rules

RULES = parse_rules(
    '[sites.lab]\nmx_suffixes = ["lab.test"]\nconnection_limit = 3\n'
    'max_message_rate = "120/min"\nmax_connection_rate = "600/min"\n'
    '[domains."tiny.test"]\nconnection_limit = 1\n',
    "t.toml",
    shipped_rules(),
)


SOURCES = {ip: SourceConfig(ip, ip) for ip in ("10.0.0.1", "10.0.0.2")}


def connect(b: Broker, holder: str, source: str, site: str, domain: str | None = None) -> Choice:
    """A connection slot from ``source`` alone (a pool of one)."""
    return b.choose(holder, "p", [(source, 1)], "wait", site, domain)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_connection_limit_holds_across_holders() -> None:
    b = Broker(RULES, clock=Clock(), sources=SOURCES)
    grants = [connect(b, w, "10.0.0.1", "lab") for w in ("w0", "w1", "w0", "w1")]
    assert [g.ok for g in grants] == [True, True, True, False]
    assert (grants[3].reason, grants[3].kind) == ("connection limit", "connection_limit")
    b.release("w1", "p", "10.0.0.1", "lab")
    assert connect(b, "w1", "10.0.0.1", "lab").ok
    # Another source has its own budget; a domain with its own limit its own pair.
    assert connect(b, "w0", "10.0.0.2", "lab").ok
    assert connect(b, "w0", "10.0.0.1", "lab", "tiny.test").ok
    assert not connect(b, "w1", "10.0.0.1", "lab", "tiny.test").ok
    # A worker that dies gives its slots back.
    b.drop_holder("w0")
    assert sum(p.in_use for p in b.pairs.values()) == 1  # w1's one lab slot


def test_message_rate_holds_over_a_minute() -> None:
    clock = Clock()
    b = Broker(RULES, clock=clock)
    sent = 0
    for _ in range(600):  # a greedy worker asking 10 times a second for a minute
        g = b.take("w0", "10.0.0.1", "lab", 50)
        sent += g.tokens
        clock.t += 0.1
    assert 118 <= sent <= 122  # 120/min, plus at most the one-second burst


def test_421_storm_suspends_only_that_pair_and_recovers() -> None:
    clock = Clock()
    b = Broker(RULES, clock=clock, sources=SOURCES)
    for _ in range(5):
        b.report("10.0.0.1", "gmail", 421, "4.7.28", "rate limited")
    g = connect(b, "w0", "10.0.0.1", "gmail")
    assert not g.ok and g.kind == "suspended" and g.retry_at == clock.t + 1800
    assert "10.0.0.1: suspended (gmail-rate-limited" in g.reason
    assert connect(b, "w0", "10.0.0.2", "gmail").ok  # another source
    assert connect(b, "w0", "10.0.0.1", "lab").ok  # another site
    clock.t += 1800
    assert connect(b, "w0", "10.0.0.1", "gmail").ok


def test_deferrals_slow_the_grants_and_successes_restore_them() -> None:
    clock = Clock()
    b = Broker(RULES, clock=clock)
    for _ in range(3):
        b.report("10.0.0.1", "lab", 451, "4.3.0", "try again")
        clock.t += 1.0  # one decrease a second at most
    pair = b.pair("10.0.0.1", "lab")
    assert pair.state.rate == 2.0 / 8
    sent = 0
    for _ in range(200):  # 20 s, within the backoff (30 s without push-back ends it)
        sent += b.take("w0", "10.0.0.1", "lab", 50).tokens
        clock.t += 0.1
    assert sent <= 6  # 15/min now
    for _ in range(200):  # successes for a while: the rate climbs back to the limit
        b.report("10.0.0.1", "lab", 250, "2.0.0", "ok")
        clock.t += 1.0
    assert pair.state.rate == 2.0
    assert b.status()[0]["rate_per_min"] == 120.0
