"""Prometheus metrics. Every name here is documented in ``docs/operations.md``.

Labels are bounded: results, states, directions, listener names, the provider sites
the shaping rules name (any other destination: ``other``) and HTTP route templates,
never recipient domains, addresses or raw paths.

With several workers (docs/decisions/0004) the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` before any worker starts: prometheus-client then keeps
every value in a per-process file, and the supervisor's ``/metrics`` adds them up
(gauges as the sum over live workers, or as their multiprocess mode says). The
supervisor's own values (:class:`ApplianceMetrics`, its :class:`ProcessMetrics`) are
such files too: prometheus-client chooses where values live when it is first
imported, and the supervisor imports it only after setting the variable
(``Supervisor._metrics`` checks).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import hmac
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from postwarden.values import REFUSALS

if TYPE_CHECKING:
    from postwarden.config import MetricsConfig

# No ``<counter>_created`` series (one more per counter and label set, holding the
# process's start time): as most exporters, and as the supervisor's summed exposition
# already is. prometheus-client reads this switch when it collects, for every registry.
disable_created_metrics()

#: Bounded label values (documented in docs/operations.md).
REJECT_REASONS = (
    "auth_required",
    "relay_denied",
    "auth_without_tls",
    "auth_failed",
    "too_many_recipients",
    "too_many_sessions",
    "too_many_commands",
    "bare_newline",
    "bad_sender",
    "bad_recipient",
    "local_error",
    "insufficient_storage",
    "sender_domain",
    "pool",
    "bad_priority",
    "address_literal",
    "nul",
    "bad_from",
    "hops",
    "auth_locked",
    "credentials_revoked",
    "auth_unavailable",
    "control_unavailable",
)
#: Why the inbound MX (mta.inbound) refused a command.
INBOUND_REFUSALS = (
    "relay_denied",
    "bad_recipient",
    "too_many_recipients",
    "too_large",
    "too_many_sessions",
    "too_many_commands",
    "auth",
    "local_error",
    "insufficient_storage",
)
FAILURE_STAGES = (
    "connect",
    "dns",
    "mail",
    "rcpt",
    "data",
    "connection",
    "local",
    "smtputf8",
    "private",  # a destination on an address delivery may not connect to
    "shaping",
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)


class Metrics:
    """All of the appliance's metrics, in their own registry (one per appliance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "postwarden_messages_received",
            "Messages accepted and spooled.",
            ["source"],
            registry=r,
        )
        self.recipients_received = Counter(
            "postwarden_recipients_received", "Recipients accepted and spooled.", registry=r
        )
        self.rejected = Counter(
            "postwarden_smtp_rejected",
            "SMTP commands refused by the ingress, by reason.",
            ["reason"],
            registry=r,
        )
        self.auth_lockouts = Counter(
            "postwarden_auth_lockouts",
            "Client addresses locked out of AUTH after repeated failures (lockouts begun).",
            registry=r,
        )
        self.guard_local = Counter(
            "postwarden_session_guard_local",
            "Session-limit and AUTH-lockout decisions taken by a worker alone (the broker"
            " did not answer).",
            ["check"],
            registry=r,
        )
        self.delivered = Counter(
            "postwarden_recipients_delivered", "Recipients delivered (2xx after DATA).", registry=r
        )
        self.deferred = Counter(
            "postwarden_recipients_deferred",
            "Temporary delivery failures.",
            ["reason"],
            registry=r,
        )
        self.bounced = Counter(
            "postwarden_recipients_bounced",
            "Permanent delivery failures.",
            ["reason"],
            registry=r,
        )
        self.expired = Counter(
            "postwarden_recipients_expired", "Recipients that reached queue.max_age.", registry=r
        )
        self.recovered_inflight = Counter(
            "postwarden_spool_recovered_inflight",
            "Recipients found leased at startup after a crash (each may be delivered twice).",
            registry=r,
        )
        self.record_failures = Counter(
            "postwarden_scheduler_record_failures",
            "Failed writes of delivery outcomes to the spool (each retried).",
            registry=r,
        )
        self.session_leftovers = Counter(
            "postwarden_scheduler_session_leftovers",
            "Recipients a delivery session ended without reporting (requeued by the "
            "scheduler), by how it ended.",
            ["ending"],
            registry=r,
        )
        self.broker_connected = Gauge(
            "postwarden_shaping_broker_connected",
            "Workers connected to the shaping broker (1 per worker; less: some run on "
            "local limits).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.broker_reconnects = Counter(
            "postwarden_shaping_broker_reconnects",
            "Connections to the shaping broker made again after one was lost.",
            registry=r,
        )
        self.broker_fallback = Counter(
            "postwarden_shaping_broker_fallback",
            "Shaping calls answered by a worker's local limits while the broker was away.",
            ["op"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "postwarden_queue_recipients",
            "Recipients in the spool by state.",
            ["state"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inflight = Gauge(
            "postwarden_scheduler_inflight",
            "Recipients leased to the scheduler.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections = Gauge(
            "postwarden_connections_open",
            "Open SMTP connections.",
            ["direction"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.accept_latency = Histogram(
            "postwarden_acceptance_seconds",
            "From end of DATA to the 250 reply (spooling, DKIM, fsync).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_latency = Histogram(
            "postwarden_delivery_seconds",
            "From acceptance to successful delivery, per recipient.",
            buckets=_DELIVERY_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "postwarden_delivery_attempts",
            "Delivery transactions by result and provider site (sites the shaping rules"
            " name; other).",
            ["result", "site"],
            registry=r,
        )
        self.delivery_connections = Counter(
            "postwarden_delivery_connections",
            "Outbound delivery connections that got to MAIL FROM, by provider site and"
            " whether STARTTLS was in force (tls=yes|no).",
            ["site", "tls"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "postwarden_event_loop_lag_seconds",
            "How late a 0.5 s timer fired on a worker's event loop.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_oldest = Gauge(
            "postwarden_queue_oldest_seconds",
            "Age of the oldest recipient in the state (0 when none), the most over workers.",
            ["state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # Each worker serves the same certificate file: the soonest expiry wins.
        self.tls_expiry = Gauge(
            "postwarden_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate a listener serves (submission, inbound), unix time.",
            ["listener"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.http_requests = Counter(
            "postwarden_http_requests",
            "Control-plane HTTP requests by route template (other: none matched), method"
            " and status class.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "postwarden_http_request_seconds",
            "Control-plane request latency, by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dropped = Counter(
            "postwarden_recipients_dropped",
            "Recipients not sent because they are suppressed, by suppression reason and stage.",
            ["reason", "stage"],
            registry=r,
        )
        self.shaping_waits = Counter(
            "postwarden_shaping_waits",
            "Recipients held back by the shaping broker (not an attempt), by reason.",
            ["reason"],
            registry=r,
        )
        self.shaping_yields = Counter(
            "postwarden_shaping_yields",
            "Delivery connections ended early to give their slot to a request waiting"
            " for one (in this or another worker): idle, or bulk before transactional.",
            ["reason"],
            registry=r,
        )
        self.shaping_connections = Counter(
            "postwarden_shaping_connections",
            "Delivery connections opened, by pool and source.",
            ["pool", "source"],
            registry=r,
        )
        self.spool_fsyncs = Counter(
            "postwarden_spool_commits", "Durable spool group commits.", registry=r
        )
        self.inbound_accepted = Counter(
            "postwarden_inbound_accepted",
            "Reports (bounces, complaints) the inbound MX accepted and stored.",
            registry=r,
        )
        self.inbound_refused = Counter(
            "postwarden_inbound_refused",
            "SMTP commands the inbound MX refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.inbound_sessions = Gauge(
            "postwarden_inbound_sessions_open",
            "Open sessions on the inbound MX.",
            registry=r,
            multiprocess_mode="livesum",
        )
        # The inbox is shared by the workers: each sees the same count.
        self.inbound_pending = Gauge(
            "postwarden_inbound_pending",
            "Reports in the inbox waiting to be processed (or being processed).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.inbound_unparsed = Gauge(
            "postwarden_inbound_unparsed",
            "Reports kept in the inbox because they could not be parsed.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.inbound_reports = Counter(
            "postwarden_bounce_reports",
            "Reports from the inbox processed, by what they were: bounce, complaint, "
            "feedback (ARF that is no complaint), auto_reply, delayed, delivered,"
            " unsubscribe (to a List-Unsubscribe mailto), unparsed.",
            ["outcome"],
            registry=r,
        )
        self.return_path_tokens = Counter(
            "postwarden_return_path_tokens",
            "Return-path tokens read from reports: valid, or forged (a bad signature).",
            ["verdict"],
            registry=r,
        )
        self.unsubscribe_requests = Counter(
            "postwarden_unsubscribe_requests",
            "Requests to List-Unsubscribe links (/u/<token>) by method (GET, HEAD, POST,"
            " mailto: a message to its mailto address)"
            " and token verdict: valid, or forged (altered, malformed, not ours).",
            ["method", "verdict"],
            registry=r,
        )
        self.preference_requests = Counter(
            "postwarden_preference_requests",
            "Requests to preference center links (/p/<token>) by method (GET, HEAD counted"
            " as GET; POST) and verdict: valid, invalid (a form that does not read: 400),"
            " gone (the contact deleted: 404), forged (the token does not read or is of"
            " another kind: 404), unavailable (the database down: 503).",
            ["method", "verdict"],
            registry=r,
        )
        self.tracking_requests = Counter(
            "postwarden_tracking_requests",
            "Requests to the open pixel (kind=open, /t/o/<token>) and click redirects"
            " (kind=click, /t/c/<token>) by verdict: valid (the hit stored), forged"
            " (the token does not read: 404), lost (answered, the database down).",
            ["kind", "verdict"],
            registry=r,
        )
        self.tracking_verdicts = Counter(
            "postwarden_tracking_verdicts",
            "Tracking hits judged by the verdict pass, by kind (open, click) and verdict"
            " (human, machine: a proxy, a scanner, a prefetch).",
            ["kind", "verdict"],
            registry=r,
        )
        self.webhook_attempts = Counter(
            "postwarden_webhook_attempts",
            "Tries to deliver an event to a webhook endpoint, by outcome: delivered (a 2xx"
            " answer), failed (any other answer, or none: tried again later).",
            ["outcome"],
            registry=r,
        )
        self.bounce_categories = Counter(
            "postwarden_bounce_categories",
            "Permanent failures by classifier category and hard/soft, during delivery "
            "(stage=sync) or from reports (stage=async).",
            ["category", "hard", "stage"],
            registry=r,
        )
        self.bounce_suppressions = Counter(
            "postwarden_bounce_suppressions",
            "Suppressions written because of bounces and complaints, by reason.",
            ["reason"],
            registry=r,
        )
        self.control_pruned = Counter(
            "postwarden_control_pruned_rows",
            "Rows deleted from the control database by retention, by table.",
            ["table"],
            registry=r,
        )
        # Every label value exists from the start (at 0), so that dashboards and rates
        # see each series before its first event, with one worker or several.
        self.received.labels("smtp")
        self.received.labels("api")
        for reason in ("unsubscribe", "hard_bounce", "soft_bounce", "complaint", "manual"):
            for stage in ("acceptance", "delivery"):
                self.dropped.labels(reason, stage)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for check in ("sessions", "auth"):
            self.guard_local.labels(check)
        for reason in INBOUND_REFUSALS:
            self.inbound_refused.labels(reason)
        for outcome in (
            "bounce",
            "complaint",
            "feedback",
            "auto_reply",
            "delayed",
            "delivered",
            "unsubscribe",
            "unparsed",
        ):
            self.inbound_reports.labels(outcome)
        for verdict in ("valid", "forged"):
            self.return_path_tokens.labels(verdict)
            for method in ("GET", "HEAD", "POST", "mailto"):
                self.unsubscribe_requests.labels(method, verdict)
        for verdict in ("valid", "invalid", "gone", "forged", "unavailable"):
            for method in ("GET", "POST"):
                self.preference_requests.labels(method, verdict)
        for kind in ("open", "click"):
            for verdict in ("valid", "forged", "lost"):
                self.tracking_requests.labels(kind, verdict)
            for verdict in ("human", "machine"):
                self.tracking_verdicts.labels(kind, verdict)
        for outcome in ("delivered", "failed"):
            self.webhook_attempts.labels(outcome)
        for reason in ("hard_bounce", "soft_bounce", "complaint"):
            self.bounce_suppressions.labels(reason)
        for reason in FAILURE_STAGES:
            self.deferred.labels(reason)
            self.bounced.labels(reason)
        self.declare_sites(())
        for state in ("queued", "deferred"):
            self.queue_oldest.labels(state)
        for state in ("queued", "deferred", "active", "held"):
            self.queue_depth.labels(state)
        for direction in ("in", "out"):
            self.connections.labels(direction)
        for reason in WAIT_REASONS:
            self.shaping_waits.labels(reason)
        for ending in ("completed", "failed", "cancelled"):
            self.session_leftovers.labels(ending)
        for why in ("idle", "bulk"):
            self.shaping_yields.labels(why)
        for op in ("choose", "take"):
            self.broker_fallback.labels(op)
        for table in ("events", "messages", "message_recipients", "tracking_hits"):
            self.control_pruned.labels(table)

    def declare_sites(self, sites: Iterable[str]) -> None:
        """The series of every site the shaping rules name, and ``other``, at 0 (again
        at a reload that names new ones)."""
        for site in (*sites, OTHER_SITE):
            for result in ("delivered", "temporary", "permanent"):
                self.attempts.labels(result, site)
            for tls in ("yes", "no"):
                self.delivery_connections.labels(site, tls)


WAIT_REASONS = REFUSALS
#: The ``site`` label of destinations the shaping rules do not name.
OTHER_SITE = "other"


def site_label(site: str) -> str:
    """A provider site as a label value: the name of a site the shaping rules name;
    ``other`` for a destination of none (``mx:<its hosts>``, shaping.rules) or none
    known. Bounded by the rules file."""
    return OTHER_SITE if not site or site.startswith("mx:") else site


class ProcessMetrics:
    """The process's own readings (memory, CPU, descriptors): written by every process
    of the appliance (supervisor and workers), summed by /metrics (the descriptor
    limit: the least). Read by :func:`postwarden.vitals.keep_vitals`.

    ``others`` names more processes this one reads for (the supervisor reads its fork
    server, which writes no metrics of its own): their readings are added to its own.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        others: Callable[[], Iterable[int]] | None = None,
    ) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.rss = Gauge(
            "postwarden_process_resident_memory_bytes",
            "Resident memory, summed over the appliance's processes.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cpu = Counter(
            "postwarden_process_cpu_seconds",
            "User and system CPU time of the appliance's processes.",
            registry=r,
        )
        self.open_fds = Gauge(
            "postwarden_process_open_fds",
            "Open file descriptors, summed over the appliance's processes.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.max_fds = Gauge(
            "postwarden_process_max_fds",
            "The open file descriptor limit (RLIMIT_NOFILE soft), the least of the"
            " appliance's processes.",
            registry=r,
            multiprocess_mode="livemin",
        )
        # prometheus-client's own reader of /proc/<pid> (not registered: read by hand),
        # and the CPU seconds each process had at its last reading.
        self._others = others
        self._readers: dict[int | str, ProcessCollector] = {"self": ProcessCollector(registry=None)}
        self._cpu_seen: dict[int | str, float] = {}

    def update(self) -> None:
        """One reading of /proc/self and of the others' (a handful of small reads
        each; every few seconds)."""
        if self._others is not None:
            pids: set[int | str] = {"self", *self._others()}
            for gone in set(self._readers) - pids:
                del self._readers[gone]
                self._cpu_seen.pop(gone, None)
            for pid in pids - set(self._readers):
                self._readers[pid] = ProcessCollector(
                    pid=functools.partial(str, pid), registry=None
                )
        rss = fds = 0.0
        max_fds: float | None = None
        for pid, reader in self._readers.items():
            for family in reader.collect():
                for sample in family.samples:
                    if sample.name == "process_resident_memory_bytes":
                        rss += sample.value
                    elif sample.name == "process_open_fds":
                        fds += sample.value
                    elif sample.name == "process_max_fds":
                        max_fds = sample.value if max_fds is None else min(max_fds, sample.value)
                    elif sample.name == "process_cpu_seconds_total":
                        seen = self._cpu_seen.get(pid, 0.0)
                        if sample.value > seen:
                            self.cpu.inc(sample.value - seen)
                            self._cpu_seen[pid] = sample.value
        self.rss.set(rss)
        self.open_fds.set(fds)
        if max_fds is not None:
            self.max_fds.set(max_fds)


class ApplianceMetrics:
    """What one process says for the whole appliance: the supervisor with several
    workers, else the process alone."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        mode: Literal["max"] = "max"  # one process writes these
        self.workers = Gauge(
            "postwarden_workers",
            "Workers configured (1 without a supervisor).",
            registry=r,
            multiprocess_mode=mode,
        )
        self.workers_alive = Gauge(
            "postwarden_workers_alive", "Workers running now.", registry=r, multiprocess_mode=mode
        )
        self.worker_restarts = Counter(
            "postwarden_worker_restarts",
            "Workers the supervisor started again after one died.",
            registry=r,
        )
        self.start_time = Gauge(
            "postwarden_start_time_seconds",
            "When the appliance (the supervisor, or the process alone) started, unix time.",
            registry=r,
            multiprocess_mode=mode,
        )
        self.previous_stop_clean = Gauge(
            "postwarden_previous_stop_clean",
            "1 if the previous run on this spool stopped cleanly, 0 if it ended without a"
            " clean stop (crash, kill -9, OOM, watchdog); from the spool's run marker.",
            registry=r,
            multiprocess_mode=mode,
        )
        self.disk_free = Gauge(
            "postwarden_spool_disk_free_bytes",
            "Free space for the appliance's user on the spool's file system.",
            registry=r,
            multiprocess_mode=mode,
        )
        self.disk_size = Gauge(
            "postwarden_spool_disk_size_bytes",
            "Size of the spool's file system.",
            registry=r,
            multiprocess_mode=mode,
        )


class ShapingMetrics:
    """What the shaping broker knows, per source, site and warming key (bounded: sites
    the rules do not name count as "other"). Refreshed from the broker's state."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        pair = ["source", "site"]
        mode: Literal["mostrecent"] = "mostrecent"  # one process (the broker's) writes these
        self.rate = Gauge(
            "postwarden_shaping_rate_per_minute",
            "Message rate in force.",
            pair,
            registry=r,
            multiprocess_mode=mode,
        )
        self.conns = Gauge(
            "postwarden_shaping_connections_open",
            "Connections held.",
            pair,
            registry=r,
            multiprocess_mode=mode,
        )
        self.conn_limit = Gauge(
            "postwarden_shaping_connection_limit",
            "Connection limit in force.",
            pair,
            registry=r,
            multiprocess_mode=mode,
        )
        self.suspended = Gauge(
            "postwarden_shaping_suspended",
            "1 while the pair is suspended.",
            pair,
            registry=r,
            multiprocess_mode=mode,
        )
        self.actions = Counter(
            "postwarden_shaping_actions",
            "Response-rule actions taken.",
            [*pair, "rule", "action"],
            registry=r,
        )
        key = ["key"]
        self.day = Gauge(
            "postwarden_warming_day", "Warming plan day.", key, registry=r, multiprocess_mode=mode
        )
        self.cap = Gauge(
            "postwarden_warming_cap",
            "Today's warming cap.",
            key,
            registry=r,
            multiprocess_mode=mode,
        )
        self.sent = Gauge(
            "postwarden_warming_sent_today",
            "Attempts counted today.",
            key,
            registry=r,
            multiprocess_mode=mode,
        )
        self.paused = Gauge(
            "postwarden_warming_paused", "1 while paused.", key, registry=r, multiprocess_mode=mode
        )
        self.health = Gauge(
            "postwarden_health_score",
            "Health score 0-100.",
            key,
            registry=r,
            multiprocess_mode=mode,
        )


def _written(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except FileNotFoundError:
        return False


def render_multiprocess() -> bytes:
    """The text exposition of every process's metrics, summed (supervisor side)."""
    from prometheus_client import multiprocess

    class Collector(multiprocess.MultiProcessCollector):
        """Leaves out a file a process (a worker starting) has created and not yet
        sized: it holds no value yet, and prometheus-client would fail the whole
        scrape on its empty header."""

        def collect(self) -> Any:
            files = [f for f in glob.glob(os.path.join(self._path, "*.db")) if _written(f)]
            return self.merge(files, accumulate=True)

    registry = CollectorRegistry()
    Collector(registry, path=os.environ["PROMETHEUS_MULTIPROC_DIR"])
    return bytes(generate_latest(registry))


def token_digest(cfg: MetricsConfig) -> bytes | None:
    """The SHA-256 of the token /metrics needs (metrics.bearer_token_file or
    metrics.bearer_token_sha256), or None when it needs none. OSError/ValueError when
    the file cannot be read or is empty."""
    if cfg.bearer_token_sha256:
        return bytes.fromhex(cfg.bearer_token_sha256)
    if cfg.bearer_token_file:
        with open(cfg.bearer_token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"{cfg.bearer_token_file} is empty")
        return hashlib.sha256(token.encode()).digest()
    return None


def token_matches(digest: bytes, authorization: str) -> bool:
    """Whether an Authorization header carries the token: the digests compared in
    constant time (the digest's length never depends on the token presented)."""
    scheme, _, token = authorization.partition(" ")
    given = hashlib.sha256(token.strip().encode()).digest()
    return hmac.compare_digest(given, digest) and scheme.lower() == "bearer"


def tenant_key(key: str, tenant_labels: bool) -> str | None:
    """A warming key as a label value: ``domain:<sending domain>`` names a tenant's
    domain, kept only when the operator opts in (metrics.tenant_labels); None drops
    the series. Source keys name the appliance's own IPs and stay."""
    if key.startswith("domain:") and not tenant_labels:
        return None
    return key
