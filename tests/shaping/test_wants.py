"""Slots across holders (issue 17, item 3), on the broker with a driven clock: a
transactional request waiting for a slot holds bulk requests back and is told of the
connections to the site; the holders of those connections hear it; a freed slot is
told to whoever waits; idle connections are asked to give way when the source whose
turn it is has no free slot; transactional connections take tokens first."""

from __future__ import annotations

from typing import Any

from postwarden.config import SourceConfig
from postwarden.shaping.broker import Broker
from postwarden.shaping.rules import parse_rules, shipped_rules
from postwarden.shaping.wants import BULK, HIGH, WANT_TTL, deliver
from tests.shaping.test_choose import Clock

SOURCES = {n: SourceConfig(n, f"10.0.0.{i}") for i, n in enumerate(("a", "b"), 1)}
RULES = parse_rules(
    '[sites.lab]\nmx_suffixes = ["lab.test"]\nconnection_limit = 1\n'
    'max_message_rate = "60/min"\n',
    "t.toml",
    shipped_rules(),
)  # fmt: skip


class Worker:
    """A holder that keeps what the broker pushes to it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.heard: list[dict[str, Any]] = []

    def push(self, msg: dict[str, Any]) -> None:
        self.heard.append(msg)

    def __repr__(self) -> str:
        return self.name


def make() -> tuple[Broker, Clock]:
    clock = Clock()
    return Broker(RULES, clock=clock, sources=SOURCES), clock


def flush(b: Broker) -> None:
    deliver(b.wants.take_outbox())


def test_transactional_request_holds_bulk_back_and_is_told_to_slot_holders() -> None:
    b, _clock = make()
    bulk, tx = Worker("bulk"), Worker("tx")
    one = [("a", 1)]
    assert b.choose(bulk, "p", one, "spill", "lab", lane=BULK).ok
    # The transactional worker finds the only slot taken: refused, and the holder of
    # the connection hears that transactional mail wants source a there.
    no = b.choose(tx, "p", one, "spill", "lab", lane=HIGH)
    assert not no.ok and no.kind == "connection_limit"
    flush(b)
    assert bulk.heard == [{"push": "wanted", "site": "lab", "high": ["a"], "any": ["a"]}]
    # The bulk connection gives way; the bulk worker asks again at once: refused,
    # though the slot is free, while the transactional request waits.
    b.release(bulk, "p", "a", "lab", sent=3)
    flush(b)
    assert tx.heard == [{"push": "freed", "site": "lab"}]
    again = b.choose(bulk, "p", one, "spill", "lab", lane=BULK)
    assert not again.ok and "transactional mail waits" in again.reason
    assert b.choose(tx, "p", one, "spill", "lab", lane=HIGH).ok
    flush(b)
    # Met: the bulk worker hears that transactional mail no longer waits (only its
    # own bulk request does), and is refused only for the slot now taken.
    assert bulk.heard[-1] == {"push": "wanted", "site": "lab", "high": [], "any": ["a"]}
    assert b.choose(bulk, "p", one, "spill", "lab", lane=BULK).reason == "connection limit"
    b.release(tx, "p", "a", "lab", sent=1)
    assert b.choose(bulk, "p", one, "spill", "lab", lane=BULK).ok


def test_a_want_lapses_and_goes_with_its_holder() -> None:
    b, clock = make()
    bulk, tx = Worker("bulk"), Worker("tx")
    one = [("a", 1)]
    assert b.choose(bulk, "p", one, "spill", "lab", lane=BULK).ok
    assert not b.choose(tx, "p", one, "spill", "lab", lane=HIGH).ok
    b.release(bulk, "p", "a", "lab")
    clock.t += WANT_TTL + 0.01  # the transactional worker stopped asking
    assert b.choose(bulk, "p", one, "spill", "lab", lane=BULK).ok
    # A worker that goes away takes its wants with it.
    b2, _clock = make()
    assert b2.choose(bulk, "p", one, "spill", "lab", lane=BULK).ok
    assert not b2.choose(tx, "p", one, "spill", "lab", lane=HIGH).ok
    b2.release(bulk, "p", "a", "lab")
    b2.drop_holder(tx)
    assert b2.choose(bulk, "p", one, "spill", "lab", lane=BULK).ok


def test_bulk_goes_on_from_sources_the_transactional_request_does_not_use() -> None:
    b, _clock = make()
    bulk, tx = Worker("bulk"), Worker("tx")
    assert b.choose(bulk, "p", [("a", 1)], "spill", "lab", lane=BULK).ok
    assert not b.choose(tx, "p", [("a", 1)], "spill", "lab", lane=HIGH).ok
    # Another pool, another source: nothing waits for b.
    c = b.choose(bulk, "q", [("b", 1)], "spill", "lab", lane=BULK)
    assert c.ok and c.source == "b"


def test_idle_connections_of_the_source_whose_turn_it_is_are_asked_to_give_way() -> None:
    b, clock = make()
    w1, w2 = Worker("w1"), Worker("w2")
    both = [("a", 3), ("b", 1)]
    b.balancer.add("p", "lab", "b", 0.5, clock.t)  # a is behind its share: a's turn
    assert b.choose(w1, "p", both, "spill", "lab", lane=BULK).source == "a"
    # w2's turn is a again, but its slot is taken: w2 gets b, and w1 (holding a's
    # connection, perhaps idle) hears that a request wants a. Not a transactional
    # one: only an idle connection gives way for it.
    assert b.choose(w2, "p", both, "spill", "lab", lane=BULK).source == "b"
    flush(b)
    assert w1.heard == [{"push": "wanted", "site": "lab", "high": [], "any": ["a"]}]
    # Said again only after a while, not at every request.
    b.release(w2, "p", "b", "lab")
    assert b.choose(w2, "p", both, "spill", "lab", lane=BULK).source == "b"
    flush(b)
    assert len(w1.heard) == 1


def test_a_source_ahead_of_its_share_waits_for_the_busy_one() -> None:
    b, clock = make()
    w1, w2 = Worker("w1"), Worker("w2")
    both = [("a", 3), ("b", 1)]
    b.balancer.add("p", "lab", "b", 40, clock.t)  # b carried 40 lately, a nothing
    b.balancer.add("p", "lab", "a", 90, clock.t)  # 30 per unit of weight: a's turn
    assert b.choose(w1, "p", both, "spill", "lab", lane=BULK).source == "a"
    # a has no free slot; b is ahead of its share (40 > 31 a unit): the request
    # waits for a, rather than carry the pool's mail from the wrong address.
    no = b.choose(w2, "p", both, "spill", "lab", lane=BULK)
    assert not no.ok and no.kind == "connection_limit"
    # Once a has carried its share (150 / 3 = 50 a unit), it is b's turn.
    b.release(w1, "p", "a", "lab", sent=60)
    assert b.choose(w2, "p", both, "spill", "lab", lane=BULK).source == "b"


def test_transactional_connections_take_tokens_first() -> None:
    b, clock = make()
    bulk, tx = Worker("bulk"), Worker("tx")
    # One token a second; the bulk connection took this second's as it opened.
    assert b.choose(bulk, "p", [("a", 1)], "spill", "lab", lane=BULK).tokens == 1
    b.release(bulk, "p", "a", "lab")
    no = b.take(tx, "a", "lab", 1, lane=HIGH)
    assert not no.ok and no.kind == "message_rate"
    # When the token comes, bulk waits for the transactional connection to take it.
    clock.t = no.retry_at
    held = b.take(bulk, "a", "lab", 1, lane=BULK)
    assert not held.ok and "transactional mail first" in held.reason
    assert b.take(tx, "a", "lab", 1, lane=HIGH).ok
    clock.t = held.retry_at + 1.0
    assert b.take(bulk, "a", "lab", 1, lane=BULK).ok
