"""The campaign crash test of issue 21: a real ``postwarden serve`` with two workers
launches a 20 000-recipient campaign and is killed with SIGKILL twice, once while the
send records are being written and once while they are being fed to the spool; after
the last restart every contact of the snapshot has exactly one message at the lab
sinks, and the campaign ends ``sent`` with its counters equal to the sinks' counts.

While the kills happen the recipients' MX host accepts connections and never greets,
so that no message is accepted by a sink in the instant before the appliance records
it: that instant is SMTP's own at-least-once window (RFC 5321 6.1;
tests/queue/test_durability.py bounds it), not the campaign's. (A host that answers
4xx instead would cost a deferral of every message fed: most of the test's time.)
What this test proves is the campaign's part: the launch resumes at its cursor, and a
record cut off between the spool's fsync and its own update is neither sent twice nor
skipped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from postwarden.lab import Lab
from postwarden.store.campaign_models import Campaign, SendRecord
from postwarden.store.db import create_engine, sessionmaker
from tests.conftest import postwarden_cli
from tests.control.test_imports_crash import child_config, client
from tests.control.test_templates import ADDRESS, FOOTER
from tests.queue.test_durability import serve
from tests.waiting import eventually

N = 20_000
HTML = "<html><body><p>Hello {{ contact.name }}</p>" + FOOTER + "</body></html>"


async def progress(engine: AsyncEngine) -> dict[str, Any]:
    """The campaign's state, whether its records are all written, and its records by
    state (with how many pending ones already have a message id)."""
    async with sessionmaker(engine)() as s:
        row = (await s.execute(select(Campaign))).scalar_one_or_none()
        if row is None:
            return {"state": None, "records": 0, "by_state": {}}
        by = dict(
            (
                await s.execute(select(SendRecord.state, func.count()).group_by(SendRecord.state))
            ).all()
        )
        handed = await s.scalar(
            select(func.count()).where(
                SendRecord.state == "pending", SendRecord.message_id.is_not(None)
            )
        )
        return {
            "state": row.state,
            "records_done": row.records_done,
            "records": sum(by.values()),
            "by_state": by,
            "pending_with_id": handed,
        }


@contextlib.asynccontextmanager
async def silent_mx(lab: Lab, domain: str) -> Any:
    """``domain``'s MX: a host on the lab's port that accepts connections and never
    says a word (delivery waits for its greeting, delivery.timeouts.greeting)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    server = await asyncio.start_server(hold, "127.0.9.9", lab.mx_port)
    lab.dns.remove(domain, "MX")
    lab.dns.add(domain, "MX", "10 silent.lab.test.")
    lab.dns.add("silent.lab.test", "A", "127.0.9.9")
    try:
        yield held
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


def kill(proc: Any) -> None:
    """SIGKILL to the supervisor and its workers (their process group)."""
    os.killpg(proc.pid, signal.SIGKILL)


async def set_up(base: str, admin: str, lab: Lab) -> tuple[str, int]:
    """A tenant with a verified domain, 20 000 contacts, a template and an approved
    campaign to them: (the tenant's key, the campaign's id)."""
    async with client(base, admin) as c:
        tid = (await c.post("/v1/tenants", json={"name": "acme"})).json()["id"]
        r = await c.patch(f"/v1/tenants/{tid}", json={"settings": {"postal_address": ADDRESS}})
        assert r.status_code == 200, r.text
        r = await c.post(f"/v1/tenants/{tid}/keys",
                         json={"name": "k", "scopes": ["send", "read", "manage"]})  # fmt: skip
        key = r.json()["key"]
        r = await c.post(f"/v1/tenants/{tid}/keys", json={"name": "a", "scopes": ["approve"]})
        approver = r.json()["key"]
    async with client(base, key) as c:
        r = await c.post("/v1/domains", json={"name": "acme.test"})
        assert r.status_code == 201, r.text
        for rec in r.json()["records"]:
            lab.dns.remove(rec["name"], rec["type"])
            lab.dns.add(rec["name"], rec["type"], rec["value"])
        r = await c.post(f"/v1/domains/{r.json()['id']}/verify")
        assert r.status_code == 200 and r.json()["verified"], r.text
        rows = "".join(f"u{i}@inbox.test,User {i}\n" for i in range(N))
        r = await c.post("/v1/imports", content=("email,name\n" + rows).encode(),
                         headers={"Content-Type": "text/csv"})  # fmt: skip
        assert r.status_code == 202, r.text
        iid = r.json()["id"]

        async def imported() -> bool:
            got = (await c.get(f"/v1/imports/{iid}")).json()
            assert got["state"] in ("queued", "running", "done"), got
            return bool(got["state"] == "done")

        await eventually(imported, 90, "the import", interval=0.2)
        r = await c.post(
            "/v1/audiences", json={"name": "all", "rule": 'email.endswith("@inbox.test")'}
        )
        audience = r.json()["id"]
        t = {"name": "n", "category": "marketing", "subject": "Hi {{ contact.name }}",
             "html": HTML}  # fmt: skip
        r = await c.post("/v1/templates", json=t)
        template = r.json()["id"]
        r = await c.post("/v1/campaigns", json={"name": "big", "audience_id": audience,
                         "template_id": template, "from": {"email": "news@acme.test"}})  # fmt: skip
        cid = r.json()["id"]
        r = await c.post(f"/v1/campaigns/{cid}/validate", json={})
        assert r.json()["problems"] == [], r.text
    async with client(base, approver) as a:
        r = await a.post(f"/v1/campaigns/{cid}/approve", json={})
        assert r.status_code == 200, r.text
    return key, cid


