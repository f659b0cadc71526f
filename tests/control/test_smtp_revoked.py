"""A key revoked (or its tenant disabled) while an SMTP session that logged in with it
is open: the next MAIL of that session is refused, and its AUTH state is gone."""

from __future__ import annotations

import ssl

import aiosmtplib
import pytest

from postwarden.store.secrets import key_prefix
from tests.control.conftest import ControlApi, ControlFactory
from tests.waiting import eventually

MSG = b"From: a@acme.test\r\nTo: u@inbox.test\r\nSubject: s\r\n\r\nbody\r\n"


def no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def session(api: ControlApi, key: str) -> aiosmtplib.SMTP:
    host, port = api.app.smtp_addresses[0]
    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, tls_context=no_verify())
    await smtp.connect()
    await smtp.starttls()
    await smtp.login("acme", key)
    return smtp


async def test_key_revoked_mid_session_is_refused_at_the_next_mail(
    control: ControlFactory,
) -> None:
    # 127.0.0.1 is not trusted here: without AUTH nothing may relay.
    api = await control(
        {"smtp": {"trusted_networks": ["10.0.0.0/8"]},
         "control": {"require_verified_domains": False}}
    )  # fmt: skip
    api.lab.add_domain("inbox.test")
    key = await api.tenant("acme")
    async with api.client(key) as c:
        r = await c.post("/v1/keys", json={"name": "second", "scopes": ["send"]})
        assert r.status_code == 201, r.text
        other, other_id = r.json()["key"], r.json()["id"]
    smtp = await session(api, key)
    kept = await session(api, other)
    try:
        errors, _ = await smtp.sendmail("a@acme.test", ["u@inbox.test"], MSG)
        assert errors == {}
        async with api.client(key) as c:
            keys = (await c.get("/v1/keys")).json()["data"]
            kid = next(k["id"] for k in keys if k["id"] != other_id)
            r = await c.delete(f"/v1/keys/{kid}")
            assert r.status_code == 200 and r.json()["revoked_at"], r.text
        await eventually(
            lambda: key_prefix(key) in api.app.control.revocations.revoked_keys,
            10,
            "the revoked key",
        )
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await smtp.sendmail("a@acme.test", ["u@inbox.test"], MSG)
        assert refused.value.code == 530
        assert refused.value.message == "5.7.0 Authentication credentials invalid"
        # The session is no longer authenticated; the key does not log in again.
        await smtp.rset()
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as again:
            await smtp.sendmail("a@acme.test", ["u@inbox.test"], MSG)
        assert again.value.message == "5.7.0 Authentication required"
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await smtp.login("acme", key)
        # The tenant's other key, in its own session, still sends.
        errors, _ = await kept.sendmail("a@acme.test", ["u@inbox.test"], MSG)
        assert errors == {}
        # Disabling the tenant stops that one at its next MAIL too.
        async with api.client(api.admin_key) as c:
            tid = (await c.get("/v1/tenants")).json()["data"][0]["id"]
            r = await c.patch(f"/v1/tenants/{tid}", json={"disabled": True})
            assert r.status_code == 200, r.text
        await eventually(
            lambda: tid in api.app.control.revocations.disabled_tenants, 10, "the disabled tenant"
        )
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as disabled:
            await kept.sendmail("a@acme.test", ["u@inbox.test"], MSG)
        assert disabled.value.code == 530
        rejected = api.app.metrics.registry.get_sample_value(
            "postwarden_smtp_rejected_total", {"reason": "credentials_revoked"}
        )
        assert rejected == 2
    finally:
        smtp.close()
        kept.close()
    await api.lab.wait_for_messages(2)
