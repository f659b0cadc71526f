"""The lab's sink MX hosts: aiosmtpd servers that behave like providers' inbound MXes.

Each :class:`Sink` listens on its own loopback address (``127.0.1.N``) and the port all
sinks share. What a sink answers to ``RCPT TO`` depends on the recipient's domain
(or the full address), looked up in the :class:`SinkState` all sinks share; see
:data:`BEHAVIOURS`. Unknown domains accept. Every message a sink accepts with ``250``
at the end of DATA is appended to :attr:`SinkState.messages`, with only the accepted
recipients; nothing is logged per message, so the sinks keep up with the benchmark.
Nothing is written to disk either, unless the state has an inbox
(:attr:`SinkState.inbox`, a lab with a state directory): then each message is verified
(DKIM, against the lab's DNS) and stored in its maildir before the ``250``, see
:mod:`postwarden.lab.inbox`.

The sinks advertise 8BITMIME, SMTPUTF8, a 256 MiB SIZE and (unless :attr:`Sink.tls`
is off) STARTTLS with a self-signed certificate; they never advertise AUTH. DATA is
read in bulk for speed, and its lines are not held to 1000 octets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NoReturn

from aiosmtpd.smtp import SMTP, Envelope, Session

from postwarden.mta.protocol import PostwardenSMTP
from postwarden.tls import self_signed

if TYPE_CHECKING:
    from postwarden.lab.inbox import LabInbox

log = logging.getLogger("postwarden.lab")

#: What a sink does at ``RCPT TO`` for a recipient:
#:
#: ``accept``      ``250``.
#: ``reject``      ``550 5.1.1 <addr>: Recipient address rejected: User unknown``.
#: ``tempfail``    ``451 4.3.2 Mailbox temporarily unavailable``.
#: ``greylist``    ``451 4.7.1`` for the first attempt of a (sender, recipient) pair,
#:                 ``250`` for every later one.
#: ``disconnect``  ``421 4.7.0 Too many connections, closing``, then the connection closes.
#: ``drop_data``   ``250``; when the message content has arrived the connection is
#:                 aborted without a reply to DATA.
#: ``slow``        ``250`` after :attr:`SinkState.slow_delay` seconds.
BEHAVIOURS: tuple[str, ...] = (
    "accept",
    "reject",
    "tempfail",
    "greylist",
    "disconnect",
    "drop_data",
    "slow",
)

DATA_SIZE_LIMIT = 256 * 1024 * 1024
SESSION_TIMEOUT = 60.0
# The longest DATA line and the stream reader's buffer limit of a sink session.
_LINE_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One message a sink accepted (``250`` at the end of DATA)."""

    #: The message exactly as received, after dot-unstuffing.
    data: bytes
    #: The envelope sender; ``""`` for the null reverse-path ``<>``.
    mail_from: str
    #: The recipients the sink accepted, in ``RCPT`` order.
    rcpt_tos: list[str]
    #: The client's source IP.
    peer: str
    #: The IP of the sink that received it.
    sink_address: str
    #: Its MX name, e.g. ``mx1.lab.test``.
    sink_name: str
    #: Whether the session was under STARTTLS.
    tls: bool
    #: The client's EHLO/HELO name.
    helo: str
    #: ``time.time()`` at acceptance.
    received_at: float
    #: The TLS protocol version and cipher, when under STARTTLS and kept in an inbox.
    tls_version: str = ""
    tls_cipher: str = ""
    #: Its id in the lab inbox (``""`` when the lab keeps no inbox).
    id: str = ""


