"""The one SMTP protocol of every Postwarden listener, and its server factory.

:class:`PostwardenSMTP` is aiosmtpd's SMTP with the wire-level speedups of
:mod:`postwarden.mta.wire` (DATA read in bulk, plain paths parsed without the email
package) and, for a guarded listener, the session rules every listener keeps:
sessions per client IP (refused before the greeting), commands per session, enhanced
status codes on every reply. What differs between listeners is not a subclass but the
objects passed in, as aiosmtpd's handler hooks are:

* the handler (aiosmtpd's ``handle_EHLO``, ``handle_MAIL``, ``handle_RCPT``,
  ``handle_DATA``) decides each command;
* the :class:`Guard` (for submission and the inbound MX, the handler itself) holds the
  session slots, counts refusals, gives the limits and answers AUTH
  (:meth:`Guard.auth_command`), and may rewrite replies before their enhanced code is
  added (an optional ``rewrite_reply(raw, command)``, looked up once per session);
* ``registry``, a set the session is in while it is connected (the lab's sinks cut
  their sessions off through it).

Without a guard (the lab's sinks) the session is aiosmtpd's with the speedups only.

aiosmtpd's private parts used here (``_handle_client``, ``_smtp_methods``,
``_getaddr``, ``_reader``, ``_set_post_data_state``, ...) are named in
tests/mta/test_patched_internals.py; pyproject.toml bounds aiosmtpd's version.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, syntax

from postwarden.config import Config
from postwarden.mta.sessions import SessionSlot
from postwarden.mta.wire import fast_getaddr, read_data

MAX_PATH = 254  # RFC 5321 4.5.3.1.3: a path is 256 octets with its angle brackets

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


def ehlo_lines(responses: list[str], offer_auth: bool) -> list[str]:
    """aiosmtpd's EHLO reply lines as a Postwarden listener sends them: PIPELINING and
    ENHANCEDSTATUSCODES announced (aiosmtpd pipelines, and every reply gets its code),
    AUTH only when ``offer_auth``. For a handler's ``handle_EHLO``."""
    out = []
    for line in responses:
        if line.startswith("250-AUTH") and not offer_auth:
            continue
        if line == "250 HELP":
            out += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250 HELP"]
            continue
        out.append(line)
    return out


def take_recipient(
    guard: Guard, envelope: Envelope, address: str, rcpt_options: list[str], limit: int
) -> str:
    """The end of a handler's ``handle_RCPT`` once the address is accepted: ``452
    4.5.3`` (counted as ``too_many_recipients``) when ``limit`` are taken already,
    else the recipient is added to the envelope."""
    if len(envelope.rcpt_tos) >= limit:
        guard.refused("too_many_recipients")
        return "452 4.5.3 Too many recipients"
    envelope.rcpt_tos.append(address)
    envelope.rcpt_options.extend(rcpt_options)
    return "250 2.1.5 Recipient OK"


