"""A PostgreSQL outage under load (issue 18): a real private server is stopped and
started again while API and SMTP clients keep sending. Nothing answers 500 or shows
internal text; the API says 503 with Retry-After for what needs the database and goes
on with cached keys for the rest; SMTP AUTH of a key never seen says 454; /healthz
goes degraded then ok; every accepted message is delivered exactly once; an
idempotent request spooled while the database was down answers as the first time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiosmtplib
import httpx
import pytest

from postwarden.lab import Lab
from postwarden.queue.admin import QueueAdmin
from tests.control.conftest import ControlApi, make_admin_key
from tests.pg import PgServer, start_server, stop_server
from tests.waiting import eventually

INTERNAL = ("Traceback", "Errno", "asyncpg", "sqlalchemy", "ConnectionRefused", "Error:")


@pytest.fixture
def own_postgres() -> Iterator[PgServer]:
    """A server of this test's own: it is stopped and started again."""
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)


async def api_on(server: PgServer, appliance: Any, lab: Lab) -> ControlApi:
    """An appliance with its API on a database of ``server`` (one the test stops)."""
    app = await appliance({"database": {"url": server.new_database()}})
    assert app.control_address is not None
    base = "http://{}:{}".format(*app.control_address)
    return ControlApi(app, base, await make_admin_key(app), lab)


class Load:
    """API and SMTP clients that send until told to stop, retrying what is refused
    for now, and keep every answer."""

    def __init__(self, api: ControlApi, key: str) -> None:
        self.api, self.key = api, key
        self.sent: list[str] = []  # recipients accepted (202 / 250)
        self.refused: Counter[str] = Counter()  # temporary refusals seen, by kind
        self.bad: list[str] = []  # answers that must never come
        self.stop = asyncio.Event()
        self.n = 0

    def _rcpt(self) -> str:
        self.n += 1
        return f"r{self.n}@inbox.test"

    async def api_client(self) -> None:
        async with self.api.client(self.key) as c:
            while not self.stop.is_set():
                rcpt, idem = self._rcpt(), uuid.uuid4().hex
                body = {"from": "shop@acme.test", "to": [rcpt], "subject": "s", "text": "x"}
                while True:  # the same key until it is accepted: a retry is safe
                    r = await c.post("/v1/messages", json=body, headers={"Idempotency-Key": idem})
                    if r.status_code == 202:
                        self.sent.append(rcpt)
                        break
                    if r.status_code == 503 and r.headers.get("retry-after"):
                        self.refused[f"api {r.json()['error']['type']}"] += 1
                    else:
                        self.bad.append(f"API {r.status_code} {r.text[:300]}")
                        break
                    await asyncio.sleep(0.1)  # the client's back-off
                await asyncio.sleep(0.02)

    async def reader(self) -> None:
        async with self.api.client(self.key) as c:
            while not self.stop.is_set():
                r = await c.get("/v1/events", params={"limit": 10})
                if r.status_code == 503 and r.headers.get("retry-after"):
                    self.refused[f"events {r.json()['error']['type']}"] += 1
                elif r.status_code != 200:
                    self.bad.append(f"events {r.status_code} {r.text[:300]}")
                if any(t in r.text for t in INTERNAL):
                    self.bad.append(f"events body: {r.text[:300]}")
                await asyncio.sleep(0.05)

    async def smtp_client(self) -> None:
        host, port = self.api.app.smtp_addresses[0]
        while not self.stop.is_set():
            rcpt = self._rcpt()
            msg = f"From: <shop@acme.test>\r\nTo: {rcpt}\r\nSubject: s\r\n\r\nx\r\n".encode()
            try:
                async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
                    await smtp.login("acme", self.key)
                    await smtp.sendmail("shop@acme.test", [rcpt], msg)
                self.sent.append(rcpt)
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code >= 500 or any(t in exc.message for t in INTERNAL):
                    self.bad.append(f"SMTP {exc.code} {exc.message}")
                else:
                    self.refused[f"smtp {exc.code}"] += 1
            await asyncio.sleep(0.02)


async def health(api: ControlApi, path: str = "/healthz") -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=api.base, timeout=10) as c:
        r = await c.get(path)
        return r.status_code, r.json()


