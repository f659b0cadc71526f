"""The lab: a simulated internet on loopback for tests, benchmarks and ``make run``.

:class:`Lab` runs, in the caller's event loop, an authoritative DNS server
(:class:`~postwarden.lab.dnsserver.DNSServer` on ``127.0.1.53``, UDP and TCP) and three
sink MX hosts (:class:`~postwarden.lab.sink.Sink` on ``127.0.1.1``-``127.0.1.3``, one
shared TCP port) that behave per recipient domain like providers' inbound MXes do::

    async with Lab() as lab:
        lab.add_domain("inbox.test")                        # MX 10 mx1.lab.test
        lab.add_domain("grey.test", behaviour="greylist", hosts=[1])
        # point the resolver at lab.nameserver and delivery at port lab.mx_port ...
        await lab.wait_for_messages(1)
        lab.messages[0].rcpt_tos

Nothing leaves the machine. Nothing is written to disk either, unless the lab is given
a state directory: ``Lab(state_dir=path)`` keeps every accepted message, with the
sink's verdicts (DKIM, TLS, which MX), in the maildir ``path/maildir``
(:class:`~postwarden.lab.inbox.LabInbox`, ``lab.inbox``).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from postwarden.lab.dnsserver import FAULTS, DNSServer
from postwarden.lab.inbox import LabInbox
from postwarden.lab.sink import (
    BEHAVIOURS,
    ReceivedMessage,
    Sink,
    SinkState,
    server_tls_context,
)

__all__ = [
    "BEHAVIOURS",
    "FAULTS",
    "DNSServer",
    "Lab",
    "LabInbox",
    "ReceivedMessage",
    "Sink",
    "SinkState",
]

ZONE = "lab.test"
SINK_HOSTS = ("127.0.1.1", "127.0.1.2", "127.0.1.3")
DNS_HOST = "127.0.1.53"
DEMO_SENDER_DOMAIN = "demo.lab.test"


def inbox_path(state_dir: str | Path) -> Path:
    """Where a lab with ``state_dir`` keeps the messages it received."""
    return Path(state_dir) / "maildir"


class Lab:
    """The DNS server and the sink MX hosts, started and stopped together.

    ``async with Lab() as lab`` starts everything (DNS on a random free port unless
    ``dns_port`` names one, the sinks on one port free on all their addresses) and
    stops it all on exit, freeing the ports. The sinks' names ``mx1.lab.test`` …
    resolve to their addresses from the start. Records and behaviours may be changed
    at any time.

    With ``state_dir``, every accepted message is also stored, DKIM verified against
    the lab DNS, in the maildir ``state_dir/maildir`` (:attr:`inbox`) before the sink
    answers ``250``; a lab started again on the same directory keeps the earlier ones.
    """

    def __init__(
        self,
        *,
        sink_hosts: tuple[str, ...] = SINK_HOSTS,
        dns_host: str = DNS_HOST,
        dns_port: int = 0,
        state_dir: str | Path | None = None,
    ) -> None:
        self.dns = DNSServer(dns_host, port=dns_port)
        self.state = SinkState()
        #: The maildir of received messages (only with ``state_dir``).
        self.inbox: LabInbox | None = None
        if state_dir is not None:
            self.inbox = LabInbox(inbox_path(state_dir), dns=self.dns)
            self.state.inbox = self.inbox
        names = [f"mx{i}.{ZONE}" for i in range(1, len(sink_hosts) + 1)]
        tls_context, self.cert_pem = server_tls_context([*names, f"*.{ZONE}"], sink_hosts)
        #: The sink MX hosts, in order: ``sinks[0]`` is ``mx1.lab.test`` on ``127.0.1.1``.
        self.sinks = [
            Sink(host=host, name=name, state=self.state, tls_context=tls_context)
            for host, name in zip(sink_hosts, names, strict=True)
        ]
        #: The TCP port every sink listens on (0 until started).
        self.mx_port = 0
        #: Demo domains (after :meth:`populate_demo`) → one line on how they behave.
        self.demo_domains: dict[str, str] = {}
        self._started = False
        self.dns.add(f"ns.{ZONE}", "A", dns_host)
        for sink in self.sinks:
            self.dns.add(sink.name, "A", sink.host)

    # -- lifecycle ------------------------------------------------------------------

    @property
    def nameserver(self) -> str:
        """``"host:port"`` of the DNS server (UDP and TCP)."""
        return self.dns.nameserver

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Every message the sinks accepted, in order of acceptance."""
        return self.state.messages

    async def start(self, attempts: int = 50) -> None:
        """Start the DNS server and the sinks (on a port free on all sink addresses)."""
        if self._started:
            return
        await self.dns.start()
        try:
            await self._listen_all(attempts)
        except BaseException:
            await self.dns.stop()
            raise
        self._started = True

    async def _listen_all(self, attempts: int) -> None:
        last: OSError | None = None
        for _ in range(attempts):
            try:
                await self.sinks[0].listen(0)
                port = self.sinks[0].port
                for sink in self.sinks[1:]:
                    await sink.listen(port)
            except OSError as exc:
                last = exc
                for sink in self.sinks:
                    await sink.close()
                continue
            self.mx_port = port
            return
        raise OSError("lab: no TCP port free on every sink address") from last

    async def stop(self) -> None:
        """Stop the sinks and the DNS server, cutting open connections."""
        for sink in self.sinks:
            await sink.close()
        await self.dns.stop()
        self._started = False

    async def __aenter__(self) -> Lab:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- domains --------------------------------------------------------------------

    def add_domain(
        self,
        domain: str,
        behaviour: str = "accept",
        hosts: list[int] | None = None,
        mx_layout: str | None = None,
    ) -> None:
        """Publish MX records for ``domain`` and set how its recipients are treated.

        ``hosts`` are sink indexes (default ``[0]``), given preferences 10, 20, 30 …
        in that order; ``mx_layout="all"`` means every sink. Replaces the domain's
        earlier MX records.
        """
        if mx_layout == "all":
            indexes = list(range(len(self.sinks)))
        elif mx_layout is None:
            indexes = list(hosts) if hosts is not None else [0]
        else:
            raise ValueError(f"unknown mx_layout {mx_layout!r}; expected 'all' or None")
        if not indexes:
            raise ValueError("add_domain needs at least one sink")
        self.state.set_behaviour(domain, behaviour)
        self.dns.remove(domain, "MX")
        for n, index in enumerate(indexes, start=1):
            self.dns.add(domain, "MX", f"{10 * n} {self.sinks[index].name}.")

    def add_null_mx(self, domain: str) -> None:
        """Publish RFC 7505's null MX (``0 .``): the domain accepts no mail."""
        self.dns.remove(domain, "MX")
        self.dns.add(domain, "MX", "0 .")

    def add_implicit_mx(self, domain: str, sink_index: int) -> None:
        """No MX for ``domain``, only an A record pointing at sink ``sink_index``;
        its recipients are accepted."""
        self.dns.remove(domain, "MX")
        self.dns.remove(domain, "A")
        self.dns.add(domain, "A", self.sinks[sink_index].host)
        self.state.set_behaviour(domain, "accept")

    def set_behaviour(self, domain_or_address: str, behaviour: str) -> None:
        """Change the behaviour for a domain or one address without touching DNS."""
        self.state.set_behaviour(domain_or_address, behaviour)

    def set_slow_delay(self, seconds: float) -> None:
        """How long the ``slow`` behaviour waits before answering RCPT."""
        self.state.slow_delay = seconds

    async def wait_for_messages(
        self,
        n: int,
        timeout: float = 10,  # noqa: ASYNC109 - the API tests rely on
    ) -> list[ReceivedMessage]:
        """Wait until at least ``n`` messages arrived; :class:`TimeoutError` (saying
        how many did) after ``timeout`` seconds."""
        return await self.state.wait_for_messages(n, timeout)

    def populate_demo(self) -> None:
        """Add the ``make run`` demo domains (see :attr:`demo_domains`) and the demo
        sending domain ``demo.lab.test`` (A, SPF and an MX so DSNs land in the lab)."""
        first, second, third = (self.sinks[i % len(self.sinks)] for i in range(3))
        self.add_domain("inbox.lab.test", "accept", hosts=[0])
        self.add_domain("greylist.lab.test", "greylist", hosts=[1 % len(self.sinks)])
        self.add_domain("full.lab.test", "tempfail", hosts=[2 % len(self.sinks)])
        self.add_domain("nouser.lab.test", "reject", hosts=[0])
        self.add_null_mx("nullmx.lab.test")
        self.demo_domains = {
            "inbox.lab.test": f"accepts every recipient ({first.name})",
            "greylist.lab.test": f"greylists: 451 4.7.1 first, accepts the retry ({second.name})",
            "full.lab.test": f"mailbox full: 451 4.3.2 every time, then expiry ({third.name})",
            "nouser.lab.test": f"no such user: 550 5.1.1, bounces at once ({first.name})",
            "nullmx.lab.test": "null MX (RFC 7505): accepts no mail, bounces with 5.1.10",
        }
        self.dns.remove(DEMO_SENDER_DOMAIN, "A")
        self.dns.add(DEMO_SENDER_DOMAIN, "A", "127.0.0.1")
        self.dns.remove(DEMO_SENDER_DOMAIN, "TXT")
        self.dns.add(DEMO_SENDER_DOMAIN, "TXT", "v=spf1 ip4:127.0.0.0/8 -all")
        self.add_domain(DEMO_SENDER_DOMAIN, "accept", hosts=[0])
