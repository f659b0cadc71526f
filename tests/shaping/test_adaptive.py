"""Adaptive throttling as policy: provider answers suspend or slow a (source, site)
pair, deferrals put it in backoff and halve its rate, successes win it back, and
everything expires."""

from __future__ import annotations

import pytest

from postwarden.shaping.adaptive import (
    DEFAULT_AIMD,
    UNLIMITED,
    Aimd,
    PairState,
    connect_at,
    in_backoff,
    normal_at,
    observe,
    observed_rate,
    on_answer,
    on_success,
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
        on_success(s, now=10 + t)
    assert s.rate == 50.0  # back to the rules' limit, never above it
    for t in range(200):
        on_answer(s, now=200 + t, site="mx:x.test", code=421, enhanced="4.4.2", text="")
    assert s.rate == pytest.approx(1 / 10)  # the floor: one probe per retry interval


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


def defer(s: PairState, now: float, aimd: Aimd = DEFAULT_AIMD) -> None:
    on_answer(s, now=now, site="mx:x.test", code=421, enhanced="4.7.0", text="slow down", aimd=aimd)


def test_an_unrated_pair_backs_off_from_the_rate_it_was_seen_to_deliver_at() -> None:
    s = PairState(limit_rate=UNLIMITED, limit_connections=32)
    for i in range(100):  # 10 messages a second for 10 s
        observe(s, 1000 + i / 10)
    assert observed_rate(s, 1010) == pytest.approx(10.0, rel=0.05)
    defer(s, 1010)
    # Not a million a second halved: half what it delivered at, and in backoff.
    assert s.rate == pytest.approx(5.0, rel=0.05) and in_backoff(s)
    assert s.changes[-1][1].startswith("backoff")
    # A site that refused from the first message: the floor, one probe per 10 s.
    r = PairState(limit_rate=UNLIMITED, limit_connections=32)
    defer(r, 1000)
    assert r.rate == pytest.approx(1 / 10)


def test_a_greylisting_deferral_is_no_push_back() -> None:
    s = PairState(limit_rate=UNLIMITED, limit_connections=32)
    on_answer(s, now=5, site="x", code=451, enhanced="4.7.1", text="greylisted", adaptive=False)
    assert not in_backoff(s) and s.rate == UNLIMITED


def test_connections_are_paced_in_backoff() -> None:
    s = PairState(limit_rate=UNLIMITED, limit_connections=32)
    assert connect_at(s, 1000) == 1000  # not in backoff: at once
    now = 1000.0
    attempts = 0
    # A site answering 421 to every attempt for 60 s: each allowed connection is
    # refused, and the next one waits for the pace in force.
    while now < 1060:
        at = connect_at(s, now)
        if at <= now:
            attempts += 1
            s.last_connect = now
            defer(s, now)
        now += 0.05
    assert attempts <= 7, attempts  # one per 10 s, not one per 50 ms
    # Probes go on while it pushes back: the backoff does not end.
    assert in_backoff(s) and normal_at(s) == pytest.approx(s.pushback_at + 30)


def test_recovery_doubles_per_quiet_window_and_ends_within_the_to_normal_time() -> None:
    s = PairState(limit_rate=5.0, limit_connections=10)
    for t in range(5):
        defer(s, 1000 + t)
    assert s.rate == pytest.approx(5 / 32)
    last = s.pushback_at
    # Successes just after the push-back: no increase until a window has passed.
    on_success(s, now=last + 1)
    assert s.rate == pytest.approx(5 / 32)
    now = last
    while s.rate < 5.0:
        now += 0.5
        on_success(s, now=now)
    # 5 doublings, one per 5 s window: full rate 25 s after the last push-back.
    assert now - last == pytest.approx(25.0)
    assert in_backoff(s)  # still, until 30 s without push-back
    on_success(s, now=last + 30)
    assert not in_backoff(s) and s.changes[-1][1].startswith("normal")


def test_full_rate_returns_after_to_normal_after_even_without_successes() -> None:
    aimd = Aimd(decrease=0.25, retry_interval=2.0, to_normal_after=12.0)
    s = PairState(limit_rate=5.0, limit_connections=10)
    defer(s, 1000, aimd)
    assert s.rate == pytest.approx(1.25)  # the site's backoff_rate
    for t in range(1, 10):
        defer(s, 1000 + t, aimd)
    assert s.rate == pytest.approx(0.5)  # the floor: one probe per 2 s
    assert connect_at(s, 1011.0, aimd) == 1011.0  # the probe is due
    assert normal_at(s, aimd) == 1021.0
    assert connect_at(s, 1021.0, aimd) == 1021.0 and not in_backoff(s)
    assert s.rate == 5.0


def test_a_lowering_rule_in_force_keeps_its_rate_when_the_backoff_ends() -> None:
    s = PairState(limit_rate=50.0, limit_connections=20)
    defer(s, 1000)
    hit = on_answer(s, now=1001, site="gmail", code=421, enhanced="4.7.0", text="unusual rate")
    assert hit is not None and hit.action == "lower_rate"
    lowered = s.rate
    on_success(s, now=1040)  # 39 s without push-back: the backoff ends, the rule holds
    assert not in_backoff(s) and s.rate == lowered
