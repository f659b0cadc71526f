"""SMTP submission (aiosmtpd): relay control, limits, spooling before ``250``.

The protocol is :class:`~postwarden.mta.protocol.PostwardenSMTP` (enhanced status
codes on every reply, sessions per client IP, commands per session), built by
:func:`~postwarden.mta.protocol.server_factory` with an :class:`IngressHandler`, which
decides each command and is the listener's guard: AUTH only over TLS or from trusted
networks with the password check off the event loop, a lockout per client IP.

Bare CR or LF (SMTP smuggling, CVE-2023-51764 family): aiosmtpd only ends DATA on
``<CRLF>.<CRLF>``, but passes bare LF *inside* a line to the handler. By default
(``smtp.bare_newlines = "reject"``) such a message is refused with
``550 5.6.0``; with ``"normalize"`` every bare CR or LF becomes CRLF before the
message is spooled. Either way nothing we relay carries a stray CR or LF.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import Envelope, LoginPassword, Session

from postwarden.config import Config
from postwarden.mail.cleanup import Origin, Rejected
from postwarden.metrics import Metrics
from postwarden.mta.auth import AuthUnavailable, KeyLogin, PasswordStore
from postwarden.mta.guard import GuardChannel
from postwarden.mta.protocol import MAX_PATH, PostwardenSMTP, ehlo_lines, take_recipient
from postwarden.mta.protocol import add_enhanced_code as add_enhanced_code  # re-exported
from postwarden.mta.sessions import SessionGuard
from postwarden.queue.spool import new_message_id
from postwarden.values import LANE_BULK, LANE_HIGH, SpoolFull, StoredMessage
from postwarden.values import Envelope as SpoolEnvelope

log = logging.getLogger("postwarden.ingress")

_ADDRESS = re.compile(r"^[^\s@<>()\[\],;:\"]+@[A-Za-z0-9.\-\[\]:]+$|^[^\s@]+@[^\s@]+$")

MAX_AUTH_FAILURES = 3
_LANES = {"high": LANE_HIGH, "bulk": LANE_BULK}  # X-Postwarden-Priority


def has_bare_newline(data: bytes) -> bool:
    """True when ``data`` holds a CR not followed by LF or an LF not preceded by CR."""
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf or data.count(b"\r") != crlf


_BARE = re.compile(rb"\r\n|\r|\n")


def normalize_newlines(data: bytes) -> bytes:
    """Turn every bare CR and bare LF into CRLF."""
    return _BARE.sub(b"\r\n", data)


# The fields the appliance reads and takes off (they never leave it): the whole field,
# folded lines included (the relay folds the base64 value of Meta).
_CONTROL_FIELD = re.compile(
    rb"(?im)^X-Postwarden-(Meta|Pool|Priority):((?:[^\r\n]*\r\n)(?:[ \t][^\r\n]*\r\n)*)"
)
# What a pool name looks like (the API's rule); anything else names no pool.
POOL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


@dataclass(frozen=True)
class ControlFields:
    """What the ``X-Postwarden-*`` fields of a message said (the first of each name)."""

    meta: dict[str, Any] | None = None  # Meta, decoded; None when absent or garbage
    pool: str | None = None  # Pool, unfolded and stripped
    priority: str | None = None  # Priority, unfolded, stripped, lower-cased


def _decode_meta(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(base64.b64decode(b"".join(raw.split()), validate=True))
        if isinstance(value, dict):
            return {
                "source": "api",
                "subject": str(value.get("subject", ""))[:300],
                "tags": [str(t)[:64] for t in value.get("tags", [])][:10],
                "metadata": {str(k)[:64]: str(v)[:1000]
                             for k, v in dict(value.get("metadata", {})).items()},
            }  # fmt: skip
    except (ValueError, TypeError, AttributeError):
        pass
    return None


def _text(raw: bytes) -> str:
    return b" ".join(raw.split()).decode("utf-8", "replace")


def take_control_fields(data: bytes) -> tuple[bytes, ControlFields | None]:
    """Remove every ``X-Postwarden-Meta``, ``-Pool`` and ``-Priority`` field from the
    header; return the message and what the first field of each name said (None when
    the message has none of them: the message is then returned as it is, not copied).

    The control plane (``serve --role control``) relays API messages with them;
    submitters may name a pool and a priority (checked by the caller)."""
    end = data.find(b"\r\n\r\n")
    stop = len(data) if end < 0 else end + 2
    # Every message passes here: one scan of its header, no copy unless it has a field.
    if _CONTROL_FIELD.search(data, 0, stop) is None:
        return data, None
    head = data[:stop]
    first: dict[bytes, bytes] = {}
    for m in _CONTROL_FIELD.finditer(head):
        first.setdefault(m.group(1).lower(), m.group(2))
    head = _CONTROL_FIELD.sub(b"", head)
    meta = first.get(b"meta")
    pool = first.get(b"pool")
    priority = first.get(b"priority")
    fields = ControlFields(
        meta=_decode_meta(meta) if meta is not None else None,
        pool=_text(pool) if pool is not None else None,
        priority=_text(priority).lower() if priority is not None else None,
    )
    return (head if end < 0 else head + data[end + 2 :]), fields


def take_meta(data: bytes) -> tuple[bytes, dict[str, Any] | None]:
    """:func:`take_control_fields`, keeping only the decoded ``X-Postwarden-Meta``."""
    data, fields = take_control_fields(data)
    return data, fields.meta if fields is not None else None


@dataclass(frozen=True)
class Submitter:
    """Who authenticated a session (aiosmtpd keeps it as ``session.auth_data``)."""

    login: bytes
    tenant_id: int | None = None  # set when the password was a tenant's API key
    key_prefix: str | None = None  # that key, checked again at every MAIL


# (envelope, message as received, queue id, origin) -> the stored message; raises
# mail.cleanup.Rejected (its reply is the answer) when the message cannot pass cleanup.
SubmitFn = Callable[[SpoolEnvelope, bytes, str, Origin], Awaitable[StoredMessage]]


class IngressHandler(SessionGuard):
    """Decides MAIL, RCPT and DATA for the submission listeners."""

    def __init__(
        self,
        cfg: Config,
        metrics: Metrics,
        passwords: PasswordStore,
        submit: SubmitFn,
        *,
        key_auth: Callable[[str, str], Awaitable[KeyLogin | None]] | None = None,
        key_valid: Callable[[str, int], bool] | None = None,
        pool_for: Callable[[int | None, str | None], str | None] | None = None,
        shared: GuardChannel | None = None,
    ) -> None:
        self.metrics = metrics
        self.passwords = passwords
        self.submit = submit
        super().__init__(shared)
        self.in_transaction = 0
        # (tenant name, API key) -> the tenant and key when the key may send; from the
        # control plane (None: no API-key logins).
        self.key_auth = key_auth
        # (key prefix, tenant id) -> whether a key that logged in may still send (not
        # revoked, tenant not disabled since): in memory, asked at every MAIL.
        self.key_valid: Callable[[str, int], bool] = key_valid or (lambda _k, _t: True)
        # (tenant id or None, the pool X-Postwarden-Pool names or None) -> the pool to
        # spool the message with (None: the appliance's default pool); raises ValueError
        # (its text the reply) when the pool is unknown or not the sender's. From the
        # control plane; alone, whatever pool is named.
        self.pool_for: Callable[[int | None, str | None], str | None] = pool_for or (
            lambda _t, p: p
        )
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """Apply a (re)loaded configuration: limits, networks, users take effect at once."""
        self.cfg = cfg
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in cfg.smtp.trusted_networks]
        self.passwords.configure(cfg.smtp.users)

    # -- sessions

    def limits(self) -> tuple[int, float]:
        return self.cfg.smtp.max_message_size, self.cfg.smtp.idle_timeout

    def max_sessions_per_ip(self) -> int:
        return self.cfg.smtp.max_sessions_per_ip

    def sessions_changed(self, delta: int) -> None:
        self.metrics.connections.labels("in").inc(delta)

    def refused(self, reason: str) -> None:
        self.metrics.rejected.labels(reason).inc()

    def is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%")[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.trusted)

    def may_relay(self, session: Session) -> bool:
        peer = session.peer[0] if session.peer else ""
        return bool(session.authenticated) or self.is_trusted(peer)

    # -- AUTH (PostwardenSMTP hands the command over: Guard.auth_command)

    # AUTH as aiosmtpd's smtp_AUTH does it, but deciding here: its own path sets the
    # deprecated Session.login_data on every success (a warning per login). Only over
    # TLS or from trusted networks, checked off the loop, with a lockout per client IP.
    async def auth_command(self, server: PostwardenSMTP, arg: str) -> None:
        peer_ip = server.peer_ip
        trusted = self.is_trusted(peer_ip)
        if not server._tls_protocol and not trusted:
            self.metrics.rejected.labels("auth_without_tls").inc()
            await server.push(
                "538 5.7.11 Encryption required for requested authentication "
                "mechanism: use STARTTLS"
            )
            return
        if await server.check_helo_needed("EHLO"):
            return
        session = server.session
        if session is None:
            return
        if not session.extended_smtp:
            await server.push("500 Error: command 'AUTH' not recognized")
            return
        if session.authenticated:
            await server.push("503 Already authenticated")
            return
        args = (arg or "").split()
        if not args:
            await server.push("501 Not enough value")
            return
        if len(args) > 2:
            await server.push("501 Too many values")
            return
        mechanism = args[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            await server.push("504 5.5.4 Unrecognized authentication type")
            return
        # A locked-out address is refused before it sends a password: nothing checked.
        # Trusted networks may relay without AUTH anyway and are never locked out.
        if not trusted and await self.auth_locked(peer_ip) > 0:
            await self._close_locked(server)
            return
        parse = server.auth_PLAIN if mechanism == "PLAIN" else server.auth_LOGIN
        result = await parse(server, args)
        credentials = result.auth_data
        if not isinstance(credentials, LoginPassword):
            return  # aborted or undecodable: aiosmtpd has answered
        try:
            who = await self._verify(credentials, peer_ip)
        except AuthUnavailable:
            # Not the client's fault and not a failed guess: nothing counted.
            self.metrics.rejected.labels("auth_unavailable").inc()
            await server.push("454 4.7.0 Temporary authentication failure, try again later")
            return
        if who is not None:
            session.authenticated = True
            session.auth_data = who  # type: ignore[assignment]  # aiosmtpd infers None
            await server.push("235 2.7.0 Authentication successful")
            return
        server.auth_failures += 1
        self.metrics.rejected.labels("auth_failed").inc()
        log.warning("event=auth_failed peer=%s user=%r", peer_ip, credentials.login[:64])
        if not trusted and await self.auth_failed(peer_ip) > 0:
            await self._close_locked(server)
            return
        # Slow down guessing; after a few failures the session ends.
        await asyncio.sleep(min(0.5 * server.auth_failures, 2.0))
        if server.auth_failures >= MAX_AUTH_FAILURES:
            await server.push("421 4.7.0 Too many authentication failures, closing")
            if server.transport is not None:
                server.transport.close()
            return
        await server.push("535 5.7.8 Authentication credentials invalid")

    async def _close_locked(self, server: PostwardenSMTP) -> None:
        self.refused("auth_locked")
        await server.push("421 4.7.0 Too many failed authentications from your address, try later")
        if server.transport is not None:
            server.transport.close()

    async def _verify(self, credentials: LoginPassword, peer_ip: str) -> Submitter | None:
        """Who ``credentials`` are: a configured user or a tenant's API key; None."""
        login, password = credentials.login, credentials.password
        ok = await self.passwords.verify(login, password)
        key: KeyLogin | None = None
        if not ok and self.key_auth is not None:
            # A tenant's API key with the send scope: username = the tenant's name.
            key = await self.key_auth(
                login.decode("utf-8", "replace"), password.decode("utf-8", "replace")
            )
            ok = key is not None
        if not ok:
            return None
        log.info("event=auth_ok peer=%s user=%s tenant=%s", peer_ip,
                 login.decode("utf-8", "replace"),
                 key.tenant_id if key is not None else "-")  # fmt: skip
        if key is None:
            return Submitter(login)
        return Submitter(login, key.tenant_id, key.key_prefix)

    # -- hooks

    async def handle_EHLO(
        self, server: PostwardenSMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        session.host_name = hostname
        peer = session.peer[0] if session.peer else ""
        # AUTH is advertised only where it may be used.
        return ehlo_lines(responses, bool(server._tls_protocol) or self.is_trusted(peer))

    async def handle_MAIL(
        self, server: PostwardenSMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:  # fmt: skip
        who = session.auth_data if session.authenticated else None
        if isinstance(who, Submitter) and who.key_prefix is not None and who.tenant_id is not None:
            if not self.key_valid(who.key_prefix, who.tenant_id):
                # Revoked (or its tenant disabled) since this session logged in.
                session.authenticated = False
                session.auth_data = None
                self.metrics.rejected.labels("credentials_revoked").inc()
                log.warning("event=auth_revoked peer=%s tenant=%s key=%s",
                            session.peer[0] if session.peer else "", who.tenant_id,
                            who.key_prefix)  # fmt: skip
                return "530 5.7.0 Authentication credentials invalid"
        if not self.may_relay(session):
            self.metrics.rejected.labels("auth_required").inc()
            return "530 5.7.0 Authentication required"
        # "<>" is the null reverse-path (RFC 5321 4.5.5: bounces, DSNs); aiosmtpd
        # keeps it as "<>" in the envelope, the spool as "".
        if address and address != "<>" and (len(address) > MAX_PATH or not _ADDRESS.match(address)):
            self.metrics.rejected.labels("bad_sender").inc()
            return "553 5.1.7 Bad sender address syntax"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: PostwardenSMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        if not self.may_relay(session):
            self.metrics.rejected.labels("relay_denied").inc()
            return "554 5.7.1 Relay access denied"
        if len(address) > MAX_PATH or not _ADDRESS.match(address):
            self.metrics.rejected.labels("bad_recipient").inc()
            return "553 5.1.3 Bad recipient address syntax"
        if address.rpartition("@")[2].startswith("[") and not self.cfg.smtp.allow_address_literals:
            # x@[127.0.0.1] names a host, not a domain: a way to make us connect inward.
            self.metrics.rejected.labels("address_literal").inc()
            return "550 5.7.1 Address literals are not accepted here"
        return take_recipient(self, envelope, address, rcpt_options, self.cfg.smtp.max_recipients)

    async def handle_DATA(
        self, server: PostwardenSMTP, session: Session, envelope: Envelope
    ) -> str:
        started = time.perf_counter()
        data = envelope.original_content or b""
        if has_bare_newline(data):
            if self.cfg.smtp.bare_newlines == "reject":
                self.metrics.rejected.labels("bare_newline").inc()
                return "550 5.6.0 Message contains a bare CR or LF; lines must end with CRLF"
            data = normalize_newlines(data)
        self.in_transaction += 1
        try:
            peer_ip = session.peer[0] if session.peer else ""
            msg_id = new_message_id()
            tls = server._tls_protocol is not None
            who = session.auth_data if session.authenticated else None
            auth = who.login.decode("utf-8", "replace") if isinstance(who, Submitter) else None
            tenant = who.tenant_id if isinstance(who, Submitter) else None
            data, fields = take_control_fields(data)
            # Only a tenant's own relay may describe its messages.
            meta = fields.meta if fields is not None and tenant is not None else None
            lane, requested = LANE_HIGH, None
            if fields is not None:
                if fields.priority is not None:
                    if fields.priority not in _LANES:
                        self.metrics.rejected.labels("bad_priority").inc()
                        return "550 5.6.0 X-Postwarden-Priority must be high or bulk"
                    lane = _LANES[fields.priority]
                requested = fields.pool
            try:
                if requested is not None and not POOL_NAME.fullmatch(requested):
                    raise ValueError(f"no pool named {requested[:64]!a}")
                pool = self.pool_for(tenant, requested)
            except ValueError as exc:
                self.metrics.rejected.labels("pool").inc()
                return f"550 5.7.1 {' '.join(str(exc).split())[:300]}"
            protocol = "ESMTP" + ("S" if tls else "") + ("A" if auth else "")
            if not session.extended_smtp:
                protocol = "SMTP"
            tls_info = None
            if tls and session.ssl:
                cipher = session.ssl.get("cipher")
                if cipher:
                    tls_info = f"using {cipher[1]} with cipher {cipher[0]}"
            origin = Origin(protocol, peer_ip, session.host_name or "", tls_info)
            body_8bit = not data.isascii() or "BODY=8BITMIME" in (
                o.upper() for o in envelope.mail_options
            )
            spool_env = SpoolEnvelope(
                mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                client_ip=peer_ip,
                helo=session.host_name or "",
                auth=auth,
                tenant=str(tenant) if tenant is not None else None,
                smtputf8=bool(envelope.smtp_utf8),
                body_8bit=body_8bit,
                meta=meta,
                pool=pool,
                lane=lane,
            )
            try:
                stored = await self.submit(spool_env, data, msg_id, origin)
            except Rejected as exc:
                self.metrics.rejected.labels(exc.reason).inc()
                return exc.reply
            except SpoolFull:
                # The disk is full: nothing of this message was kept; the client retries.
                log.warning("event=spool_full peer=%s", peer_ip)
                self.metrics.rejected.labels("insufficient_storage").inc()
                return "452 4.3.1 Insufficient system storage"
            except Exception:
                log.exception("event=spool_failed peer=%s", peer_ip)
                self.metrics.rejected.labels("local_error").inc()
                return "451 4.3.0 Temporary local problem, try again later"
        finally:
            self.in_transaction -= 1
        self.metrics.accept_latency.observe(time.perf_counter() - started)
        self.metrics.received.labels("smtp").inc()
        self.metrics.recipients_received.inc(len(envelope.rcpt_tos))
        # Per message at debug: the durable per-recipient record is the event log.
        log.debug(
            "event=accepted msg=%s peer=%s from=%r rcpts=%d size=%d auth=%s",
            stored.msg_id,
            peer_ip,
            envelope.mail_from,
            len(envelope.rcpt_tos),
            len(data),
            auth or "-",
        )
        if meta is not None:
            # The relay learns each recipient's id, and which were dropped, from the reply.
            ids = ",".join(
                f"{rid}" + (f":{stored.drops[r]}" if r in stored.drops else "")
                for r, rid in zip(envelope.rcpt_tos, stored.rcpt_ids, strict=True)
            )
            return f"250 2.0.0 Ok: queued as {stored.msg_id} rcpts={ids}"
        return f"250 2.0.0 Ok: queued as {stored.msg_id}"
