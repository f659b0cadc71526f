"""A recording MX for shaping tests: an aiosmtpd server on a loopback address that
notes every connection (client address, opened, closed) and every message (client
address, EHLO name, time), and answers MAIL FROM as the test says per client address."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Conn:
    peer: str
    opened: float
    closed: float = 0.0


@dataclass
class Got:
    peer: str
    helo: str
    at: float
    rcpts: list[str]


@dataclass
class Records:
    conns: list[Conn] = field(default_factory=list)
    messages: list[Got] = field(default_factory=list)
    # (client address, the sink's address) -> the reply to MAIL FROM (None: accept)
    answer: Callable[[str, str], str | None] = lambda _peer, _local: None
    # recipient -> reply to RCPT (None: accept)
    rcpt_answer: Callable[[str], str | None] = lambda _rcpt: None

    def max_concurrent(self) -> int:
        edges = sorted(
            [(c.opened, 1) for c in self.conns]
            + [(c.closed or time.time(), -1) for c in self.conns],
            key=lambda e: (e[0], e[1]),
        )
        best = cur = 0
        for _t, d in edges:
            cur += d
            best = max(best, cur)
        return best

    def by_peer(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.messages:
            out[m.peer] = out.get(m.peer, 0) + len(m.rcpts)
        return out


class _Handler:
    def __init__(self, rec: Records) -> None:
        self.rec = rec

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        local = server.transport.get_extra_info("sockname")[0]
        reply = self.rec.answer(session.peer[0], local)
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.rec.rcpt_answer(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.rec.messages.append(
            Got(session.peer[0], session.host_name or "", time.time(), list(envelope.rcpt_tos))
        )
        return "250 2.0.0 OK"


class RecordingSink:
    def __init__(self, host: str, *more: str) -> None:
        self.host = host
        self.hosts = [host, *more]
        self.rec = Records()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.transports: set[Any] = set()

    async def start(self, port: int = 0) -> None:
        rec = self.rec
        handler = _Handler(rec)
        live = self.transports

        class Proto(SMTP):
            def connection_made(self, transport: Any) -> None:
                self._rec_conn = Conn(transport.get_extra_info("peername")[0], time.time())
                rec.conns.append(self._rec_conn)
                live.add(transport)
                super().connection_made(transport)

            def connection_lost(self, error: Exception | None) -> None:
                self._rec_conn.closed = time.time()
                live.discard(self.transport)
                super().connection_lost(error)

        loop = asyncio.get_running_loop()
        if port == 0 and len(self.hosts) > 1:  # one port on every address
            from tests.conftest import free_port

            port = free_port(self.host)
        self.server = await loop.create_server(
            lambda: Proto(handler, hostname="mx.rec.test", ident="rec"), self.hosts, port
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for t in list(self.transports):
                t.abort()
            await self.server.wait_closed()
