"""Sending domains: DKIM keys made and kept encrypted, the records to publish, checks
through the lab DNS, signing with the verified keys, and rotation."""

from __future__ import annotations

import re

import aiosmtplib
import dkim
import pytest
from sqlalchemy import select

from postwarden.store.models import DkimKey
from tests.control.conftest import ControlFactory


def by_purpose(domain: dict, purpose: str) -> list[dict]:  # type: ignore[type-arg]
    return [r for r in domain["records"] if r["purpose"] == purpose]


async def test_new_domain_shows_records_and_keeps_keys_encrypted(control: ControlFactory) -> None:
    api = await control({"delivery": {"source_address": "127.0.0.1"}})
    key = await api.tenant("acme")
    async with api.client(key) as c:
        r = await c.post("/v1/domains", json={"name": "Acme.Test."})
        assert r.status_code == 201, r.text
        d = r.json()
    assert d["name"] == "acme.test" and d["verified"] is False
    dk = by_purpose(d, "dkim")
    assert {x["value"].split(";")[1].strip() for x in dk} == {"k=rsa", "k=ed25519"}
    assert all(x["name"].endswith("._domainkey.acme.test") and x["required"] for x in dk)
    assert by_purpose(d, "spf")[0]["value"] == "v=spf1 ip4:127.0.0.1 ~all"
    assert by_purpose(d, "dmarc")[0] == {
        **by_purpose(d, "dmarc")[0],
        "name": "_dmarc.acme.test",
        "value": "v=DMARC1; p=none",
        "required": False,
    }
    rp = by_purpose(d, "return_path_mx")[0]
    assert rp["name"] == "pwb.acme.test" and rp["value"] == "10 postwarden.test"
    assert by_purpose(d, "return_path_spf")[0]["value"] == "v=spf1 ip4:127.0.0.1 -all"
    assert by_purpose(d, "tracking")[0]["type"] == "CNAME"
    async with api.app.control.sessions() as s:
        rows = (await s.execute(select(DkimKey))).scalars().all()
    assert len(rows) == 2
    for row in rows:
        assert b"PRIVATE KEY" not in row.private_key and row.private_key.startswith(b"gAAAA")
        assert api.app.control.box.open(row.private_key)  # decrypts with the configured key
    # The same domain for another tenant is a conflict, not a second owner.
    other = await api.tenant("other")
    async with api.client(other) as c:
        assert (await c.post("/v1/domains", json={"name": "acme.test"})).status_code == 409
        r = await c.post("/v1/domains", json={"name": "not a domain"})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "name"


