"""Adaptive throttling as policy: provider answers suspend or slow a (source, site)
pair, deferrals halve its rate, successes win it back, and everything expires."""

from __future__ import annotations

import pytest

from postwarden.shaping.adaptive import (
    PairState,
    on_answer,
    on_success_window,
    rule,
    suspended,
)


def gmail_pair() -> PairState:
    return PairState(limit_rate=50.0, limit_connections=20)


def test_gmail_421_4_7_28_suspends_then_expires_without_bouncing() -> None:
    s = gmail_pair()
    hit = on_answer(
        s,
        now=0,
        site="gmail",
        code=421,
        enhanced="4.7.28",
        text="Our system has detected an unusual rate of unsolicited mail",
    )
    assert hit is not None and hit.action == "suspend"
    assert suspended(s, 1) and suspended(s, 1799) and not suspended(s, 1800)
    assert "gmail-rate-limited" in s.reason
    # The same answer elsewhere is not Gmail's rule.
    other = gmail_pair()
    assert on_answer(other, now=0, site="mx:b.test", code=421, enhanced="4.7.28", text="") is None
    assert not suspended(other, 1)


def test_yahoo_and_microsoft_answers() -> None:
    y = gmail_pair()
    assert (
        on_answer(
            y,
            now=0,
            site="yahoo",
            code=421,
            enhanced="4.7.0",
            text="[TS03] All messages from 192.0.2.1 will be permanently deferred",
        ).action
        == "suspend"
    )  # type: ignore[union-attr]
    m = gmail_pair()
    hit = on_answer(
        m,
        now=0,
        site="microsoft",
        code=451,
        enhanced="4.7.650",
        text="The mail server IP connecting to Outlook.com server has exceeded the rate limit",
    )
    assert hit is not None and hit.name == "microsoft-4.7.650"
    c = gmail_pair()
    hit = on_answer(
        c,
        now=0,
        site="mx:x.test",
        code=421,
        enhanced="4.7.0",
        text="Too many connections from your IP",
    )
    assert hit is not None and c.connections == 10
    c_later = c.connections
    on_answer(c, now=901, site="mx:x.test", code=250, enhanced="2.0.0", text="ok")
    assert c_later == 10 and c.connections == 20  # the lowering expired


def test_deferrals_halve_and_successes_recover_within_limits() -> None:
    s = gmail_pair()
    for t in range(3):
        on_answer(s, now=t, site="mx:x.test", code=451, enhanced="4.3.0", text="try later")
    assert s.rate == pytest.approx(50 / 8)
    for t in range(100):
        on_success_window(s, now=10 + t)
    assert s.rate == 50.0  # back to the rules' limit, never above it
    for t in range(200):
        on_answer(s, now=200 + t, site="mx:x.test", code=421, enhanced="4.4.2", text="")
    assert s.rate == pytest.approx(1 / 60)  # the floor


def test_changes_are_recorded_with_reasons() -> None:
    s = gmail_pair()
    on_answer(s, now=5, site="gmail", code=421, enhanced="4.7.28", text="slow down")
    on_answer(s, now=2000, site="gmail", code=250, enhanced="2.0.0", text="ok")
    whats = [w for _, w, _ in s.changes]
    assert whats[0].startswith("suspend") and "resume" in whats


def test_rule_validation() -> None:
    with pytest.raises(ValueError, match="action"):
        rule("x", "explode", 60, code=421)
    with pytest.raises(ValueError, match="at least one"):
        rule("x", "suspend", 60)
    r = rule("prefix", "suspend", 60, enhanced="4.7.")
    assert r.matches("any", 421, "4.7.1", "") and not r.matches("any", 421, "4.4.1", "")