class SinkState:
    """What all sinks share: behaviour per recipient domain, greylist memory and the
    messages received. Changes apply to the next command of every session.
    """

    def __init__(self) -> None:
        self.behaviours: dict[str, str] = {}
        self.slow_delay = 3.0
        self.messages: list[ReceivedMessage] = []
        #: Where accepted messages are also stored (a lab with a state directory).
        self.inbox: LabInbox | None = None
        self._greylisted: set[tuple[str, str]] = set()
        self._arrived = asyncio.Event()

    def set_behaviour(self, key: str, behaviour: str) -> None:
        """Set the behaviour for a domain (``example.test``) or one address
        (``user@example.test``; takes precedence over its domain). Case-insensitive.
        """
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; expected one of {BEHAVIOURS}")
        self.behaviours[key.lower().rstrip(".")] = behaviour

    def behaviour_for(self, address: str) -> str:
        """The behaviour for ``address``: its own, else its domain's, else ``accept``."""
        if not self.behaviours:
            return "accept"
        addr = address.lower()
        found = self.behaviours.get(addr)
        if found is None:
            found = self.behaviours.get(addr.rpartition("@")[2], "accept")
        return found

    def greylist_passes(self, mail_from: str, rcpt: str) -> bool:
        """False the first time a (sender, recipient) pair is seen, True afterwards."""
        key = (mail_from.lower(), rcpt.lower())
        if key in self._greylisted:
            return True
        self._greylisted.add(key)
        return False

    def record(self, message: ReceivedMessage) -> None:
        """Append an accepted message and wake :meth:`wait_for_messages`."""
        self.messages.append(message)
        self._arrived.set()

    async def wait_for_messages(
        self,
        n: int,
        timeout: float = 10,  # noqa: ASYNC109 - the API tests rely on
    ) -> list[ReceivedMessage]:
        """Wait until at least ``n`` messages arrived; returns :attr:`messages`.

        Raises :class:`TimeoutError` saying how many arrived when ``timeout`` passes.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.messages) < n:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"lab: {len(self.messages)} of {n} messages arrived within {timeout} s"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return self.messages


@functools.cache
def _self_signed(names: tuple[str, ...], ips: tuple[str, ...]) -> tuple[bytes, bytes]:
    """One certificate per process for the same names (key generation is not free)."""
    return self_signed(names, ips, days=3650)


def server_tls_context(names: Iterable[str], ips: Iterable[str]) -> tuple[ssl.SSLContext, bytes]:
    """A server-side TLS context with a self-signed certificate for ``names`` and
    ``ips`` (generated once per process for the same arguments), and the certificate
    PEM so a client can trust it.
    """
    cert_pem, key_pem = _self_signed(tuple(names), tuple(ips))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory(prefix="postwarden-lab-") as tmp:
        cert_file, key_file = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        with open(cert_file, "wb") as f:
            f.write(cert_pem)
        with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert_file, key_file)
    return ctx, cert_pem


async def _until_cancelled() -> NoReturn:
    """Park the session task; closing the connection cancels it."""
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable: the future is never resolved")


class _SinkHandler:
    """aiosmtpd hooks: behaviours at RCPT, recording at DATA."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.state = sink.state

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [r for r in responses if not r[4:].upper().startswith("AUTH")]

    async def handle_RCPT(
        self,
        server: PostwardenSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        behaviour = self.state.behaviour_for(address)
        if behaviour == "reject":
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if behaviour == "tempfail":
            return "451 4.3.2 Mailbox temporarily unavailable"
        if behaviour == "greylist" and not self.state.greylist_passes(
            envelope.mail_from or "", address
        ):
            return "451 4.7.1 Greylisted, try again later"
        if behaviour == "disconnect":
            await server.push("421 4.7.0 Too many connections, closing")
            server.hang_up(abort=False)
            await _until_cancelled()
        if behaviour == "slow":
            await asyncio.sleep(self.state.slow_delay)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(
        self, server: PostwardenSMTP, session: Session, envelope: Envelope
    ) -> str:
        state = self.state
        if state.behaviours and any(
            state.behaviour_for(r) == "drop_data" for r in envelope.rcpt_tos
        ):
            server.hang_up(abort=True)
            await _until_cancelled()
        mail_from = envelope.mail_from or ""
        peer: Any = session.peer
        message = ReceivedMessage(
            data=envelope.original_content or b"",
            mail_from="" if mail_from == "<>" else mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            peer=str(peer[0]) if isinstance(peer, tuple) else str(peer),
            sink_address=self.sink.host,
            sink_name=self.sink.name,
            tls=session.ssl is not None,
            helo=session.host_name or "",
            received_at=time.time(),
        )
        if state.inbox is not None:
            return await self._store(state.inbox, session, message)
        state.record(message)
        return f"250 2.0.0 Ok: queued as {self.sink.name}-{len(state.messages)}"

    async def _store(self, inbox: LabInbox, session: Session, message: ReceivedMessage) -> str:
        """Keep the message in the inbox before accepting it, as a real MX would."""
        if session.ssl is not None:
            cipher = session.ssl.get("cipher")
            if isinstance(cipher, tuple) and len(cipher) >= 2:
                message = replace(message, tls_version=str(cipher[1]), tls_cipher=str(cipher[0]))
        try:
            message = await inbox.deliver(message)
        except Exception as exc:  # a full disk, a bug: the sender retries, nothing is lost
            log.error("event=lab_store_failed sink=%s error=%r", self.sink.name, exc)
            return "451 4.3.0 Could not store the message, try again later"
        self.state.record(message)
        return f"250 2.0.0 Ok: queued as {message.id}"


@dataclass(eq=False)
class Sink:
    """One sink MX host at ``host``, named ``name``.

    Set :attr:`refuse` or :attr:`tls` and ``await`` :meth:`apply` to change how it
    serves: refusing closes the listener (connections are refused) and cuts open
    sessions; a TLS change restarts the listener and cuts open sessions, so the next
    session sees the new setting.
    """

    host: str
    name: str
    state: SinkState
    tls_context: ssl.SSLContext | None
    #: The TCP port (shared by all sinks of a lab); set when first listening.
    port: int = 0
    #: Accepted TCP connections, cumulative.
    connections: int = 0
    #: Refuse connections (after :meth:`apply`).
    refuse: bool = False
    #: Offer STARTTLS (after :meth:`apply`).
    tls: bool = True
    #: Largest message accepted (bytes, advertised as SIZE); for new sessions.
    data_size_limit: int = DATA_SIZE_LIMIT
    _server: asyncio.Server | None = field(default=None, repr=False)
    _serving_tls: bool = field(default=True, repr=False)
    _sessions: set[PostwardenSMTP] = field(default_factory=set, repr=False)

    def _protocol(self) -> PostwardenSMTP:
        self.connections += 1
        # aiosmtpd's SMTP with the bulk DATA and path speedups (no session rules),
        # in _sessions while connected so that the sink can cut it off. DATA lines are
        # not held to 1000 octets; the stream reader's limit still holds command lines
        # to RFC 5321's sizes through aiosmtpd's own check.
        return PostwardenSMTP(
            _SinkHandler(self),
            max_line_octets=_LINE_LIMIT,
            line_length_limit=_LINE_LIMIT,
            registry=self._sessions,
            hostname=self.name,
            tls_context=self.tls_context if self._serving_tls else None,
            require_starttls=False,
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=self.data_size_limit,
            command_call_limit=None,
            timeout=SESSION_TIMEOUT,
            loop=asyncio.get_running_loop(),
        )

    @property
    def listening(self) -> bool:
        """Whether the listener is open."""
        return self._server is not None

    async def listen(self, port: int) -> None:
        """Open the listener on ``host:port`` (0: any free port; :attr:`port` is set).

        Raises :class:`OSError` when the port is taken.
        """
        self._serving_tls = self.tls
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._protocol, self.host, port)
        self._server = server
        self.port = int(server.sockets[0].getsockname()[1])

    async def apply(self) -> None:
        """Make :attr:`refuse` and :attr:`tls` take effect, on the same address and port."""
        if self.refuse:
            await self.close()
            return
        if self._server is not None and self._serving_tls != self.tls:
            await self.close()
        if self._server is None:
            await self.listen(self.port)

    async def close(self) -> None:
        """Close the listener and abort every open session."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        sessions = list(self._sessions)
        for session in sessions:
            session.hang_up(abort=True)
        tasks = [s._handler_coroutine for s in sessions if s._handler_coroutine is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2)
