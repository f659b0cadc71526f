"""The broker's choice of a source (weights, pauses, suspensions, warming caps with
overflow wait/spill, bounce rules) and what a reload keeps (a driven clock)."""

from __future__ import annotations

from postwarden.config import SourceConfig
from postwarden.shaping.adaptive import rule
from postwarden.shaping.broker import Broker
from postwarden.shaping.rules import parse_rules, shipped_rules
from postwarden.warming.book import WarmingBook, plan_from

RULES = parse_rules(
    '[sites.lab]\nmx_suffixes = ["lab.test"]\nconnection_limit = 50\n', "t.toml", shipped_rules()
)
SOURCES = {n: SourceConfig(n, f"10.0.0.{i}") for i, n in enumerate(("a", "b", "c"), 1)}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def broker(**kw: object) -> tuple[Broker, Clock, WarmingBook]:
    clock = Clock()
    book = WarmingBook("UTC", wall=lambda: 1_700_000_000.0 + clock.t)
    return Broker(RULES, clock=clock, sources=SOURCES, book=book, **kw), clock, book  # type: ignore[arg-type]


def test_messages_follow_the_weights() -> None:
    b, clock, _book = broker()
    members = [("a", 3), ("b", 1)]
    for _ in range(400):
        c = b.choose("w", "p", members, "wait", "lab")
        assert c.ok
        b.release("w", "p", c.source, "lab", sent=5)
    sent = b.balancer.sent
    assert sent("p", "lab", "a", clock.t) == 3 * sent("p", "lab", "b", clock.t)


def test_paused_and_suspended_sources_are_passed_over() -> None:
    b, clock, book = broker()
    members = [("a", 1), ("b", 1)]
    book.pause("source:a", "by hand")
    for _ in range(5):
        c = b.choose("w", "p", members, "wait", "lab")
        assert c.source == "b"
        b.release("w", "p", "b", "lab", sent=1)
    b.report("b", "gmail", 421, "4.7.28", "slow down")
    c = b.choose("w", "p", members, "wait", "gmail")
    assert not c.ok and "a: paused (by hand)" in c.reason and "b: suspended" in c.reason
    assert c.retry_at == clock.t + 60.0  # the pause is asked about again first
    book.resume("source:a")
    assert b.choose("w", "p", members, "wait", "gmail").source == "a"


def test_warming_cap_wait_defers_its_share_spill_gives_it_away() -> None:
    b, _clock, book = broker()
    book.start("source:c", plan_from({"name": "t", "days": [2, 4]}))
    members = [("a", 1), ("c", 1)]
    c = b.choose("w", "p", members, "wait", "lab", want=5)
    while c.source != "c":
        b.release("w", "p", c.source, "lab", sent=1)
        c = b.choose("w", "p", members, "wait", "lab", want=5)
    assert c.metered and c.tokens == 2  # the day's cap, granted up front
    b.release("w", "p", "c", "lab", sent=2)
    # Capped: with "wait", c's share waits for its next day: its weight's part of the
    # 10 queued (5), not what a connection would carry ...
    seen = set()
    for _ in range(6):
        c = b.choose("w", "p", members, "wait", "lab", want=5, queued=10)
        if c.ok:
            seen.add(c.source)
            b.release("w", "p", c.source, "lab", sent=5)
        else:
            assert c.defer == 5 and c.reason == "warming cap reached: c"
            seen.add("deferred")
    assert seen == {"a", "deferred"}
    # ... with "spill", a carries it all.
    assert all(b.choose("w", "p", members, "spill", "lab").source == "a" for _ in range(5))


def test_bounce_rule_and_a_reload_that_keeps_what_answers_did() -> None:
    rules = (rule("lab-bounce", "bounce", 60, text="blocked", sites=["lab"]), *RULES.responses)
    b, _clock, _book = broker(response_rules=rules)
    b.report("a", "lab", 554, "5.7.1", "blocked for spam")
    c = b.choose("w", "p", [("a", 1)], "wait", "lab")
    assert not c.ok and c.bounce.startswith("554 5.7.1")
    b.report("b", "lab", 451, "4.3.0", "busy")  # AIMD: b's rate halves
    lowered = b.pair("b", "lab").state.rate
    new = parse_rules(
        '[sites.lab]\nmx_suffixes = ["lab.test"]\nconnection_limit = 7\n', "t.toml", shipped_rules()
    )
    b.reconfigure(new)
    assert b.pair("b", "lab").state.rate == lowered
    assert b.pair("a", "lab").state.connections == 7  # not lowered: the new limit
    assert not b.choose("w", "p", [("a", 1)], "wait", "lab").ok  # the bounce rule holds


def test_a_warming_sending_domain_is_capped_whatever_the_source() -> None:
    b, _clock, book = broker()
    book.start("domain:news.example", plan_from({"name": "t", "days": [3, 6]}))
    assert b.warming_domains() == ["news.example"]
    got = 0
    for src in ("a", "b", "a", "b", "a"):
        g = b.take("w", src, "lab", 1, sending_domain="News.Example")
        got += g.tokens
        if not g.ok:
            assert g.reason == "domain warming cap reached: News.Example"
    assert got == 3
    assert b.take("w", "a", "lab", 1, sending_domain="other.example").ok  # not warming
    book.pause("domain:news.example", "complaints")
    g = b.take("w", "a", "lab", 1, sending_domain="news.example")
    assert not g.ok and g.reason.startswith("domain paused")
