"""The lab publishes the control plane's sending domains in its DNS (lab/publish.py)."""

from __future__ import annotations

import re

import pytest

from postwarden.lab.publish import DomainPublisher
from tests.control.conftest import ControlFactory, control  # noqa: F401  (the fixture)
from tests.pg import postgres  # noqa: F401  (control's fixture, unused on SQLite)


@pytest.mark.parametrize("control", ["sqlite"], indirect=True)
async def test_publisher_keeps_the_lab_dns_in_step_with_domains(
    control: ControlFactory,  # noqa: F811 - the fixture imported above
) -> None:
    api = await control()
    lines: list[str] = []
    pub = DomainPublisher(api.lab, api.app.cfg, api.app.control.sessions, say=lines.append)
    dns = api.lab.dns
    key = await api.tenant("acme")
    async with api.client(key) as c:
        # A domain made before the lab starts (the database outlives a run): at start.
        early = (await c.post("/v1/domains", json={"name": "early.test"})).json()
        assert dns.records("early.test", "TXT") == []
        await pub.start()
        try:
            assert re.fullmatch(
                r"lab: published DNS for early\.test \(DKIM s=pw1-\w+-ed, s=pw1-\w+-rsa; SPF; "
                r"DMARC; return path pwb\.early\.test MX\+SPF; tracking CNAME\) - verify with "
                rf"POST /v1/domains/{early['id']}/verify",
                lines[0],
            ), lines
            for rec in early["records"]:
                got = dns.records(rec["name"], rec["type"])
                assert any(rec["value"] in g.replace('" "', "") for g in got), (rec, got)
            # Mail to the domain lands in the lab, as for demo.lab.test.
            assert dns.records("early.test", "MX") == ["10 mx1.lab.test."]

            # Verify right after creation finds every record: the lab DNS re-reads the
            # database before answering a name it does not hold.
            d = (await c.post("/v1/domains", json={"name": "acme.test"})).json()
            v = (await c.post(f"/v1/domains/{d['id']}/verify")).json()
            assert v["verified"], v
            assert sum("published DNS for acme.test" in x for x in lines) == 1, lines

            # A rotation's new keys are published too ("updated"), the old ones kept.
            r = await c.post(f"/v1/domains/{d['id']}/dkim/rotate")
            assert r.status_code == 200, r.text
            new = [k["selector"] for k in r.json()["dkim"] if k["generation"] == 2]
            await pub.wait_until(lambda: any("updated DNS for acme.test" in x for x in lines))
            for sel in new:
                assert dns.records(f"{sel}._domainkey.acme.test", "TXT"), sel
            old = [k["selector"] for k in r.json()["dkim"] if k["generation"] == 1]
            assert all(dns.records(f"{s}._domainkey.acme.test", "TXT") for s in old)

            # A removed domain's records go, its MX too; the other domain's stay.
            assert (await c.delete(f"/v1/domains/{d['id']}")).status_code == 200
            await pub.wait_until(lambda: "lab: removed DNS for acme.test" in lines)
            assert dns.records("acme.test", "TXT") == []
            assert dns.records("acme.test", "MX") == []
            assert dns.records(f"{old[0]}._domainkey.acme.test", "TXT") == []
            assert dns.records("early.test", "MX") == ["10 mx1.lab.test."]
        finally:
            await pub.stop()
    assert dns.refresh is None
