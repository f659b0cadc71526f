"""Listing messages: GET /v1/messages (a tenant's own) and GET
/v1/tenants/{id}/messages (an operator's view of one tenant), newest first, each filter,
cursor pagination through ties of time, tenant isolation, and bad filters refused."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import httpx
import pytest

from postwarden.control import message_list
from postwarden.store.models import Message, Recipient
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_smtp_tenant import submit

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


async def tenant_id(api: ControlApi, key: str) -> int:
    async with api.client(key) as c:
        tid: int = (await c.get("/v1/keys")).json()["data"][0]["tenant_id"]
        return tid


async def seed(api: ControlApi, tid: int, rows: list[dict[str, Any]]) -> None:
    """Messages as the event copier writes them (each row: the message's columns and
    ``rcpts``, a list of (address, state))."""
    async with api.app.control.sessions() as s:
        for i, row in enumerate(rows):
            row = dict(row)
            rcpts = row.pop("rcpts")
            s.add(Message(tenant_id=tid, **row))
            for n, (address, state) in enumerate(rcpts):
                s.add(
                    Recipient(
                        id=f"{row['id']}.{n}",
                        message_id=row["id"],
                        tenant_id=tid,
                        address=address,
                        state=state,
                        updated_at=T0 + dt.timedelta(seconds=i),
                    )
                )
        await s.commit()


def corpus(prefix: str) -> list[dict[str, Any]]:
    """30 messages over 10 distinct times (three at each: ties the cursor must break),
    with states, recipients, tags, senders and sources that the filters pick apart."""
    rows = []
    for i in range(30):
        states = ["delivered"] if i % 3 else ["delivered", "bounced"]
        if i % 10 == 0:
            states = ["deferred"]
        rcpts = [(f"r{i}@inbox.test", states[0])]
        rcpts += [(f"{prefix}-archive@inbox.test", s) for s in states[1:]]
        rows.append(
            {
                "id": f"{prefix}{i:03d}",
                "created_at": T0 + dt.timedelta(minutes=i // 3),
                # The SMTP ones keep the domain as the client sent it.
                "mail_from": "news@acme.test" if i % 2 else "Shop@ACME.Test",
                "subject": f"subject {i}",
                "source": "api" if i % 2 else "smtp",
                "tags": ["orders", "eu"] if i % 5 == 0 else (["orders-2"] if i % 5 == 1 else []),
                "meta": {"n": str(i)},
                "rcpts": rcpts,
            }
        )
    return rows


def newest_first(rows: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in sorted(rows, key=lambda r: (r["created_at"], r["id"]), reverse=True)]


async def every_page(c: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        q = {**params, **({"cursor": cursor} if cursor else {})}
        r = await c.get(path, params=q)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["data"]) <= params.get("limit", 100)
        out += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            return out
    raise AssertionError("pagination did not end")


@pytest.mark.long
async def test_filters_pagination_and_isolation(
    control: ControlFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hundreds of pages are read: no rate limit in the way.
    api = await control({"control": {"rate_limit": 100000, "rate_burst": 100000}})
    key_a = await api.tenant("alpha")
    key_b = await api.tenant("bravo")
    reader_a = await api.tenant("alpha-reader", scopes=("read",))
    tid_a, tid_b = await tenant_id(api, key_a), await tenant_id(api, key_b)
    rows_a, rows_b = corpus("a"), corpus("b")
    await seed(api, tid_a, rows_a)
    await seed(api, tid_b, rows_b)
    by_id = {r["id"]: r for r in rows_a}
    by_b = {r["id"]: r for r in rows_b}

    def expect(pred: Any) -> list[str]:
        return [i for i in newest_first(rows_a) if pred(by_id[i])]

    def states(r: dict[str, Any]) -> set[str]:
        return {s for _, s in r["rcpts"]}

    async with api.client(key_a) as c:
        # Every page, through ties of time, once each and newest first.
        got = await every_page(c, "/v1/messages", limit=4)
        assert [m["id"] for m in got] == newest_first(rows_a)
        assert got[-1] == {
            "id": "a000",
            "tenant_id": tid_a,
            "created_at": "2026-11-01T12:00:00Z",
            "mail_from": "Shop@ACME.Test",
            "subject": "subject 0",
            "source": "smtp",
            "tags": ["orders", "eu"],
            "metadata": {"n": "0"},
            "recipients": 1,
            "states": {"deferred": 1},
        }
        three = next(m for m in got if m["id"] == "a003")
        assert three["recipients"] == 2 and three["states"] == {"bounced": 1, "delivered": 1}
        # A full page gives a cursor even when nothing follows; the page after is empty.
        r = await c.get("/v1/messages", params={"limit": 30})
        assert len(r.json()["data"]) == 30 and r.json()["next_cursor"] is not None
        r = await c.get("/v1/messages", params={"limit": 30, "cursor": r.json()["next_cursor"]})
        assert r.json() == {"data": [], "next_cursor": None}
        cursor_a = (await c.get("/v1/messages", params={"limit": 5})).json()["next_cursor"]
        # Each filter, and filters together, paged through.
        cases: list[tuple[dict[str, Any], Any]] = [
            ({"status": "bounced"}, lambda r: "bounced" in states(r)),
            ({"status": "deferred"}, lambda r: "deferred" in states(r)),
            ({"status": "expired"}, lambda r: False),
            ({"since": "2026-11-01T12:03:00Z"}, lambda r: r["created_at"] >= T0 + _m(3)),
            ({"until": "2026-11-01T13:03:00+01:00"}, lambda r: r["created_at"] < T0 + _m(3)),
            (
                {"since": "2026-11-01T12:02:00Z", "until": "2026-11-01T12:05:00Z"},
                lambda r: T0 + _m(2) <= r["created_at"] < T0 + _m(5),
            ),
            ({"recipient": "r7@inbox.test"}, lambda r: r["id"] == "a007"),
            (
                {"recipient": "a-archive@inbox.test"},
                lambda r: any(a == "a-archive@inbox.test" for a, _ in r["rcpts"]),
            ),
            ({"recipient": "b-archive@inbox.test"}, lambda r: False),  # bravo's
            ({"tag": "orders"}, lambda r: "orders" in r["tags"]),  # not orders-2
            ({"tag": "orders-2"}, lambda r: "orders-2" in r["tags"]),
            ({"tag": "order"}, lambda r: False),
            ({"from": "news@acme.test"}, lambda r: r["mail_from"] == "news@acme.test"),
            ({"domain": "acme.test"}, lambda r: True),
            ({"domain": "ACME.test."}, lambda r: True),
            ({"domain": "cme.test"}, lambda r: False),
            ({"source": "smtp"}, lambda r: r["source"] == "smtp"),
            (
                {"status": "delivered", "tag": "orders", "source": "api"},
                lambda r: (
                    "delivered" in states(r) and "orders" in r["tags"] and r["source"] == "api"
                ),
            ),
        ]
        # Every way to a page gives the same pages: the defaults (few matches of a
        # recipient filter are looked up; other filters walk windows of 500), then
        # every recipient filter walked too, in windows smaller than a page.
        for lookup, first, most in ((5000, 500, 32000), (0, 2, 5), (1, 1, 1)):
            monkeypatch.setattr(message_list, "LOOKUP_LIMIT", lookup)
            monkeypatch.setattr(message_list, "WINDOW_FIRST", first)
            monkeypatch.setattr(message_list, "WINDOW_MAX", most)
            for params, pred in cases:
                for limit in (3, 100):
                    got = await every_page(c, "/v1/messages", limit=limit, **params)
                    assert [m["id"] for m in got] == expect(pred), (lookup, first, params, limit)
        monkeypatch.undo()
    # Tenant B's key sees B's only: never one of A's, whatever the filter or cursor.
    async with api.client(key_b) as c:
        got = await every_page(c, "/v1/messages", limit=7)
        assert [m["id"] for m in got] == newest_first(rows_b)
        for params in ({"recipient": "a-archive@inbox.test"}, {"recipient": "r7@inbox.test"}):
            ids = [m["id"] for m in await every_page(c, "/v1/messages", **params)]
            assert all(i.startswith("b") for i in ids), ids
        # A's cursor is a place in time here: B's older messages, none of A's.
        r = await c.get("/v1/messages", params={"cursor": cursor_a})
        older = [
            i
            for i in newest_first(rows_b)
            if by_b[i]["created_at"] < by_id[newest_first(rows_a)[4]]["created_at"]
        ]
        assert [m["id"] for m in r.json()["data"]] == older
    # A read-only key lists; an operator key is refused here (its route is the tenant's).
    async with api.client(reader_a) as c:
        assert (await c.get("/v1/messages")).json() == {"data": [], "next_cursor": None}
    async with api.client(api.admin_key) as c:
        r = await c.get("/v1/messages")
        assert r.status_code == 403 and "tenant key" in r.json()["error"]["message"]
        # The operator's view of a tenant: the same list and filters.
        got = await every_page(c, f"/v1/tenants/{tid_a}/messages", limit=8)
        assert [m["id"] for m in got] == newest_first(rows_a)
        got = await every_page(c, f"/v1/tenants/{tid_b}/messages", status="bounced")
        assert [m["id"] for m in got] == [
            i
            for i in newest_first(rows_b)
            if i[1:] in {r["id"][1:] for r in rows_a if "bounced" in states(r)}
        ]
        r = await c.get("/v1/tenants/999999/messages")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    async with api.client(key_a) as c:
        r = await c.get(f"/v1/tenants/{tid_a}/messages")
        assert r.status_code == 403 and "operator key" in r.json()["error"]["message"]


def _m(minutes: int) -> dt.timedelta:
    return dt.timedelta(minutes=minutes)


@pytest.mark.sqlite_only  # HTTP/SMTP-level: see tests/control/conftest.py
async def test_bad_filters_are_refused_naming_the_field(control: ControlFactory) -> None:
    api = await control()
    key = await api.tenant("acme")
    async with api.client(key) as c:
        for params, path, words in (
            ({"status": "bounce"}, "status", "'bounced'"),
            ({"since": "2026-11-01T12:00:00"}, "since", "time zone"),
            ({"until": "yesterday"}, "until", ""),
            ({"cursor": "bm90LWEtY3Vyc29y"}, "cursor", "not a cursor"),  # "not-a-cursor"
            ({"cursor": "!!"}, "cursor", ""),
            ({"limit": "0"}, "limit", ""),
            ({"limit": "1001"}, "limit", ""),
            ({"tag": "no tags with spaces"}, "tag", ""),
            ({"domain": "not a domain"}, "domain", "not a domain"),
            ({"source": "carrier-pigeon"}, "source", "'api'"),
            ({"recipient": ""}, "recipient", ""),
            ({"sort": "oldest"}, "sort", ""),
        ):
            r = await c.get("/v1/messages", params=params)
            assert r.status_code == 422, (params, r.text)
            err = r.json()["error"]
            assert err["fields"][0]["path"] == path, (params, err)
            assert words in err["message"], (params, err)


async def test_real_mail_is_listed_with_its_recipients_states(control: ControlFactory) -> None:
    """Messages sent through the API and over SMTP AUTH, followed to delivery and to a
    bounce: the list shows each, newest first, with its recipients' states."""
    api = await control()
    api.lab.add_domain("inbox.test")
    api.lab.add_domain("nouser.test", behaviour="reject")
    key = await api.tenant("acme")
    await api.verified_domain(key, "acme.test")
    async with api.client(key) as c:
        r = await c.post(
            "/v1/messages",
            json={
                "from": "news@acme.test",
                "to": ["ann@inbox.test", "gone@nouser.test"],
                "subject": "first",
                "text": "t",
                "tags": ["news"],
                "metadata": {"k": "v"},
            },
        )
        assert r.status_code == 202, r.text
        first = r.json()["id"]
        # Listed at once: the API remembers what it accepted.
        r = await c.get("/v1/messages")
        assert [m["id"] for m in r.json()["data"]] == [first]
        second = await submit(api, "acme", key, "shop@acme.test", ["bob@inbox.test"])
        deadline = time.monotonic() + 30
        while True:
            r = await c.get("/v1/messages")
            data = r.json()["data"]
            done = [m["states"] for m in data] == [
                {"delivered": 1},
                {"bounced": 1, "delivered": 1},
            ]
            if done:
                break
            assert time.monotonic() < deadline, data
            await asyncio.sleep(0.1)
        assert [m["id"] for m in data] == [second, first]
        assert data[0]["source"] == "smtp" and data[0]["mail_from"] == "shop@acme.test"
        assert data[1]["tags"] == ["news"] and data[1]["metadata"] == {"k": "v"}
        assert data[1]["subject"] == "first" and data[1]["recipients"] == 2
        r = await c.get("/v1/messages", params={"status": "bounced"})
        assert [m["id"] for m in r.json()["data"]] == [first]
        r = await c.get("/v1/messages", params={"recipient": "bob@inbox.test"})
        assert [m["id"] for m in r.json()["data"]] == [second]
        r = await c.get("/v1/messages", params={"source": "api", "tag": "news"})
        assert [m["id"] for m in r.json()["data"]] == [first]


