"""Tenants' mail through the cleanup stage, over real sockets: a From that hides
another domain never passes the verified-domain rule (SMTP), and API messages take
the same stage (our Received line, NUL, reserved headers)."""

from __future__ import annotations

import aiosmtplib
import pytest

from postwarden.lab.demo import dkim_verdicts
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_messages import ready_tenant

# The cleanup stage's header checks on API mail: SQLite only
# (the rule is in tests/control/conftest.py).
pytestmark = pytest.mark.sqlite_only

# The database plays no part here: SQLite only.
pytestmark = pytest.mark.parametrize("control", ["sqlite"], indirect=True)

# Each passed the tenant check as tenant.test before, while victim.test or other.test
# was shown (first mailbox) or signed (the signer's own From regex).
HIDING = [
    b'From: a@acme.test, "b" <@victim.test>',
    b"From: a@acme.test(@victim.test",
    b"From: ceo@victim.test a@acme.test",
    b"From: ceo@victim.test\x00a@acme.test",
]


async def acme(control: ControlFactory) -> tuple[ControlApi, str]:
    api = await control()
    api.lab.add_domain("inbox.test")
    await ready_tenant(api, "victim", "victim.test")
    return api, await ready_tenant(api)


async def smtp_send(api: ControlApi, key: str, message: bytes) -> aiosmtplib.SMTPResponse:
    host, port = api.app.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        await smtp.login("acme", key)
        _, reply = await smtp.sendmail("a@acme.test", ["u@inbox.test"], message)
    return reply


async def test_a_from_that_hides_another_domain_is_refused(control: ControlFactory) -> None:
    api, key = await acme(control)
    for head in HIDING:
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await smtp_send(api, key, head + b"\r\nSubject: s\r\n\r\nbody\r\n")
        assert exc.value.code == 550 and exc.value.message.startswith("5.6.0"), head
    # Sender does not let a tenant name another's domain among several authors.
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await smtp_send(
            api, key, b"From: a@acme.test, ceo@victim.test\r\nSender: a@acme.test\r\n\r\nb\r\n"
        )
    assert exc.value.code == 550 and exc.value.message.startswith("5.7.1")
    # The same tenant's plain From goes out, signed as the domain cleanup decided.
    await smtp_send(api, key, b"From: Shop <shop@ACME.test>\r\nSubject: s\r\n\r\nbody\r\n")
    got = await api.lab.wait_for_messages(1, timeout=10)
    assert len(got) == 1 and b"victim" not in got[0].data
    verdicts = await dkim_verdicts(got[0].data, api.app.resolver)
    assert verdicts and all(v.startswith("pass") and v.endswith("d=acme.test") for v in verdicts)


async def test_api_messages_pass_the_same_stage(control: ControlFactory) -> None:
    api, key = await acme(control)
    body = {"from": "shop@acme.test", "to": ["u@inbox.test"], "subject": "s", "text": "hi"}
    async with api.client(key) as c:
        r = await c.post("/v1/messages", json={**body, "html": "<p>a\u0000b</p>"})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "html", r.text
        for name in ("Resent-From", "resent-to", "Resent-Message-ID"):
            r = await c.post("/v1/messages", json={**body, "headers": {name: "x@victim.test"}})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["fields"][0]["path"] == f"headers.{name}"
        r = await c.post("/v1/messages", json=body)
        assert r.status_code == 202, r.text
    got = await api.lab.wait_for_messages(1, timeout=10)
    head = got[0].data.split(b"\r\n\r\n", 1)[0]
    assert b"Received: from api ([127.0.0.1])" in head and b"with HTTP id " in head
    verdicts = await dkim_verdicts(got[0].data, api.app.resolver)
    assert verdicts and all(v.startswith("pass") for v in verdicts)
