"""Delivery end to end: submission → spool → DKIM → lab DNS → lab MX, each behaviour."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import aiosmtplib
import dkim
import pytest

from postwarden.appliance import Appliance
from postwarden.lab import Lab
from postwarden.queue.admin import QueueAdmin
from tests.conftest import SENDER_DOMAIN, ApplianceFactory


def message(rcpts: list[str], subject: str = "test", body: str = "hello") -> bytes:
    return (
        f"From: Sender <news@{SENDER_DOMAIN}>\r\nTo: {', '.join(rcpts)}\r\n"
        f"Subject: {subject}\r\n\r\n{body}\r\n"
    ).encode()


async def submit(app: Appliance, rcpts: list[str], **kw: Any) -> str:
    host, port = app.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        _, resp = await smtp.sendmail(f"news@{SENDER_DOMAIN}", rcpts, message(rcpts, **kw))
    return resp.rsplit(" ", 1)[-1]


def events(app: Appliance, msg_id: str) -> list[dict[str, Any]]:
    admin = QueueAdmin(app.cfg.spool.path)
    try:
        return admin.events(msg_id=msg_id, limit=1000)
    finally:
        admin.close()


async def wait_events(
    app: Appliance, msg_id: str, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 10
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        evs = events(app, msg_id)
        if pred(evs):
            return evs
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; events so far: {[e['type'] for e in evs]}")
        await asyncio.sleep(0.05)


def types(evs: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in evs]


def has(kind: str, n: int = 1) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda evs: types(evs).count(kind) >= n


async def test_accepted_message_is_signed_and_delivered_over_tls(
    lab: Lab, appliance: ApplianceFactory, dkim_keys: list[dict[str, str]]
) -> None:
    lab.add_domain("inbox.test")
    app = await appliance({"dkim": {"keys": dkim_keys}})
    msg_id = await submit(app, ["u1@inbox.test", "u2@inbox.test"])
    evs = await wait_events(app, msg_id, has("delivered", 2))
    assert types(evs)[:2] == ["accepted", "accepted"]
    delivered = [e for e in evs if e["type"] == "delivered"]
    assert all(e["detail"]["response"].startswith("250") for e in delivered)
    assert all(
        e["detail"]["tls"] is True and e["detail"]["mx"].endswith("lab.test") for e in delivered
    )
    # Both recipients at one domain travel in one transaction.
    assert len(lab.messages) == 1 and sorted(lab.messages[0].rcpt_tos) == [
        "u1@inbox.test",
        "u2@inbox.test",
    ]
    got = lab.messages[0]
    assert got.tls
    # Verify both signatures with dkimpy, keys fetched from the lab DNS.
    txt = {}
    for k in dkim_keys:
        name = f"{k['selector']}._domainkey.{k['domain']}"
        txt[name] = "".join(await app.resolver.resolve_txt(name)).encode()
    sigs = re.findall(rb"(?m)^DKIM-Signature:", got.data)
    assert len(sigs) == 2
    for idx in range(2):
        assert dkim.DKIM(got.data).verify(
            idx=idx, dnsfunc=lambda n, **_: txt[n.decode().rstrip(".")]
        )
    # The message left the spool.
    admin = QueueAdmin(app.cfg.spool.path)
    assert admin.summary()["messages"] == 0
    admin.close()


async def test_rejected_recipient_bounces_at_once(lab: Lab, appliance: ApplianceFactory) -> None:
    lab.add_domain("inbox.test")
    lab.add_domain("nouser.test", behaviour="reject")
    app = await appliance()
    msg_id = await submit(app, ["ok@inbox.test", "gone@nouser.test"])
    evs = await wait_events(
        app, msg_id, lambda e: "bounced" in types(e) and "delivered" in types(e)
    )
    bounced = next(e for e in evs if e["type"] == "bounced")
    assert bounced["rcpt"] == "gone@nouser.test"
    assert bounced["detail"]["response"].startswith("550 5.1.1")
    assert "deferred" not in types(evs)


async def test_tempfail_defers_with_backoff_then_expires(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("full.test", behaviour="tempfail")
    app = await appliance(
        {
            "queue": {
                "max_age": "1.5s",
                "retry_initial": "0.2s",
                "retry_factor": 2.0,
                "retry_max": "1s",
            }
        }
    )
    msg_id = await submit(app, ["x@full.test"])
    evs = await wait_events(app, msg_id, has("expired"), timeout=15)
    deferred = [e for e in evs if e["type"] == "deferred"]
    assert len(deferred) >= 2
    assert all(e["detail"]["response"].startswith("451") for e in deferred)
    # Each wait is longer than the one before (exponential, no jitter in tests).
    # Without jitter the n-th wait is 0.2 * 2**(n-1) s, never past expiry (1.5 s).
    created = evs[0]["ts"]
    for n, d in enumerate(deferred, start=1):
        expected = min(d["ts"] + min(0.2 * 2 ** (n - 1), 1.0), created + 1.5)
        assert abs(d["detail"]["next_attempt"] - expected) < 0.05, (n, d)
    assert types(evs)[-1] == "expired"
    assert QueueAdmin(app.cfg.spool.path).summary()["messages"] == 0


async def test_greylisting_is_retried_and_delivered(lab: Lab, appliance: ApplianceFactory) -> None:
    lab.add_domain("grey.test", behaviour="greylist")
    app = await appliance()
    msg_id = await submit(app, ["x@grey.test"])
    evs = await wait_events(app, msg_id, has("delivered"))
    assert types(evs) == ["accepted", "deferred", "delivered"]
    assert evs[1]["detail"]["response"].startswith("451 4.7.1")


@pytest.mark.parametrize(
    ("behaviour", "prefix"),
    [("disconnect", "421"), ("drop_data", "451 4.4.2"), ("slow", "451 4.4.2")],
)
async def test_transient_failures_defer(
    lab: Lab, appliance: ApplianceFactory, behaviour: str, prefix: str
) -> None:
    lab.add_domain("flaky.test", behaviour=behaviour)
    overrides: dict[str, Any] = {"queue": {"retry_initial": "30s"}}
    if behaviour == "slow":
        lab.set_slow_delay(3.0)
        overrides["delivery"] = {"timeouts": {"rcpt": "0.5s"}}
    app = await appliance(overrides)
    msg_id = await submit(app, ["x@flaky.test"])
    evs = await wait_events(app, msg_id, has("deferred"))
    deferred = next(e for e in evs if e["type"] == "deferred")
    assert deferred["detail"]["response"].startswith(prefix), deferred
    assert "bounced" not in types(evs)
    admin = QueueAdmin(app.cfg.spool.path)
    rows = admin.list()
    admin.close()
    assert [r["state"] for r in rows] == ["deferred"] and rows[0]["attempts"] == 1


async def test_dns_outcomes(lab: Lab, appliance: ApplianceFactory) -> None:
    lab.add_null_mx("nullmx.test")
    lab.add_domain("broken.test")
    lab.dns.set_fault("broken.test", "servfail")
    lab.add_implicit_mx("implicit.test", 1)
    app = await appliance({"queue": {"retry_initial": "30s"}})
    null_id = await submit(app, ["x@nullmx.test"])
    nx_id = await submit(app, ["x@does-not-exist.test"])
    fail_id = await submit(app, ["x@broken.test"])
    imp_id = await submit(app, ["x@implicit.test"])
    evs = await wait_events(app, null_id, has("bounced"))
    assert "5.1.10" in evs[-1]["detail"]["response"]
    evs = await wait_events(app, nx_id, has("bounced"))
    assert "5.1.2" in evs[-1]["detail"]["response"]
    evs = await wait_events(app, fail_id, has("deferred"))
    assert "4.4.3" in evs[-1]["detail"]["response"]
    evs = await wait_events(app, imp_id, has("delivered"))
    assert evs[-1]["detail"]["ip"] == lab.sinks[1].host


async def test_next_mx_is_tried_when_the_first_refuses(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("multi.test", mx_layout="all")
    lab.sinks[0].refuse = True
    await lab.sinks[0].apply()
    app = await appliance()
    msg_id = await submit(app, ["x@multi.test"])
    evs = await wait_events(app, msg_id, has("delivered"))
    assert evs[-1]["detail"]["ip"] != lab.sinks[0].host
    assert lab.messages[0].sink_address != lab.sinks[0].host


async def test_source_address_and_connection_reuse(lab: Lab, appliance: ApplianceFactory) -> None:
    lab.add_domain("bulk.test")
    app = await appliance(
        {
            "delivery": {
                "source_address": "127.0.0.9",
                "max_connections_per_domain": 1,
                "max_messages_per_connection": 100,
                "timeouts": {"idle": "2s"},
            }
        }
    )
    ids = await asyncio.gather(*(submit(app, [f"u{i}@bulk.test"]) for i in range(20)))
    await lab.wait_for_messages(20, timeout=15)
    assert {m.peer for m in lab.messages} == {"127.0.0.9"}
    assert len(set(ids)) == 20
    connections = sum(s.connections for s in lab.sinks)
    assert connections <= 3, connections


async def test_required_tls_policy_defers_when_tls_is_missing(
    lab: Lab, appliance: ApplianceFactory
) -> None:
    lab.add_domain("plain.test", hosts=[2])
    lab.sinks[2].tls = False
    await lab.sinks[2].apply()
    app = await appliance(
        {
            "delivery": {"tls_policies": {"plain.test": "required"}},
            "queue": {"retry_initial": "30s"},
        }
    )
    msg_id = await submit(app, ["x@plain.test"])
    evs = await wait_events(app, msg_id, has("deferred"))
    assert "4.7.10" in evs[-1]["detail"]["response"]
    assert lab.messages == []


@pytest.mark.parametrize("seed", range(80))
def test_smtp_client_speedups_give_aiosmtplibs_results(seed: int) -> None:
    import random

    from postwarden.mta.smtpclient_speedups import _PeriodQuoter, normalize_message_line_endings
    from postwarden.mta.smtpclient_speedups import original as aiosmtplib_original

    normalize, periods = aiosmtplib_original()
    rng = random.Random(seed)
    pieces = [b"a", b".", b"..", b"\r\n", b"\r\n.", b"\n", b"\r", b" ", b"\r\n\r\n", b"x.y"]
    message = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
    assert normalize_message_line_endings(message) == normalize(message)
    normalized = normalize(message)
    for m in (message, normalized):
        assert _PeriodQuoter().sub(b"..", m) == periods.sub(b"..", m)
