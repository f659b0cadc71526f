"""A domain verified is a domain mail may come From at once on the process that
answered the verify (over the API and over SMTP AUTH, with no retry), and on another
process of the same database once its change-feed poll (``control.cache_poll``) has
run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosmtplib
import pytest

from tests.control.conftest import ControlFactory
from tests.control.test_smtp_tenant import submit

MESSAGE = {"from": "a@acme.test", "to": ["u@inbox.test"], "subject": "s", "text": "t"}


async def test_verify_is_in_force_at_once_here_and_after_a_poll_elsewhere(
    control: ControlFactory, tmp_path: Path
) -> None:
    # This process never polls the change feed on its own (an hour): only the verify
    # call's own wait can put the domain in its cache before the next request.
    api = await control({"control": {"cache_poll": "1h"}})
    api.lab.add_domain("inbox.test")
    key = await api.tenant("acme")
    # Another process on the same database (its own spool), polling every 0.2 s.
    other = await control({"spool": {"path": str(tmp_path / "other-spool")}})
    async with api.client(key) as c:
        tenant_id = (await c.get("/v1/keys")).json()["data"][0]["tenant_id"]
    # Before: refused by both processes, over the API and over SMTP.
    for side in (api, other):
        async with side.client(key) as c:
            r = await c.post("/v1/messages", json=MESSAGE)
            assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "from"
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await submit(side, "acme", key, "a@acme.test", ["u@inbox.test"])
        assert refused.value.code == 550 and "5.7.1" in refused.value.message

    await api.verified_domain(key, "acme.test")

    # At once, on the process that answered: one try each, no wait.
    async with api.client(key) as c:
        r = await c.post("/v1/messages", json=MESSAGE)
        assert r.status_code == 202, r.text
    assert await submit(api, "acme", key, "a@acme.test", ["u@inbox.test"])
    # On the other process, once its poll has read the change feed.
    deadline = time.monotonic() + 30
    while not other.app.control.may_send_as(tenant_id, "acme.test"):
        assert time.monotonic() < deadline, "the other process never took the verification"
        await asyncio.sleep(0.02)
    async with other.client(key) as c:
        r = await c.post("/v1/messages", json=MESSAGE)
        assert r.status_code == 202, r.text
    assert await submit(other, "acme", key, "a@acme.test", ["u@inbox.test"])
    # All four go out, signed by the processes that took them.
    await api.lab.wait_for_messages(4)