@pytest.mark.sqlite_only  # the copier's reading of an event, not the database's
async def test_an_event_naming_no_tenant_id_does_not_stop_the_copy(
    control: ControlFactory,
) -> None:
    """Mail accepted under a tenant that is no control-plane id (the lab's and the
    shaping tests' names) stays in the spool's log only; the tenant's mail after it is
    still copied and listed."""
    from postwarden.queue.spool import new_message_id
    from postwarden.values import Envelope

    api = await control()
    api.lab.add_domain("inbox.test")
    key = await api.tenant("acme")
    await api.verified_domain(key, "acme.test")
    data = b"From: x@big.test\r\nTo: c@inbox.test\r\nSubject: f\r\n\r\nx\r\n"
    await api.app.acceptance.accept(
        Envelope("x@big.test", ["c@inbox.test"], tenant="big"), data, new_message_id()
    )
    mid = await submit(api, "acme", key, "shop@acme.test", ["bob@inbox.test"])
    async with api.client(key) as c:
        deadline = time.monotonic() + 30
        while True:
            data_ = (await c.get("/v1/messages")).json()["data"]
            if [m["states"] for m in data_] == [{"delivered": 1}]:
                break
            assert time.monotonic() < deadline, data_
            await asyncio.sleep(0.1)
        assert [m["id"] for m in data_] == [mid]
