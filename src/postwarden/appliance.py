"""Wires the stages together and runs them on one event loop.

ingress (SMTP), API, DSNs ─▶ acceptance ─▶ spool (fsync) ─▶ scheduler ─▶ delivery
─▶ events (spool index)
inbound MX (``inbound.listen``) ─▶ inbox (fsync; shared by all workers)

Shutdown (SIGTERM/SIGINT): stop accepting connections, let transactions that are
spooling finish, let delivery sessions finish the transaction they are in (up to
``server.shutdown_grace``), hand unstarted work back to the queue, flush and
checkpoint the spool index. Reload (SIGHUP): re-read the config file; limits,
trusted networks, users, DKIM keys, TLS policies and the retry schedule change at
once; listener addresses need a restart (logged). A bad file is refused and the old
configuration stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from postwarden.bounces.classify import (
    Classifier,
    PatternsError,
    default_classifier,
)
from postwarden.bounces.inbox import Inbox
from postwarden.bounces.notices import FailureNotices
from postwarden.bounces.parse import Parser
from postwarden.bounces.processor import BounceProcessor
from postwarden.bounces.verp import ReturnPaths
from postwarden.config import Config, ConfigError, load_config, parse_hostport
from postwarden.control.events import EventCopier
from postwarden.control.plane import ControlPlane
from postwarden.control.unsubscribe import mailto_unsubscribe
from postwarden.dns.resolver import Resolver
from postwarden.mail.addresses import suppression_key
from postwarden.mail.cleanup import Cleanup, Origin
from postwarden.metrics import ApplianceMetrics, Metrics, ProcessMetrics, ShapingMetrics
from postwarden.mta.acceptance import Acceptance
from postwarden.mta.auth import PasswordStore
from postwarden.mta.delivery import DeliveryAgent
from postwarden.mta.dkim import DkimSigner, SigningKey, load_key
from postwarden.mta.inbound import InboundHandler
from postwarden.mta.ingress import IngressHandler
from postwarden.mta.protocol import server_factory
from postwarden.notify import (
    BEAT_ENV,
    Notifier,
    beat,
    reload_generation,
    write_ready,
    write_reloaded,
)
from postwarden.queue.gauges import keep_gauges
from postwarden.queue.scheduler import Scheduler
from postwarden.queue.shards import shard_path
from postwarden.queue.spool import Spool, new_message_id
from postwarden.shaping.channel import BrokerClient
from postwarden.shaping.service import ShapingService
from postwarden.shaping.shaper import Backend, LocalBackend, Shaper
from postwarden.store.retention import Pruner
from postwarden.tls import certificate_expiry, ensure_tls_files, server_context
from postwarden.values import Envelope, StoredMessage
from postwarden.vitals import keep_vitals, mark_running, mark_stopped

if TYPE_CHECKING:
    from starlette.routing import Route

log = logging.getLogger("postwarden")


def config_keys(cfg: Config) -> list[SigningKey]:
    """Load every ``[[dkim.keys]]`` entry; a bad key names its config path."""
    keys = []
    for i, k in enumerate(cfg.dkim.keys):
        try:
            keys.append(load_key(k.domain, k.selector, k.key_file, k.algorithm))
        except Exception as exc:
            raise ConfigError(f"dkim.keys[{i}].key_file: {exc}") from exc
    return keys


def build_signer(cfg: Config, extra: list[SigningKey] | None = None) -> DkimSigner:
    """The config's keys, then the control plane's (``extra``) on top."""
    return DkimSigner(config_keys(cfg) + list(extra or ()))


@dataclass(frozen=True)
class WorkerRole:
    """What makes an appliance one worker of several (docs/decisions/0004)."""

    index: int
    count: int
    sockets: tuple[socket.socket, ...]  # the supervisor's listening sockets, shared
    control_sock: socket.socket | None = None  # the control plane's, shared too
    # The inbound MX's listening sockets; when empty, those the supervisor passed in
    # the environment (supervisor.inherited_inbound_sockets).
    inbound_sockets: tuple[socket.socket, ...] = ()


def worker_share(cfg: Config, count: int) -> Config:
    """The config one of ``count`` workers runs with: appliance-wide connection and
    in-flight limits divided among them (rounded up), everything else as given."""
    if count <= 1:
        return cfg

    def share(n: int) -> int:
        return max(1, math.ceil(n / count))

    d, q = cfg.delivery, cfg.queue
    return dataclasses.replace(
        cfg,
        delivery=dataclasses.replace(
            d,
            max_connections=share(d.max_connections),
            max_connections_per_domain=share(d.max_connections_per_domain),
        ),
        queue=dataclasses.replace(q, max_inflight=share(q.max_inflight)),
        control=dataclasses.replace(
            cfg.control, max_body_memory=share(cfg.control.max_body_memory)
        ),
    )


def prunes_control_database(worker: WorkerRole | None) -> bool:
    """One pruner per appliance (store.retention): the workers share the control
    database, so worker 0 prunes, or the process alone."""
    return worker is None or worker.index == 0


class Appliance:
    """The whole MTA in one object: ``await start()``, then ``await stop()``.

    Alone, it listens on ``smtp.listen`` and ``control.listen`` and spools under
    ``spool.path``. As worker ``k`` of a supervisor (``worker``), it serves the
    supervisor's listening sockets, spools in its own shard and leaves the control
    plane to the supervisor.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        config_path: str | None = None,
        worker: WorkerRole | None = None,
        api: bool = True,
        shaping_wall: Callable[[], float] = time.time,
        extra_routes: list[Route] | None = None,
    ) -> None:
        self.worker = worker
        #: More routes for the control listener (the lab's inbox under ``postwarden lab``).
        self.extra_routes = list(extra_routes or ())
        self.api = api  # False with `serve --role mta`: health and metrics only
        cfg = worker_share(cfg, worker.count) if worker else cfg
        self.cfg = cfg
        self.config_path = config_path
        self.metrics = Metrics()
        # Every process reads its own memory, CPU and descriptors; the process alone
        # also speaks for the whole appliance (a worker's supervisor does: supervisor.py).
        self.process_metrics = ProcessMetrics(self.metrics.registry)
        self.appliance_metrics = None if worker else ApplianceMetrics(self.metrics.registry)
        self.spool_path = shard_path(cfg.spool.path, worker.index if worker else 0)
        self.spool = Spool(
            self.spool_path,
            segment_size=cfg.spool.segment_size,
            fsync=cfg.spool.fsync,
            event_retention=cfg.spool.event_retention,
            upkeep_interval=cfg.spool.upkeep_interval,
            on_events=self._on_events,
        )
        self.resolver = Resolver(
            cfg.dns.nameservers, timeout=cfg.dns.timeout, cache_size=cfg.dns.cache_size
        )
        self.agent = DeliveryAgent(cfg, self.resolver, self.spool.read_body, self.metrics)
        self._config_keys = config_keys(cfg)
        self.control = ControlPlane(
            cfg,
            self.resolver,
            inject=lambda *args: self.acceptance.inject(*args),
            submit=self._submit_campaign,
            worker=(worker.index, worker.count) if worker else (0, 1),
            spool_root=str(cfg.spool.path),
            shaping_command=self._broker_command,
            on_keys=self._keys_changed,
            metrics=self.metrics,
        )
        # Signed per-recipient return paths (VERP), read back by the bounce processor.
        self.return_paths = ReturnPaths.from_config(cfg)
        # DSNs to senders whose tenants want them, through acceptance like any mail.
        self.notices = FailureNotices(
            cfg.ehlo_hostname,
            wants_notices=lambda tenant: tenant in self.control.pool_cache.notify_tenants,
            read_body=self.spool.read_body,
            submit=lambda env, data: self.acceptance.submit(
                env, data, new_message_id(), Origin("local")
            ),
        )
        # Traffic shaping: a worker asks the supervisor's broker (connected in start);
        # the process alone runs its own (``shaping_wall``: the tests' calendar).
        self.shaping: ShapingService | None = None
        self.broker_client: BrokerClient | None = None
        backend: Backend
        if worker is not None:
            self.broker_client = backend = BrokerClient(
                cfg.shaping_socket, metrics=self.metrics, on_notice=self._broker_notice
            )
        else:
            self.shaping = ShapingService(
                cfg, wall=shaping_wall, metrics=ShapingMetrics(self.metrics.registry)
            )
            backend = LocalBackend(self.shaping, on_notice=self._broker_notice)
        self.shaper = Shaper(cfg, backend, self.control.pool_cache.members)
        self.metrics.declare_sites(self.shaper.rules.sites)
        self.scheduler = Scheduler(
            cfg,
            self.spool,
            self.agent,
            self.metrics,
            suppressed=self.control.suppressed,
            return_path=lambda lease: self.return_paths.for_lease(
                lease, self.control.signing.verified
            ),
            failed=self.notices.failed,
            shaper=self.shaper,
        )
        # The one way into the spool, for SMTP, the API and our own DSNs.
        self.acceptance = Acceptance(
            Cleanup(cfg.server.hostname, cfg.smtp.hop_limit),
            DkimSigner(self._config_keys),
            self.spool,
            self.scheduler,
            self.metrics,
            may_send_as=self.control.may_send_as,
            suppressed=self.control.suppressed,
            keys_loaded=lambda: self.control.db.started,
        )
        self.passwords = PasswordStore(cfg.smtp.users)
        self.ingress = IngressHandler(
            cfg,
            self.metrics,
            self.passwords,
            self.acceptance.submit,
            key_auth=self.control.smtp_login,
            key_valid=self.control.revocations.key_valid,
            pool_for=self.control.pool_cache.pool_for,
            # Sessions per IP and AUTH lockouts: a worker asks the supervisor's tables,
            # for the whole appliance (mta.guard).
            shared=self.broker_client,
        )
        # The inbound MX (bounces, complaints): only with inbound.listen (a worker: with
        # the sockets the supervisor bound for it); its inbox is shared by every worker.
        self.inbox: Inbox | None = None
        self.inbound: InboundHandler | None = None
        self._inbound_socks: tuple[socket.socket, ...] = ()
        if worker is not None:
            from postwarden.supervisor import inherited_inbound_sockets

            self._inbound_socks = worker.inbound_sockets or inherited_inbound_sockets()
        enabled = bool(self._inbound_socks) if worker is not None else bool(cfg.inbound.listen)
        self.bounces: BounceProcessor | None = None
        if enabled:
            self.inbox = Inbox(cfg.inbound_path)
            self.bounces = BounceProcessor(
                cfg,
                self.inbox,
                self.control.sessions,
                self.return_paths,
                parser=Parser(default_classifier(cfg.bounces.patterns_file)),
                metrics=self.metrics,
                feedback_to_broker=self._broker_command,
                on_suppressed=self._bounce_suppressed,
                on_unsubscribe=self._mailto_unsubscribe,
            )
            self.inbound = InboundHandler(
                cfg,
                self.metrics,
                self.inbox,
                self.control.inbound.accepts,
                on_delivered=self.bounces.wake,
                shared=self.broker_client,
            )
        self.inbound_servers: list[asyncio.AbstractServer] = []
        self.inbound_addresses: list[tuple[str, int]] = []
        self.copier = EventCopier(
            self.spool_path,
            self.control.sessions,
            bounces=cfg.bounces,
            metrics=self.metrics,
            on_suppressed=self._bounce_suppressed,
            # What the control plane holds, the spool may prune (spool.event_retention).
            on_copied=self.spool.mark_copied,
        )
        self.servers: list[asyncio.AbstractServer] = []
        self.smtp_addresses: list[tuple[str, int]] = []
        self.control_address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None  # with metrics.listen
        self._http: Any = None
        self._metrics_http: Any = None
        self.pruner: Pruner | None = None  # control-database retention (store.retention)
        self._gauge_task: asyncio.Task[None] | None = None
        self._vitals_task: asyncio.Task[None] | None = None
        self._marked = False  # the spool's run marker says "running" (vitals.py)
        self._stopped = asyncio.Event()
        self._stopping = False
        # systemd's notifications (docs/decisions/0013): a process of its own speaks
        # to systemd itself; a worker only beats, and its supervisor speaks.
        self.notifier: Notifier | None = None
        self._liveness: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ bounces

    def _bounce_suppressed(self, pairs: list[tuple[int, str]]) -> None:
        """Suppressions written by bounces: in this process's cache at once (the others
        load them from the change feed)."""
        keys = [(t, suppression_key(a)) for t, a in pairs]
        task = asyncio.get_running_loop().create_task(self.control.suppressions.refresh(keys))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _mailto_unsubscribe(self, token: str, sender: str) -> bool:
        """A message to a List-Unsubscribe mailto: whether its token read (then the
        unsubscribe is recorded; control.unsubscribe)."""
        return await mailto_unsubscribe(self.control, token, sender)

    async def _submit_campaign(self, env: Envelope, data: bytes, msg_id: str) -> StoredMessage:
        """A campaign's message (control.campaign_runner), through acceptance."""
        stored = await self.acceptance.submit(env, data, msg_id, Origin("local", helo="campaign"))
        self.metrics.received.labels("campaign").inc()
        self.metrics.recipients_received.inc(len(env.rcpt_tos))
        return stored

    async def _broker_command(self, **args: Any) -> dict[str, Any]:
        return await self.shaper.backend.command(**args)

    def _broker_notice(self, msg: dict[str, Any]) -> None:
        self.scheduler.broker_notice(msg)

    # ------------------------------------------------------------------ lifecycle

    def _keys_changed(self, keys: list[SigningKey]) -> None:
        signer = DkimSigner(self._config_keys + keys)
        self.acceptance.reconfigure(signer=signer)
        log.info("event=dkim_keys_loaded domains=%s",
                 ",".join(sorted(signer.domains())) or "-")  # fmt: skip

    async def start(self) -> None:
        if self.appliance_metrics is not None:
            self._mark_start(self.appliance_metrics)
        if self.broker_client is not None:
            await self.broker_client.connect()
        if self.shaping is not None:
            await self.shaping.start(serve=True)
        await self.control.start()
        await self.spool.open()
        if self.spool.recovered_inflight:
            self.metrics.recovered_inflight.inc(self.spool.recovered_inflight)
        self.copier.start()
        if prunes_control_database(self.worker):
            self.pruner = Pruner(
                self.cfg.database,
                self.control.sessions,
                on_pruned=lambda table, n: self.metrics.control_pruned.labels(table).inc(n),
            )
            self.pruner.start()
        self.scheduler.start()
        if self.bounces is not None:
            self.bounces.start()
            self.bounces.wake()  # what waited in the inbox while nobody ran
        cert, key = ensure_tls_files(self.cfg)
        tls = server_context(cert, key)
        self._certificate_expiry(cert)
        loop = asyncio.get_running_loop()
        factory = server_factory(self.ingress, tls)
        if self.worker is not None:
            for sock in self.worker.sockets:
                server = await loop.create_server(factory, sock=sock, backlog=1024)
                self.servers.append(server)
                self.smtp_addresses.append(sock.getsockname()[:2])
            await self._start_inbound(tls)
            await self._start_http()
        else:
            for spec in self.cfg.smtp.listen:
                host, port = parse_hostport(spec, "smtp.listen")
                server = await loop.create_server(
                    factory, host, port, backlog=1024, reuse_address=True
                )
                self.servers.append(server)
                for sock in server.sockets:
                    self.smtp_addresses.append(sock.getsockname()[:2])
            await self._start_inbound(tls)
            await self._start_http()
        self._gauge_task = asyncio.create_task(
            keep_gauges(
                self.spool,
                self.metrics,
                self.inbox,
                # the inbox is shared: worker 0 prunes it
                prune_inbox=self.worker is None or self.worker.index == 0,
                keep_unparsed=self.cfg.inbound.keep_unparsed,
            )
        )
        self._vitals_task = asyncio.create_task(
            keep_vitals(
                self.process_metrics,
                lag=self.metrics.loop_lag,
                appliance=self.appliance_metrics,
                spool_dir=str(self.cfg.spool.path),
            )
        )
        log.info(
            "event=started worker=%s smtp=%s inbound=%s control=%s spool=%s config=%s loop=%s",
            f"{self.worker.index}/{self.worker.count}" if self.worker else "-",
            ",".join(f"{h}:{p}" for h, p in self.smtp_addresses),
            ",".join(f"{h}:{p}" for h, p in self.inbound_addresses) or "-",
            "{}:{}".format(*self.control_address) if self.control_address else "-",
            self.spool_path,
            self.cfg.source,
            type(loop).__module__.split(".")[0],
        )

    def _mark_start(self, m: ApplianceMetrics) -> None:
        """The process alone speaks for the appliance: one worker, started now, and
        whether the previous run on the spool stopped cleanly (its run marker)."""
        m.workers.set(1)
        m.workers_alive.set(1)
        m.start_time.set(time.time())
        clean = mark_running(self.cfg.spool.path)
        self._marked = True
        m.previous_stop_clean.set(1 if clean else 0)
        if not clean:
            log.warning("event=previous_run_unclean spool=%s", self.cfg.spool.path)

    def _certificate_expiry(self, cert: str) -> None:
        """When the listeners' certificate (submission; the inbound MX serves it too)
        expires. Read once: it is loaded once, at start."""
        try:
            expiry = certificate_expiry(cert)
        except (OSError, ValueError) as exc:
            log.warning("event=certificate_unreadable file=%s error=%r", cert, str(exc))
            return
        self.metrics.tls_expiry.labels("submission").set(expiry)
        if self.inbound is not None:
            self.metrics.tls_expiry.labels("inbound").set(expiry)

    async def _start_inbound(self, tls: Any) -> None:
        """The inbound MX on ``inbound.listen`` (a worker: on the supervisor's sockets),
        with the submission listeners' TLS certificate."""
        if self.inbound is None:
            return
        loop = asyncio.get_running_loop()
        factory = server_factory(self.inbound, tls)
        if self.worker is not None:
            for sock in self._inbound_socks:
                server = await loop.create_server(factory, sock=sock, backlog=1024)
                self.inbound_servers.append(server)
                self.inbound_addresses.append(sock.getsockname()[:2])
            return
        for spec in self.cfg.inbound.listen:
            host, port = parse_hostport(spec, "inbound.listen")
            server = await loop.create_server(factory, host, port, backlog=1024, reuse_address=True)
            self.inbound_servers.append(server)
            for sock in server.sockets:
                self.inbound_addresses.append(sock.getsockname()[:2])

    async def _start_http(self) -> None:
        from prometheus_client import generate_latest

        from postwarden.control.app import create_app, metrics_app
        from postwarden.control.server import HttpServer
        from postwarden.metrics import render_multiprocess
        from postwarden.supervisor import inherited_metrics_socket, metrics_token, read_status

        def health() -> tuple[bool, dict[str, Any]]:
            ok = not self.spool.closed and not self._stopping
            details: dict[str, Any] = {
                "database": self.control.db.snapshot(),
                "inflight": self.scheduler.inflight,
                "sessions_in": self.ingress.open_sessions,
                "sessions_out": self.scheduler.sessions,
            }
            if self.inbound is not None:
                details["sessions_inbound"] = self.inbound.open_sessions
            if self.worker is not None:
                details["worker"] = self.worker.index
                sup = read_status()
                details.update(sup)
                ok = ok and not sup.get("stopping", False)
            return ok, details

        def metrics() -> bytes:
            if self.worker is not None:
                return render_multiprocess()
            return bytes(generate_latest(self.metrics.registry))

        token = metrics_token(self.cfg)
        separate = bool(self.cfg.metrics.listen)
        app = create_app(
            metrics,
            health,
            self.control if self.api else None,
            metrics_token=token,
            serve_metrics=not separate,
            extra_routes=self.extra_routes,
            http_metrics=self.metrics,
        )
        if self.worker is not None and self.worker.control_sock is not None:
            self._http = HttpServer(app, sock=self.worker.control_sock)
        else:
            host, port = parse_hostport(self.cfg.control.listen, "control.listen")
            self._http = HttpServer(app, host, port)
        self.control_address = await self._http.start()
        if separate:
            # A worker serves the supervisor's socket (every worker renders the sum).
            sock = inherited_metrics_socket() if self.worker is not None else None
            scrapes = metrics_app(metrics, token, self.metrics)
            if sock is not None:
                self._metrics_http = HttpServer(scrapes, sock=sock)
            else:
                host, port = parse_hostport(self.cfg.metrics.listen, "metrics.listen")
                self._metrics_http = HttpServer(scrapes, host, port)
            self.metrics_address = await self._metrics_http.start()

    def _on_events(self, events: list[dict[str, Any]]) -> None:
        """Events the spool committed: logged, and copied to the control plane."""
        if log.isEnabledFor(logging.DEBUG):
            for ev in events:
                if ev["type"] != "accepted":
                    log.debug("event=%s msg=%s rcpt_id=%s", ev["type"], ev["msg_id"],
                              ev["rcpt_id"])  # fmt: skip
        self.copier.notify(events)

    async def stop(self) -> None:
        """Graceful shutdown; safe to call twice."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if self.notifier is not None:
            self.notifier.stopping()
        if self._liveness is not None:
            self._liveness.cancel()
        log.info("event=stopping")
        for server in self.servers + self.inbound_servers:
            server.close()
        if self.control.campaigns is not None:  # it hands messages to the spool
            await self.control.campaigns.stop()
        grace = self.cfg.server.shutdown_grace
        deadline = time.monotonic() + grace
        # Transactions already past DATA finish spooling (and get their 250); reports
        # the inbound MX is storing too.
        while (  # noqa: ASYNC110
            self.ingress.in_transaction or (self.inbound and self.inbound.in_transaction)
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.scheduler.stop(max(0.0, deadline - time.monotonic()))
        await self.shaper.backend.close()
        if self.shaping is not None:
            await self.shaping.stop()
        if self._gauge_task:
            self._gauge_task.cancel()
        if self._vitals_task:
            self._vitals_task.cancel()
        if self._http is not None:
            await self._http.stop()
        if self._metrics_http is not None:
            await self._metrics_http.stop()
        if self.pruner is not None:
            await self.pruner.stop()
        # The last events are committed (the scheduler has stopped): copy them and let
        # go of the copier's read connection before the spool checkpoints its WAL.
        await self.copier.stop()
        await self.spool.close()
        await self.control.stop()
        for server in self.servers + self.inbound_servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        if self._marked:
            mark_stopped(self.cfg.spool.path)  # the last step of a clean stop
        self._stopped.set()
        log.info("event=stopped")

    def reload(self) -> bool:
        """Re-read the config file; apply what can change live. False if refused.
        systemd hears RELOADING=1 first and READY=1 after, with what came of it; a
        worker tells its supervisor instead, which tells systemd once all have."""
        if self.notifier is None:
            done = self._reload()
            if self.worker is not None:
                self._confirm_reload(done)
            return done
        self.notifier.reloading()
        done = self._reload()
        self.notifier.ready("serving" if done else "serving; the new configuration was refused")
        return done

    @staticmethod
    def _supervisor_dir() -> str:
        """Where a worker's supervisor keeps its status, ready, beat and reload files
        ("" when there is none)."""
        from postwarden.supervisor import STATUS_ENV

        return os.path.dirname(os.environ.get(STATUS_ENV, ""))

    def _confirm_reload(self, applied: bool) -> None:
        directory = self._supervisor_dir()
        if directory and self.worker is not None:
            try:
                write_reloaded(directory, self.worker.index, reload_generation(directory), applied)
            except OSError as exc:
                log.warning("event=reload_confirm_failed error=%r", str(exc))

    def _reload(self) -> bool:
        if self.config_path is None:
            log.info("event=reload_skipped reason=no_config_file")
            return False
        from postwarden.supervisor import check_files

        try:
            new = check_files(load_config(self.config_path))
            keys = config_keys(new)
            signer = DkimSigner(keys + self.control.signing.keys)
            return_paths = ReturnPaths.from_config(new)
            parser = Parser(Classifier(new.bounces.patterns_file or None))
            if self.worker is not None:
                new = worker_share(new, self.worker.count)
        except (ConfigError, PatternsError, OSError, ValueError) as exc:
            log.error("event=reload_refused error=%r", str(exc))
            return False
        if (
            new.smtp.listen != self.cfg.smtp.listen
            or new.control.listen != self.cfg.control.listen
            or new.inbound.listen != self.cfg.inbound.listen
            or new.inbound_path != self.cfg.inbound_path
        ):
            log.warning("event=reload_partial reason=listen_addresses_need_restart")
        self.cfg = new
        self._config_keys = keys
        self.return_paths = return_paths
        self.copier.reconfigure(new.bounces)
        if self.pruner is not None:
            self.pruner.reconfigure(new.database)
        if self.bounces is not None:
            self.bounces.reconfigure(new, parser, return_paths)
        if self.control.verdicts is not None:
            self.control.verdicts.reconfigure(new)
        self.acceptance.reconfigure(
            cleanup=Cleanup(new.server.hostname, new.smtp.hop_limit), signer=signer
        )
        self.ingress.configure(new)
        self.agent.reconfigure(new)
        self.scheduler.reconfigure(new)
        self.control.pool_cache.configure(new)
        self.control.inbound.configure(new)
        if self.inbound is not None:
            self.inbound.configure(new)
        self.shaper.reconfigure(new)
        self.metrics.declare_sites(self.shaper.rules.sites)
        if self.shaping is not None:
            self.shaping.reload(new)
        log.info(
            "event=reloaded config=%s dkim_domains=%s",
            self.config_path,
            ",".join(sorted(signer.domains())) or "-",
        )
        return True

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, stop. A signal that comes while the
        appliance is still starting takes effect as soon as it has started (SIGTERM a
        clean stop, SIGHUP a reload): a slow start on a loaded machine never ends in a
        process killed half-way or a reload lost."""
        loop = asyncio.get_running_loop()
        stop, reload = asyncio.Event(), asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload.set)  # applied once started
        if self.worker is None:
            self.notifier = Notifier()
            self.notifier.status("starting: recovering the spool, binding the listeners")
        await self.start()
        self.install_signal_handlers()
        self._liveness = self._start_liveness()
        if stop.is_set():
            await self.stop()
        elif reload.is_set():
            self.reload()
        await self.wait_stopped()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _start_liveness(self) -> asyncio.Task[None] | None:
        """Started: a worker writes its ready file and beats (its supervisor tells
        systemd); a process of its own says READY=1 and feeds the watchdog from its
        loop (docs/decisions/0013)."""
        if self.worker is not None:
            directory = self._supervisor_dir()
            if not directory:
                return None
            write_ready(directory, self.worker.index)
            interval = float(os.environ.get(BEAT_ENV) or 0)
            if interval <= 0:
                return None
            return asyncio.create_task(beat(directory, self.worker.index, interval))
        if self.notifier is None or not self.notifier.enabled:
            return None
        self.notifier.ready("serving")
        if self.notifier.watchdog is None:
            return None
        return asyncio.create_task(self._ping(self.notifier, self.notifier.watchdog / 2))

    async def _ping(self, notifier: Notifier, every: float) -> None:
        while True:
            notifier.ping()
            await asyncio.sleep(every)


async def serve(cfg: Config, config_path: str | None = None, role: str = "all") -> None:
    if role == "control":
        from postwarden.control.standalone import ControlService

        await ControlService(cfg).run()
        return
    await Appliance(cfg, config_path=config_path, api=role != "mta").run()
