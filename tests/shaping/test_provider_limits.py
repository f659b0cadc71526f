"""A provider's limits across the whole pool (rules: provider_connection_limit,
provider_max_message_rate): per-source limits multiply with the sources, these do not.
Broker on a driven clock, then a real appliance with two source addresses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from postwarden.lab import Lab
from postwarden.shaping.broker import Broker
from postwarden.shaping.rules import RulesError, parse_rules, shipped_rules
from tests.conftest import ApplianceFactory
from tests.shaping.recsink import RecordingSink
from tests.shaping.test_choose import SOURCES, Clock
from tests.shaping.test_lab_shaping import SRC_A, SRC_B, send, shaping_config
from tests.waiting import eventually

RULES = parse_rules(
    '[sites.lab]\nmx_suffixes = ["lab.test"]\nconnection_limit = 10\n'
    'max_message_rate = "100/s"\nprovider_connection_limit = 3\n'
    'provider_max_message_rate = "20/s"\n',
    "t.toml",
    shipped_rules(),
)
MEMBERS = [("a", 1), ("b", 1), ("c", 1)]


def test_connections_across_sources_stop_at_the_provider_limit() -> None:
    clock = Clock()
    b = Broker(RULES, clock=clock, sources=SOURCES)
    granted = [b.choose("w", "p", MEMBERS, "spill", "lab") for _ in range(3)]
    assert all(c.ok for c in granted) and len({c.source for c in granted}) == 3
    no = b.choose("w", "p", MEMBERS, "spill", "lab")
    assert not no.ok and no.kind == "connection_limit" and "provider" in no.reason
    assert b.choose("w", "p", MEMBERS, "spill", "other").ok  # another site: its own
    b.release("w", "p", granted[0].source, "lab")
    assert b.choose("w", "p", MEMBERS, "spill", "lab").ok
    b.drop_holder("w")  # a worker gone: its slots count no more
    assert b.choose("w2", "p", MEMBERS, "spill", "lab").ok


def test_messages_across_sources_share_the_provider_rate() -> None:
    clock = Clock()
    b = Broker(RULES, clock=clock, sources=SOURCES)
    got = 0
    for src in ("a", "b", "c"):
        g = b.take("w", src, "lab", 50)
        got += g.tokens if g.ok else 0
    assert got == 20  # a second's worth of the provider's 20/s, not 3 x 100
    no = b.take("w", "a", "lab", 1)
    assert not no.ok and no.kind == "message_rate" and no.retry_at > clock.t
    clock.t += 0.5
    assert b.take("w", "b", "lab", 50).tokens == 10
    assert b.choose("w", "p", MEMBERS, "spill", "lab").metered


@pytest.mark.parametrize(
    "text, words",
    [
        ("[default]\nprovider_connection_limit = 0\n", "must be a positive integer"),
        ('[sites.x]\nmx_suffixes = ["x"]\nprovider_max_message_rate = "fast"\n', "rate like"),
    ],
)
def test_bad_provider_limits_are_refused(text: str, words: str) -> None:
    with pytest.raises(RulesError, match=words):
        parse_rules(text, "shaping.toml", shipped_rules())


@pytest.fixture
async def sink(lab: Lab) -> AsyncIterator[RecordingSink]:
    s = RecordingSink("127.0.3.9")
    await s.start()
    lab.dns.add("mx1.gm.test", "A", s.host)
    lab.dns.add("gm-one.test", "MX", "10 mx1.gm.test.")
    yield s
    await s.stop()


async def test_two_sources_never_hold_more_than_the_provider_allows(
    tmp_path: Path, lab: Lab, sink: RecordingSink, appliance: ApplianceFactory
) -> None:
    # Each source may hold 4 connections; the provider allows 2 in all.
    rules = "connection_limit = 4\nprovider_connection_limit = 2\n"
    cfg = shaping_config(tmp_path, sink, rules, members=(("a", 1), ("b", 1)))
    app = await appliance(cfg)
    n = 200
    await send(app.smtp_addresses[0][1], [f"r{i}@gm-one.test" for i in range(n)], sessions=10)
    await eventually(lambda: len(sink.rec.messages) >= n, 60, "all delivered")
    assert sink.rec.max_concurrent() <= 2
    assert {m.peer for m in sink.rec.messages} == {SRC_A, SRC_B}  # both sources sent
