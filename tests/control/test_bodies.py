"""Request bodies over a real socket (issue 15, item 6): a body that cannot become a
message (larger than smtp.max_message_size after base64) gets 413 before it is read,
declared or streamed; and the bytes of bodies held at once stay within
control.max_body_memory (a request past it waits, then gets 503 with Retry-After)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from postwarden.control.messages import api_body_limit
from tests.control.conftest import ControlApi, ControlFactory
from tests.control.test_messages import ready_tenant

# Request body limits and the body budget: SQLite only
# (the rule is in tests/control/conftest.py).
pytestmark = pytest.mark.sqlite_only

MAX_MESSAGE = 60_000


def limit_of(api: ControlApi) -> int:
    return api_body_limit(api.app.control)


async def open_post(
    api: ControlApi, key: str, headers: dict[str, str]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = api.base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = {
        "Host": f"{host}:{port}",
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        **headers,
    }
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in head.items())
        + b"\r\n"
    )
    await writer.drain()
    return reader, writer


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 response (Content-Length framed, as uvicorn sends JSON)."""
    status_line = await asyncio.wait_for(reader.readline(), 60)
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, json.loads(body) if body else None


def json_body(size: int) -> bytes:
    """A message whose JSON is ``size`` bytes."""
    head = b'{"from": "app@acme.test", "to": ["ann@inbox.test"], "text": "'
    tail = b'"}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


async def tenant(api: ControlApi) -> str:
    api.lab.add_domain("inbox.test")
    return await ready_tenant(api)


async def test_oversize_bodies_get_413_before_they_are_read(control: ControlFactory) -> None:
    api = await control({"smtp": {"max_message_size": MAX_MESSAGE}})
    key = await tenant(api)
    limit = limit_of(api)
    assert limit < 1_000_000  # from smtp.max_message_size, not the old fixed 64 MB
    # Declared too large: answered with only the headers sent.
    reader, writer = await open_post(api, key, {"Content-Length": str(limit + 1)})
    writer.write(b'{"from": ')
    await writer.drain()
    status, _, body = await read_response(reader)
    assert status == 413, body
    assert body["error"]["type"] == "too_large"
    assert body["error"]["fields"][0]["path"] == "body"
    writer.close()

    # Streamed (chunked) past the limit: answered before the last chunk is sent.
    reader, writer = await open_post(api, key, {"Transfer-Encoding": "chunked"})
    sent = 0
    chunk = b"a" * 16384
    while sent <= limit:
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        sent += len(chunk)
    await writer.drain()
    status, _, body = await read_response(reader)  # no terminating 0-chunk was sent
    assert status == 413, body
    writer.close()

    # Within the body limit, the message is built and held to smtp.max_message_size:
    # 413 too_large too (issue 16), naming the field and the limit.
    reader, writer = await open_post(api, key, {"Content-Length": str(limit - 10)})
    writer.write(json_body(limit - 10))
    await writer.drain()
    status, _, body = await read_response(reader)
    assert status == 413 and body["error"]["type"] == "too_large", body
    assert body["error"]["fields"][0]["path"] == "body", body
    assert f"is {MAX_MESSAGE} bytes" in body["error"]["message"], body
    writer.close()
    async with api.client(key) as c:
        r = await c.post("/v1/messages", json=json.loads(json_body(1000)))
        assert r.status_code == 202, r.text


async def test_concurrent_bodies_stay_within_the_budget(control: ControlFactory) -> None:
    api = await control(
        {"smtp": {"max_message_size": 200_000}, "control": {"max_body_memory": 100_000}}
    )
    key = await tenant(api)
    budget = api.app.control.body_budget
    size = 70_000  # two of them do not fit in 100 000
    # A holds 70 000 bytes while its body is still coming.
    ra, wa = await open_post(api, key, {"Content-Length": str(size)})
    wa.write(json_body(size)[:1000])
    await wa.drain()
    while budget.in_use < size:  # A's reservation is taken
        await asyncio.sleep(0.01)
    # B does not fit beside A: it waits, then gets 503 with Retry-After.
    rb, wb = await open_post(api, key, {"Content-Length": str(size)})
    wb.write(json_body(size))
    await wb.drain()
    status, headers, body = await read_response(rb)
    assert status == 503 and headers["retry-after"] == "1", body
    assert body["error"]["type"] == "busy"
    assert budget.in_use == size  # B never held any of it
    wb.close()
    # A finishes; its bytes are given back.
    wa.write(json_body(size)[1000:])
    await wa.drain()
    status, _, body = await read_response(ra)
    assert status == 202, body
    wa.close()
    assert budget.in_use == 0
    # Several at once: each is answered, and the budget never ran over.
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, budget.in_use)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())

    async def one() -> int:
        r, w = await open_post(api, key, {"Content-Length": str(40_000)})
        w.write(json_body(40_000))
        await w.drain()
        status, _, _ = await read_response(r)
        w.close()
        return status

    statuses = await asyncio.gather(*(one() for _ in range(6)))
    watcher.cancel()
    assert set(statuses) <= {202, 503} and 202 in statuses, statuses
    assert 0 < peak <= 100_000
    assert budget.in_use == 0
