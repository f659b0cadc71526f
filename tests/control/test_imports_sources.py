"""Data sources: CSV and JSON pulled from an HTTP server the test starts on loopback,
each pull an import; redirects, internal addresses, size and HTTP errors refused and
reported as failed imports."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from postwarden.store.contact_models import Contact
from tests.control.conftest import ControlFactory
from tests.control.test_imports import finished
from tests.waiting import eventually

Reply = tuple[int, dict[str, str], bytes]


class Site:
    """A small HTTP/1.1 server on 127.0.0.1: path -> (status, headers, body)."""

    def __init__(self) -> None:
        self.pages: dict[str, Reply] = {}
        self.hits: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            self.hits.append(path)
            status, headers, body = self.pages.get(path, (404, {}, b"no"))
            headers = {"Content-Length": str(len(body)), **headers, "Connection": "close"}
            w.write(f"HTTP/1.1 {status} X\r\n".encode())
            w.write("".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n")
            w.write(body)
            await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    s = Site()
    await s.start()
    yield s
    await s.stop()


async def pulled(c: httpx.AsyncClient, source_id: int, n: int) -> list[dict[str, Any]]:
    """The source's first ``n`` imports, once each has ended."""

    async def ready() -> list[dict[str, Any]] | None:
        r = await c.get("/v1/imports", params={"data_source_id": source_id})
        data: list[dict[str, Any]] = r.json()["data"]
        return data if len(data) >= n else None

    listed = await eventually(ready, 30, f"{n} pulls of source {source_id}")
    return [await finished(c, x["id"]) for x in listed[:n]]


async def test_csv_and_json_sources_are_pulled_into_imports(
    control: ControlFactory, site: Site
) -> None:
    api = await control()
    key = await api.tenant("acme")
    site.pages["/people.csv"] = (200, {"Content-Type": "text/csv"},
                                 b"email,name,plan\nann@example.com,Ann,pro\nbad,X,\n")  # fmt: skip
    people = {"data": [
        {"email": "bo@example.com", "name": "Bo", "tags": ["a", "b"], "score": 3.5,
         "vip": True, "gone": None},
        {"email": "cy@example.com", "tags": []},
    ]}  # fmt: skip
    site.pages["/people.json"] = (200, {}, json.dumps(people).encode())
    site.pages["/moved"] = (302, {"Location": "/people.csv"}, b"")
    async with api.client(key) as c:
        r = await c.post(
            "/v1/data-sources",
            json={"url": site.url("/people.csv"), "format": "csv", "interval": 60,
                  "on_conflict": "update", "name": "crm"},
        )  # fmt: skip
        assert r.status_code == 201, r.text
        src = r.json()
        assert src["interval"] == 60 and src["options"]["on_conflict"] == "update"
        (imp,) = await pulled(c, src["id"], 1)
        assert imp["state"] == "done" and imp["data_source_id"] == src["id"], imp
        assert (imp["rows_imported"], imp["rows_rejected"]) == (1, 1)
        assert imp["errors"][0]["row"] == 3 and imp["errors"][0]["column"] == "email"
        got = (await c.get(f"/v1/data-sources/{src['id']}")).json()
        assert got["last_import_id"] == imp["id"]

        # Pulled again on demand; the schedule is not run early by itself.
        assert site.hits == ["/people.csv"]
        r = await c.post(f"/v1/data-sources/{src['id']}/run")
        assert r.status_code == 202
        first, second = await pulled(c, src["id"], 2)
        assert second["state"] == "done" and second["contacts_created"] == 0

        r = await c.post(
            "/v1/data-sources",
            json={"url": site.url("/people.json"), "format": "json", "interval": 3600},
        )
        (imp,) = await pulled(c, r.json()["id"], 1)
        assert imp["state"] == "done" and imp["rows_imported"] == 2, imp
        # A redirect on the same host is followed.
        r = await c.post("/v1/data-sources", json={"url": site.url("/moved"), "interval": 3600})
        (imp,) = await pulled(c, r.json()["id"], 1)
        assert imp["state"] == "done" and imp["rows_imported"] == 1, imp

        # Disabled, then deleted: its imports stay.
        r = await c.patch(f"/v1/data-sources/{src['id']}", json={"enabled": False})
        assert r.status_code == 200 and r.json()["enabled"] is False
        assert (await c.delete(f"/v1/data-sources/{src['id']}")).status_code == 200
        assert (await c.get(f"/v1/data-sources/{src['id']}")).status_code == 404
        assert (await c.get(f"/v1/imports/{first['id']}")).json()["data_source_id"] is None

    async with api.app.control.sessions() as s:
        rows = (await s.execute(select(Contact))).scalars().all()
    by = {x.email: x for x in rows}
    assert by["ann@example.com"].attributes == {"plan": "pro"}
    assert by["bo@example.com"].name == "Bo"
    assert by["bo@example.com"].attributes == {"tags": "a|b", "score": "3.5", "vip": "true"}
    assert by["cy@example.com"].attributes == {}

    other = await api.tenant("other")
    async with api.client(other) as c:
        assert (await c.get("/v1/data-sources")).json()["data"] == []


@pytest.mark.sqlite_only
async def test_pulls_that_are_refused_become_failed_imports(
    control: ControlFactory, site: Site
) -> None:
    api = await control()
    key = await api.tenant("acme")
    api.lab.dns.add("inside.test", "A", "10.1.2.3")
    site.pages["/elsewhere"] = (302, {"Location": f"http://127.0.0.2:{site.port}/x"}, b"")
    site.pages["/huge"] = (200, {"Content-Length": str(40 * 1024 * 1024)}, b"")
    site.pages["/broken"] = (500, {}, b"oops")
    site.pages["/notjson"] = (200, {}, b"[1, 2]")
    cases = [
        ("http://10.1.2.3/a.csv", "csv", "refusing to connect to 10.1.2.3"),
        ("http://inside.test/a.csv", "csv", "refusing to connect to 10.1.2.3"),
        (f"http://[::1]:{site.port}/a.csv", "csv", "refusing to connect to ::1"),
        (site.url("/elsewhere"), "csv", "redirected to another host (127.0.0.2)"),
        (site.url("/huge"), "csv", "larger than 33554432 bytes"),
        (site.url("/broken"), "csv", "HTTP 500"),
        (site.url("/notjson"), "json", "JSON: item 0 is not an object"),
    ]
    async with api.client(key) as c:
        for url, fmt, why in cases:
            r = await c.post("/v1/data-sources", json={"url": url, "format": fmt})
            assert r.status_code == 201, r.text
            (imp,) = await pulled(c, r.json()["id"], 1)
            assert imp["state"] == "failed" and why in imp["error"], (url, imp)
        assert "/x" not in site.hits
        for body, path in [
            ({"url": "ftp://example.com/a.csv"}, "url"),
            ({"url": "not a url"}, "url"),
            ({"url": site.url("/a"), "interval": 10}, "interval"),
            ({"url": site.url("/a"), "format": "xml"}, "format"),
            ({"url": site.url("/a"), "mapping": {"a": "list:nope"}}, "mapping.a"),
            ({"url": site.url("/a"), "on_conflict": "merge"}, "on_conflict"),
        ]:
            r = await c.post("/v1/data-sources", json=body)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["fields"][0]["path"] == path, r.text
