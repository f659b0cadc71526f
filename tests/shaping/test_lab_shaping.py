"""Shaping end to end: a real appliance delivers to a recording MX on loopback, from
source addresses 127.0.2.x, with the lab's DNS; what the MX saw is the evidence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from postwarden.lab import Lab
from tests.conftest import ApplianceFactory
from tests.shaping.recsink import RecordingSink
from tests.waiting import eventually

# Timing-sensitive (rates, group commit): `make test` runs these at normal CPU priority,
# three at a time, alongside the rest at the lowest.
pytestmark = pytest.mark.serial

SRC_A, SRC_B = "127.0.2.1", "127.0.2.2"


@pytest.fixture
async def sink(lab: Lab) -> AsyncIterator[RecordingSink]:
    s = RecordingSink("127.0.3.1", "127.0.3.2")
    await s.start()
    lab.dns.add("mx1.gm.test", "A", s.host)
    lab.dns.add("mx.other.test", "A", s.hosts[1])
    for d in ("gm-one.test", "gm-two.test"):
        lab.dns.add(d, "MX", "10 mx1.gm.test.")
    lab.dns.add("elsewhere.test", "MX", "10 mx.other.test.")
    yield s
    await s.stop()


def shaping_config(
    tmp_path: Path,
    sink: RecordingSink,
    rules: str,
    members: tuple[tuple[str, int], ...] = (("a", 3), ("b", 1)),
) -> dict[str, Any]:
    """Sources a and b, the pool "main" of ``members`` (name, weight), the sink's MX
    hosts as the site "gmail" with ``rules`` (TOML lines of that site) on top."""
    path = tmp_path / "shaping.toml"
    path.write_text('[sites.gmail]\nmx_suffixes = ["gm.test"]\n' + rules, encoding="utf-8")
    return {
        "delivery": {"mx_port": sink.port, "max_connections_per_domain": 20},
        "sources": [
            {"name": "a", "address": SRC_A, "ehlo": "a.out.test"},
            {"name": "b", "address": SRC_B, "ehlo": "b.out.test"},
        ],
        "pools": [{"name": "main", "members": [{"source": n, "weight": w} for n, w in members]}],
        "shaping": {"rules_file": str(path), "default_pool": "main"},
    }


async def send(
    port: int, rcpts: list[str], sessions: int = 8, sender: str = "a@sender.test"
) -> None:
    it = iter(rcpts)

    async def one() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
            for r in it:
                await smtp.sendmail(sender, [r], f"Subject: s\r\nTo: {r}\r\n\r\nx\r\n".encode())

    await asyncio.gather(*(one() for _ in range(sessions)))


async def test_pool_weights_decide_the_source_and_ehlo(
    tmp_path: Path, lab: Lab, sink: RecordingSink, appliance: ApplianceFactory
) -> None:
    # A backlog (the MX was down while the mail came in), as a busy sender has: every
    # connection then carries its full 4 messages, and the weights decide the split.
    # (Connections are not what limits here: each source could open every one.)
    cfg = shaping_config(tmp_path, sink, "max_messages_per_connection = 4\nconnection_limit = 64\n")
    app = await appliance(cfg)
    port = app.smtp_addresses[0][1]
    n = 600
    mx_port = sink.port
    await sink.stop()
    await send(port, [f"r{i}@gm-{'one' if i % 2 else 'two'}.test" for i in range(n)])
    sink.rec.conns.clear()
    await sink.start(mx_port)
    await eventually(lambda: sum(sink.rec.by_peer().values()) >= n, 60, "all delivered")
    got = sink.rec.by_peer()
    assert set(got) == {SRC_A, SRC_B}
    share_a = got[SRC_A] / n
    assert 0.68 <= share_a <= 0.82, got  # weights 3:1
    helos = {(m.peer, m.helo) for m in sink.rec.messages}
    assert helos == {(SRC_A, "a.out.test"), (SRC_B, "b.out.test")}
    assert max(len(m.rcpts) for m in sink.rec.messages) == 1


@pytest.mark.timeout(300)
async def test_site_limits_hold_under_load(
    tmp_path: Path, lab: Lab, sink: RecordingSink, appliance: ApplianceFactory
) -> None:
    # One source, so every connection is the same (source, site) pair: 3 connections
    # and 6000 messages a minute at most, whichever of the site's domains they are for.
    rules = 'connection_limit = 3\nmax_message_rate = "6000/min"\n'
    cfg = shaping_config(tmp_path, sink, rules, members=(("a", 1),))
    app = await appliance(cfg)
    port = app.smtp_addresses[0][1]
    n = 1000  # ten seconds at the limit: long enough for every window below
    started = time.time()
    await send(port, [f"r{i}@gm-{'one' if i % 2 else 'two'}.test" for i in range(n)], sessions=10)
    await eventually(lambda: len(sink.rec.messages) >= n, 120, "all delivered")
    took = sink.rec.messages[-1].at - started
    assert sink.rec.max_concurrent() <= 3
    # Rate: in every window, at most the rate's worth plus the one-second burst (100),
    # plus what connections hold (tokens are granted up to 10 at a time, 3 connections).
    times = sorted(m.at for m in sink.rec.messages)
    rate = 6000 / 60
    for width in (1.0, 5.0, 10.0):
        j = 0
        for i, t in enumerate(times):
            while times[j] < t - width:
                j += 1
            assert i - j + 1 <= rate * width + 100 + 30, (width, i - j + 1)
    assert took >= (n - 130) / rate * 0.95  # it was the limit that paced it
    status = await app.shaper.backend.command(op="status")  # type: ignore[union-attr]
    pair = next(p for p in status["pairs"] if p["site"] == "gmail")
    assert pair["limit_per_min"] == 6000 and pair["connection_limit"] == 3


async def test_421_storm_suspends_only_that_pair_and_recovers(
    tmp_path: Path, lab: Lab, sink: RecordingSink, appliance: ApplianceFactory
) -> None:
    rules = (
        '[[responses]]\nname = "lab-421"\naction = "suspend"\nduration = "3s"\n'
        'code = 421\nenhanced = "4.7.28"\nsites = ["gmail"]\n'
    )
    cfg = shaping_config(tmp_path, sink, rules)
    app = await appliance(cfg)
    port = app.smtp_addresses[0][1]
    storm = True
    sink.rec.answer = lambda peer, local: (
        "421 4.7.28 Our system has detected an unusual rate"
        if storm and peer == SRC_A and local == sink.host
        else None
    )
    await send(
        port, [f"s{i}@gm-one.test" for i in range(40)] + [f"o{i}@elsewhere.test" for i in range(20)]
    )
    await eventually(lambda: len(sink.rec.messages) >= 60, 60, "all delivered despite the storm")
    status = await app.shaper.backend.command(op="status")  # type: ignore[union-attr]
    pairs = {(p["source"], p["site"]): p for p in status["pairs"]}
    assert pairs[("a", "gmail")]["suspended_for"] > 0
    assert pairs[("a", "gmail")]["reason"].startswith("lab-421")
    assert pairs.get(("b", "gmail"), {"suspended_for": 0})["suspended_for"] == 0
    other = [p for (src, site), p in pairs.items() if site != "gmail"]
    assert all(p["suspended_for"] == 0 for p in other)
    assert any(a["rule"] == "lab-421" for a in status["actions"])
    gm = [m for m in sink.rec.messages if m.rcpts[0].endswith("gm-one.test")]
    assert all(m.peer == SRC_B for m in gm)  # nothing reached gmail from a
    assert any(m.peer == SRC_A for m in sink.rec.messages if m.rcpts[0].endswith("elsewhere.test"))
    # Nothing bounced: every recipient was delivered.
    assert sorted(r for m in sink.rec.messages for r in m.rcpts) == sorted(
        [f"s{i}@gm-one.test" for i in range(40)] + [f"o{i}@elsewhere.test" for i in range(20)]
    )
    # The storm ends; the suspension expires by itself and a sends to gmail again.
    storm = False

    async def a_gmail_free() -> bool:
        status = await app.shaper.backend.command(op="status")  # type: ignore[union-attr]
        pair = [p for p in status["pairs"] if (p["source"], p["site"]) == ("a", "gmail")]
        return all(p["suspended_for"] == 0 for p in pair)

    await eventually(a_gmail_free, 30, "a's suspension at gmail to expire")
    # a's rate there climbs back from where the storm's push-backs left it: on a busy
    # machine b may carry a first batch whole before a's next turn. Batches go on
    # until a carries one of them (each batch all delivered before the next).
    before, sent = len(sink.rec.messages), 0

    async def a_sends_again() -> bool:
        nonlocal sent
        if any(m.peer == SRC_A for m in sink.rec.messages[before:]):
            return True
        if len(sink.rec.messages) >= before + sent and sent < 400:
            await send(port, [f"t{sent + i}@gm-one.test" for i in range(40)])
            sent += 40
        return False

    await eventually(a_sends_again, 60, "a to send to gmail again after the storm", interval=0.2)
    await eventually(lambda: len(sink.rec.messages) >= before + sent, 60, "after the storm")
    status = await app.shaper.backend.command(op="status")  # type: ignore[union-attr]
    a_gm = next(p for p in status["pairs"] if (p["source"], p["site"]) == ("a", "gmail"))
    assert a_gm["suspended_for"] == 0


def near_midnight(seconds_before: float) -> Callable[[], float]:
    """A wall clock that reads ``seconds_before`` seconds before a UTC midnight now,
    and runs on from there."""
    import datetime as dt

    now = time.time()
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    midnight = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC).timestamp()
    offset = midnight - seconds_before - now
    return lambda: time.time() + offset


async def shaped(
    appliance: ApplianceFactory,
    cfg: dict[str, Any],
    wall: Callable[[], float] = time.time,
) -> Any:
    app = await appliance(cfg, shaping_wall=wall)
    return app, app.shaping


async def test_warming_source_stops_at_its_cap_and_resumes_the_next_day(
    tmp_path: Path, lab: Lab, sink: RecordingSink, appliance: ApplianceFactory
) -> None:
    cfg = shaping_config(tmp_path, sink, "", members=(("a", 1),))  # overflow "wait"
    app, svc = await shaped(appliance, cfg, near_midnight(8.0))
    svc.command(
        {
            "op": "warming_start",
            "target": "source",
            "name": "a",
            "plan": {"name": "tiny", "days": [5, 10, 20]},
        }
    )
    port = app.smtp_addresses[0][1]
    await send(port, [f"w{i}@gm-one.test" for i in range(8)], sessions=2)
    await eventually(lambda: len(sink.rec.messages) >= 5, 5, "the day's cap")
    # Nothing more should go today, so nothing to wait for: a window in which a send
    # past the cap would show.
    await asyncio.sleep(1.0)
    assert len(sink.rec.messages) == 5  # the cap holds: the rest waits
    p = svc.book.progress("source:a")
    assert (p["day"], p["cap"], p["sent_today"], p["remaining"]) == (1, 5, 5, 0)
    # Midnight passes (on the test's clock): day 2, cap 10, and the waiting three go.
    await eventually(lambda: len(sink.rec.messages) >= 8, 20, "the next day")
    p = svc.book.progress("source:a")
    assert (p["day"], p["cap"], p["sent_today"]) == (2, 10, 3)
    assert p["history"][-1]["sent"] == 5 and p["history"][-1]["healthy"]
    assert sorted(r for m in sink.rec.messages for r in m.rcpts) == sorted(
        f"w{i}@gm-one.test" for i in range(8)
    )  # none bounced, none twice


async def test_bounce_storm_pauses_a_warming_source_until_resumed(
    tmp_path: Path, lab: Lab, sink: RecordingSink, appliance: ApplianceFactory
) -> None:
    cfg = shaping_config(tmp_path, sink, "", members=(("a", 1),))
    cfg["shaping"].update(pause_min_volume=20, pause_recheck="0.5s")
    app, svc = await shaped(appliance, cfg)
    svc.command({"op": "warming_start", "target": "source", "name": "a", "plan": "moderate"})
    sink.rec.rcpt_answer = lambda rcpt: "550 5.1.1 no such user" if rcpt.startswith("bad") else None
    port = app.smtp_addresses[0][1]
    await send(port, [f"good{i}@gm-one.test" for i in range(10)], sessions=1)
    await eventually(lambda: len(sink.rec.messages) >= 10, 10, "good mail")
    await send(port, [f"bad{i}@gm-one.test" for i in range(12)], sessions=2)
    await eventually(lambda: bool(svc.book.is_paused("source:a")), 10, "the auto-pause")
    assert svc.book.is_paused("source:a").startswith("auto: bounce rate")
    # What was in flight at the pause lands first (nothing to wait on: how many were
    # in flight is not known), so that ``before`` counts it.
    await asyncio.sleep(0.5)
    before = len(sink.rec.messages)
    await send(port, [f"later{i}@gm-one.test" for i in range(5)], sessions=1)
    await asyncio.sleep(2.0)  # several rechecks: the pause is sticky
    assert len(sink.rec.messages) == before
    assert svc.book.is_paused("source:a")
    # An operator resumes it (the API, as a client would); the mail that waited goes.
    out = await app.shaper.backend.command(op="resume", target="source", name="a")  # type: ignore[union-attr]
    assert not out["progress"]["paused"]
    await eventually(lambda: len(sink.rec.messages) >= before + 5, 10, "mail after the resume")
    assert {r for m in sink.rec.messages[before:] for r in m.rcpts} == {
        f"later{i}@gm-one.test" for i in range(5)
    }
    assert not svc.book.is_paused("source:a")  # the window starts afresh after a resume


async def test_transactional_mail_and_small_tenants_are_not_starved_by_a_campaign(
    tmp_path: Path, lab: Lab, sink: RecordingSink, appliance: ApplianceFactory
) -> None:
    from postwarden.queue.spool import new_message_id
    from postwarden.values import LANE_BULK, LANE_HIGH, Envelope

    # One connection at 20 messages a second: the campaign alone needs 20 s.
    rules = 'connection_limit = 1\nmax_message_rate = "1200/min"\n'
    cfg = shaping_config(tmp_path, sink, rules, members=(("a", 1),))
    app = await appliance(cfg)

    async def accept(tenant: str, lane: int, rcpt: str) -> None:
        data = f"From: x@{tenant}.test\r\nTo: {rcpt}\r\nSubject: f\r\n\r\nx\r\n".encode()
        env = Envelope(f"x@{tenant}.test", [rcpt], tenant=tenant, lane=lane)
        await app.acceptance.accept(env, data, new_message_id())

    for i in range(400):
        await accept("big", LANE_BULK, f"c{i}@gm-one.test")
    await eventually(lambda: len(sink.rec.messages) >= 20, 10, "the campaign under way")
    # Each acceptance syncs the spool, and the campaign goes on meanwhile: what counts
    # is the order from the moment each tenant's last message was accepted.
    mark = len(sink.rec.messages)
    for i in range(20):
        await accept("small", LANE_BULK, f"s{i}@gm-one.test")
    mark_s = len(sink.rec.messages)
    for i in range(10):
        await accept("shop", LANE_HIGH, f"t{i}@gm-one.test")
    mark_t = len(sink.rec.messages)
    # The order is settled once the small tenant's and the shop's mail is through;
    # the rest of the campaign only repeats the same turn.
    await eventually(
        lambda: sum(m.rcpts[0][0] in "st" for m in sink.rec.messages) >= 30, 60, "s and t"
    )
    order = [m.rcpts[0][0] for m in sink.rec.messages]
    after = order[mark:]
    # Transactional: once the last was accepted, what is left of the ten goes next,
    # after what was in flight (a job or two per session).
    last_t = max(i for i, c in enumerate(order) if c == "t")
    assert last_t < mark_t + 10 + 5, (mark_t - mark, after[:60])
    # The small tenant shares the bulk lane with the campaign turn by turn: its 20
    # go within the next ~40 bulk messages (and the shop's 10), not after the
    # campaign's 380.
    last_s = max(i for i, c in enumerate(order) if c == "s")
    assert last_s < mark_s + 2 * 20 + 10 + 10, (mark_s - mark, after[:80])
    assert order.count("s") == 20 and order.count("t") == 10
    assert order.count("c") >= len(after) - 30  # the campaign kept going meanwhile
