"""The lab's authoritative DNS server: real DNS packets over UDP and TCP on loopback.

:class:`DNSServer` answers every name from an in-memory table (it is authoritative for
the whole namespace, so the resolver under test never needs the internet):

* records of the asked type → ``NOERROR`` with those records, ``AA`` set;
* a name that exists (any record type, or an ancestor of a name that has records) but
  has none of the asked type → ``NOERROR`` with an empty answer (NODATA);
* any other name → ``NXDOMAIN``.

With :attr:`DNSServer.refresh` set (``postwarden lab`` sets it to re-read the control
database), a query for a name the table does not hold waits for one refresh first, as
a database-backed server (PowerDNS's SQL backends) would see a row committed a moment
ago; concurrent misses share a refresh.

Negative answers carry a root ``SOA`` in the authority section whose minimum is
:attr:`DNSServer.negative_ttl` (short, so tests that add records later are not stuck
behind a cached ``NXDOMAIN``). Faults can be injected per name: ``"servfail"``,
``"refused"`` or ``"timeout"`` (the query is dropped, nothing is sent).

UDP answers larger than 512 bytes (or the query's EDNS payload size) are truncated
with ``TC`` set; TCP answers use two-byte length framing and any number of queries
per connection. The response copies the query's ID and question
(:func:`dns.message.make_response`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset
from dns.rdatatype import RdataType

log = logging.getLogger("postwarden.lab.dns")

Fault = Literal["servfail", "timeout", "refused"]
FAULTS: tuple[str, ...] = ("servfail", "timeout", "refused")

_SOA_TEXT = "ns.lab.test. hostmaster.lab.test. 1 3600 600 86400 {ttl}"
_MAX_TXT_CHUNK = 255
_UDP_DEFAULT_LIMIT = 512


def _name(name: str | dns.name.Name) -> dns.name.Name:
    """``name`` as an absolute :class:`dns.name.Name` (trailing dot optional)."""
    if isinstance(name, dns.name.Name):
        return name if name.is_absolute() else name.concatenate(dns.name.root)
    return dns.name.from_text(name, origin=dns.name.root)


def txt_rdata(value: str | bytes) -> dns.rdata.Rdata:
    """One TXT rdata holding ``value`` split into 255-byte character-strings."""
    raw = value.encode() if isinstance(value, str) else value
    chunks = [raw[i : i + _MAX_TXT_CHUNK] for i in range(0, len(raw), _MAX_TXT_CHUNK)] or [b""]
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)


def _rdata(rdtype: RdataType, value: str | bytes) -> dns.rdata.Rdata:
    if rdtype == dns.rdatatype.TXT:
        return txt_rdata(value)
    text = value.decode() if isinstance(value, bytes) else value
    return dns.rdata.from_text(
        dns.rdataclass.IN, rdtype, text, origin=dns.name.root, relativize=False
    )


class DNSServer:
    """An authoritative DNS server on ``host``: UDP and TCP on one port, a random free
    one unless ``port`` names it (``postwarden lab`` does, so that ``dig`` finds it).

    Records and faults may be changed at any time, also while serving; every query
    sees the table as it is when the query arrives.
    """

    def __init__(self, host: str = "127.0.1.53", *, port: int = 0, negative_ttl: int = 5) -> None:
        self.host = host
        #: The port asked for (0: any free one); :attr:`port` is the one in use.
        self.want_port = port
        self.port = 0
        self.negative_ttl = negative_ttl
        #: Queries received (UDP and TCP, including ones answered with a fault).
        self.queries = 0
        #: The most recent queries as ``(name, type, "udp" | "tcp")``, lower-case name
        #: without trailing dot; bounded.
        self.query_log: deque[tuple[str, str, str]] = deque(maxlen=1000)
        self._records: dict[dns.name.Name, dict[RdataType, list[tuple[dns.rdata.Rdata, int]]]] = {}
        self._faults: dict[dns.name.Name, Fault] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients: set[asyncio.StreamWriter] = set()
        self._tcp_tasks: set[asyncio.Task[None]] = set()
        #: Called (and awaited) before answering a name the table does not hold.
        self.refresh: Callable[[], Awaitable[None]] | None = None
        self._refresh_lock = asyncio.Lock()
        self._refreshes = 0  # refreshes started so far
        self._udp_tasks: set[asyncio.Task[None]] = set()

    # -- the table ------------------------------------------------------------------

    @property
    def nameserver(self) -> str:
        """``"host:port"`` of the running server (port 0 before :meth:`start`)."""
        return f"{self.host}:{self.port}"

    def add(self, name: str, rtype: str, value: str | bytes, ttl: int = 60) -> None:
        """Add one record. ``value`` is presentation format (``"10 mx1.lab.test"``,
        an IP); for TXT it is the text itself, of any length (split into 255-byte
        strings inside one TXT rdata). Names are case-insensitive, trailing dot
        optional; names inside values are taken as absolute. Adding a record that is
        already present (same data) only updates its TTL.
        """
        rdtype = dns.rdatatype.from_text(rtype.upper())
        rdata = _rdata(rdtype, value)
        rows = self._records.setdefault(_name(name), {}).setdefault(rdtype, [])
        rows[:] = [(r, t) for r, t in rows if r != rdata]
        rows.append((rdata, ttl))

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Remove the records of ``rtype`` at ``name`` (all types when ``None``)."""
        key = _name(name)
        if rtype is None:
            self._records.pop(key, None)
            return
        types = self._records.get(key)
        if types is not None:
            types.pop(dns.rdatatype.from_text(rtype.upper()), None)
            if not types:
                del self._records[key]

    def discard(self, name: str, rtype: str, value: str | bytes) -> None:
        """Remove one record (as given to :meth:`add`); absent records are ignored."""
        rdtype = dns.rdatatype.from_text(rtype.upper())
        rdata = _rdata(rdtype, value)
        key = _name(name)
        types = self._records.get(key)
        rows = types.get(rdtype) if types is not None else None
        if types is None or rows is None:
            return
        rows[:] = [(r, t) for r, t in rows if r != rdata]
        if not rows:
            del types[rdtype]
        if not types:
            del self._records[key]

    def records(self, name: str, rtype: str) -> list[str]:
        """The records of ``rtype`` at ``name`` in presentation format (for tests)."""
        rows = self._records.get(_name(name), {}).get(dns.rdatatype.from_text(rtype.upper()))
        return [r.to_text() for r, _ in rows or []]

    def set_fault(self, name: str, kind: str | None) -> None:
        """Make every query for ``name`` (any type) fail: ``"servfail"`` (SERVFAIL),
        ``"refused"`` (REFUSED) or ``"timeout"`` (no answer at all); ``None`` clears.
        """
        key = _name(name)
        if kind is None:
            self._faults.pop(key, None)
            return
        if kind not in FAULTS:
            raise ValueError(f"unknown DNS fault {kind!r}; expected one of {FAULTS}")
        self._faults[key] = cast(Fault, kind)

    def _exists(self, qname: dns.name.Name) -> bool:
        if qname in self._records:
            return True
        return any(n.is_subdomain(qname) for n in self._records)

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to ``query``, or ``None`` when it is to be dropped."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.flags &= ~dns.flags.AA
            response.set_rcode(
                dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY else dns.rcode.FORMERR
            )
            return response
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        fault = self._faults.get(qname)
        if fault == "timeout":
            return None
        if fault is not None:
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.SERVFAIL if fault == "servfail" else dns.rcode.REFUSED)
            return response
        if question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
            response.flags &= ~dns.flags.AA
            return response
        types = self._records.get(qname, {})
        wanted = list(types) if qtype == dns.rdatatype.ANY else [qtype]
        for rdtype in wanted:
            rows = types.get(rdtype)
            if rows:
                rrset = dns.rrset.RRset(qname, dns.rdataclass.IN, rdtype)
                for rdata, ttl in rows:
                    rrset.add(rdata, ttl)  # the RRset's TTL is the smallest one
                response.answer.append(rrset)
        if not response.answer:
            if not self._exists(qname):
                response.set_rcode(dns.rcode.NXDOMAIN)
            soa = dns.rrset.from_text(
                dns.name.root,
                self.negative_ttl,
                "IN",
                "SOA",
                _SOA_TEXT.format(ttl=self.negative_ttl),
            )
            response.authority.append(soa)
        return response

    def _needs_refresh(self, wire: bytes) -> bool:
        if self.refresh is None:
            return False
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return False
        return bool(query.question) and query.question[0].name not in self._records

    async def _refreshed(self) -> None:
        """Run :attr:`refresh` once after this call began (or join one that did)."""
        asked = self._refreshes
        async with self._refresh_lock:
            # Refreshes run under the lock: one that started after this query arrived
            # (counted above ``asked``) has finished, and saw what this one would.
            if self._refreshes > asked or self.refresh is None:
                return
            self._refreshes += 1
            try:
                await self.refresh()
            except Exception:
                log.warning("lab DNS: refresh failed", exc_info=True)

    async def _handle_async(self, wire: bytes, transport: str) -> bytes | None:
        if self._needs_refresh(wire):
            await self._refreshed()
        return self._handle(wire, transport)

    def _handle(self, wire: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # malformed or not a query: drop, like many servers do
            return None
        if query.flags & dns.flags.QR:
            return None
        self.queries += 1
        if query.question:
            q = query.question[0]
            self.query_log.append(
                (
                    q.name.to_text(omit_final_dot=True).lower(),
                    dns.rdatatype.to_text(q.rdtype),
                    transport,
                )
            )
        try:
            response = self.answer(query)
        except Exception:
            log.exception("lab DNS: failed to answer %s", query.question)
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
        if response is None:
            return None
        if transport == "tcp":
            return response.to_wire(max_size=65535)
        limit = max(_UDP_DEFAULT_LIMIT, query.payload) if query.edns >= 0 else _UDP_DEFAULT_LIMIT
        return response.to_wire(max_size=limit, prefer_truncation=True)

    # -- serving --------------------------------------------------------------------

    async def start(self, attempts: int = 50) -> None:
        """Bind UDP on a random free port of :attr:`host` and TCP on the same port.

        Retries with another port when the TCP bind of that port fails. With a fixed
        port, one try: :class:`OSError` saying which address is taken.
        """
        loop = asyncio.get_running_loop()
        if self.want_port:
            await self._start_fixed(loop)
            return
        last: OSError | None = None
        for _ in range(attempts):
            udp, _proto = await loop.create_datagram_endpoint(
                lambda: _UDPProtocol(self), local_addr=(self.host, 0)
            )
            port = int(udp.get_extra_info("sockname")[1])
            try:
                tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError as exc:
                last = exc
                udp.close()
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            return
        raise OSError(f"lab DNS: no port free for both UDP and TCP on {self.host}") from last

    async def _start_fixed(self, loop: asyncio.AbstractEventLoop) -> None:
        where = f"{self.host}:{self.want_port}"
        try:
            udp, _proto = await loop.create_datagram_endpoint(
                lambda: _UDPProtocol(self), local_addr=(self.host, self.want_port)
            )
        except OSError as exc:
            raise OSError(exc.errno, f"lab DNS: cannot listen on {where} (UDP): {exc}") from exc
        try:
            tcp = await asyncio.start_server(self._serve_tcp, self.host, self.want_port)
        except OSError as exc:
            udp.close()
            raise OSError(exc.errno, f"lab DNS: cannot listen on {where} (TCP): {exc}") from exc
        self._udp, self._tcp, self.port = udp, tcp, self.want_port

    async def stop(self) -> None:
        """Stop serving and free the port; open TCP connections are closed."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        for udp_task in list(self._udp_tasks):
            udp_task.cancel()
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._tcp_clients):
                writer.transport.abort()
            for task in list(self._tcp_tasks):
                task.cancel()
            if self._tcp_tasks:
                await asyncio.wait(self._tcp_tasks, timeout=2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tcp.wait_closed(), 2)
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tcp_tasks.add(task)
        self._tcp_clients.add(writer)
        try:
            while True:
                head = await reader.readexactly(2)
                (length,) = struct.unpack("!H", head)
                wire = await reader.readexactly(length)
                reply = await self._handle_async(wire, "tcp")
                if reply is not None:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_clients.discard(writer)
            if task is not None:
                self._tcp_tasks.discard(task)
            writer.close()


class _UDPProtocol(asyncio.DatagramProtocol):
    """Answers each datagram at once, in the event loop (no per-query task)."""

    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if self.server._needs_refresh(data):
            task = asyncio.get_running_loop().create_task(self._answer_later(data, addr))
            self.server._udp_tasks.add(task)
            task.add_done_callback(self.server._udp_tasks.discard)
            return
        self._send(self.server._handle(data, "udp"), addr)

    async def _answer_later(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self._send(await self.server._handle_async(data, "udp"), addr)

    def _send(self, reply: bytes | None, addr: tuple[str | object, ...]) -> None:
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)
