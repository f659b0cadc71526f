"""The inbound MX (aiosmtpd): bounces and feedback-loop reports, stored before ``250``.

It is the MX of the return-path domains (``<control.return_path_label>.<sending
domain>``) and of ``inbound.domains``, listening on ``inbound.listen``. It takes mail
for those domains only — any local part, ``postmaster`` included, and the bare
``postmaster`` of RFC 5321 4.5.1 — from anyone, and refuses every other recipient with
``550 5.7.1 relay access denied``, whoever connects (loopback and
``smtp.trusted_networks`` included): it never relays. Any reverse-path is fine
(bounces come from ``<>``); AUTH is not offered; STARTTLS is, with the submission
listeners' certificate, never required.

What it accepts goes into the :class:`~postwarden.bounces.inbox.Inbox` (fsync'd)
before the ``250``; a failure to store answers ``451 4.3.0`` and keeps nothing. Then
:attr:`InboundHandler.on_delivered` is called, so that whoever processes the inbox
can wake up. The message is stored exactly as received (no headers added; bare CR or
LF left as they are: it is read, never relayed).

Limits (``[inbound]``): ``max_message_size`` (advertised as SIZE; a larger
``SIZE=`` or more data is refused with ``552 5.3.4`` and nothing is stored),
``max_recipients`` (``452 4.5.3`` beyond), ``max_sessions_per_ip``, ``idle_timeout``;
``smtp.max_line_length`` and ``smtp.max_commands_per_session`` as for submission.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiosmtpd.smtp import Envelope, Session

from postwarden.bounces.inbox import Inbox
from postwarden.config import Config
from postwarden.metrics import Metrics
from postwarden.mta.guard import GuardChannel
from postwarden.mta.protocol import MAX_PATH, PostwardenSMTP, ehlo_lines, take_recipient
from postwarden.mta.sessions import SessionGuard

log = logging.getLogger("postwarden.inbound")

#: (domain) -> whether the inbound MX takes mail for it (the control plane's cache).
AcceptsFn = Callable[[str], bool]


OnDelivered = Callable[[], None]


class InboundHandler(SessionGuard):
    """Decides RCPT and DATA for the inbound MX; stores what it accepts in ``inbox``.
    It is also the listener's guard (mta.protocol): the session rules of submission,
    its own limits, and no AUTH."""

    listener = "inbound"  # its own sessions-per-IP limit in the shared tables

    def __init__(
        self,
        cfg: Config,
        metrics: Metrics,
        inbox: Inbox,
        accepts: AcceptsFn,
        on_delivered: OnDelivered | None = None,
        shared: GuardChannel | None = None,
    ) -> None:
        self.metrics = metrics
        self.inbox = inbox
        self.accepts = accepts
        # Called (on the event loop) after each report is stored; plain and optional.
        self.on_delivered = on_delivered
        super().__init__(shared)
        self.in_transaction = 0
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """Apply a (re)loaded configuration: limits take effect for new sessions."""
        self.cfg = cfg

    def refused(self, reason: str) -> None:
        self.metrics.inbound_refused.labels(reason).inc()

    def limits(self) -> tuple[int, float]:
        return self.cfg.inbound.max_message_size, self.cfg.inbound.idle_timeout

    def max_sessions_per_ip(self) -> int:
        return self.cfg.inbound.max_sessions_per_ip

    def sessions_changed(self, delta: int) -> None:
        self.metrics.inbound_sessions.inc(delta)

    # -- the protocol's replies and AUTH

    def rewrite_reply(self, raw: bytes, command: str | None) -> bytes:
        """A reply as it goes out, before its enhanced code is added."""
        if raw.startswith(b"552"):
            # aiosmtpd's own size refusals (MAIL SIZE=, too much DATA): nothing stored.
            self.refused("too_large")
        elif command == "RCPT" and raw.startswith(b"553"):
            # aiosmtpd could not parse the path at all: as the handler's syntax refusal.
            self.refused("bad_recipient")
            return b"501 5.1.3 Bad recipient address syntax"
        return raw

    async def auth_command(self, server: PostwardenSMTP, arg: str) -> None:
        self.refused("auth")
        await server.push("502 5.5.1 Authentication not available on this service")

    # -- the rule

    def local(self, address: str) -> bool | None:
        """Whether the inbound MX takes mail for ``address``; None when it is no address."""
        if len(address) > MAX_PATH:
            return None
        local, at, domain = address.rpartition("@")
        if not at:
            # RFC 5321 4.5.1: "RCPT TO:<Postmaster>" without a domain is accepted.
            return True if address.lower() == "postmaster" else None
        if not local or not domain or any(c.isspace() for c in domain):
            return None
        return self.accepts(domain)

    # -- hooks

    async def handle_EHLO(
        self, server: PostwardenSMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        session.host_name = hostname
        return ehlo_lines(responses, offer_auth=False)  # AUTH is never offered here

    async def handle_MAIL(
        self, server: PostwardenSMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:  # fmt: skip
        # Any reverse-path: bounces come from "<>", reports from anywhere.
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: PostwardenSMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        ok = self.local(address)
        if ok is None:
            self.refused("bad_recipient")
            return "501 5.1.3 Bad recipient address syntax"
        if not ok:
            self.refused("relay_denied")
            peer = session.peer[0] if session.peer else ""
            log.info("event=inbound_relay_denied peer=%s rcpt=%r", peer, address[:MAX_PATH])
            return f"550 5.7.1 <{address}>: relay access denied"
        return take_recipient(
            self, envelope, address, rcpt_options, self.cfg.inbound.max_recipients
        )

    async def handle_DATA(
        self, server: PostwardenSMTP, session: Session, envelope: Envelope
    ) -> str:
        started = time.perf_counter()
        data = envelope.original_content or b""
        peer = session.peer[0] if session.peer else ""
        mail_from = envelope.mail_from or ""
        self.in_transaction += 1
        try:
            item_id = await asyncio.to_thread(
                self.inbox.deliver,
                "" if mail_from == "<>" else mail_from,
                list(envelope.rcpt_tos),
                data,
                peer,
                session.host_name or "",
            )
        except Exception:
            log.exception("event=inbound_store_failed peer=%s", peer)
            self.refused("local_error")
            return "451 4.3.0 Temporary local problem, try again later"
        finally:
            self.in_transaction -= 1
        self.metrics.inbound_accepted.inc()
        log.info(
            "event=inbound_accepted id=%s peer=%s from=%r rcpts=%d size=%d ms=%.1f",
            item_id, peer, mail_from, len(envelope.rcpt_tos), len(data),
            (time.perf_counter() - started) * 1000,
        )  # fmt: skip
        if self.on_delivered is not None:
            try:
                self.on_delivered()
            except Exception:
                log.exception("event=inbound_notify_failed id=%s", item_id)
        return f"250 2.0.0 Ok: queued as {item_id}"