def hand_back(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    """aiosmtpd's ``authenticator``: it is called synchronously, and the check is not
    (a slow password hash off the loop, a key lookup), so it only hands the parsed
    credentials back to the guard's :meth:`Guard.auth_command`, which decides."""
    return AuthResult(success=False, handled=False, auth_data=auth_data)


class Guard(Protocol):
    """What a guarded listener supplies besides aiosmtpd's hooks (its handler, a
    :class:`~postwarden.mta.sessions.SessionGuard`, in practice)."""

    @property
    def cfg(self) -> Config: ...

    def limits(self) -> tuple[int, float]:
        """The message size limit and idle timeout of a new session."""
        ...

    def session_opened(self, ip: str) -> SessionSlot: ...

    async def admit(self, slot: SessionSlot) -> bool: ...

    def session_closed(self, slot: SessionSlot) -> None: ...

    def refused(self, reason: str) -> None:
        """Count a refusal of this listener, by reason."""
        ...

    async def auth_command(self, server: PostwardenSMTP, arg: str) -> None:
        """Answer an AUTH command (aiosmtpd's ``auth_PLAIN``/``auth_LOGIN`` parse the
        credentials and hand them back: see :func:`hand_back`)."""
        ...


class PostwardenSMTP(SMTP):
    """aiosmtpd's SMTP with DATA read by :func:`~postwarden.mta.wire.read_data`, plain
    paths parsed by :func:`~postwarden.mta.wire.fast_getaddr`, and, with a ``guard``,
    the session rules of the module docstring.

    ``max_line_octets`` is the longest DATA line, its CRLF included;
    ``line_length_limit`` (aiosmtpd's, also the stream reader's buffer limit) bounds
    command lines. Where the stream reader's buffer is not the ``bytearray``
    :func:`~postwarden.mta.wire.read_data` puts pipelined bytes back into, aiosmtpd's
    own DATA line loop runs instead.
    """

    def __init__(
        self,
        handler: Any,
        *,
        guard: Guard | None = None,
        max_line_octets: int = 1000,
        line_length_limit: int | None = None,
        registry: set[PostwardenSMTP] | None = None,
        **kwargs: Any,
    ) -> None:
        # aiosmtpd reads the limit while building its StreamReader in __init__.
        if line_length_limit is not None:
            self.line_length_limit = line_length_limit
        self.max_line_octets = max_line_octets
        super().__init__(handler, **kwargs)
        self.guard = guard
        self.registry = registry
        self.peer_ip = ""
        self.auth_failures = 0  # failed AUTHs in this session (the guard counts them)
        self._command: str | None = None  # the command being answered (guarded only)
        self._commands = 0
        self._slot: SessionSlot | None = None
        # Past the slot check: aiosmtpd's loop handles EOF from there.
        self._started = guard is None
        self._rewrite: Callable[[bytes, str | None], bytes] | None = None
        if guard is not None:
            self._rewrite = getattr(guard, "rewrite_reply", None)
            self._smtp_methods = {
                name: self._counted(guard, name, method)
                for name, method in self._smtp_methods.items()
            }

    def _counted(
        self, guard: Guard, name: str, method: Callable[[str], Awaitable[None]]
    ) -> Callable[..., Awaitable[None]]:
        async def wrapper(arg: str) -> None:
            self._commands += 1
            if self._commands > guard.cfg.smtp.max_commands_per_session:
                guard.refused("too_many_commands")
                await self.push("421 4.7.0 Too many commands in this session, closing")
                if self.transport is not None:
                    self.transport.close()
                return
            self._command = name
            try:
                await method(arg)
            finally:
                self._command = None

        return wrapper

    # -- connection accounting

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            return  # STARTTLS re-entry, same session
        if self.registry is not None:
            self.registry.add(self)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        if self.guard is not None:
            self._slot = self.guard.session_opened(self.peer_ip)

    def connection_lost(self, error: Exception | None) -> None:
        if self._slot is not None:
            assert self.guard is not None
            self.guard.session_closed(self._slot)
            self._slot = None
        if self.registry is not None:
            self.registry.discard(self)
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
        if self.guard is not None:
            admitted = self._slot is None or await self.guard.admit(self._slot)
            self._started = True
            if not admitted:
                self.guard.refused("too_many_sessions")
                await self.push("421 4.7.0 Too many sessions from your address, try later")
                if self.transport is not None:
                    self.transport.close()
                return
        await super()._handle_client()

    def hang_up(self, *, abort: bool) -> None:
        """Close the TCP connection under any TLS layer: ``abort`` drops it at once,
        otherwise pending replies are flushed first."""
        raw = self._original_transport or self.transport
        if raw is None:
            return
        if abort and isinstance(raw, asyncio.WriteTransport):
            raw.abort()
        else:
            raw.close()

    # -- replies

    async def push(self, status: str | bytes) -> None:
        raw = status.encode("utf-8") if isinstance(status, str) else status
        if self.guard is not None and self._command != "EHLO":
            if self._rewrite is not None:
                raw = self._rewrite(raw, self._command)
            raw = add_enhanced_code(raw)
        await super().push(raw)

    # -- commands

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if self.guard is None:
            await super().smtp_AUTH(arg)
            return
        await self.guard.auth_command(self, arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        fast = fast_getaddr(arg)
        return fast if fast is not None else super()._getaddr(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if not isinstance(getattr(self._reader, "_buffer", None), bytearray):
            await super().smtp_DATA(arg)
            return
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content, error = await read_data(
                self._reader, self.data_size_limit, self.max_line_octets
            )
        except (ConnectionError, asyncio.IncompleteReadError):
            if self.transport is not None:
                self.transport.close()
            return
        if error is not None:
            await self.push(error)
            self._set_post_data_state()
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)


def server_factory(
    handler: Guard, tls_context: ssl.SSLContext | None
) -> Callable[[], PostwardenSMTP]:
    """The protocol factory of a listener (``loop.create_server``) whose handler is
    also its guard. Limits are read per connection, so that a reload (SIGHUP) applies
    to every new session."""

    def factory() -> PostwardenSMTP:
        cfg = handler.cfg
        size_limit, idle_timeout = handler.limits()
        return PostwardenSMTP(
            handler,
            guard=handler,
            max_line_octets=cfg.smtp.max_line_length,
            line_length_limit=cfg.smtp.max_line_length + 1,
            data_size_limit=size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=cfg.server.hostname,
            ident="Postwarden ESMTP",
            tls_context=tls_context,
            require_starttls=False,
            timeout=idle_timeout,
            auth_required=False,
            auth_require_tls=False,
            authenticator=hand_back,
            loop=asyncio.get_running_loop(),
        )

    return factory
