"""SMTP submission as a tenant naming a pool and a priority (X-Postwarden-Pool,
X-Postwarden-Priority): allowed, forbidden, unknown, bad priority; the fields never
reach the spool or the recipient."""

from __future__ import annotations

import dataclasses

import aiosmtplib
import pytest

from postwarden.control.relay import Credentials, RelayError, SmtpRelay
from postwarden.values import LANE_BULK, LANE_HIGH, Envelope
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_domains import verify_signatures
from tests.control.test_messages import ready_tenant
from tests.control.test_pools import POOLS, events_of, spooled

# Pool and priority header fields over SMTP and the relay: SQLite only
# (the rule is in tests/control/conftest.py).
pytestmark = pytest.mark.sqlite_only


async def send(api: ControlApi, key: str, fields: bytes, rcpt: str = "u@later.test") -> str:
    """Submit as tenant acme with ``fields`` in the header; the spool's message id."""
    host, port = api.app.smtp_addresses[0]
    msg = (
        b"From: Shop <shop@acme.test>\r\nTo: " + rcpt.encode() + b"\r\n" + fields
        + b"Subject: pools\r\n\r\nx-postwarden-pool: in the body stays\r\n"
    )  # fmt: skip
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        await smtp.login("acme", key)
        _, resp = await smtp.sendmail("shop@acme.test", [rcpt], msg)
    return resp.rsplit(" ", 1)[-1]


async def refused(api: ControlApi, key: str, fields: bytes) -> aiosmtplib.SMTPDataError:
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await send(api, key, fields)
    return exc.value


async def test_smtp_header_fields_name_pool_and_priority(control: ControlFactory) -> None:
    api = await control(POOLS)
    api.lab.add_domain("later.test", behaviour="tempfail")  # stays in the spool
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    async with api.client(api.admin_key) as c:
        r = await c.post("/v1/pools", json={"name": "warm", "members": [{"source": "b"}]})
        assert r.status_code == 201
        tid = (await c.get("/v1/tenants")).json()["data"][0]["id"]
        r = await c.patch(f"/v1/tenants/{tid}", json={"allowed_pools": ["warm"]})
        assert r.status_code == 200

    # Refused at the end of DATA, nothing spooled.
    err = await refused(api, key, b"X-Postwarden-Pool: cfg\r\n")
    assert (err.code, err.message) == (550, "5.7.1 this account may not send from pool 'cfg'")
    err = await refused(api, key, b"X-Postwarden-Pool: nope\r\n")
    assert (err.code, err.message) == (550, "5.7.1 no pool named 'nope'")
    err = await refused(api, key, b"X-Postwarden-Pool: Bad Name!\r\n")
    assert err.code == 550 and err.message.startswith("5.7.1 no pool named")
    err = await refused(api, key, b"X-Postwarden-Priority: urgent\r\n")
    assert (err.code, err.message) == (550, "5.6.0 X-Postwarden-Priority must be high or bulk")
    err = await refused(api, key, b"X-Postwarden-Pool: warm\r\nX-Postwarden-Priority:\r\n")
    assert err.code == 550 and err.message.startswith("5.6.0")
    assert not events_of(api)

    # Allowed: the pool, folded and in any case of field name; the priority too.
    bulk = await send(api, key, b"x-postwarden-POOL:\r\n  warm \r\nX-Postwarden-Priority: Bulk\r\n")
    plain = await send(api, key, b"")
    high = await send(api, key, b"X-Postwarden-Priority: high\r\nX-Postwarden-Pool: default\r\n")
    row = spooled(api, bulk)
    assert (row["pool"], row["lane"]) == ("warm", LANE_BULK)
    assert (spooled(api, plain)["pool"], spooled(api, plain)["lane"]) == (None, LANE_HIGH)
    assert (spooled(api, high)["pool"], spooled(api, high)["lane"]) == ("default", LANE_HIGH)
    # Taken off before signing and spooling; the body is the body.
    body = api.app.spool.read_location(row["segment"], row["body_offset"], row["body_length"])
    head, _, text = body.partition(b"\r\n\r\n")
    assert b"x-postwarden" not in head.lower() and b"DKIM-Signature:" in head
    assert text == b"x-postwarden-pool: in the body stays\r\n"

    # The tenant's own default pool applies to mail that names none.
    async with api.client(api.admin_key) as c:
        r = await c.patch(f"/v1/tenants/{tid}", json={"default_pool": "warm"})
        assert r.status_code == 200
    assert spooled(api, await send(api, key, b""))["pool"] == "warm"
    err = await refused(api, key, b"X-Postwarden-Pool: default\r\n")
    assert err.code == 550 and "may not" in err.message

    # What reaches the recipient carries none of the fields, and its signature holds.
    await send(api, key, b"X-Postwarden-Pool: warm\r\n", rcpt="ann@inbox.test")
    got = await api.lab.wait_for_messages(1)
    assert b"x-postwarden" not in got[0].data.partition(b"\r\n\r\n")[0].lower()
    assert len(await verify_signatures(api, got[0].data)) == 2


async def test_relay_carries_pool_and_priority(control: ControlFactory) -> None:
    """``serve --role control`` relays API messages over SMTP: the pool and priority
    ride as the two header fields, and the MTA applies (and checks) them."""
    api = await control(POOLS)
    api.lab.add_domain("later.test", behaviour="tempfail")  # stays in the spool
    key = await ready_tenant(api)
    async with api.client(api.admin_key) as c:
        await c.post("/v1/pools", json={"name": "warm", "members": [{"source": "b"}]})
        tid = (await c.get("/v1/tenants")).json()["data"][0]["id"]
        await c.patch(f"/v1/tenants/{tid}", json={"allowed_pools": ["warm"]})
    host, port = api.app.smtp_addresses[0]
    cfg = dataclasses.replace(
        api.app.cfg, control=dataclasses.replace(api.app.cfg.control, submit_to=f"{host}:{port}")
    )
    relay = SmtpRelay(cfg)
    msg = b"From: shop@acme.test\r\nSubject: s\r\n\r\nx\r\n"
    creds = Credentials("acme", key)
    meta = {"subject": "s", "tags": ["t"], "metadata": {}}
    for pool, lane in (("warm", LANE_BULK), (None, LANE_HIGH), ("default", LANE_HIGH)):
        env = Envelope("shop@acme.test", ["u@later.test"], meta=meta, pool=pool, lane=lane)
        stored = await relay.inject(env, msg, "unused", creds)
        row = spooled(api, stored.msg_id)
        assert (row["pool"], row["lane"]) == (pool, lane)
        body = api.app.spool.read_location(row["segment"], row["body_offset"], row["body_length"])
        assert b"X-Postwarden" not in body
    # The MTA checks the pool against the tenant's again.
    env = Envelope("shop@acme.test", ["u@later.test"], meta=meta, pool="cfg", lane=LANE_HIGH)
    with pytest.raises(RelayError, match="may not send from pool 'cfg'"):
        await relay.inject(env, msg, "unused", creds)
