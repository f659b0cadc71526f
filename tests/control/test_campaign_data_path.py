"""Issue 20's path through the API only, as a tenant walks it: declare an attribute,
make a list, import a CSV with bad rows and read the report, build an audience on
the list and an attribute and preview its count, write a template from design JSON,
lint it, preview it with an imported contact, and test-send it into the lab, where
it arrives DKIM-signed and rendered for that contact."""

from __future__ import annotations

import email
import email.policy
from typing import Any

from tests.control.conftest import ControlFactory
from tests.control.test_domains import verify_signatures
from tests.control.test_imports import finished
from tests.control.test_messages import ready_tenant, until
from tests.waiting import eventually

CSV = (
    "email,name,plan,list:vip\n"
    "ann@inbox.test,Ann,pro,yes\n"
    "bob@inbox.test,Bob,free,yes\n"
    "not an address,Nobody,pro,yes\n"
    "cy@inbox.test,Cy,pro,no\n"
)
DESIGN = {
    "version": 1,
    "sections": [
        {
            "columns": [
                {
                    "blocks": [
                        {
                            "type": "text",
                            "html": "<p>Hello {{ contact.name }}, plan "
                            "{{ contact.attributes.plan }}</p>",
                        },
                        {"type": "button", "text": "Shop", "href": "https://shop.test/"},
                        {"type": "footer"},
                    ]
                }
            ]
        }
    ],
}


async def test_import_audience_template_preview_and_test_send(control: ControlFactory) -> None:
    api = await control()
    api.lab.add_domain("inbox.test")
    key = await ready_tenant(api)
    async with api.client(key) as c:
        r = await c.post("/v1/contact-attributes", json={"name": "plan", "type": "string"})
        assert r.status_code == 201, r.text
        assert (await c.post("/v1/lists", json={"name": "vip"})).status_code == 201
        r = await c.post("/v1/imports", content=CSV.encode(), headers={"Content-Type": "text/csv"})
        assert r.status_code == 202, r.text
        report = await finished(c, r.json()["id"])
        assert (report["state"], report["rows_imported"], report["rows_rejected"]) == (
            "done",
            3,
            1,
        )
        assert [(e["row"], e["column"]) for e in report["errors"]] == [(4, "email")]

        rule = 'attributes.plan == "pro" and in_list("vip")'
        r = await c.post("/v1/audiences", json={"name": "pro vips", "rule": rule})
        assert r.status_code == 201, r.text
        r = await c.get(f"/v1/audiences/{r.json()['id']}/preview")
        assert r.json()["count"] == 1 and [x["email"] for x in r.json()["sample"]] == [
            "ann@inbox.test"
        ]
        ann = r.json()["sample"][0]["id"]

        r = await c.post(
            "/v1/templates",
            json={
                "name": "news",
                "category": "marketing",
                "subject": "For {{ contact.name }}",
                "design": DESIGN,
            },
        )
        assert r.status_code == 201, r.text
        tid = r.json()["id"]
        lint = (await c.post(f"/v1/templates/{tid}/lint")).json()
        # The tenant has set no postal address yet: the lint says so.
        assert "postal_address_unset" in [f["code"] for f in lint["findings"]], lint
        r = await c.post(f"/v1/templates/{tid}/preview", json={"contact_id": ann})
        assert "Hello Ann, plan pro" in r.json()["html"], r.text

        r = await c.post(
            f"/v1/templates/{tid}/test-send",
            json={"from": "news@acme.test", "to": ["seed@inbox.test"], "contact_id": ann},
        )
        assert r.status_code == 202, r.text
        sent = r.json()["messages"][0]["id"]
        await until(c, sent, lambda m: m["recipients"][0]["state"] == "delivered")

    def arrived() -> list[Any]:
        return [m for m in api.lab.messages if m.rcpt_tos == ["seed@inbox.test"]]

    await eventually(lambda: len(arrived()) == 1, 15, "the test send in the lab")
    raw = arrived()[0].data
    assert len(await verify_signatures(api, raw)) >= 1
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == "For Ann" and parsed["X-Postwarden-Test"] == "1"
    html = parsed.get_body(("html",))
    assert html is not None and "Hello Ann, plan pro" in html.get_content()
