"""``postwarden serve --role control``: the control plane alone, for split deployments.

No SMTP listener, no spool: the API, its database and caches, and message injection
relayed over SMTP to an MTA (``control.submit_to``; the MTA runs ``--role mta`` on
the same database). See docs/decisions/0005.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from prometheus_client import generate_latest

from postwarden.config import Config, parse_hostport
from postwarden.control.plane import ControlPlane
from postwarden.control.relay import SmtpRelay
from postwarden.dns.resolver import Resolver
from postwarden.metrics import Metrics, ProcessMetrics
from postwarden.vitals import keep_vitals

log = logging.getLogger("postwarden.control")


class ControlService:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.resolver = Resolver(
            cfg.dns.nameservers, timeout=cfg.dns.timeout, cache_size=cfg.dns.cache_size
        )
        self.relay = SmtpRelay(cfg)
        # The API's own metrics (requests by route, tracking, the database's state) and
        # the process's readings; the MTA's series are exported at zero.
        self.metrics = Metrics()
        self.registry = self.metrics.registry
        self.process_metrics = ProcessMetrics(self.registry)
        self.control = ControlPlane(
            cfg, self.resolver, inject=self.relay.inject, metrics=self.metrics
        )
        self._vitals: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None
        self._http: Any = None
        self._metrics_http: Any = None
        self.metrics_address: tuple[str, int] | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        from postwarden.control.app import create_app, metrics_app
        from postwarden.control.server import HttpServer
        from postwarden.supervisor import metrics_token

        await self.control.start()

        def health() -> tuple[bool, dict[str, Any]]:
            return not self._stopping, {
                "role": "control",
                "database": self.control.db.snapshot(),
                "submit_to": f"{self.relay.host}:{self.relay.port}",
            }

        def metrics() -> bytes:
            return bytes(generate_latest(self.registry))

        token = metrics_token(self.cfg)
        separate = bool(self.cfg.metrics.listen)
        app = create_app(
            metrics,
            health,
            self.control,
            metrics_token=token,
            serve_metrics=not separate,
            http_metrics=self.metrics,
        )
        host, port = parse_hostport(self.cfg.control.listen, "control.listen")
        self._http = HttpServer(app, host, port)
        self.address = await self._http.start()
        if separate:
            host, port = parse_hostport(self.cfg.metrics.listen, "metrics.listen")
            self._metrics_http = HttpServer(metrics_app(metrics, token), host, port)
            self.metrics_address = await self._metrics_http.start()
        self._vitals = asyncio.create_task(
            keep_vitals(self.process_metrics, lag=self.metrics.loop_lag)
        )
        log.info(
            "event=started role=control control=%s:%s submit_to=%s:%s",
            *self.address,
            self.relay.host,
            self.relay.port,
        )

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._vitals is not None:
            self._vitals.cancel()
        if self._http is not None:
            await self._http.stop()
        if self._metrics_http is not None:
            await self._metrics_http.stop()
        await self.control.stop()
        self._stopped.set()
        log.info("event=stopped")

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        await self._stopped.wait()
