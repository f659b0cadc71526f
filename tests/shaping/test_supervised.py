"""Shaping with several workers: `postwarden serve` with 2 workers shares one broker
(the supervisor's), so the limits hold across processes; the CLI and the API speak to
that broker; a bad rules file is refused at reload and the rules in force stay."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from postwarden.lab import Lab
from tests.conftest import config_cli, operator_key_via_cli
from tests.queue.test_durability import serve
from tests.shaping.recsink import RecordingSink
from tests.shaping.test_lab_shaping import SRC_A, send
from tests.waiting import eventually

# Timing-sensitive (rates, group commit): `make test` runs these at normal CPU priority,
# three at a time, alongside the rest at the lowest.
pytestmark = pytest.mark.serial

RULES = (
    '[sites.gmail]\nmx_suffixes = ["gm.test"]\nconnection_limit = 2\n'
    'max_message_rate = "3000/min"\n'
)


@pytest.mark.long(10)
@pytest.mark.timeout(300)
async def test_two_workers_share_the_limits_cli_and_api_reach_the_broker(
    tmp_path: Path, lab: Lab, subprocess_config: Any
) -> None:
    sink = RecordingSink("127.0.3.1")
    await sink.start()
    lab.dns.add("mx1.gm.test", "A", sink.host)
    for d in ("gm-one.test", "gm-two.test"):
        lab.dns.add(d, "MX", "10 mx1.gm.test.")
    rules = tmp_path / "shaping.toml"
    rules.write_text(RULES, encoding="utf-8")
    config, port = subprocess_config(
        {
            "server": {"workers": 2},
            "delivery": {"mx_port": sink.port},
            "sources": [{"name": "a", "address": SRC_A, "ehlo": "a.out.test"}],
            "shaping": {"rules_file": str(rules)},
        }
    )
    import tomllib

    control = tomllib.loads(config.read_text())["control"]["listen"]
    try:
        async with serve([], config, port, tmp_path / "serve.log") as proc:
            n = 400  # eight seconds at 50/s: longer than the 5 s window checked
            await send(port, [f"r{i}@gm-{'one' if i % 2 else 'two'}.test" for i in range(n)], 10)
            await eventually(lambda: len(sink.rec.messages) >= n, 120, "all delivered")
            # Two workers, one budget: never more than 2 connections, 50 messages/s.
            assert sink.rec.max_concurrent() <= 2
            times = sorted(m.at for m in sink.rec.messages)
            j = 0
            for i, t in enumerate(times):
                while times[j] < t - 5.0:
                    j += 1
                assert i - j + 1 <= 50 * 5 + 50 + 20, i - j + 1
            assert {m.peer for m in sink.rec.messages} == {SRC_A}

            code, out = await config_cli(config, "shaping", "status")
            assert code == 0, out
            assert re.search(r"a +gmail +conns [0-2]/2 rate 3000.0/min \(limit 3000.0\)", out), out
            code, out = await config_cli(
                config, "warming", "start", "--source", "a", "--plan", "conservative"
            )
            assert code == 0 and "plan conservative day 1/21 cap 50" in out, out
            code, out = await config_cli(
                config, "warming", "pause", "--source", "a", "--reason", "test"
            )
            assert code == 0 and "PAUSED (test)" in out, out
            code, out = await config_cli(config, "warming", "progress", "--source", "nope")
            assert code == 1 and "no source named 'nope'" in out, out

            # The API, with an operator key.
            op = await operator_key_via_cli(config)
            async with httpx.AsyncClient(
                base_url=f"http://{control}", headers={"Authorization": f"Bearer {op}"}
            ) as c:
                r = await c.get("/v1/warming/source/a")
                assert r.status_code == 200 and r.json()["progress"]["paused"] == "test"
                r = await c.post("/v1/warming/source/a/resume")
                assert r.status_code == 200 and not r.json()["progress"]["paused"]
                r = await c.post("/v1/warming/source/zz/start", json={"plan": "moderate"})
                assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "name"
                r = await c.post(
                    "/v1/warming/domain/news.example/start", json={"plan": {"days": [5, 50]}}
                )
                assert r.status_code == 200 and r.json()["progress"]["cap"] == 5
                # A bad rules file: refused with its line and key, the old rules stay.
                rules.write_text(RULES.replace("connection_limit = 2", "connection_limit = 0"))
                r = await c.post("/v1/shaping/reload")
                assert r.status_code == 409
                assert (
                    "shaping.toml:3: sites.gmail.connection_limit" in r.json()["error"]["message"]
                )

                def refusals() -> int:
                    return (tmp_path / "serve.log").read_text().count("reload_refused")

                before = refusals()
                proc.send_signal(signal.SIGHUP)
                await eventually(lambda: refusals() > before, 30, "the SIGHUP reload refused too")
                r = await c.get("/v1/shaping")
                gm = [x for x in r.json()["pairs"] if x["site"] == "gmail"]
                assert gm and all(x["connection_limit"] == 2 for x in gm)
                # A good one: in force at once, through the API.
                rules.write_text(RULES.replace("connection_limit = 2", "connection_limit = 5"))
                r = await c.post("/v1/shaping/reload")
                assert r.status_code == 200, r.text
                r = await c.get("/v1/shaping")
                gm = [x for x in r.json()["pairs"] if x["site"] == "gmail"]
                assert gm and all(x["connection_limit"] == 5 for x in gm)
                metrics = (await c.get("/metrics")).text
                assert 'postwarden_shaping_connection_limit{site="gmail",source="a"}' in metrics
        log = (tmp_path / "serve.log").read_text()
        assert "event=reload_refused" in log or "shaping_reload_refused" in log
    finally:
        await sink.stop()