async def test_verify_reports_missing_mismatch_then_ok(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        d = (await c.post("/v1/domains", json={"name": "acme.test"})).json()
        r = await c.post(f"/v1/domains/{d['id']}/verify")
        assert r.status_code == 200
        v = r.json()
        assert not v["verified"] and {x["status"] for x in v["records"]} == {"missing"}
        # Publish everything but SPF right; the DKIM RSA record carries another key.
        api.publish(d, skip=("spf",))
        api.lab.dns.add("acme.test", "TXT", "v=spf1 include:elsewhere.test ~all")
        rsa = next(x for x in by_purpose(d, "dkim") if "k=rsa" in x["value"])
        api.lab.dns.remove(rsa["name"], "TXT")
        api.lab.dns.add(rsa["name"], "TXT", "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A")
        v = (await c.post(f"/v1/domains/{d['id']}/verify")).json()
        status = {x["purpose"] + ":" + x["name"]: x for x in v["records"]}
        spf = status["spf:acme.test"]
        assert spf["status"] == "mismatch" and "a:postwarden.test" in spf["detail"]
        assert spf["found"] == ["v=spf1 include:elsewhere.test ~all"]
        assert status[f"dkim:{rsa['name']}"]["status"] == "mismatch"
        assert status["dmarc:_dmarc.acme.test"]["status"] == "ok"
        assert not v["verified"]
        # Put both right: verified.
        api.publish(d)
        v = (await c.post(f"/v1/domains/{d['id']}/verify")).json()
        assert v["verified"], [x for x in v["records"] if x["status"] != "ok"]
        assert all(k["state"] == "signing" for k in v["dkim"])
        # A later GET shows the last check.
        g = (await c.get(f"/v1/domains/{d['id']}")).json()
        assert g["verified"] and {x["status"] for x in g["records"]} == {"ok"}


@pytest.mark.sqlite_only  # HTTP/SMTP-level: see tests/control/conftest.py
async def test_dns_failure_is_an_error_not_missing(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        d = await api.verified_domain(key, "acme.test")
        api.lab.dns.set_fault("acme.test", "servfail")
        v = (await c.post(f"/v1/domains/{d['id']}/verify")).json()
        spf = next(x for x in v["records"] if x["purpose"] == "spf")
        assert spf["status"] == "error"
        assert v["verified"]  # a DNS outage does not unverify a domain


async def send(api, mail_from: str, to: str) -> None:  # type: ignore[no-untyped-def]
    host, port = api.app.smtp_addresses[0]
    msg = (f"From: <{mail_from}>\r\nTo: <{to}>\r\nSubject: hello\r\n\r\nbody\r\n").encode()
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        await smtp.sendmail(mail_from, [to], msg)


async def verify_signatures(api, data: bytes) -> list[str]:  # type: ignore[no-untyped-def]
    """The selectors of the signatures that verify against the lab DNS."""
    ok = []
    sels = [s.decode() for s in re.findall(rb"(?m)^DKIM-Signature:.*?\bs=([^;\s]+)", data, re.S)]
    dom = re.findall(rb"(?m)^DKIM-Signature:.*?\bd=([^;\s]+)", data, re.S)
    txt = {}
    for sel, d in zip(sels, dom, strict=True):
        name = f"{sel}._domainkey.{d.decode()}"
        txt[name] = "".join(await api.app.control.fresh_resolver.resolve_txt(name)).encode()
    for idx, sel in enumerate(sels):
        if dkim.DKIM(data).verify(idx=idx, dnsfunc=lambda n, **_: txt[n.decode().rstrip(".")]):
            ok.append(sel)
    return ok


async def test_verified_domain_signs_and_rotation_keeps_old_key_until_removed(
    control: ControlFactory,
) -> None:
    api = await control()
    api.lab.add_domain("inbox.test")
    key = await api.tenant("acme")
    # Unverified: the keys exist but do not sign.
    async with api.client(key) as c:
        d0 = (await c.post("/v1/domains", json={"name": "unverified.test"})).json()
    await send(api, "a@unverified.test", "u@inbox.test")
    msgs = await api.lab.wait_for_messages(1)
    assert b"DKIM-Signature" not in msgs[0].data
    assert d0["dkim"][0]["state"] == "pending"

    d = await api.verified_domain(key, "acme.test")
    gen1 = {k["selector"] for k in d["dkim"]}
    # No wait: the verify answer came once the signer had the keys.
    await send(api, "a@acme.test", "u@inbox.test")
    msgs = await api.lab.wait_for_messages(2)
    assert sorted(await verify_signatures(api, msgs[1].data)) == sorted(gen1)

    async with api.client(key) as c:
        r = await c.post(f"/v1/domains/{d['id']}/dkim/rotate")
        assert r.status_code == 200
        d2 = r.json()
        gen2 = {k["selector"] for k in d2["dkim"] if k["generation"] == 2}
        assert len(gen2) == 2 and {k["state"] for k in d2["dkim"] if k["generation"] == 2} == {
            "pending"
        }
        assert (await c.post(f"/v1/domains/{d['id']}/dkim/rotate")).status_code == 409
        # Checking before the new records are out does not unverify a signing domain.
        v = (await c.post(f"/v1/domains/{d['id']}/verify")).json()
        assert v["verified"], [x for x in v["records"] if x["required"] and x["status"] != "ok"]
        assert {k["state"] for k in v["dkim"] if k["generation"] == 1} == {"signing"}
        # Until the new records verify, generation 1 keeps signing.
        await send(api, "a@acme.test", "u@inbox.test")
        msgs = await api.lab.wait_for_messages(3)
        assert sorted(await verify_signatures(api, msgs[2].data)) == sorted(gen1)
        api.publish(d2)
        v = (await c.post(f"/v1/domains/{d['id']}/verify")).json()
        assert v["verified"]
        states = {k["selector"]: k["state"] for k in v["dkim"]}
        assert {states[s] for s in gen1} == {"retired"} and {states[s] for s in gen2} == {"signing"}
        # The retired keys are still published (mail in flight verifies), not required.
        old = [
            x for x in v["records"] if x["purpose"] == "dkim" and x["name"].split(".")[0] in gen1
        ]
        assert old and not any(x["required"] for x in old)
        await send(api, "a@acme.test", "u@inbox.test")
        msgs = await api.lab.wait_for_messages(4)
        assert sorted(await verify_signatures(api, msgs[3].data)) == sorted(gen2)
        # A signing key cannot be removed; a retired one can.
        sel2 = next(iter(gen2))
        assert (await c.delete(f"/v1/domains/{d['id']}/dkim/{sel2}")).status_code == 409
        for sel in gen1:
            assert (await c.delete(f"/v1/domains/{d['id']}/dkim/{sel}")).status_code == 200
        g = (await c.get(f"/v1/domains/{d['id']}")).json()
        assert {k["selector"] for k in g["dkim"]} == gen2


async def test_verify_is_in_force_for_the_next_request_and_keys_are_parsed_once(
    control: ControlFactory,
) -> None:
    """The answer to verify comes once this process may send From the domain and sign
    with its keys: a send right after it is accepted and signed. A later domain change
    re-reads the keys but does not parse the ones it had again (tens of milliseconds an
    RSA key, which a database of many domains would spend on every change)."""
    api = await control()
    api.lab.add_domain("inbox.test")
    key = await api.tenant("acme")
    d = await api.verified_domain(key, "first.test")
    async with api.client(key) as c:
        r = await c.post(
            "/v1/messages",
            json={"from": "a@first.test", "to": ["u@inbox.test"], "subject": "s", "text": "t"},
        )
        assert r.status_code == 202, r.text
    msgs = await api.lab.wait_for_messages(1)
    selectors = sorted(await verify_signatures(api, msgs[0].data))
    assert selectors == sorted(k["selector"] for k in d["dkim"])
    plane = api.app.control
    assert plane is not None
    before = {id(k) for k in plane.signing.keys}
    await api.verified_domain(key, "second.test")
    after = {id(k) for k in plane.signing.keys}
    assert before < after and len(after) == 2 * len(before)
