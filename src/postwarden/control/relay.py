"""How a control-only process (``serve --role control``) hands API messages to an MTA.

It submits each message over SMTP to ``control.submit_to`` with the caller's own
credentials (the tenant's name and the API key of the request: a ``send`` key is also
an SMTP password), so the MTA attaches the tenant, checks the From domain and the
suppressions, signs and spools exactly as for any submission; the ``250`` comes only
after the spool has the message durably. What the API was given (tags, metadata,
subject) rides in an ``X-Postwarden-Meta`` header, the pool and priority in
``X-Postwarden-Pool`` and ``X-Postwarden-Priority``; the MTA takes them off before
signing (and checks the pool against the tenant's again). Its reply names each
recipient's id and which were dropped.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
import ssl
from dataclasses import dataclass

import aiosmtplib

from postwarden.config import Config, parse_hostport
from postwarden.values import LANE_BULK, Envelope, StoredMessage

_REPLY = re.compile(r"queued as (\S+) rcpts=(\S+)")
RELAY_SESSIONS = 16


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RelayError(RuntimeError):
    """The MTA did not take the message."""


@dataclass(frozen=True)
class Credentials:
    tenant_name: str
    api_key: str


class SmtpRelay:
    def __init__(self, cfg: Config) -> None:
        spec = cfg.control.submit_to or cfg.smtp.listen[0]
        self.host, self.port = parse_hostport(spec, "control.submit_to")
        self.timeout = cfg.delivery.timeouts.data_term
        # Tenants' keys travel in AUTH: off this host, only inside TLS, and the MTA's
        # certificate checked against control.submit_ca_file when one is given.
        self.require_tls = not _is_loopback(self.host)
        self.tls = ssl.create_default_context(cafile=cfg.control.submit_ca_file or None)
        self.tls.check_hostname = False
        if not cfg.control.submit_ca_file:
            self.tls.verify_mode = ssl.CERT_NONE
        # A batch of 1 000 must not open 1 000 sessions (smtp.max_sessions_per_ip).
        self._slots = asyncio.Semaphore(RELAY_SESSIONS)

    async def inject(
        self, envelope: Envelope, message: bytes, msg_id: str, credentials: Credentials | None
    ) -> StoredMessage:
        if credentials is None:
            raise RelayError("no credentials to submit with")
        meta = base64.b64encode(json.dumps(dict(envelope.meta or {})).encode())
        # Folded at 76: a long subject or much metadata must not make a line longer than
        # the MTA accepts (smtp.max_line_length).
        folded = b"\r\n ".join(meta[i : i + 76] for i in range(0, len(meta), 76))
        fields = [b"X-Postwarden-Meta: " + folded + b"\r\n"]
        if envelope.pool is not None:
            fields.append(b"X-Postwarden-Pool: " + envelope.pool.encode("ascii") + b"\r\n")
        priority = b"bulk" if envelope.lane == LANE_BULK else b"high"
        fields.append(b"X-Postwarden-Priority: " + priority + b"\r\n")
        data = b"".join(fields) + message
        async with self._slots:
            return await self._submit(envelope, data, credentials)

    async def _submit(
        self, envelope: Envelope, data: bytes, credentials: Credentials
    ) -> StoredMessage:
        options = ["SMTPUTF8"] if envelope.smtputf8 else []
        try:
            async with aiosmtplib.SMTP(
                hostname=self.host,
                port=self.port,
                timeout=self.timeout,
                tls_context=self.tls,
                start_tls=True if self.require_tls else None,
            ) as smtp:
                await smtp.login(credentials.tenant_name, credentials.api_key)
                _, reply = await smtp.sendmail(
                    envelope.mail_from, list(envelope.rcpt_tos), data, mail_options=options
                )
        except aiosmtplib.SMTPException as exc:
            raise RelayError(f"the MTA at {self.host}:{self.port} refused: {exc}") from exc
        except OSError as exc:
            raise RelayError(f"the MTA at {self.host}:{self.port} is unreachable: {exc}") from exc
        m = _REPLY.search(reply)
        if m is None:
            raise RelayError(f"unexpected reply from the MTA: {reply!r}")
        ids: list[int] = []
        drops: dict[str, str] = {}
        for rcpt, part in zip(envelope.rcpt_tos, m.group(2).split(","), strict=True):
            rid, _, reason = part.partition(":")
            ids.append(int(rid))
            if reason:
                drops[rcpt] = reason
        return StoredMessage(m.group(1), tuple(ids), (), drops)
