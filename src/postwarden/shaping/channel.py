"""The broker over a Unix socket: the supervisor serves it, workers call it.

Newline-delimited JSON, one connection per worker; the connection is the holder, so
a worker that dies (its socket closes) gives back every slot it held. Requests carry
an ``id`` and get one answer with the same id; ``reports`` (delivery answers, batched)
carries none and gets none. The broker also sends notices of its own, with ``push``
and no ``id`` (``shaping.wants``: a slot wanted or freed at a site). Times cross as
"seconds from now", never as clock readings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from postwarden.mta.guard import GUARD_OPS, GuardTables
from postwarden.shaping.broker import Broker
from postwarden.shaping.fallback import LocalLimits
from postwarden.shaping.grants import Choice, Grant
from postwarden.shaping.wants import deliver

if TYPE_CHECKING:
    from postwarden.metrics import Metrics

T = TypeVar("T", Grant, Choice)

log = logging.getLogger("postwarden.shaping")
MAX_LINE = 64 * 1024


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def short_path(path: str) -> str:
    """A Unix socket path the kernel takes (at most 107 bytes): long ones go through
    their directory's ``/proc/self/fd`` entry (the directory stays open)."""
    if len(os.fsencode(path)) < 100:
        return path
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{os.path.basename(path)}"


class _Holder:
    """One worker's connection: the broker's holder of its slots, and where the
    broker's notices for that worker go."""

    __slots__ = ("writer",)

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def push(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(msg).encode() + b"\n")


class BrokerServer:
    """Serves a broker; ``commands`` answers the operator's ops (status, warming…);
    ``guard`` holds the appliance's SMTP session slots and AUTH lockouts (mta.guard)."""

    def __init__(
        self,
        broker: Broker,
        path: str,
        commands: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        guard: GuardTables | None = None,
    ) -> None:
        self.broker = broker
        self.path = path
        self.commands = commands
        self.guard = guard if guard is not None else GuardTables()
        self._server: asyncio.AbstractServer | None = None
        self.holders = 0

    def _prepare(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    async def start(self) -> None:
        self._prepare()
        old = os.umask(0o077)  # the owner only: these ops pause and resume sending
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, short_path(self.path), limit=MAX_LINE
            )
        finally:
            os.umask(old)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holder = _Holder(writer)
        self.holders += 1
        try:
            while line := await reader.readline():
                answer: dict[str, Any] | None
                try:
                    req = json.loads(line)
                except ValueError as exc:
                    req, answer = {}, {"id": None, "ok": False, "reason": f"bad request: {exc}"}
                else:
                    try:
                        answer = self._handle(holder, req)
                    except (ValueError, KeyError, TypeError) as exc:
                        log.warning("event=broker_bad_request error=%r", str(exc))
                        answer = {"id": req.get("id"), "ok": False, "reason": f"{exc}"}
                if answer is not None:
                    writer.write(json.dumps(answer).encode() + b"\n")
                if self.broker.wants.outbox:
                    deliver(self.broker.wants.take_outbox())
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self.holders -= 1
            self.broker.drop_holder(holder)
            self.guard.drop_holder(holder)
            writer.close()

    def _handle(self, holder: object, req: dict[str, Any]) -> dict[str, Any] | None:
        op = req["op"]
        b = self.broker
        if op in GUARD_OPS:
            guarded = self.guard.handle(holder, req)
            return None if guarded is None else {"id": req["id"], **guarded}
        if op == "reports":  # fire-and-forget: no answer
            for item in req["items"]:
                b.report(**item)
            return None
        answer: dict[str, Any]
        if op == "choose":
            members = [(str(n), int(w)) for n, w in req["members"]]
            c = b.choose(
                holder,
                req["pool"],
                members,
                req["overflow"],
                req["site"],
                req["domain"],
                int(req["want"]),
                queued=int(req.get("queued") or 0),
                lane=int(req.get("lane") or 0),
            )
            answer = {**_fields(c, b.clock()), "warming_domains": b.warming_domains()}
        elif op == "take":
            g = b.take(
                holder,
                req["source"],
                req["site"],
                int(req["want"]),
                req["domain"],
                req["sending_domain"],
                lane=int(req.get("lane") or 0),
            )
            answer = _fields(g, b.clock())
        elif op == "refusal":
            answer = _fields(b.refusal(req["source"], req["site"], req["domain"]), b.clock())
        elif op == "release":
            b.release(
                holder,
                req["pool"],
                req["source"],
                req["site"],
                req["domain"],
                int(req["sent"]),
                int(req["unused"]),
            )
            answer = {"ok": True}
        elif op == "command":
            if self.commands is None:
                raise ValueError("no commands here")
            answer = {"ok": True, **self.commands(req["args"])}
        else:
            raise ValueError(f"unknown op {op!r}")
        return {"id": req["id"], **answer}


