"""The broker over a Unix socket: the supervisor serves it, workers call it.

Newline-delimited JSON, one connection per worker; the connection is the holder, so
a worker that dies (its socket closes) gives back every slot it held. Requests carry
an ``id`` and get one answer with the same id; ``report`` carries none and gets none
(answers are fire-and-forget). Times cross as "seconds from now", never as clock
readings.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from typing import Any

from postwarden.shaping.broker import Broker, Grant

log = logging.getLogger("postwarden.shaping")
MAX_LINE = 64 * 1024


class BrokerServer:
    def __init__(self, broker: Broker, path: str) -> None:
        self.broker = broker
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self.holders = 0

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_LINE)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holder = object()
        self.holders += 1
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    answer = self._handle(holder, req)
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("event=broker_bad_request error=%r", str(exc))
                    answer = {"id": None, "ok": False, "reason": f"bad request: {exc}"}
                if answer is not None:
                    writer.write(json.dumps(answer).encode() + b"\n")
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self.holders -= 1
            self.broker.drop_holder(holder)
            writer.close()

    def _handle(self, holder: object, req: dict[str, Any]) -> dict[str, Any] | None:
        op = req["op"]
        b = self.broker
        src, site, dom = req.get("source", ""), req.get("site", ""), req.get("domain")
        if op == "report":
            b.report(src, site, int(req["code"]), req.get("enhanced", ""), req.get("text", ""), dom)
            return None
        if op == "release":
            b.release_connection(holder, src, site, dom)
            return {"id": req["id"], "ok": True}
        if op == "acquire":
            g = b.acquire_connection(holder, src, site, dom)
        elif op == "take":
            g = b.take_messages(holder, src, site, int(req["want"]), dom)
        elif op == "status":
            return {"id": req["id"], "ok": True, "pairs": b.status()}
        else:
            raise ValueError(f"unknown op {op!r}")
        return {
            "id": req["id"],
            "ok": g.ok,
            "tokens": g.tokens,
            "reason": g.reason,
            "retry_in": max(0.0, g.retry_at - b.clock()) if g.retry_at else 0.0,
        }


class BrokerClient:
    """A worker's end. Methods mirror :class:`Broker`'s; grants carry ``retry_at`` on
    this process's monotonic clock."""

    def __init__(self, path: str, *, timeout: float = 2.0) -> None:
        self.path = path
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(self.path, limit=MAX_LINE)
        self._task = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while line := await self._reader.readline():
                msg = json.loads(line)
                fut = self._pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("the broker went away"))
            self._pending.clear()

    def _send(self, req: dict[str, Any]) -> None:
        if self._writer is None:
            raise ConnectionError("not connected to the broker")
        self._writer.write(json.dumps(req).encode() + b"\n")

    async def _call(self, **req: Any) -> dict[str, Any]:
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._send({"id": rid, **req})
        try:
            return await asyncio.wait_for(fut, self.timeout)
        finally:
            self._pending.pop(rid, None)

    async def _grant(self, **req: Any) -> Grant:
        loop = asyncio.get_running_loop()
        try:
            a = await self._call(**req)
        except (TimeoutError, ConnectionError) as exc:
            # No answer is a no: never exceed a limit because the broker is slow.
            return Grant(False, reason=f"broker unavailable: {exc!r}", retry_at=loop.time() + 1)
        retry = loop.time() + a["retry_in"] if a.get("retry_in") else 0.0
        return Grant(a["ok"], a.get("tokens", 0), a.get("reason", ""), retry)

    async def acquire_connection(self, source: str, site: str, domain: str | None = None) -> Grant:
        return await self._grant(op="acquire", source=source, site=site, domain=domain)

    async def release_connection(self, source: str, site: str, domain: str | None = None) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError):
            await self._call(op="release", source=source, site=site, domain=domain)

    async def take_messages(
        self, source: str, site: str, want: int, domain: str | None = None
    ) -> Grant:
        return await self._grant(op="take", source=source, site=site, want=want, domain=domain)

    def report(
        self,
        source: str,
        site: str,
        code: int,
        enhanced: str = "",
        text: str = "",
        domain: str | None = None,
    ) -> None:
        with contextlib.suppress(ConnectionError):
            self._send(
                {
                    "op": "report",
                    "source": source,
                    "site": site,
                    "code": code,
                    "enhanced": enhanced,
                    "text": text[:500],
                    "domain": domain,
                }
            )

    async def status(self) -> list[dict[str, Any]]:
        pairs: list[dict[str, Any]] = (await self._call(op="status"))["pairs"]
        return pairs