async def until_health(api: ControlApi, status: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        _code, body = await health(api)
        if body["status"] == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/healthz never said {status}: {body}")
        await asyncio.sleep(0.05)


async def test_postgres_stopped_and_started_under_load(
    own_postgres: PgServer, appliance: Any, lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="postwarden")
    lab.add_domain("inbox.test")
    app = await appliance({"database": {"url": own_postgres.new_database()}})
    assert app.control_address is not None
    host, port = app.control_address
    api = ControlApi(app, f"http://{host}:{port}", await make_admin_key(app), lab)
    async with api.client(api.admin_key) as c:
        r = await c.post("/v1/tenants", json={"name": "acme"})
        tid = r.json()["id"]
        keys = []
        for name in ("k", "unseen"):
            r = await c.post(
                f"/v1/tenants/{tid}/keys", json={"name": name, "scopes": ["send", "read", "manage"]}
            )
            keys.append(r.json()["key"])
    key, unseen = keys  # unseen: no request uses it before the outage, no cache holds it
    await api.verified_domain(key, "acme.test")
    code, body = await health(api)
    assert code == 200 and body["status"] == "ok" and body["database"] == {"state": "up"}, body

    load = Load(api, key)
    tasks = [
        asyncio.create_task(load.api_client()),
        asyncio.create_task(load.api_client()),
        asyncio.create_task(load.smtp_client()),
        asyncio.create_task(load.reader()),
    ]
    try:
        await eventually(lambda: len(load.sent) >= 20, 30, "mail flowing before the outage")
        before = len(load.sent)
        caplog.clear()
        stopped = time.monotonic()
        await asyncio.to_thread(own_postgres.stop)
        down = await until_health(api, "degraded")
        assert down["down"] == ["database"] and down["database"]["state"] == "down", down
        assert (await health(api, "/readyz"))[0] == 503
        # What needs the database says so; mail with cached keys goes on.
        await eventually(
            lambda: load.refused["events database_unavailable"] >= 3, 30, "503s for reads"
        )
        await eventually(lambda: len(load.sent) >= before + 20, 30, "mail during the outage")
        # A key no cache holds: SMTP AUTH is a temporary failure, never a 5xx.
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as exc:
            async with aiosmtplib.SMTP(
                hostname=app.smtp_addresses[0][0], port=app.smtp_addresses[0][1], start_tls=False
            ) as smtp:
                await smtp.login("acme", unseen)
        assert exc.value.code == 454 and exc.value.message.startswith("4.7.0"), exc.value
        # An idempotent send while the database is down: spooled, its answer never
        # written to the database. A retry answers the same, now and after.
        idem = {"Idempotency-Key": "outage-1"}
        body = {"from": "shop@acme.test", "to": ["once@inbox.test"], "subject": "s", "text": "x"}
        async with api.client(key) as c:
            first = await c.post("/v1/messages", json=body, headers=idem)
            assert first.status_code == 202, first.text
            again = await c.post("/v1/messages", json=body, headers=idem)
            assert again.status_code == 202 and again.json() == first.json()
            other = await c.post("/v1/messages", json={**body, "subject": "t"}, headers=idem)
            assert other.status_code == 409, other.text
        outage = time.monotonic() - stopped
        records = list(caplog.records)
        await asyncio.to_thread(own_postgres.restart)
        await until_health(api, "ok")
        assert (await health(api, "/readyz"))[0] == 200
        async with api.client(key) as c:
            after = await c.post("/v1/messages", json=body, headers=idem)
            assert after.status_code == 202 and after.json() == first.json()
        n = len(load.sent)
        await eventually(lambda: len(load.sent) >= n + 20, 30, "mail after the outage")
    finally:
        load.stop.set()
        for t in tasks:
            with contextlib.suppress(Exception):
                await t
    assert not load.bad, load.bad[:5]
    # A readable log: one line per kind of failure per 10 s (with a count), each
    # traceback once; the outage itself said when it began.
    kinds = Counter(r.getMessage().split()[0] for r in records)
    assert all(n <= 1 + outage / 10 for n in kinds.values()), (outage, kinds)
    traces = Counter(r.getMessage().split()[0] for r in records if r.exc_info)
    assert all(n == 1 for n in traces.values()), traces
    assert any("event=database_unavailable" in r.getMessage() for r in records)
    # Every accepted message delivered, each once; the idempotent one once.
    want = Counter([*load.sent, "once@inbox.test"])
    await lab.wait_for_messages(sum(want.values()), timeout=60)
    got = Counter(r for m in lab.messages for r in m.rcpt_tos)
    assert got == want, (sorted((got - want).items())[:5], sorted((want - got).items())[:5])


async def test_the_appliance_starts_while_postgres_is_down(
    own_postgres: PgServer, appliance: Any, lab: Lab
) -> None:
    lab.add_domain("inbox.test")
    url = own_postgres.new_database()
    await asyncio.to_thread(own_postgres.stop)
    app = await appliance({"database": {"url": url}})  # starts: the MTA side needs no database
    assert app.control_address is not None
    host, port = app.control_address
    api = ControlApi(app, f"http://{host}:{port}", "", lab)
    code, body = await health(api)
    assert code == 200 and body["status"] == "degraded", body
    assert body["database"]["control_plane"] == "starting", body
    assert (await health(api, "/readyz"))[0] == 503
    async with api.client("pw_0123456789ab_" + "x" * 43) as c:
        r = await c.get("/v1/tenants")
        assert r.status_code == 503 and r.json()["error"]["type"] == "database_unavailable"
        assert r.headers["retry-after"]
    # Relaying from a trusted network: mail whose domain may have DKIM keys in the
    # database waits (451, the client retries); nothing internal is said.
    smtp_host, smtp_port = app.smtp_addresses[0]
    msg = b"From: <a@shop.test>\r\nTo: u@inbox.test\r\nSubject: s\r\n\r\nx\r\n"
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await aiosmtplib.send(msg, hostname=smtp_host, port=smtp_port, start_tls=False,
                              sender="a@shop.test", recipients=["u@inbox.test"])  # fmt: skip
    assert exc.value.code == 451 and exc.value.message.startswith("4.3.0"), exc.value
    assert not any(t in exc.value.message for t in INTERNAL)
    # The database comes: the control plane starts by itself, mail goes.
    await asyncio.to_thread(own_postgres.restart)
    body = await until_health(api, "ok")
    assert body["database"] == {"state": "up"}, body
    await aiosmtplib.send(msg, hostname=smtp_host, port=smtp_port, start_tls=False,
                          sender="a@shop.test", recipients=["u@inbox.test"])  # fmt: skip
    await lab.wait_for_messages(1, timeout=30)


async def test_tenant_mail_waits_until_the_suppressions_are_read(
    own_postgres: PgServer, appliance: Any, lab: Lab
) -> None:
    """Started with the database down, the appliance cannot know whom a tenant
    suppressed: its queued mail waits (never sent, never dropped) until it can."""
    lab.add_domain("later.test", behaviour="tempfail")
    cfg = {"database": {"url": own_postgres.new_database()}}
    first = await appliance(cfg)
    assert first.control_address is not None
    host, port = first.control_address
    api = ControlApi(first, f"http://{host}:{port}", await make_admin_key(first), lab)
    key = await api.tenant("acme")
    await api.verified_domain(key, "acme.test")
    async with api.client(key) as c:
        body = {"from": "shop@acme.test", "to": ["a@later.test", "b@later.test"], "text": "x"}
        r = await c.post("/v1/messages", json={**body, "subject": "s"})
        assert r.status_code == 202, r.text
        r = await c.post("/v1/suppressions", json={"address": "b@later.test"})
        assert r.status_code in (200, 201), r.text
    await first.stop()  # the mail waits in the spool (the MX said 451)
    await asyncio.to_thread(own_postgres.stop)
    lab.set_behaviour("later.test", "accept")
    second = await appliance(cfg)

    def waiting() -> list[dict[str, Any]]:
        admin = QueueAdmin(second.cfg.spool.path)
        try:
            return admin.list(limit=100)
        finally:
            admin.close()

    await eventually(
        lambda: len([r for r in waiting() if "suppression list" in (r["wait_reason"] or "")]) == 2,
        30,
        "the tenant's mail held",
    )
    assert not lab.messages  # nothing sent while whom to skip is unknown
    await asyncio.to_thread(own_postgres.restart)
    await lab.wait_for_messages(1, timeout=60)
    await eventually(lambda: not waiting(), 30, "an empty queue")
    assert [m.rcpt_tos for m in lab.messages] == [["a@later.test"]]  # b stayed suppressed


async def test_a_database_from_a_newer_version_stops_the_start(
    tmp_path: Any, appliance: Any
) -> None:
    """Not a state to wait out: the start stops, saying what to do (never an upgrade
    attempt on a revision this version does not know)."""
    import sqlite3

    from postwarden.control import ControlPlaneError
    from postwarden.store.db import upgrade

    path = tmp_path / "newer.db"
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade(url)
    db = sqlite3.connect(path)
    db.execute("UPDATE alembic_version SET version_num = 'f00d'")
    db.commit()
    db.close()
    with pytest.raises(ControlPlaneError) as exc:
        await appliance({"database": {"url": url, "auto_upgrade": True}})
    assert "revision f00d, which this version" in str(exc.value)
    assert "postwarden db downgrade" in str(exc.value)


async def test_serve_with_two_workers_starts_without_its_database(
    tmp_path: Any, subprocess_config: Any
) -> None:
    from tests.conftest import free_port
    from tests.queue.test_durability import serve

    # Nothing listens there: the database is down, not misconfigured.
    url = f"postgresql+asyncpg://pw@127.0.0.1:{free_port()}/postwarden"
    config, port = subprocess_config(
        {"server": {"workers": 2}, "database": {"url": url, "auto_upgrade": False}}
    )
    import tomllib

    control = tomllib.loads(config.read_text())["control"]["listen"]
    async with serve([], config, port, tmp_path / "serve.log"):
        async with httpx.AsyncClient(base_url=f"http://{control}", timeout=10) as c:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.TransportError):
                    r = await c.get("/healthz")
                    if r.status_code == 200:
                        break
                assert time.monotonic() < deadline, "no /healthz"
                await asyncio.sleep(0.1)
            assert r.json()["status"] == "degraded", r.json()
            assert r.json()["database"]["control_plane"] == "starting"
    log = (tmp_path / "serve.log").read_text()
    assert "event=database_unavailable" in log and "Traceback" not in log, log[-2000:]
