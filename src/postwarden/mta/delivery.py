"""Direct-to-MX delivery over SMTP (aiosmtplib).

One :class:`DeliveryAgent` runs *sessions*: a session resolves a destination
domain's MX hosts, connects to the first one that answers (trying the next host or
address on connection failure or a 4xx/5xx greeting), says EHLO, upgrades with
STARTTLS according to the domain's TLS policy, then carries job after job (one job =
one message with all its recipients at that domain) over the same connection.

The outcome of each recipient is reported as an :class:`AttemptResult`; the
scheduler turns it into a state change with the one retry policy. Nothing here
decides *when* to retry.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import aiosmtplib
from aiosmtplib import SMTPResponse
from aiosmtplib.errors import (
    SMTPConnectError,
    SMTPException,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from postwarden.config import Config, SourceConfig
from postwarden.dns.resolver import DnsError, MxHost, Resolver
from postwarden.metrics import OTHER_SITE, Metrics, site_label
from postwarden.mta import smtpclient_speedups
from postwarden.mta.destinations import allowed_hosts, parse_networks
from postwarden.values import AttemptResult, Job, Kind, Lease, SpoolError

log = logging.getLogger("postwarden.delivery")


def format_response(code: int, message: str) -> str:
    """One-line ``"451 4.3.0 text"`` form of an SMTP reply (multi-line joined by spaces)."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return f"{code} {text}".strip()


def kind_of(code: int) -> Kind:
    if 200 <= code < 300:
        return "delivered"
    if 400 <= code < 500:
        return "temporary"
    if code >= 500:
        return "permanent"
    return "temporary"  # anything unexpected is retried, never lost


class ExpiringSet:
    """Keys remembered for ``ttl`` seconds, at most ``max_entries`` of them (the oldest
    forgotten first): a memory of recent failures that cannot grow without bound
    however many distinct addresses fail."""

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        # key -> expiry; one ttl for all, so insertion order is expiry order.
        self._until: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def add(self, key: str, now: float) -> None:
        self._until.pop(key, None)
        self._until[key] = now + self.ttl
        while self._until and (
            len(self._until) > self.max_entries or next(iter(self._until.values())) <= now
        ):
            self._until.popitem(last=False)

    def __contains__(self, item: tuple[str, float]) -> bool:
        """``(key, now) in s``: whether ``key`` was added less than ``ttl`` ago."""
        key, now = item
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            del self._until[key]
            return False
        return True


#: How long, and for how many addresses, a failed STARTTLS is remembered.
TLS_BROKEN_TTL = 3600.0
TLS_BROKEN_MAX = 4096


class _ConnectFailed(Exception):
    """``answer``: the response is the MX host's own (greeting, EHLO), not a network
    or local (TLS) failure."""

    def __init__(self, response: str, permanent: bool = False, answer: bool = False) -> None:
        super().__init__(response)
        self.response = response
        self.permanent = permanent
        self.answer = answer


@dataclass
class _Connection:
    smtp: aiosmtplib.SMTP
    mx: str
    ip: str
    tls: bool
    source: str = ""
    used: bool = False  # a transaction was begun on it
    mailed: bool = False  # counted in postwarden_delivery_connections
    site: str = OTHER_SITE  # the provider site as a metric label (metrics.site_label)


class Gate(Protocol):
    """The scheduler's say over one session (traffic shaping): which source it leaves
    from, whether each message may go now, and what the answers were."""

    max_messages: int
    site: str  # the destination's provider site, once open() has run (shaping.rules)

    async def open(self, mx_hosts: tuple[MxHost, ...], job: Job) -> SourceConfig | None:
        """The source to connect from; None: refused (the gate took ``job`` back)."""

    async def admit(self, job: Job) -> str:
        """Before a transaction: "go", "skip" (the gate took the job back; go on with
        the next) or "stop" (the gate took it back; end the session)."""

    async def refused(
        self, job: Job, results: list[AttemptResult], room: int, answer: bool
    ) -> bool:
        """The connection was refused as a whole (``results``: ``job``'s, as they would
        be reported; ``answer``: the host's own, not a network or TLS failure): one
        event, told once. True: the gate took ``job`` back (end the session); False:
        report the results (without :meth:`answered`)."""

    def answered(self, job: Job, results: list[AttemptResult]) -> None: ...

    async def close(self, sent: int) -> None: ...


def _whole_connection(results: list[AttemptResult], alive: bool) -> bool:
    """Whether a transaction's answer speaks for the whole connection: MAIL refused
    for every recipient with a 421 ("closing the channel") or the connection gone."""
    if not results or any(r.reason != "mail" or r.kind != "temporary" for r in results):
        return False
    return not alive or results[0].response.startswith("421")


