"""Contact imports through the API: a CSV with every kind of bad row and its report,
multipart uploads with a mapping, encodings and delimiters, dry runs, whole-file
failures, and what another tenant sees."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import httpx
from sqlalchemy import select

from postwarden.store.contact_models import (
    AttributeDef,
    Contact,
    ContactList,
    ListMember,
    Topic,
    TopicSubscription,
)
from postwarden.store.import_models import Import
from tests.control.conftest import ControlApi, ControlFactory
from tests.waiting import eventually


async def finished(c: httpx.AsyncClient, iid: int, timeout: float = 30) -> dict[str, Any]:
    """The import once it has ended (done, failed or cancelled)."""

    async def ended() -> dict[str, Any] | None:
        r = await c.get(f"/v1/imports/{iid}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body if body["state"] in ("done", "failed", "cancelled") else None

    return await eventually(ended, timeout, f"import {iid} to end")


async def tenant_id(c: httpx.AsyncClient) -> int:
    tid: int = (await c.get("/v1/keys")).json()["data"][0]["tenant_id"]
    return tid


async def setup_tenant(api: ControlApi, tid: int) -> dict[str, int]:
    """Attribute types, a list and a topic, as the contacts API would make them."""
    async with api.app.control.sessions() as s:
        s.add_all(
            [
                AttributeDef(tenant_id=tid, name="age", type="number"),
                AttributeDef(tenant_id=tid, name="vip", type="boolean"),
            ]
        )
        beta = ContactList(tenant_id=tid, name="beta")
        news = Topic(tenant_id=tid, name="news")
        s.add_all([beta, news])
        await s.commit()
        return {"beta": beta.id, "news": news.id}


async def contacts(api: ControlApi, tid: int) -> dict[str, Contact]:
    async with api.app.control.sessions() as s:
        rows = (await s.execute(select(Contact).where(Contact.tenant_id == tid))).scalars()
        return {x.email: x for x in rows}


REPORT_CSV = (
    "email,name,age,vip,list:beta,topic:news,topic:gone\r\n"
    "ann@example.com,Ann,31,yes,yes,yes,\r\n"  # row 2: good
    "not-an-address,Bob,40,no,,,\r\n"  # row 3: bad email
    "cy@example.com,Cy,22\r\n"  # row 4: ragged
    'dee@example.com,"Dee\nSecond line",50,,no,no,\r\n'  # row 5: quoted newline (a name
    # may not hold one: rejected, and still one record)
    "ANN@Example.com,Ann again,32,,,,\r\n"  # row 6: duplicate of row 2
    "eve@example.com,Eve,old,maybe,,,\r\n"  # row 7: wrong types (two columns)
    "fay@example.com,Fay,,,,,yes\r\n"  # row 8: an unknown topic
    "\r\n"  # row 9: blank, skipped
    'gus@example.com,"Gus, Jr.",7,1,1,0,\r\n'  # row 10: good
)


async def test_a_csv_with_bad_rows_is_reported_row_by_row(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        tid = await tenant_id(c)
        ids = await setup_tenant(api, tid)
        # An address suppressed before it is imported: its new contact takes the status.
        r = await c.post(
            "/v1/suppressions", json={"address": "gus@example.com", "reason": "hard_bounce"}
        )
        assert r.status_code == 201, r.text
        r = await c.post(
            "/v1/imports", content=REPORT_CSV.encode(), headers={"Content-Type": "text/csv"}
        )
        assert r.status_code == 202, r.text
        iid = r.json()["id"]
        imp = await finished(c, iid)
        assert imp["state"] == "done", imp
        assert (imp["rows_total"], imp["rows_done"]) == (8, 8)
        assert (imp["rows_imported"], imp["rows_rejected"]) == (2, 6)
        assert imp["contacts_created"] == 2
        errors = {e["row"]: e for e in imp["errors"]}
        assert sorted(errors) == [3, 4, 5, 6, 7, 8]
        assert errors[3]["column"] == "email" and "not a valid email" in errors[3]["reason"]
        assert errors[4]["column"] == "" and "3 fields; the header has 7" in errors[4]["reason"]
        assert errors[5]["column"] == "name" and "U+000A" in errors[5]["reason"]
        assert errors[6]["column"] == "email" and "duplicate of row 2" in errors[6]["reason"]
        assert errors[7]["column"] == "age" and "'old' is not a number" in errors[7]["reason"]
        assert "vip: 'maybe' is not a boolean" in errors[7]["reason"]
        assert errors[8] == {"row": 8, "column": "topic:gone", "reason": "no topic 'gone'"}

        # Every rejected row, its reason and its cells as the file had them.
        r = await c.get(f"/v1/imports/{iid}/rejects.csv")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        table = list(csv.reader(io.StringIO(r.text)))
        assert table[0] == ["row", "column", "reason", "email", "name", "age", "vip",
                            "list:beta", "topic:news", "topic:gone"]  # fmt: skip
        assert [int(t[0]) for t in table[1:]] == [3, 4, 5, 6, 7, 8]
        assert table[3][3:5] == ["dee@example.com", "Dee\nSecond line"]
        assert table[4][3] == "ANN@Example.com"

        r = await c.get("/v1/imports")
        assert [x["id"] for x in r.json()["data"]] == [iid]

    found = await contacts(api, tid)
    assert sorted(found) == ["ann@example.com", "gus@example.com"]
    ann, gus = found["ann@example.com"], found["gus@example.com"]
    assert (ann.name, ann.attributes) == ("Ann", {"age": 31, "vip": True})
    assert (gus.name, gus.attributes) == ("Gus, Jr.", {"age": 7, "vip": True})
    assert (ann.status, gus.status) == ("active", "bounced")
    async with api.app.control.sessions() as s:
        members = (await s.execute(select(ListMember.contact_id))).scalars().all()
        subs = (await s.execute(select(TopicSubscription))).scalars().all()
    assert sorted(members) == sorted([ann.id, gus.id])
    assert {(x.contact_id, x.topic_id, x.opted_in) for x in subs} == {
        (ann.id, ids["news"], True),
        (gus.id, ids["news"], False),
    }

    # Another tenant sees none of it.
    other = await api.tenant("other")
    async with api.client(other) as c:
        assert (await c.get(f"/v1/imports/{iid}")).status_code == 404
        assert (await c.get(f"/v1/imports/{iid}/rejects.csv")).status_code == 404
        assert (await c.post(f"/v1/imports/{iid}/cancel")).status_code == 404
        assert (await c.get("/v1/imports")).json()["data"] == []

    # Cancelled while queued (the runner stopped, so that it stays queued): it never
    # runs; an import that ended cannot be cancelled.
    await api.app.control.imports.stop()
    async with api.client(key) as c:
        r = await c.post("/v1/imports", content=b"email\nzed@example.com\n",
                         headers={"Content-Type": "text/csv"})  # fmt: skip
        queued = r.json()["id"]
        assert (await c.get(f"/v1/imports/{queued}")).json()["state"] == "queued"
        r = await c.post(f"/v1/imports/{queued}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        assert (await c.post(f"/v1/imports/{queued}/cancel")).status_code == 409
        r = await c.post(f"/v1/imports/{iid}/cancel")
        assert r.status_code == 409 and "the import is done" in r.json()["error"]["message"]
    assert "zed@example.com" not in await contacts(api, tid)


async def test_multipart_mapping_encodings_delimiters_and_dry_run(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        tid = await tenant_id(c)
        ids = await setup_tenant(api, tid)
        # Latin-1, semicolons, columns named as the exporter named them.
        latin = "Adresse;Nom;Âge;Beta\nzoé@example.com;Zoé;29;oui\nli@example.com;Lì;33;1\n"
        mapping = {"Adresse": "email", "Nom": "name", "Âge": "attribute:age"}
        options = {"mapping": {**mapping, "Beta": f"list:{ids['beta']}"}, "encoding": "latin-1"}
        r = await c.post(
            "/v1/imports",
            files={"file": ("people.csv", latin.encode("latin-1"), "text/csv")},
            data={"options": json.dumps(options)},
        )
        assert r.status_code == 202, r.text
        imp = await finished(c, r.json()["id"])
        assert imp["state"] == "done" and imp["rows_imported"] == 1, imp
        # "oui" is no yes/no: the row is rejected, naming the column.
        assert imp["errors"] == [
            {"row": 2, "column": "Beta", "reason": "'oui' is not yes/no (true/false, 1/0)"}
        ]
        assert imp["options"]["delimiter"] is None and imp["options"]["encoding"] == "latin-1"
        found = await contacts(api, tid)
        assert found["li@example.com"].name == "Lì"
        assert found["li@example.com"].attributes == {"age": 33}

        # UTF-8 with a BOM, TAB-separated, options as form fields: on_conflict=skip
        # leaves Lì as she is; a dry run writes nothing at all.
        tsv = "\ufeffemail\tname\nli@example.com\tSomeone else\nnew@example.com\tNew\n"
        for dry in ("true", "false"):
            r = await c.post(
                "/v1/imports",
                files={"file": ("p.tsv", tsv.encode("utf-8"), "text/csv")},
                data={"on_conflict": "skip", "dry_run": dry},
            )
            assert r.status_code == 202, r.text
            imp = await finished(c, r.json()["id"])
            assert imp["state"] == "done" and imp["rows_imported"] == 2, imp
            assert imp["contacts_created"] == (0 if dry == "true" else 1)
            found = await contacts(api, tid)
            assert ("new@example.com" in found) == (dry == "false")
            assert found["li@example.com"].name == "Lì"

        # The charset of the Content-Type stands for encoding when it is not given.
        r = await c.post("/v1/imports", content="email,name\nlu@example.com,Lü\n".encode("latin-1"),
                         headers={"Content-Type": "text/csv; charset=ISO-8859-1"})  # fmt: skip
        assert (await finished(c, r.json()["id"]))["options"]["encoding"] == "latin-1"
        assert (await contacts(api, tid))["lu@example.com"].name == "Lü"

        # on_conflict=replace: the file's attributes are Lì's attributes whole.
        for body, attrs in [(b"email,plan\nli@example.com,gold\n", {"plan": "gold"}),
                            (b"email,plan\nli@example.com,\n", {})]:  # fmt: skip
            r = await c.post("/v1/imports", content=body, params={"on_conflict": "replace"},
                             headers={"Content-Type": "text/csv"})  # fmt: skip
            imp = await finished(c, r.json()["id"])
            assert imp["contacts_updated"] == 1, imp
            assert (await contacts(api, tid))["li@example.com"].attributes == attrs

        # Whole-file failures: nothing of the file is written, the reason is given.
        for body, query, why in [
            (b"email,name\nx@example.com,\xff\n", {}, "not UTF-8: byte 0xff near byte 25"),
            (b"mail,name\nx@example.com,X\n", {}, "no column is the email"),
            (b"email,First Name\nx@example.com,X\n", {}, "'First Name' is not an attribute"),
            (
                b"email,name\nx@example.com,X\n",
                {"mapping": json.dumps({"e-mail": "email"})},
                "the file has no column 'e-mail'",
            ),
            (b'email,name\nx@example.com,"X\n' + b"y" * 200_000, {}, "row 2: a cell longer"),
            (b"email,name\n" + b"x@example.com," * 80_000, {}, "a line longer than"),
        ]:
            r = await c.post(
                "/v1/imports", content=body, params=query, headers={"Content-Type": "text/csv"}
            )
            assert r.status_code == 202, r.text
            imp = await finished(c, r.json()["id"])
            assert imp["state"] == "failed" and why in imp["error"], (why, imp)
            assert imp["rows_imported"] == 0
        assert "x@example.com" not in await contacts(api, tid)

        # Refused at once, with the field at fault.
        for kw, status, path in [
            ({"params": {"on_conflict": "merge"}}, 422, "on_conflict"),
            ({"params": {"mapping": "{"}}, 422, "mapping"),
            ({"params": {"mapping": json.dumps({"a": "email", "b": "phone"})}}, 422, "mapping"),
            ({"params": {"mapping": json.dumps({"e": "list:nope"})}}, 422, "mapping.e"),
            ({"params": {"mapping": json.dumps({"e": "topic:999"})}}, 422, "mapping.e"),
            ({"content": b""}, 422, "body"),
        ]:
            kw.setdefault("content", b"e\nx@example.com\n")
            r = await c.post("/v1/imports", headers={"Content-Type": "text/csv"}, **kw)
            assert r.status_code == status, (kw, r.text)
            assert r.json()["error"]["fields"][0]["path"] == path, r.text
        r = await c.post("/v1/imports", json={"email": "x@example.com"})
        assert r.status_code == 415
        r = await c.post("/v1/imports", files={"other": ("a.csv", b"email\n")})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "file"
        # Nothing half-received is left behind by a refused upload.
        listed = (await c.get("/v1/imports", params={"limit": 100})).json()["data"]
        assert len(listed) == 12
        async with api.app.control.sessions() as s:
            states = (await s.execute(select(Import.state))).scalars().all()
        assert sorted(states) == ["done"] * 6 + ["failed"] * 6

    read_only = await api.tenant("reader", scopes=("read",))
    async with api.client(read_only) as c:
        r = await c.post("/v1/imports", content=b"email\n", headers={"Content-Type": "text/csv"})
        assert r.status_code == 403
