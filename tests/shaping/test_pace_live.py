"""Backoff end to end (issue 17, items 4 and 5): a real appliance delivers to a
recording MX on loopback that pushes back with 421; what the MX saw is the evidence.

* A site the rules give no rate, answering 421 to every MAIL, gets a probe now and
  then, not thousands of connection attempts.
* Once a provider stops pushing back, the full rate is back within a minute.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from postwarden.lab import Lab
from tests.conftest import ApplianceFactory
from tests.shaping.recsink import RecordingSink
from tests.shaping.test_lab_shaping import send, shaping_config
from tests.waiting import eventually

REFUSE = "421 4.7.0 Try again later, closing connection"


@pytest.fixture
async def sink(lab: Lab) -> AsyncIterator[RecordingSink]:
    s = RecordingSink("127.0.3.5", "127.0.3.6")
    await s.start()
    lab.dns.add("mx1.gm.test", "A", s.host)  # the site "gmail" of shaping_config
    lab.dns.add("gm-pace.test", "MX", "10 mx1.gm.test.")
    lab.dns.add("mx.unrated.test", "A", s.hosts[1])  # a site of its own, no rate
    lab.dns.add("unrated.test", "MX", "10 mx.unrated.test.")
    yield s
    await s.stop()


async def pair_status(app: Any, site: str) -> dict[str, Any]:
    status = await app.shaper.backend.command(op="status")
    return next((p for p in status["pairs"] if p["site"] == site), {})


async def until_status(
    app: Any, site: str, cond: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        p = await pair_status(app, site)
        if p and cond(p):
            return p
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {p}")
        await asyncio.sleep(0.05)


async def test_an_unrated_site_answering_421_gets_a_few_tens_of_attempts(
    tmp_path: Path, lab: Lab, sink: RecordingSink, appliance: ApplianceFactory
) -> None:
    # Probes every 4 s (10 s by default), so that the site's recovery shows sooner.
    cfg = shaping_config(tmp_path, sink, 'backoff_retry_interval = "4s"\n', members=(("a", 1),))
    app = await appliance(cfg)
    refusing = True
    sink.rec.answer = lambda _peer, _local: REFUSE if refusing else None
    # Retries come back within a second (the tests' queue schedule): unpaced, 30
    # messages made 554 attempts in 25 s. A busy machine only makes fewer: these
    # bounds need no quiet machine, so the test runs in parallel.
    await send(app.smtp_addresses[0][1], [f"r{i}@unrated.test" for i in range(30)])
    await eventually(lambda: bool(sink.rec.conns), 10, "a first attempt")
    first = sink.rec.conns[0].opened
    span = 9.0
    await eventually(lambda: time.time() >= first + span, span + 5, "the refusals' span")
    opened = [c.opened - first for c in sink.rec.conns if c.opened < first + span]
    # The connections opened before the first refusal was heard, then a probe now
    # and then: at most a few tens a minute.
    later = [t for t in opened if t >= 2.0]
    assert len(opened) <= 40 and len(later) <= 5, opened
    p = await pair_status(app, "mx:mx.unrated.test")
    assert p["backoff"] and p["rate_limited"] and p["rate_per_min"] <= 15.0, p  # 1 per 4 s
    # The site takes mail again: a probe finds out within its retry interval.
    refusing = False
    await eventually(lambda: bool(sink.rec.messages), 20, "a delivery after the refusals")


# Rates measured from the MX's timestamps: `make test` runs it at normal CPU priority.
@pytest.mark.serial
@pytest.mark.long(18)
async def test_full_rate_is_back_soon_after_push_back_stops(
    tmp_path: Path, lab: Lab, sink: RecordingSink, appliance: ApplianceFactory
) -> None:
    """With backoff_to_normal_after at 8 s, to keep the test short: the defaults' 30 s
    (full rate within a minute) are checked on a driven clock in test_backoff."""
    limit = 5.0  # messages/s
    rules = 'max_message_rate = "300/min"\nbackoff_to_normal_after = "8s"\n'
    cfg = shaping_config(tmp_path, sink, rules, members=(("a", 1),))
    app = await appliance(cfg)
    pushing = True
    sink.rec.answer = lambda _peer, _local: REFUSE if pushing else None
    await send(app.smtp_addresses[0][1], [f"r{i}@gm-pace.test" for i in range(250)])
    # Push-back until the rate in force is a sixteenth of the limit or less.
    await until_status(
        app, "gmail", lambda p: p["rate_per_min"] <= limit * 60 / 16, 60, "the backoff"
    )
    pushing = False
    stopped = time.time()

    def recovered() -> bool:
        # Some 5 s window after the push-back stopped carried 90 % of the limit.
        times = [m.at for m in sink.rec.messages if m.at >= stopped]
        j = 0
        for i, t in enumerate(times):
            while times[j] < t - 5.0:
                j += 1
            if i - j + 1 >= 0.9 * limit * 5:
                return True
        return False

    await eventually(recovered, 60, "the full rate")
    times = [m.at for m in sink.rec.messages if m.at >= stopped]
    took = times[-1] - stopped
    assert took <= 8 + 5 + 5, took  # the backoff's end, a window at full rate, slack
    p = await pair_status(app, "gmail")
    assert p["rate_per_min"] == limit * 60, p
