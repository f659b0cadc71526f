"""Every leased recipient is reported exactly once and the in-flight count returns to
zero, whatever fails inside a delivery session: a spool read raising SpoolError, an
unexpected exception escaping the session, a spool write of outcomes failing once."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from postwarden.appliance import Appliance
from postwarden.lab import Lab
from postwarden.queue import scheduler as scheduler_module
from postwarden.values import Lease, SpoolError
from tests.conftest import ApplianceFactory
from tests.mta.test_delivery import events, submit
from tests.waiting import eventually


def fail_first_read(app: Appliance, exc: type[Exception]) -> list[str]:
    """The spool's body reads fail once per message with ``exc``."""
    failed: list[str] = []
    real = app.agent.read_body

    def read_body(lease: Lease) -> bytes:
        if lease.msg_id not in failed:
            failed.append(lease.msg_id)
            raise exc(f"injected: short read of {lease.msg_id}")
        return real(lease)

    app.agent.read_body = read_body
    return failed


async def settle(app: Appliance, msg_ids: list[str], n_rcpts: int) -> list[dict[str, Any]]:
    def finals() -> list[dict[str, Any]]:
        return [
            e
            for m in msg_ids
            for e in events(app, m)
            if e["type"] in ("delivered", "bounced", "expired")
        ]

    await eventually(lambda: len(finals()) >= n_rcpts, 15, "every recipient delivered")
    await eventually(lambda: app.scheduler.inflight == 0, 5, "in-flight back to 0")
    evs = finals()
    per_rcpt = Counter((e["msg_id"], e["rcpt"]) for e in evs)
    assert len(per_rcpt) == n_rcpts and set(per_rcpt.values()) == {1}, per_rcpt
    assert {e["type"] for e in evs} == {"delivered"}
    return evs


@pytest.mark.parametrize("exc", [SpoolError, RuntimeError])
async def test_a_failing_body_read_is_reported_once(
    lab: Lab,
    appliance: ApplianceFactory,
    monkeypatch: pytest.MonkeyPatch,
    exc: type[Exception],
) -> None:
    lab.add_domain("inbox.test")
    lab.add_domain("other.test")
    # Bodies are read back from the spool (none ride along from acceptance).
    monkeypatch.setattr(scheduler_module, "BODY_BUDGET", 0)
    app = await appliance()
    failed = fail_first_read(app, exc)
    rcpts = ["a@inbox.test", "b@inbox.test", "c@other.test"]
    msg_ids = [await submit(app, rcpts) for _ in range(3)]
    await settle(app, msg_ids, 9)
    assert sorted(failed) == sorted(msg_ids)
    for m in msg_ids:  # the failed read was one (temporary) attempt, then delivery
        assert "deferred" in [e["type"] for e in events(app, m)]


async def test_a_failed_record_is_retried(lab: Lab, appliance: ApplianceFactory) -> None:
    lab.add_domain("inbox.test")
    app = await appliance()
    real = app.spool.record
    calls = {"failed": 0}

    async def record(outcomes: Any) -> None:
        if not calls["failed"] and any(o.state == "delivered" for o in outcomes):
            calls["failed"] += 1
            raise SpoolError("injected: disk hiccup")
        await real(outcomes)

    app.spool.record = record  # type: ignore[method-assign]
    msg_ids = [await submit(app, [f"u{i}@inbox.test", f"v{i}@inbox.test"]) for i in range(3)]
    await settle(app, msg_ids, 6)
    assert calls["failed"] == 1
    assert app.metrics.record_failures._value.get() == 1
