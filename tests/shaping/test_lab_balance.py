"""Pool weights per site (issue 17, item 6), end to end: three sources weighted 3:2:1;
one of them carries everything to one site for a while; at a second site the split
still follows the weights within 5 points. Counted at the sinks by peer address."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from postwarden.lab import Lab
from tests.conftest import ApplianceFactory
from tests.shaping.recsink import RecordingSink
from tests.shaping.test_lab_shaping import send
from tests.waiting import eventually

pytestmark = pytest.mark.serial  # a backlog drained through the weights

SOURCES = {"a": ("127.0.2.1", 3), "b": ("127.0.2.2", 2), "c": ("127.0.2.3", 1)}


@pytest.fixture
async def sinks(lab: Lab) -> AsyncIterator[RecordingSink]:
    # One recording server on two addresses: the MX hosts of two provider sites.
    s = RecordingSink("127.0.3.1", "127.0.3.2")
    await s.start()
    lab.dns.add("mx.one.test", "A", s.hosts[0])
    lab.dns.add("mx.two.test", "A", s.hosts[1])
    lab.dns.add("d1.test", "MX", "10 mx.one.test.")
    lab.dns.add("d2.test", "MX", "10 mx.two.test.")
    yield s
    await s.stop()


async def test_weights_hold_per_site_after_one_source_over_delivered(
    tmp_path: Path, lab: Lab, sinks: RecordingSink, appliance: ApplianceFactory
) -> None:
    rules = tmp_path / "shaping.toml"
    rules.write_text(
        '[default]\nmax_messages_per_connection = 4\nconnection_limit = 64\n'
        '[sites.one]\nmx_suffixes = ["one.test"]\n[sites.two]\nmx_suffixes = ["two.test"]\n',
        encoding="utf-8",
    )  # fmt: skip
    app = await appliance(
        {
            "delivery": {"mx_port": sinks.port, "max_connections_per_domain": 20},
            "sources": [{"name": n, "address": ip} for n, (ip, _w) in SOURCES.items()],
            "pools": [
                {
                    "name": "main",
                    "members": [{"source": n, "weight": w} for n, (_ip, w) in SOURCES.items()],
                }
            ],
            "shaping": {"rules_file": str(rules), "default_pool": "main"},
        }
    )
    port = app.smtp_addresses[0][1]
    backend = app.shaper.backend  # type: ignore[union-attr]
    # c (weight 1) carries all of site one while an operator holds a and b.
    for name in ("a", "b"):
        await backend.command(op="pause", target="source", name=name, reason="test")
    await send(port, [f"x{i}@d1.test" for i in range(60)], sessions=4)
    await eventually(lambda: len(sinks.rec.messages) >= 60, 30, "site one's mail")
    assert sinks.rec.by_peer() == {SOURCES["c"][0]: 60}
    for name in ("a", "b"):
        await backend.command(op="resume", target="source", name=name)

    # Site two, a backlog (its MX was down while the mail came in): every connection
    # carries its 4 messages and the weights decide. With counts per pool for every
    # site, a and b would first have had to catch up on c's 60 (c got none of 240).
    sinks.rec.messages.clear()
    mx_port = sinks.port
    await sinks.stop()
    n = 240
    await send(port, [f"y{i}@d2.test" for i in range(n)])
    await sinks.start(mx_port)
    await eventually(lambda: len(sinks.rec.messages) >= n, 60, "site two's mail")
    got = sinks.rec.by_peer()
    shares = {name: got.get(ip, 0) / n for name, (ip, _w) in SOURCES.items()}
    for name, (_ip, weight) in SOURCES.items():
        assert abs(shares[name] - weight / 6) <= 0.05, shares
    assert {r for m in sinks.rec.messages for r in m.rcpts} == {f"y{i}@d2.test" for i in range(n)}
