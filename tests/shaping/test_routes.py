"""Routing rules (``[[routes]]`` in the rules file): mail that names no pool leaves
from the pool a route gives it by recipient domain, sending domain or provider site;
mail that names a pool keeps it. Parsing on its own, then a real appliance whose two
pools leave from two source addresses, counted at the MX."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from postwarden.lab import Lab
from postwarden.shaping.rules import RulesError, parse_rules, shipped_rules
from tests.conftest import ApplianceFactory
from tests.shaping.recsink import RecordingSink
from tests.shaping.test_lab_shaping import SRC_A, SRC_B, shaping_config
from tests.waiting import eventually

ROUTES = """
[[routes]]
pool = "other"
domains = ["routed.test"]

[[routes]]
pool = "other"
senders = ["campaigns.test"]

[[routes]]
pool = "other"
sites = ["yahoo"]
"""


def test_routes_by_domain_sender_and_site() -> None:
    rules = parse_rules(ROUTES, "shaping.toml", shipped_rules())
    assert rules.route("Routed.Test", "x.test") == "other"
    assert rules.route("plain.test", "campaigns.test") == "other"
    assert rules.route("plain.test", "x.test") is None
    # Sites are decided when a connection opens, never while mail is queued.
    assert rules.route("plain.test", "x.test", "yahoo") == "other"
    assert rules.route("routed.test", "x.test", "gmail") is None


@pytest.mark.parametrize(
    "text, words",
    [
        ('[[routes]]\ndomains = ["a.test"]\n', ":2: routes[0].pool: a route needs"),
        ('[[routes]]\npool = "p"\n', "give domains, senders or sites"),
        ('[[routes]]\npool = "p"\nsites = ["x"]\ndomains = ["a"]\n', "cannot be combined"),
        ('[[routes]]\npool = "p"\ndomains = "a.test"\n', "must be a list of names"),
        ('[[routes]]\npool = "p"\nrecipients = ["a"]\n', "unknown key"),
    ],
)
def test_a_bad_route_is_refused_with_its_line(text: str, words: str) -> None:
    with pytest.raises(RulesError, match=re.escape(words)):
        parse_rules("\n" + text, "shaping.toml", shipped_rules())


@pytest.fixture
async def sink(lab: Lab) -> AsyncIterator[RecordingSink]:
    s = RecordingSink("127.0.3.10")
    await s.start()
    lab.dns.add("mx1.gm.test", "A", s.host)
    for d in ("routed.test", "plain.test"):
        lab.dns.add(d, "MX", "10 mx1.gm.test.")
    yield s
    await s.stop()


async def send_as(port: int, sender: str, rcpt: str, pool: str | None = None) -> None:
    head = f"X-Postwarden-Pool: {pool}\r\n" if pool else ""
    data = f"From: {sender}\r\nTo: {rcpt}\r\nSubject: s\r\n{head}\r\nx\r\n".encode()
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
        await smtp.sendmail(sender, [rcpt], data)


async def test_mail_leaves_from_the_pool_its_route_gives(
    tmp_path: Path, lab: Lab, sink: RecordingSink, appliance: ApplianceFactory
) -> None:
    cfg: dict[str, Any] = shaping_config(tmp_path, sink, "", members=(("a", 1),))
    cfg["pools"].append({"name": "other", "members": [{"source": "b", "weight": 1}]})
    rules = tmp_path / "shaping.toml"
    rules.write_text(rules.read_text() + ROUTES.replace("yahoo", "gmail"), encoding="utf-8")
    app = await appliance(cfg)
    port = app.smtp_addresses[0][1]
    await send_as(port, "a@shop.test", "u1@routed.test")  # by domain: other
    await send_as(port, "a@campaigns.test", "u2@plain.test")  # by sender: other
    await send_as(port, "a@shop.test", "u3@routed.test", pool="main")  # named: kept
    await eventually(lambda: len(sink.rec.messages) >= 3, 20, "three delivered")
    peer = {m.rcpts[0]: m.peer for m in sink.rec.messages}
    assert peer == {"u1@routed.test": SRC_B, "u2@plain.test": SRC_B, "u3@routed.test": SRC_A}


async def test_a_route_by_site_decides_when_the_connection_opens(
    tmp_path: Path, lab: Lab, sink: RecordingSink, appliance: ApplianceFactory
) -> None:
    cfg: dict[str, Any] = shaping_config(tmp_path, sink, "", members=(("a", 1),))
    cfg["pools"].append({"name": "other", "members": [{"source": "b", "weight": 1}]})
    rules = tmp_path / "shaping.toml"
    rules.write_text(
        rules.read_text() + '\n[[routes]]\npool = "other"\nsites = ["gmail"]\n', encoding="utf-8"
    )
    app = await appliance(cfg)
    port = app.smtp_addresses[0][1]
    await send_as(port, "a@shop.test", "u1@plain.test")  # plain.test's MX is gmail's
    await send_as(port, "a@shop.test", "u2@plain.test", pool="main")
    await eventually(lambda: len(sink.rec.messages) >= 2, 20, "two delivered")
    peer = {m.rcpts[0]: m.peer for m in sink.rec.messages}
    assert peer == {"u1@plain.test": SRC_B, "u2@plain.test": SRC_A}
