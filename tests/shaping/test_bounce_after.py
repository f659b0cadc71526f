"""``bounce_after`` in the rules file: how long a recipient may stay deferred at one
site or domain before it bounces, over ``queue.max_age`` (PowerMTA's bounce-after,
KumoMTA's max_age per queue). Real appliance, lab MX hosts that always answer 451."""

from __future__ import annotations

from pathlib import Path

from postwarden.lab import Lab
from postwarden.shaping.rules import parse_rules, shipped_rules
from tests.conftest import ApplianceFactory
from tests.mta.test_delivery import has, submit, types, wait_events


def test_bounce_after_is_a_duration_per_site_and_domain() -> None:
    rules = parse_rules(
        '[sites.yahoo]\nbounce_after = "2d"\n[domains."aol.test"]\nbounce_after = "6h"\n',
        "shaping.toml",
        shipped_rules(),
    )
    assert rules.limits_for("yahoo").retry == {"max_age": 2 * 86400.0}
    assert rules.limits_for("yahoo", "aol.test").retry == {"max_age": 6 * 3600.0}
    assert shipped_rules().limits_for("yahoo").retry == {}  # queue.max_age applies


async def test_a_domain_bounces_after_its_own_time_the_others_keep_trying(
    tmp_path: Path, lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("full-a.test", "tempfail")
    lab.add_domain("full-b.test", "tempfail")
    rules = tmp_path / "shaping.toml"
    rules.write_text('[domains."full-a.test"]\nbounce_after = "2s"\n', encoding="utf-8")
    app = await appliance({"shaping": {"rules_file": str(rules)}})
    short = await submit(app, ["u@full-a.test"])
    other = await submit(app, ["u@full-b.test"])
    evs = await wait_events(app, short, has("expired"))
    assert types(evs)[-1] == "expired" and "deferred" in types(evs)
    # The other domain, under queue.max_age (days), was deferred as often and waits on.
    evs = await wait_events(app, other, has("deferred", 3))
    assert "expired" not in types(evs)