@pytest.mark.timeout(300)
@pytest.mark.long(100)
async def test_a_campaign_killed_twice_sends_each_message_once(
    tmp_path: Path,
    lab: Lab,
    subprocess_config: Callable[..., tuple[Path, int]],
) -> None:
    overrides: dict[str, Any] = {
        "server": {"workers": 2},
        "control": {"import_batch": 5000},
        # The whole campaign may wait in the spool (the lab defers it while the
        # kills happen); small launch steps, so that the first kill falls among them.
        "campaigns": {"feed_window": N, "feed_batch": 250, "launch_batch": 100},
        # `postwarden queue flush` before the last start sends what waits at once.
        "queue": {"retry_initial": "1h", "retry_max": "1h"},
        # 20 000 messages (and the deferrals) over plain SMTP: TLS has its own tests.
        "delivery": {"tls": "disabled"},
    }
    config, conf, base, port, admin = await child_config(subprocess_config, overrides)
    url = conf["database"]["url"]
    log = tmp_path / "serve.log"
    engine = create_engine(url)  # the test's own reads of the progress, one pool
    try:
        await crash_twice_then_finish(engine, config, conf, base, port, admin, lab, log)
    finally:
        await engine.dispose()


async def crash_twice_then_finish(
    engine: AsyncEngine,
    config: Path,
    conf: dict[str, Any],
    base: str,
    port: int,
    admin: str,
    lab: Lab,
    log: Path,
) -> None:

    async with silent_mx(lab, "inbox.test"), serve([], config, port, log) as proc:
        key, cid = await set_up(base, admin, lab)
        async with client(base, key) as c:
            r = await c.post(f"/v1/campaigns/{cid}/schedule", json={})
            assert r.status_code == 200, r.text

        async def writing() -> bool:
            p = await progress(engine)
            assert not p.get("records_done"), f"all records written before the kill: {p}"
            return bool(p["records"] >= 2000)

        await eventually(writing, 60, "the launch writing records", interval=0.03)
        kill(proc)
        await proc.wait()
    first = await progress(engine)
    assert first["state"] == "sending" and 0 < first["records"] < N, first

    async with silent_mx(lab, "inbox.test"), serve([], config, port, log) as proc:

        async def feeding() -> bool:
            p = await progress(engine)
            fed = p["records"] - p["by_state"].get("pending", 0)
            assert p["by_state"].get("pending", 0) or not p["records_done"], (
                f"all fed before the kill: {p}"
            )
            return bool(p["records_done"] and fed >= N // 3)

        await eventually(feeding, 120, "the feeder handing records on", interval=0.05)
        kill(proc)
        await proc.wait()
    second = await progress(engine)
    assert second["records"] == N and second["by_state"].get("pending", 0) > 0, second

    print("at the first kill:", first, "\nat the second kill:", second)
    lab.add_domain("inbox.test")  # the lab's sink from now on
    code, out = await postwarden_cli(conf["spool"]["path"], "queue", "flush")
    assert code == 0, out
    async with serve([], config, port, log):
        async with client(base, key) as c:

            async def sent() -> dict[str, Any] | None:
                got: dict[str, Any] = (await c.get(f"/v1/campaigns/{cid}/stats")).json()
                return got if got["state"] == "sent" else None

            stats = await eventually(sent, 200, "the campaign to be sent", interval=0.5)

    arrived = collections.Counter(m.rcpt_tos[0] for m in lab.messages)
    twice = {a: n for a, n in arrived.items() if n > 1}
    assert not twice, f"{len(twice)} contacts got more than one message: {list(twice)[:5]}"
    assert set(arrived) == {f"u{i}@inbox.test" for i in range(N)}
    assert (stats["recipients"], stats["delivered"]) == (N, len(arrived)), stats
    assert stats["suppressed"] == stats["bounced"] == stats["pending"] == stats["queued"] == 0
