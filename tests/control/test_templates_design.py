"""A template made from a visual builder design (content.design) through the API: the
HTML compiled from it with its Jinja intact, the design kept with the version, lint
and preview on the compiled HTML, a bad design refused with the design's field path,
and hand-written HTML replacing the design."""

from __future__ import annotations

import copy

import pytest

from tests.content.design_samples import every_block
from tests.control.conftest import ControlFactory
from tests.control.test_templates import (
    contact_with_plan,
    expect_422,
    set_postal_address,
    tenant_id,
)


# Compiling design JSON; storing a template runs on both in test_templates.
@pytest.mark.sqlite_only
async def test_a_template_from_design_json(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    tid = await tenant_id(api, key)
    await set_postal_address(api, tid, "1 Main St, Springfield")
    contact = await contact_with_plan(api, tid)
    design = every_block()
    async with api.client(key) as c:
        r = await c.post(
            "/v1/templates",
            json={"name": "spring", "category": "marketing", "subject": "Spring", "design": design},
        )
        assert r.status_code == 201, r.text
        t = r.json()
        assert t["version"] == 1 and t["design"]["version"] == 1
        assert "<table" in t["html"] and "{{ contact.name }}" in t["html"]
        assert "{{ postal_address }}" in t["html"]  # the footer's, filled at each send

        r = await c.post(f"/v1/templates/{t['id']}/lint")
        assert r.status_code == 200 and r.json()["errors"] == 0, r.text

        r = await c.post(f"/v1/templates/{t['id']}/preview", json={"contact_id": contact})
        assert r.status_code == 200, r.text
        html = r.json()["html"]
        assert "Hello, Ann" in html and "1 Main St, Springfield" in html
        assert "{{" not in html and "{%" not in html

        # A bad design: 422 naming the field inside the design; nothing written.
        bad = copy.deepcopy(design)
        bad["sections"][0]["columns"][0]["blocks"][0]["button"]["href"] = "javascript:alert(1)"
        r = await c.patch(f"/v1/templates/{t['id']}", json={"design": bad})
        await expect_422(r, "design.sections[0].columns[0].blocks[0].button.href")
        r = await c.post("/v1/templates", json={"name": "x", "design": {"version": 1}})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"].startswith("design")
        r = await c.post("/v1/templates", json={"name": "x", "html": "<p>x</p>", "design": design})
        assert r.status_code == 422, r.text
        assert (await c.get(f"/v1/templates/{t['id']}")).json()["version"] == 1

        # A changed design is a new version; HTML written by hand drops the design.
        design["sections"][0]["columns"][0]["blocks"][0]["heading"] = "Hi, {{ contact.name }}"
        r = await c.patch(f"/v1/templates/{t['id']}", json={"design": design})
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
        assert "Hi, {{ contact.name }}" in r.json()["html"]
        r = await c.patch(f"/v1/templates/{t['id']}", json={"html": "<p>{{ contact.name }}</p>"})
        assert (r.json()["version"], r.json()["design"]) == (3, None)
        r = await c.get(f"/v1/templates/{t['id']}/versions/2")
        assert r.json()["design"]["sections"][0]["columns"][0]["blocks"][0]["heading"] == (
            "Hi, {{ contact.name }}"
        )