class DeliveryAgent:
    """Delivers jobs to MX hosts; knows nothing about queues or retries."""

    def __init__(
        self,
        cfg: Config,
        resolver: Resolver,
        read_body: Callable[[Lease], bytes],
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.resolver = resolver
        self.read_body = read_body
        self.metrics = metrics
        self._tls_ctx = self._make_tls_context(verify=cfg.delivery.tls_verify)
        self._allowed_private = parse_networks(cfg.delivery.allowed_private_networks)
        # Addresses whose STARTTLS handshake failed recently: opportunistic TLS
        # falls back to plain text there instead of failing every time.
        self._tls_broken = ExpiringSet(TLS_BROKEN_TTL, TLS_BROKEN_MAX)
        smtpclient_speedups.install()

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self._make_tls_context.cache_clear()  # a reload reads the CA certificates again
        self._tls_ctx = self._make_tls_context(verify=cfg.delivery.tls_verify)
        self._allowed_private = parse_networks(cfg.delivery.allowed_private_networks)

    @staticmethod
    @functools.cache
    def _make_tls_context(verify: bool) -> ssl.SSLContext:
        """One context per process for each setting, until a reload (the system's CA
        certificates are read once: 25 ms); contexts are never changed after this."""
        ctx = ssl.create_default_context()
        if not verify:
            # Opportunistic TLS (RFC 7435): encrypt even when the certificate cannot
            # be verified, as Postfix's "may" level does.
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def tls_policy(self, domain: str) -> str:
        return self.cfg.delivery.tls_policies.get(domain, self.cfg.delivery.tls)

    # ------------------------------------------------------------------ sessions

    async def run_session(
        self,
        domain: str,
        next_job: Callable[[bool], Awaitable[Job | None]],
        report: Callable[[list[AttemptResult]], None],
        gate: Gate | None = None,
    ) -> None:
        """Deliver jobs for ``domain`` over one connection until none are left.

        With a ``gate``, the connection leaves from the source it names and each
        transaction waits for its word.

        ``next_job(first)`` returns the next job (waiting a little for more when
        ``first`` is False) or None; every recipient of every job taken is reported
        exactly once through ``report`` — delivered, failed, or ``not_attempted``
        (handed back untouched when the session ends before its transaction began).
        """
        job = await next_job(True)
        if job is None:
            return
        try:
            mx = await self.resolver.resolve_mx(domain)
        except DnsError as exc:
            kind: Kind = "permanent" if exc.permanent else "temporary"
            code = 550 if exc.permanent else 451
            resp = f"{code} {exc.enhanced} {exc}"
            while job is not None:
                report([AttemptResult(lease, kind, resp, reason="dns") for lease in job.leases])
                job = await next_job(True)
            return
        # Decided here, where addresses are chosen, so that MX answers and address
        # literals alike never make the appliance connect inward.
        hosts, refused = allowed_hosts(mx.hosts, self._allowed_private)
        if refused:
            log.warning(
                "event=private_destination_refused domain=%s addresses=%s usable=%d",
                domain,
                ",".join(refused),
                sum(len(h.addresses) for h in hosts),
            )
        if not hosts:
            resp = (
                f"550 5.7.1 refusing to connect to a private address {(refused or ['-'])[0]} "
                "(delivery.allowed_private_networks)"
            )
            while job is not None:
                report([AttemptResult(x, "permanent", resp, reason="private") for x in job.leases])
                job = await next_job(True)
            return
        source = None
        if gate is not None:
            source = await gate.open(hosts, job)
            if source is None:
                return
        sent = 0
        limit = self.cfg.delivery.max_messages_per_connection
        if gate is not None and gate.max_messages:
            limit = min(limit, gate.max_messages)
        try:
            try:
                conn = await self._connect(domain, hosts, source)
            except _ConnectFailed as exc:
                kind = "permanent" if exc.permanent else "temporary"
                src = source.name if source else ""
                results = [
                    AttemptResult(x, kind, exc.response, reason="connect", source=src)
                    for x in job.leases
                ]
                # One refused connection is one event for the source, told once.
                if gate is not None and await gate.refused(job, results, limit, exc.answer):
                    return
                # Every job waiting for this domain would meet the same hosts: fail them
                # together rather than trying the dead destination once per message.
                while job is not None:
                    report(
                        [
                            AttemptResult(x, kind, exc.response, reason="connect", source=src)
                            for x in job.leases
                        ]
                    )
                    job = await next_job(True)
                return
            if gate is not None:
                conn.site = site_label(gate.site)
            try:
                while job is not None:
                    if gate is not None:
                        verdict = await gate.admit(job)
                        if verdict == "stop":
                            break
                        if verdict == "skip":
                            job = await next_job(False)
                            continue
                    results, alive = await self._transaction(conn, job)
                    if gate is not None and _whole_connection(results, alive):
                        if await gate.refused(job, results, limit - sent, True):
                            break
                        report(results)
                        break
                    report(results)
                    if gate is not None:
                        gate.answered(job, results)
                    sent += 1
                    if not alive or sent >= limit:
                        break
                    job = await next_job(False)
            finally:
                await self._close(conn)
        finally:
            if gate is not None:
                await gate.close(sent)

    async def _connect(
        self, domain: str, hosts: tuple[MxHost, ...], source: SourceConfig | None = None
    ) -> _Connection:
        policy = self.tls_policy(domain)
        last = "451 4.4.1 no MX host could be reached"
        all_permanent = bool(hosts)
        answer = False
        for host in hosts:
            for ip in host.addresses:
                try:
                    return await self._open(ip, host.name, policy, source)
                except _ConnectFailed as exc:
                    last = f"{exc.response} (mx {host.name} [{ip}])"
                    all_permanent = all_permanent and exc.permanent
                    answer = exc.answer
                    log.info(
                        "event=connect_failed domain=%s mx=%s ip=%s response=%r",
                        domain,
                        host.name,
                        ip,
                        exc.response,
                    )
        # RFC 5321 5.1: try every address; only when each refused permanently at the
        # greeting is the failure permanent.
        raise _ConnectFailed(last, permanent=all_permanent, answer=answer)

    async def _open(
        self, ip: str, mx_name: str, policy: str, source: SourceConfig | None = None
    ) -> _Connection:
        t = self.cfg.delivery.timeouts
        src = source.address if source else self.cfg.delivery.source_address
        ehlo = (source.ehlo if source else "") or self.cfg.ehlo_hostname
        smtp = aiosmtplib.SMTP(
            hostname=ip,
            port=self.cfg.delivery.mx_port,
            local_hostname=ehlo,
            source_address=(src, 0) if src else None,
            timeout=t.connect + t.greeting,
            start_tls=False,
            validate_certs=self.cfg.delivery.tls_verify,
        )
        try:
            await smtp.connect()
        except SMTPConnectError as exc:
            if isinstance(exc, SMTPResponseException):
                resp = format_response(exc.code, exc.message)
                raise _ConnectFailed(resp, permanent=exc.code >= 500, answer=True) from exc
            raise _ConnectFailed(f"451 4.4.1 connection failed: {exc}") from exc
        except (SMTPException, OSError) as exc:
            raise _ConnectFailed(f"451 4.4.1 connection failed: {exc}") from exc
        if self.metrics:
            self.metrics.connections.labels("out").inc()
        try:
            try:
                await smtp.ehlo(timeout=t.ehlo)
            except SMTPResponseException:
                await smtp.helo(timeout=t.ehlo)
            use_tls = False
            if policy != "disabled" and smtp.supports_extension("starttls"):
                if policy == "required" or (ip, time.monotonic()) not in self._tls_broken:
                    try:
                        await smtp.starttls(tls_context=self._tls_ctx, timeout=t.ehlo)
                        await smtp.ehlo(timeout=t.ehlo)
                        use_tls = True
                    except (SMTPException, ssl.SSLError, OSError) as exc:
                        self._tls_broken.add(ip, time.monotonic())
                        log.info("event=starttls_failed mx=%s ip=%s error=%r", mx_name, ip, exc)
                        await self._quiet_close(smtp)
                        if policy == "required":
                            raise _ConnectFailed(f"451 4.7.5 STARTTLS failed: {exc}") from exc
                        return await self._open(ip, mx_name, policy, source)
            if policy == "required" and not use_tls:
                raise _ConnectFailed("451 4.7.10 TLS required by policy but not offered")
            return _Connection(smtp, mx_name, ip, use_tls, source.name if source else "")
        except _ConnectFailed:
            await self._quiet_close(smtp)
            raise
        except SMTPResponseException as exc:
            await self._quiet_close(smtp)
            raise _ConnectFailed(
                format_response(exc.code, exc.message), permanent=exc.code >= 500, answer=True
            ) from exc
        except (SMTPException, OSError) as exc:
            await self._quiet_close(smtp)
            raise _ConnectFailed(f"451 4.4.2 connection lost during EHLO: {exc}") from exc

    async def _quiet_close(self, smtp: aiosmtplib.SMTP) -> None:
        if self.metrics:
            self.metrics.connections.labels("out").dec()
        smtp.close()

    async def _close(self, conn: _Connection) -> None:
        try:
            if conn.smtp.is_connected:
                await conn.smtp.quit(timeout=5)
        except (SMTPException, OSError):
            pass
        finally:
            await self._quiet_close(conn.smtp)

    # ------------------------------------------------------------------ one job

    async def _transaction(self, conn: _Connection, job: Job) -> tuple[list[AttemptResult], bool]:
        """Send one message; returns per-recipient results and whether the connection lives."""
        t = self.cfg.delivery.timeouts
        smtp = conn.smtp

        def result(lease: Lease, kind: Kind, resp: str, reason: str) -> AttemptResult:
            return AttemptResult(lease, kind, resp, conn.mx, conn.ip, conn.tls, reason, conn.source)

        if not smtp.is_connected:
            if conn.used:
                # The peer closed a connection it had served (an idle timeout): the
                # job goes back untouched and a fresh session takes it.
                return [result(x, "not_attempted", "", "connect") for x in job.leases], False
            # Closed before its first transaction (after EHLO, say): a failed attempt
            # like any other, or such a host is reconnected to in a tight loop.
            resp = "451 4.4.2 connection closed by the MX host before the transaction"
            return [result(x, "temporary", resp, "connection") for x in job.leases], False
        conn.used = True
        try:
            body = job.body
            if body is None:
                body = await asyncio.to_thread(self.read_body, job.leases[0])
        except (OSError, SpoolError) as exc:
            log.error("event=spool_read_failed msg=%s error=%r", job.msg_id, exc)
            resp = "451 4.3.0 local error reading the spool"
            return [result(x, "temporary", resp, "local") for x in job.leases], True
        options = [f"SIZE={len(body)}"] if smtp.supports_extension("size") else []
        if job.body_8bit and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if job.smtputf8:
            if not smtp.supports_extension("smtputf8"):
                resp = "550 5.6.7 non-ASCII address and the MX host lacks SMTPUTF8"
                return [result(x, "permanent", resp, "smtputf8") for x in job.leases], True
            options.append("SMTPUTF8")
        enc = "utf-8" if job.smtputf8 else "ascii"
        accepted: list[Lease] = []
        results: list[AttemptResult] = []
        if self.metrics and not conn.mailed:
            conn.mailed = True  # one connection got to MAIL FROM: its TLS counts once
            self.metrics.delivery_connections.labels(conn.site, "yes" if conn.tls else "no").inc()
        try:
            try:
                await smtp.mail(job.mail_from, options=options, encoding=enc, timeout=t.mail)
            except SMTPResponseException as exc:
                resp = format_response(exc.code, exc.message)
                alive = await self._rset(smtp)
                kind = kind_of(exc.code)
                return [result(x, kind, resp, "mail") for x in job.leases], alive
            for lease in job.leases:
                try:
                    r: SMTPResponse = await smtp.rcpt(lease.rcpt, encoding=enc, timeout=t.rcpt)
                    accepted.append(lease)
                except SMTPResponseException as exc:
                    resp = format_response(exc.code, exc.message)
                    results.append(result(lease, kind_of(exc.code), resp, "rcpt"))
                    if not smtp.is_connected:
                        # 421 or a drop mid-envelope: everyone not yet refused waits.
                        answered = {id(y.lease) for y in results}
                        results += [
                            result(x, "temporary", resp, "rcpt")
                            for x in job.leases
                            if id(x) not in answered
                        ]
                        return results, False
            if not accepted:
                return results, await self._rset(smtp)
            try:
                r = await smtp.data(body, timeout=t.data_term)
                resp = format_response(r.code, r.message)
                results += [result(x, "delivered", resp, "data") for x in accepted]
            except SMTPResponseException as exc:
                resp = format_response(exc.code, exc.message)
                kind = kind_of(exc.code)
                results += [result(x, kind, resp, "data") for x in accepted]
                return results, smtp.is_connected and await self._rset(smtp)
            return results, smtp.is_connected
        except (SMTPServerDisconnected, SMTPTimeoutError, SMTPException, OSError) as exc:
            # Whatever had not been answered is retried: the connection broke.
            what = "timeout" if isinstance(exc, SMTPTimeoutError | TimeoutError) else "lost"
            resp = f"451 4.4.2 connection {what} during transaction: {exc}"
            answered = {id(x.lease) for x in results if x.kind != "delivered"}
            out = [x for x in results if x.kind != "delivered"]
            out += [
                result(x, "temporary", resp, "connection")
                for x in job.leases
                if id(x) not in answered
            ]
            return out, False

    async def _rset(self, smtp: aiosmtplib.SMTP) -> bool:
        if not smtp.is_connected:
            return False
        try:
            await smtp.rset(timeout=self.cfg.delivery.timeouts.mail)
            return True
        except (SMTPException, OSError):
            return False