def _fields(answer: Grant | Choice, now: float) -> dict[str, Any]:
    """A grant or choice on the wire: its fields, the time as seconds from now."""
    out = dataclasses.asdict(answer)
    at = out.pop("retry_at")
    out["retry_in"] = max(0.0, at - now) if at else 0.0
    return out


def _unfields(cls: type[T], a: dict[str, Any], now: float) -> T:
    """The other way, ``retry_at`` on this process's clock ``now``."""
    names = {f.name for f in dataclasses.fields(cls)} - {"retry_at"}
    retry = now + a["retry_in"] if a.get("retry_in") else 0.0
    return cls(**{k: v for k, v in a.items() if k in names}, retry_at=retry)


class BrokerUnavailable(ConnectionError):
    """The broker cannot be asked now (not connected, connection lost, reconnecting)."""


#: Reconnection attempts start this far apart and double up to the max (with jitter).
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 5.0


class BrokerClient:
    """A worker's end (the :class:`~postwarden.shaping.shaper.Backend` calls); grants
    carry ``retry_at`` on this process's event-loop clock.

    When the connection drops, the client reconnects with backoff and meanwhile
    answers ``choose`` and ``take`` from :class:`LocalLimits` (conservative, never
    unlimited); ``command`` raises :class:`BrokerUnavailable` at once. A broker that
    is connected but does not answer in time still means no.
    """

    def __init__(
        self,
        path: str,
        *,
        timeout: float = 2.0,
        metrics: Metrics | None = None,
        on_notice: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.path = path
        #: Called with each notice the broker sends this worker (``shaping.wants``).
        self.on_notice = on_notice
        self.timeout = timeout
        self.metrics = metrics
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closed = False
        #: Bumped at each (re)connection: slots granted on an older connection were
        #: dropped by the broker with it and are not released there.
        self._epoch = 0
        #: (source, site) -> the epoch of each slot held (0: a local one).
        self._held: dict[tuple[str, str], list[int]] = {}
        self.local = LocalLimits()
        #: The source the broker last chose per (pool, site), and per pool.
        self._chosen: dict[tuple[str, str], str] = {}
        self._warming: list[str] = []

        self._reports: list[dict[str, Any]] = []

    @property
    def connected(self) -> bool:
        return self._writer is not None

    @property
    def _outage(self) -> bool:
        """Lost and reconnecting (a closed client answers no, as before)."""
        return self._writer is None and not self._closed

    async def connect(self) -> None:
        self._closed = False
        await self._open()

    async def _open(self) -> None:
        reader, writer = await asyncio.open_unix_connection(short_path(self.path), limit=MAX_LINE)
        self._reader, self._writer = reader, writer
        self._epoch += 1
        self._task = asyncio.create_task(self._read(reader, writer))
        if self.metrics is not None:
            self.metrics.broker_connected.set(1)

    async def close(self) -> None:
        self._closed = True
        for task in (self._reconnect_task, self._task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                msg = json.loads(line)
                if "push" in msg:
                    if self.on_notice is not None:
                        try:
                            self.on_notice(msg)
                        except Exception:  # a notice is advice: never lose the channel
                            log.exception("event=broker_notice_failed notice=%r", msg)
                    continue
                fut = self._pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (OSError, ValueError) as exc:
            log.warning("event=broker_read_failed error=%r", str(exc))
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(BrokerUnavailable("the broker went away"))
            self._pending.clear()
            if self._writer is writer:
                self._writer = None
                writer.close()
                if not self._closed:
                    self._lost()

    def _lost(self) -> None:
        log.warning("event=broker_disconnected path=%s fallback=local_limits", self.path)
        if self.metrics is not None:
            self.metrics.broker_connected.set(0)
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = RECONNECT_FIRST
        attempts = 0
        while not self._closed:
            await asyncio.sleep(delay * (0.5 + random.random()))
            attempts += 1
            try:
                await self._open()
            except OSError as exc:
                if attempts == 1 or attempts % 10 == 0:
                    log.warning("event=broker_reconnect_failed attempts=%d error=%r", attempts, exc)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            if self.metrics is not None:
                self.metrics.broker_reconnects.inc()
            log.warning("event=broker_reconnected attempts=%d", attempts)
            return

    def _send(self, req: dict[str, Any]) -> None:
        if self._writer is None:
            raise BrokerUnavailable("the shaping broker is unavailable (not connected)")
        self._writer.write(json.dumps(req).encode() + b"\n")

    async def _call(self, **req: Any) -> dict[str, Any]:
        self._flush_reports()  # the broker sees the answers before the next question
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._send({"id": rid, **req})
        self._pending[rid] = fut
        try:
            return await asyncio.wait_for(fut, self.timeout)
        finally:
            self._pending.pop(rid, None)

    async def _answer(self, cls: type[T], **req: Any) -> tuple[T, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        try:
            a = await self._call(**req)
        except (TimeoutError, ConnectionError) as exc:
            # No answer is a no: never exceed a limit because the broker is slow.
            refusal = cls(
                False,
                reason=f"broker unavailable: {exc!r}",
                retry_at=loop.time() + 1,
                kind="broker_unavailable",
            )
            return refusal, {}
        return _unfields(cls, a, loop.time()), a

    def _fallback(self, op: str) -> None:
        if self.metrics is not None:
            self.metrics.broker_fallback.labels(op).inc()

    async def choose(
        self,
        pool: str,
        members: list[tuple[str, int]],
        overflow: str,
        site: str,
        domain: str | None,
        want: int,
        queued: int = 0,
        lane: int = 0,
    ) -> tuple[Choice, list[str]]:
        req = {
            "pool": pool,
            "members": members,
            "overflow": overflow,
            "site": site,
            "domain": domain,
            "want": want,
            "queued": queued,
            "lane": lane,
        }
        if self._outage:
            self._fallback("choose")
            chosen = [self._chosen.get((pool, site)), self._chosen.get((pool, ""))]
            order = [x for x in chosen if x] + [n for n, w in members if w > 0]
            c = self.local.choose(list(dict.fromkeys(order)), site, want, loop_time())
            if c.ok:
                self._held.setdefault((c.source, site), []).append(0)
            return c, list(self._warming)
        c, a = await self._answer(Choice, op="choose", **req)
        if c.ok:
            self._held.setdefault((c.source, site), []).append(self._epoch)
            self._chosen[(pool, site)] = self._chosen[(pool, "")] = c.source
        if "warming_domains" in a:
            self._warming = list(a["warming_domains"])
        return c, list(a.get("warming_domains", []))

    async def take(
        self,
        source: str,
        site: str,
        want: int,
        domain: str | None,
        sending_domain: str | None,
        lane: int = 0,
    ) -> Grant:
        if self._outage:
            self._fallback("take")
            if sending_domain is not None:  # a warming domain's caps live in the broker
                return Grant(
                    False,
                    reason="broker unavailable: a warming domain waits for it",
                    retry_at=loop_time() + 1.0,
                    kind="broker_unavailable",
                )
            return self.local.take(source, site, want, loop_time())
        g, _ = await self._answer(
            Grant,
            op="take",
            source=source,
            site=site,
            want=want,
            domain=domain,
            sending_domain=sending_domain,
            lane=lane,
        )
        return g

    async def refusal(self, source: str, site: str, domain: str | None) -> Grant:
        """The broker's word on the source (after the reports sent before); while it
        cannot be asked, not refused (the caller then backs off on its own)."""
        if self._outage:
            return Grant(True)
        try:
            a = await self._call(op="refusal", source=source, site=site, domain=domain)
        except (TimeoutError, ConnectionError):
            return Grant(True)
        return _unfields(Grant, a, asyncio.get_running_loop().time())

    async def release(
        self, pool: str, source: str, site: str, domain: str | None, sent: int, unused: int
    ) -> None:
        held = self._held.get((source, site))
        epoch = held.pop(0) if held else self._epoch
        if held is not None and not held:
            del self._held[(source, site)]
        if epoch == 0:
            self.local.release(source, site)
            return
        if epoch != self._epoch:
            return  # granted on a connection since lost: the broker dropped it then
        with contextlib.suppress(TimeoutError, ConnectionError):
            await self._call(
                op="release",
                pool=pool,
                source=source,
                site=site,
                domain=domain,
                sent=sent,
                unused=unused,
            )

    def report_outcome(self, **item: Any) -> None:
        """Answers travel in batches: one line per event-loop turn, not one per answer."""
        if not self._reports:
            asyncio.get_running_loop().call_soon(self._flush_reports)
        self._reports.append(item)

    def _flush_reports(self) -> None:
        items, self._reports = self._reports, []
        if items:
            with contextlib.suppress(ConnectionError):
                self._send({"op": "reports", "items": items})

    async def guard_call(self, op: str, **args: Any) -> dict[str, Any]:
        """A session-guard op (mta.guard): the answer; ConnectionError or TimeoutError
        when the broker cannot give one (the caller then decides locally)."""
        return await self._call(op=op, **args)

    def guard_notify(self, op: str, **args: Any) -> None:
        """A session-guard op that has no answer (``session_close``); ConnectionError
        when it cannot be sent."""
        self._send({"op": op, **args})

    async def command(self, **args: Any) -> dict[str, Any]:
        """An operator's op (status, warming, reload): the broker's answer; raises
        :class:`BrokerUnavailable` at once while there is no connection."""
        a = await self._call(op="command", args=args)
        if not a.get("ok"):
            raise ValueError(a.get("reason") or "refused")
        return a
