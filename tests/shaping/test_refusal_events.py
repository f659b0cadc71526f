"""A refused connection is one event (issue 17, item 2): a rule already holding the
pair is not taken again, throttling never counts against warming health, and the
broker's word on a source after a refusal (a driven clock)."""

from __future__ import annotations

from postwarden.shaping.adaptive import rule
from postwarden.warming.book import plan_from
from tests.shaping.test_choose import RULES, broker

TS03 = rule("lab-ts03", "suspend", 3600, text="TS03", sites=["lab"])


def test_a_rule_in_force_is_one_action_however_many_answers_repeat_it() -> None:
    b, clock, _book = broker(response_rules=(TS03, *RULES.responses))
    for _ in range(50):  # the greetings of connections opened before the first answer
        b.report("a", "lab", 421, "4.7.0", "[TS03] deferred", throttled=3)
    assert [a["rule"] for a in b.actions] == ["lab-ts03"] and b.action_count == 1
    b.report("b", "lab", 421, "4.7.0", "[TS03] deferred", throttled=1)  # another pair
    assert [a["source"] for a in b.actions] == ["a", "b"]
    clock.t += 3601  # the suspension ran out: the next TS03 is a new action
    b.report("a", "lab", 421, "4.7.0", "[TS03] deferred", throttled=1)
    assert len(b.actions) == 3


def test_throttling_is_not_a_failed_attempt_and_never_pauses() -> None:
    b, _clock, book = broker(response_rules=(TS03, *RULES.responses))
    book.thresholds = type(book.thresholds)(min_volume=5)
    book.start("source:a", plan_from({"name": "t", "days": [1000]}))
    for _ in range(98):  # 98 refused connections
        b.report("a", "lab", 421, "4.7.0", "too fast", throttled=1)
    assert not book.is_paused("source:a")
    score, tier = book.health("source:a")
    assert (score, tier) == (100.0, "excellent")
    w = book.progress("source:a")["health"]["window"]
    assert (w["attempted"], w["throttled"]) == (0, 98)
    # Failures that are failures still count, and a pause comes with a non-good tier.
    b.report("a", "lab", 250, "2.0.0", "ok", delivered=4)
    b.report("a", "lab", 451, "4.3.0", "busy", deferred=2)
    why = book.is_paused("source:a")
    assert why.startswith("auto: delivery rate")
    assert book.health("source:a")[1] not in ("excellent", "good")


def test_the_brokers_word_on_a_source_after_a_refusal() -> None:
    b, clock, book = broker(response_rules=(TS03, *RULES.responses))
    assert b.refusal("a", "lab").ok
    b.report("a", "lab", 421, "4.7.0", "[TS03] deferred", throttled=1)
    no = b.refusal("a", "lab")
    assert not no.ok and no.kind == "suspended" and no.retry_at == clock.t + 3600
    assert b.refusal("b", "lab").ok  # the others are fine
    b.report("b", "lab", 421, "4.7.0", "slow down", throttled=1)  # no rule: AIMD only
    assert b.refusal("b", "lab").ok
    book.start("source:c", plan_from({"name": "t", "days": [1, 2]}))
    book.charge("source:c", 1, "lab")
    assert b.refusal("c", "lab").kind == "warming_cap"
    book.pause("source:b", "operator")
    assert b.refusal("b", "lab").kind == "paused"
