"""A suspension survives a restart (issue 17, item 8), end to end: a provider's
TS03-style answer suspends (source, site); the appliance stops and starts again on
the same state file; the pair stays suspended, and nothing reaches that MX from the
source until the suspension's time is up."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from postwarden.lab import Lab
from tests.conftest import ApplianceFactory
from tests.shaping.recsink import RecordingSink
from tests.shaping.test_lab_shaping import SRC_A, send, shaping_config
from tests.waiting import eventually

# Its one timing check is a lower bound (nothing before the suspension's end), which a
# busy machine cannot break: it runs in the parallel part of `make test`.

SUSPEND = 8.0  # seconds: long enough to outlive the restart


@pytest.fixture
async def sink(lab: Lab) -> AsyncIterator[RecordingSink]:
    s = RecordingSink("127.0.3.1")
    await s.start()
    lab.dns.add("mx1.gm.test", "A", s.host)
    lab.dns.add("gm-one.test", "MX", "10 mx1.gm.test.")
    yield s
    await s.stop()


async def test_a_suspension_survives_a_restart(
    tmp_path: Path, lab: Lab, sink: RecordingSink, appliance: ApplianceFactory
) -> None:
    rules = (
        '[[responses]]\nname = "lab-ts03"\naction = "suspend"\n'
        f'duration = "{SUSPEND:.0f}s"\ntext = "TS03"\nsites = ["gmail"]\n'
    )
    cfg = shaping_config(tmp_path, sink, rules, members=(("a", 1),))
    app = await appliance(cfg)
    storm = True
    sink.rec.answer = lambda peer, _local: (
        "421 4.7.0 [TS03] Messages from this IP temporarily deferred"
        if storm and peer == SRC_A
        else None
    )
    await send(app.smtp_addresses[0][1], ["first@gm-one.test"], sessions=1)

    async def suspended_for(a: object) -> float:
        status = await a.shaper.backend.command(op="status")  # type: ignore[attr-defined]
        pair = next((p for p in status["pairs"] if (p["source"], p["site"]) == ("a", "gmail")), {})
        return float(pair.get("suspended_for", 0.0))

    deadline = time.monotonic() + 10
    while (left := await suspended_for(app)) <= 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert left > 0, "the TS03 answer did not suspend (a, gmail)"
    ends = time.time() + left
    storm = False  # the provider would take mail now: only the suspension holds it
    await app.stop()
    state = json.loads(Path(app.cfg.shaping_state_file).read_text(encoding="utf-8"))
    assert [(p["source"], p["site"]) for p in state["pairs"]] == [("a", "gmail")]
    assert sink.rec.messages == []

    again = await appliance(cfg)  # the same spool and state file
    assert await suspended_for(again) > 0
    await send(again.smtp_addresses[0][1], ["second@gm-one.test"], sessions=1)
    await eventually(lambda: len(sink.rec.messages) >= 2, SUSPEND + 20, "delivery after the end")
    # Both waited for the suspension's end (to its 0.1 s in the status), though the
    # MX took mail from the moment of the restart.
    assert min(m.at for m in sink.rec.messages) >= ends - 0.2, (ends, sink.rec.messages)
    assert sorted(r for m in sink.rec.messages for r in m.rcpts) == [
        "first@gm-one.test",
        "second@gm-one.test",
    ]
    assert await suspended_for(again) == 0
