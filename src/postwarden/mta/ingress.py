"""SMTP submission (aiosmtpd): relay control, limits, spooling before ``250``.

The protocol layer is aiosmtpd's; :class:`IngressSMTP` adds what aiosmtpd leaves to
the application — enhanced status codes on every reply, sessions per client IP,
commands per session, AUTH only over TLS or from trusted networks with the password
check off the event loop — and :class:`IngressHandler` decides each command.

Bare CR or LF (SMTP smuggling, CVE-2023-51764 family): aiosmtpd only ends DATA on
``<CRLF>.<CRLF>``, but passes bare LF *inside* a line to the handler. By default
(``smtp.bare_newlines = "reject"``) such a message is refused with
``550 5.6.0``; with ``"normalize"`` every bare CR or LF becomes CRLF before the
message is spooled. Either way nothing we relay carries a stray CR or LF.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import itertools
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from postwarden.config import Config
from postwarden.mail.cleanup import Origin, Rejected
from postwarden.metrics import Metrics
from postwarden.mta.auth import AuthUnavailable, KeyLogin, PasswordStore
from postwarden.mta.guard import AuthLockout, GuardChannel, lockout_rule
from postwarden.mta.wire import BulkDataSMTP
from postwarden.queue.spool import LANE_BULK, LANE_HIGH, SpoolFull, StoredMessage, new_message_id
from postwarden.queue.spool import Envelope as SpoolEnvelope

log = logging.getLogger("postwarden.ingress")

# Default enhanced codes (RFC 3463) for replies aiosmtpd writes without one.
_ENHANCED = {
    "221": "2.0.0", "235": "2.7.0", "250": "2.0.0", "251": "2.1.5", "252": "2.5.0",
    "421": "4.7.0", "450": "4.2.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "534": "5.7.9", "535": "5.7.8", "538": "5.7.11", "550": "5.0.0",
    "552": "5.3.4", "553": "5.1.3", "554": "5.0.0", "555": "5.5.4",
}  # fmt: skip
_HAS_ENHANCED = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_REPLY = re.compile(rb"^(\d{3})([ -])(.*)$", re.DOTALL)
MAX_PATH = 254  # RFC 5321 4.5.3.1.3: a path is 256 octets with its angle brackets
_ADDRESS = re.compile(r"^[^\s@<>()\[\],;:\"]+@[A-Za-z0-9.\-\[\]:]+$|^[^\s@]+@[^\s@]+$")

MAX_AUTH_FAILURES = 3
_LANES = {"high": LANE_HIGH, "bulk": LANE_BULK}  # X-Postwarden-Priority


def add_enhanced_code(reply: bytes) -> bytes:
    """Give a reply aiosmtpd wrote without an enhanced status code a default one."""
    if _HAS_ENHANCED.match(reply):
        return reply
    m = _REPLY.match(reply)
    if not m:
        return reply
    code = m.group(1).decode()
    enhanced = _ENHANCED.get(code)
    if enhanced is None:
        return reply
    return b"%s%s%s %s" % (m.group(1), m.group(2), enhanced.encode(), m.group(3))


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


def _hand_back(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    """aiosmtpd's ``authenticator``: it is called synchronously, and the check is not
    (a slow password hash off the loop, a key lookup), so it only hands the parsed
    credentials back to :meth:`IngressSMTP.smtp_AUTH`, which decides."""
    return AuthResult(success=False, handled=False, auth_data=auth_data)


# One sequence per process: both listeners share the worker's broker connection.
_SLOT_IDS = itertools.count(1)


class SessionSlot:
    """One session as the guard counts it: whether this process's own count allows it,
    and the appliance-wide slot asked of the broker (``pending``) and whether it is held."""

    __slots__ = ("held", "id", "ip", "local_ok", "pending")

    def __init__(self, ip: str, local_ok: bool) -> None:
        self.ip = ip
        self.id = next(_SLOT_IDS)
        self.local_ok = local_ok
        self.held = False
        self.pending: asyncio.Future[bool] | None = None


class SessionGuard:
    """What a listener's handler keeps of its sessions: how many are open, in all and
    per client IP (submission and the inbound MX each have one), and failed AUTHs per
    client IP.

    With ``shared`` (a worker: the supervisor's broker) the appliance-wide tables
    decide (mta.guard); this process's own count and lockouts decide only while the
    broker cannot be reached."""

    cfg: Config
    metrics: Metrics
    listener = "smtp"  # the name of this listener's limit in the shared tables

    def __init__(self) -> None:
        self.sessions_by_ip: dict[str, int] = {}
        self.open_sessions = 0
        self.shared: GuardChannel | None = None
        self.auth_lockouts = AuthLockout()
        self._alone = False  # deciding locally because the broker did not answer

    def max_sessions_per_ip(self) -> int:
        raise NotImplementedError

    def sessions_changed(self, delta: int) -> None:
        """The open-sessions gauge of this listener."""

    def refused(self, reason: str) -> None:
        """Count a refusal of this listener, by reason."""
        raise NotImplementedError

    # -- sessions per client IP

    def session_opened(self, ip: str) -> SessionSlot:
        """Count a new session (at connect); :meth:`admit` says whether it may go on.
        The appliance-wide slot is asked for at once: one round trip per connection."""
        n = self.sessions_by_ip.get(ip, 0) + 1
        self.sessions_by_ip[ip] = n
        self.open_sessions += 1
        self.sessions_changed(1)
        slot = SessionSlot(ip, n <= self.max_sessions_per_ip())
        if self.shared is not None:
            slot.pending = asyncio.ensure_future(self._open_shared(self.shared, slot))
        return slot

    async def admit(self, slot: SessionSlot) -> bool:
        """Whether the session may be greeted (False: its IP is over the limit)."""
        if slot.pending is None:
            return slot.local_ok
        # Shielded: when the client goes while we wait, the answer still arrives and
        # session_closed gives the slot back.
        return await asyncio.shield(slot.pending)

    async def _open_shared(self, shared: GuardChannel, slot: SessionSlot) -> bool:
        try:
            answer = await shared.guard_call(
                "session_open", slot=slot.id, listener=self.listener, ip=slot.ip,
                limit=self.max_sessions_per_ip(),
            )  # fmt: skip
        except (ConnectionError, TimeoutError, OSError, RuntimeError) as exc:
            self._fell_back("sessions", exc)
            return slot.local_ok
        self._back()
        slot.held = bool(answer.get("ok"))
        return slot.held

    def session_closed(self, slot: SessionSlot) -> None:
        ip = slot.ip
        n = self.sessions_by_ip.get(ip, 0) - 1
        if n <= 0:
            self.sessions_by_ip.pop(ip, None)
        else:
            self.sessions_by_ip[ip] = n
        self.open_sessions -= 1
        self.sessions_changed(-1)
        if slot.pending is not None:
            if slot.pending.done():
                self._release(slot)
            else:
                slot.pending.add_done_callback(lambda _: self._release(slot))

    def _release(self, slot: SessionSlot) -> None:
        if not slot.held or self.shared is None:
            return
        slot.held = False
        # A broker gone meanwhile has given back every slot of this worker already.
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            self.shared.guard_notify("session_close", slot=slot.id)

    # -- AUTH lockout per client IP

    async def auth_locked(self, ip: str) -> float:
        """Seconds ``ip`` stays locked out of AUTH (0: it may try)."""
        rule = lockout_rule(self.cfg)
        if rule is None:
            return 0.0
        if self.shared is not None:
            try:
                answer = await self.shared.guard_call("auth_check", ip=ip)
            except (ConnectionError, TimeoutError, OSError, RuntimeError) as exc:
                self._fell_back("auth", exc)
            else:
                self._back()
                return float(answer.get("locked_for") or 0.0)
        return self.auth_lockouts.locked_for(ip)

    async def auth_failed(self, ip: str) -> float:
        """Count a failed AUTH of ``ip``; the seconds it is now locked out (0: not)."""
        rule = lockout_rule(self.cfg)
        if rule is None:
            return 0.0
        # Always counted here too, so that a broker outage starts from what we saw.
        left, new = self.auth_lockouts.failed(ip, rule)
        if self.shared is not None:
            try:
                answer = await self.shared.guard_call(
                    "auth_failed", ip=ip, failures=rule.failures, window=rule.window,
                    lockout=rule.lockout,
                )  # fmt: skip
            except (ConnectionError, TimeoutError, OSError, RuntimeError) as exc:
                self._fell_back("auth", exc)
            else:
                self._back()
                left, new = float(answer.get("locked_for") or 0.0), bool(answer.get("new"))
        if new:
            self.metrics.auth_lockouts.inc()
            log.warning("event=auth_lockout peer=%s failures=%d window=%.0fs lockout=%.0fs",
                        ip, rule.failures, rule.window, rule.lockout)  # fmt: skip
        return left

    # -- the broker's absence

    def _fell_back(self, check: str, exc: BaseException) -> None:
        self.metrics.guard_local.labels(check).inc()
        if not self._alone:
            self._alone = True
            log.warning("event=guard_local reason=%r listener=%s", str(exc) or repr(exc),
                        self.listener)  # fmt: skip

    def _back(self) -> None:
        if self._alone:
            self._alone = False
            log.info("event=guard_shared listener=%s", self.listener)


class GuardedSMTP(BulkDataSMTP):
    """aiosmtpd's SMTP with the session rules every Postwarden listener keeps: enhanced
    status codes on replies, sessions per client IP, commands per session."""

    def __init__(self, handler: SessionGuard, **kwargs: Any) -> None:
        # aiosmtpd reads the limit while building its StreamReader in __init__.
        self.line_length_limit = handler.cfg.smtp.max_line_length + 1
        self.max_line_octets = handler.cfg.smtp.max_line_length
        super().__init__(handler, **kwargs)
        self.guard = handler
        self._in_ehlo = False
        self._commands = 0
        self._slot: SessionSlot | None = None
        self._started = False  # past the slot check: aiosmtpd's loop handles EOF
        self._peer_ip = ""
        self._smtp_methods = {
            name: self._counted(method) for name, method in self._smtp_methods.items()
        }

    def _counted(self, method: Callable[[str], Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def wrapper(arg: str) -> None:
            self._commands += 1
            if self._commands > self.guard.cfg.smtp.max_commands_per_session:
                self.guard.refused("too_many_commands")
                await self.push("421 4.7.0 Too many commands in this session, closing")
                if self.transport is not None:
                    self.transport.close()
                return
            await method(arg)

        return wrapper

    # -- connection accounting

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            return  # STARTTLS re-entry, same session
        peer = transport.get_extra_info("peername")
        self._peer_ip = peer[0] if peer else ""
        self._slot = self.guard.session_opened(self._peer_ip)

    def connection_lost(self, error: Exception | None) -> None:
        if self._slot is not None:
            self.guard.session_closed(self._slot)
            self._slot = None
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        keep = super().eof_received()
        if not self._started:
            # The client went before its greeting (before our handler even ran, or
            # while it waited for a slot): aiosmtpd closes the connection only from
            # its command loop, so a half-open one would keep its slot for ever.
            return False
        return keep

    async def _handle_client(self) -> None:
        admitted = self._slot is None or await self.guard.admit(self._slot)
        self._started = True
        if not admitted:
            self.guard.refused("too_many_sessions")
            await self.push("421 4.7.0 Too many sessions from your address, try later")
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    # -- replies

    def rewrite(self, raw: bytes) -> bytes:
        """A reply as it goes out (not EHLO's): with an enhanced status code."""
        return add_enhanced_code(raw)

    async def push(self, status: str | bytes) -> None:
        raw = status.encode("utf-8") if isinstance(status, str) else status
        if not self._in_ehlo:
            raw = self.rewrite(raw)
        await super().push(raw)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False


def server_factory(
    cls: Callable[..., GuardedSMTP],
    handler: SessionGuard,
    tls_context: ssl.SSLContext | None,
    limits: Callable[[], tuple[int, float]],
) -> Callable[[], GuardedSMTP]:
    """A protocol factory for ``loop.create_server``. ``limits()`` gives the message
    size limit and idle timeout, read per connection, so that a reload (SIGHUP)
    applies to every new session."""

    def factory() -> GuardedSMTP:
        size_limit, idle_timeout = limits()
        return cls(
            handler,
            data_size_limit=size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=handler.cfg.server.hostname,
            ident="Postwarden ESMTP",
            tls_context=tls_context,
            require_starttls=False,
            timeout=idle_timeout,
            auth_required=False,
            auth_require_tls=False,
            loop=asyncio.get_running_loop(),
        )

    return factory


class IngressSMTP(GuardedSMTP):
    """The submission listener's SMTP: the shared session rules; AUTH only over TLS or
    from trusted networks, checked off the loop, with a lockout per client IP."""

    def __init__(self, handler: IngressHandler, **kwargs: Any) -> None:
        super().__init__(handler, authenticator=_hand_back, **kwargs)
        self.ingress = handler
        self._auth_failures = 0

    async def _close_locked(self) -> None:
        self.ingress.refused("auth_locked")
        await self.push("421 4.7.0 Too many failed authentications from your address, try later")
        if self.transport is not None:
            self.transport.close()

    # AUTH as aiosmtpd's smtp_AUTH does it, but deciding here: its own path sets the
    # deprecated Session.login_data on every success (a warning per login).
    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        trusted = self.ingress.is_trusted(self._peer_ip)
        if not self._tls_protocol and not trusted:
            self.ingress.metrics.rejected.labels("auth_without_tls").inc()
            await self.push(
                "538 5.7.11 Encryption required for requested authentication "
                "mechanism: use STARTTLS"
            )
            return
        if await self.check_helo_needed("EHLO"):
            return
        session = self.session
        if session is None:
            return
        if not session.extended_smtp:
            await self.push("500 Error: command 'AUTH' not recognized")
            return
        if session.authenticated:
            await self.push("503 Already authenticated")
            return
        args = (arg or "").split()
        if not args:
            await self.push("501 Not enough value")
            return
        if len(args) > 2:
            await self.push("501 Too many values")
            return
        mechanism = args[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            await self.push("504 5.5.4 Unrecognized authentication type")
            return
        # A locked-out address is refused before it sends a password: nothing checked.
        # Trusted networks may relay without AUTH anyway and are never locked out.
        if not trusted and await self.ingress.auth_locked(self._peer_ip) > 0:
            await self._close_locked()
            return
        parse = self.auth_PLAIN if mechanism == "PLAIN" else self.auth_LOGIN
        result = await parse(self, args)
        credentials = result.auth_data
        if not isinstance(credentials, LoginPassword):
            return  # aborted or undecodable: aiosmtpd has answered
        try:
            who = await self._verify(credentials)
        except AuthUnavailable:
            # Not the client's fault and not a failed guess: nothing counted.
            self.ingress.metrics.rejected.labels("auth_unavailable").inc()
            await self.push("454 4.7.0 Temporary authentication failure, try again later")
            return
        if who is not None:
            session.authenticated = True
            session.auth_data = who  # type: ignore[assignment]  # aiosmtpd infers None
            await self.push("235 2.7.0 Authentication successful")
            return
        self._auth_failures += 1
        self.ingress.metrics.rejected.labels("auth_failed").inc()
        log.warning("event=auth_failed peer=%s user=%r", self._peer_ip, credentials.login[:64])
        if not trusted and await self.ingress.auth_failed(self._peer_ip) > 0:
            await self._close_locked()
            return
        # Slow down guessing; after a few failures the session ends.
        await asyncio.sleep(min(0.5 * self._auth_failures, 2.0))
        if self._auth_failures >= MAX_AUTH_FAILURES:
            await self.push("421 4.7.0 Too many authentication failures, closing")
            if self.transport is not None:
                self.transport.close()
            return
        await self.push("535 5.7.8 Authentication credentials invalid")

    async def _verify(self, credentials: LoginPassword) -> Submitter | None:
        """Who ``credentials`` are: a configured user or a tenant's API key; None."""
        login, password = credentials.login, credentials.password
        ok = await self.ingress.passwords.verify(login, password)
        key: KeyLogin | None = None
        if not ok and self.ingress.key_auth is not None:
            # A tenant's API key with the send scope: username = the tenant's name.
            key = await self.ingress.key_auth(
                login.decode("utf-8", "replace"), password.decode("utf-8", "replace")
            )
            ok = key is not None
        if not ok:
            return None
        log.info("event=auth_ok peer=%s user=%s tenant=%s", self._peer_ip,
                 login.decode("utf-8", "replace"),
                 key.tenant_id if key is not None else "-")  # fmt: skip
        if key is None:
            return Submitter(login)
        return Submitter(login, key.tenant_id, key.key_prefix)


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
    ) -> None:
        self.metrics = metrics
        self.passwords = passwords
        self.submit = submit
        super().__init__()
        self.in_transaction = 0
        # (tenant name, API key) -> the tenant and key when the key may send; from the
        # control plane.
        self.key_auth: Callable[[str, str], Awaitable[KeyLogin | None]] | None = None
        # (key prefix, tenant id) -> whether a key that logged in may still send (not
        # revoked, tenant not disabled since): in memory, asked at every MAIL.
        self.key_valid: Callable[[str, int], bool] = lambda _k, _t: True
        # (tenant id or None, the pool X-Postwarden-Pool names or None) -> the pool to
        # spool the message with (None: the appliance's default pool); raises ValueError
        # (its text the reply) when the pool is unknown or not the sender's. From the
        # control plane; alone, whatever pool is named.
        self.pool_for: Callable[[int | None, str | None], str | None] = lambda _t, p: p
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """Apply a (re)loaded configuration: limits, networks, users take effect at once."""
        self.cfg = cfg
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in cfg.smtp.trusted_networks]
        self.passwords.configure(cfg.smtp.users)

    # -- sessions

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

    # -- hooks

    async def handle_EHLO(
        self, server: IngressSMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        session.host_name = hostname
        peer = session.peer[0] if session.peer else ""
        out = []
        for line in responses:
            if line.startswith("250-AUTH") and not (server._tls_protocol or self.is_trusted(peer)):
                continue  # AUTH is advertised only where it may be used
            if line == "250 HELP":
                out += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250 HELP"]
                continue
            out.append(line)
        return out

    async def handle_MAIL(
        self, server: IngressSMTP, session: Session, envelope: Envelope, address: str,
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
        self, server: IngressSMTP, session: Session, envelope: Envelope, address: str,
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
        if len(envelope.rcpt_tos) >= self.cfg.smtp.max_recipients:
            self.metrics.rejected.labels("too_many_recipients").inc()
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: IngressSMTP, session: Session, envelope: Envelope) -> str:
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


def make_server_factory(
    handler: IngressHandler, tls_context: ssl.SSLContext | None
) -> Callable[[], GuardedSMTP]:
    """The submission listeners' protocol factory."""

    def limits() -> tuple[int, float]:
        return handler.cfg.smtp.max_message_size, handler.cfg.smtp.idle_timeout

    return server_factory(IngressSMTP, handler, tls_context, limits)
