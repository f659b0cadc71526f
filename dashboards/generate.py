"""Write Postwarden's Grafana dashboards and the promtool unit tests of its alerts.

    .venv/bin/python dashboards/generate.py          # (re)write the files
    .venv/bin/python dashboards/generate.py --check  # exit 1 if a file differs

(any Python 3.11 with PyYAML will do; the venv of `make venv` has it).

The dashboards (``grafana/*.json``) are built here from plain dicts so that every panel
is made the same way: each query's metric selectors get ``instance=~"$instance"``, every
panel and query uses the datasource variable ``${datasource}``, ids and grid positions
are assigned in order. ``prometheus/alerts_test.yml`` is built from the cases below and
the alerts in ``prometheus/alerts.yml`` (their annotations, rendered for each case, are
what promtool compares). Edit this file, run it, and commit its output with it;
tests/test_dashboards.py checks that the checked-in files are its output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
GRAFANA = HERE / "grafana"
PROMETHEUS = HERE / "prometheus"

DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39  # Grafana 10.4 / 11
RATE = "$__rate_interval"

# A metric selector of ours: a postwarden_ metric, or a recording rule named
# level:postwarden_...:operations, with or without its matchers; never a function name.
_SELECTOR = re.compile(
    r"(?<![\w:\"])((?:[a-z_]+:)?postwarden_[A-Za-z0-9_:]*)(\{[^}]*\})?(?!\w|\s*\()"
)


def scoped(expr: str) -> str:
    """``expr`` with ``instance=~"$instance"`` added to each of its metric selectors."""

    def add(m: re.Match[str]) -> str:
        inner = (m.group(2) or "{}")[1:-1].strip()
        return m.group(1) + '{instance=~"$instance"' + (", " + inner if inner else "") + "}"

    return _SELECTOR.sub(add, expr)


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {
        "refId": ref,
        "datasource": DS,
        "expr": scoped(expr),
        "legendFormat": legend or "__auto",
        "range": True,
        **extra,
    }


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(pairs)]


def quantiles(
    metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99), matchers: str = ""
) -> list[dict[str, Any]]:
    """Targets of the quantiles ``qs`` of the histogram ``metric`` (seconds), of the
    series that ``matchers`` select."""
    sel = f"{metric}_bucket" + (f"{{{matchers}}}" if matchers else "")
    group = f"{by}, le" if by else "le"
    prefix = "{{" + by + "}} " if by else ""
    return targets(
        *(
            (
                f"histogram_quantile({q}, sum by ({group}) (rate({sel}[{RATE}])))",
                f"{prefix}p{round(q * 100)}",
            )
            for q in qs
        )
    )


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


def timeseries(
    title: str,
    tgts: list[dict[str, Any]],
    description: str,
    unit: str = "short",
    *,
    stack: bool = False,
    limits: dict[str, Any] | None = None,
    minimum: float | None = 0,
    maximum: float | None = None,
) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 20 if stack else 5,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
    }
    defaults: dict[str, Any] = {"unit": unit, "custom": custom}
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if limits is not None:
        defaults["thresholds"] = limits
        custom["thresholdsStyle"] = {"mode": "dashed"}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "targets": tgts,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    tgts: list[dict[str, Any]],
    description: str,
    unit: str = "short",
    *,
    limits: dict[str, Any] | None = None,
    mappings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "mappings": mappings or []}
    defaults["thresholds"] = limits or thresholds((None, "green"))
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "targets": [{**t, "instant": True, "range": False} for t in tgts],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        },
    }


def heatmap(title: str, metric: str, description: str) -> dict[str, Any]:
    """The buckets of the histogram ``metric`` (seconds) over time."""
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "targets": [
            target(
                f"sum by (le) (increase({metric}_bucket[{RATE}]))",
                "{{le}}",
                format="heatmap",
            )
        ],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {
            "calculate": False,
            "yAxis": {"unit": "s", "axisPlacement": "left"},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "tooltip": {"show": True, "yHistogram": False},
            "legend": {"show": True},
        },
    }


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "options": [],
    }


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A variable of label values, several or all of them at once (``=~"$name"``)."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "refresh": 2,
        "sort": 1,
        "hide": 0,
        "regex": "",
        "options": [],
    }


INSTANCE = query_variable(
    "instance", "Appliance", "label_values(postwarden_start_time_seconds, instance)"
)


class Board:
    """One dashboard; panels are laid out left to right, in rows of 24 columns."""

    def __init__(self, uid: str, title: str, description: str, *variables: dict) -> None:
        self.uid, self.title, self.description = uid, title, description
        self.variables = [datasource_variable(), INSTANCE, *variables]
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = self.line_height = 0

    def _newline(self) -> None:
        self.y += self.line_height
        self.x = self.line_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
            }
        )
        self.y += 1

    def add(self, panel: dict[str, Any], w: int = 12, h: int = 8) -> None:
        if self.x + w > 24:
            self._newline()
        panel = {"datasource": DS, **panel, "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}}
        self.panels.append(panel)
        self.x += w
        self.line_height = max(self.line_height, h)

    def json(self) -> dict[str, Any]:
        panels = [{"id": i, **p} for i, p in enumerate(self.panels, start=1)]
        return {
            "__comment": "Generated by dashboards/generate.py: edit that, not this file.",
            "id": None,
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["postwarden"],
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "timepicker": {},
            "timezone": "browser",
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "weekStart": "",
            "annotations": {
                "list": [
                    {
                        "builtIn": 1,
                        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                        "enable": True,
                        "hide": True,
                        "iconColor": "rgba(0, 211, 255, 1)",
                        "name": "Annotations & Alerts",
                        "type": "dashboard",
                    }
                ]
            },
            "links": [
                {
                    "type": "dashboards",
                    "title": "Postwarden",
                    "tags": ["postwarden"],
                    "asDropdown": True,
                    "includeVars": True,
                    "keepTime": True,
                    "icon": "external link",
                    "targetBlank": False,
                    "tooltip": "",
                    "url": "",
                }
            ],
            "templating": {"list": self.variables},
            "panels": panels,
        }


# ------------------------------------------------------------------------- dashboards


def ingress() -> Board:
    b = Board(
        "postwarden-ingress",
        "Postwarden / Ingress",
        "Mail coming in: submission (SMTP and API), its latency and refusals; the inbound MX.",
    )
    b.row("Accepted")
    b.add(
        timeseries(
            "Messages accepted",
            targets(
                (
                    f"sum by (source) (rate(postwarden_messages_received_total[{RATE}]))",
                    "{{source}}",
                )
            ),
            "Messages accepted and spooled per second, by how they came in (smtp, api).",
            "ops",
            stack=True,
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Recipients accepted",
            targets((f"sum(rate(postwarden_recipients_received_total[{RATE}]))", "recipients")),
            "Recipients accepted and spooled per second.",
            "ops",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Open SMTP sessions (in)",
            targets(('sum(postwarden_connections_open{direction="in"})', "sessions")),
            "Submission sessions open now, all workers.",
        ),
        w=8,
    )
    b.row("Latency")
    b.add(
        timeseries(
            "Acceptance latency",
            quantiles("postwarden_acceptance_seconds"),
            "From the end of DATA to the 250 reply: cleanup, DKIM signing, the spool's fsync.",
            "s",
        )
    )
    b.add(
        heatmap(
            "Acceptance latency distribution",
            "postwarden_acceptance_seconds",
            "How many messages took how long to be accepted, per histogram bucket.",
        )
    )
    b.row("Refusals")
    b.add(
        timeseries(
            "Refusals by reason",
            targets(
                (f"sum by (reason) (rate(postwarden_smtp_rejected_total[{RATE}]))", "{{reason}}")
            ),
            "SMTP commands refused by the submission listeners, per second, by reason "
            "(docs/operations.md, Metrics).",
            "ops",
            stack=True,
        ),
        w=16,
    )
    b.add(
        timeseries(
            "AUTH lockouts",
            targets(
                (f"sum(increase(postwarden_auth_lockouts_total[{RATE}]))", "lockouts begun"),
                (
                    f"sum by (check) (increase(postwarden_session_guard_local_total[{RATE}]))",
                    "decided locally: {{check}}",
                ),
            ),
            "Client addresses locked out of AUTH after repeated failures; session and AUTH "
            "checks a worker took alone because the supervisor's broker did not answer.",
        ),
        w=8,
    )
    return b


def queue() -> Board:
    b = Board(
        "postwarden-queue",
        "Postwarden / Queue",
        "The spool: recipients by state, how old the oldest are, what is in flight, outcomes.",
    )
    b.row("Depth")
    for state, unit_limits in (
        ("queued", thresholds((None, "green"), (10000, "orange"))),
        ("deferred", thresholds((None, "green"), (10000, "orange"))),
        ("held", thresholds((None, "green"), (1, "blue"))),
    ):
        b.add(
            stat(
                f"Recipients {state}",
                targets((f'sum(postwarden_queue_recipients{{state="{state}"}})', state)),
                f"Recipients in the spool in state {state} (refreshed every 5 s).",
                limits=unit_limits,
            ),
            w=4,
            h=4,
        )
    b.add(
        stat(
            "In flight",
            targets(("sum(postwarden_scheduler_inflight)", "in flight")),
            "Recipients leased by the schedulers (in memory, on their way out).",
        ),
        w=4,
        h=4,
    )
    b.add(
        stat(
            "Oldest queued",
            targets(('max(postwarden_queue_oldest_seconds{state="queued"})', "queued")),
            "Age of the oldest recipient waiting for its first attempt "
            "(alert PostwardenQueueStale: over 15 minutes).",
            "s",
            limits=thresholds((None, "green"), (300, "orange"), (900, "red")),
        ),
        w=4,
        h=4,
    )
    b.add(
        stat(
            "Oldest deferred",
            targets(('max(postwarden_queue_oldest_seconds{state="deferred"})', "deferred")),
            "Age of the oldest recipient waiting for a retry after a temporary failure.",
            "s",
        ),
        w=4,
        h=4,
    )
    b.add(
        timeseries(
            "Recipients by state",
            targets(("sum by (state) (postwarden_queue_recipients)", "{{state}}")),
            "Queue depth: queued (waiting for a first attempt), deferred (waiting for a "
            "retry), active (leased), held (by an operator).",
        )
    )
    b.add(
        timeseries(
            "Oldest recipient by state",
            targets(("max by (state) (postwarden_queue_oldest_seconds)", "{{state}}")),
            "Age of the oldest recipient in each state (0 when none), the most over workers.",
            "s",
            limits=thresholds((None, "green"), (900, "red")),
        )
    )
    b.row("Flow")
    b.add(
        timeseries(
            "Outcomes",
            targets(
                (f"sum(rate(postwarden_recipients_delivered_total[{RATE}]))", "delivered"),
                (f"sum(rate(postwarden_recipients_deferred_total[{RATE}]))", "deferred"),
                (f"sum(rate(postwarden_recipients_bounced_total[{RATE}]))", "bounced"),
                (f"sum(rate(postwarden_recipients_expired_total[{RATE}]))", "expired"),
                (f"sum(rate(postwarden_recipients_dropped_total[{RATE}]))", "dropped (suppressed)"),
            ),
            "Recipients per second by what became of their attempt.",
            "ops",
        )
    )
    b.add(
        timeseries(
            "In flight and connections out",
            targets(
                ("sum(postwarden_scheduler_inflight)", "recipients in flight"),
                ('sum(postwarden_connections_open{direction="out"})', "connections out"),
            ),
            "Recipients leased by the schedulers and open delivery connections.",
        )
    )
    b.add(
        timeseries(
            "Deferred by stage",
            targets(
                (
                    f"sum by (reason) (rate(postwarden_recipients_deferred_total[{RATE}]))",
                    "{{reason}}",
                )
            ),
            "Temporary failures per second by the stage they happened at.",
            "ops",
            stack=True,
        )
    )
    b.add(
        timeseries(
            "Bounced by stage",
            targets(
                (
                    f"sum by (reason) (rate(postwarden_recipients_bounced_total[{RATE}]))",
                    "{{reason}}",
                )
            ),
            "Permanent failures per second by the stage they happened at.",
            "ops",
            stack=True,
        )
    )
    b.add(
        timeseries(
            "Delivery latency",
            quantiles("postwarden_delivery_seconds"),
            "From acceptance to the 2xx of the recipient's MX, per delivered recipient "
            "(retries included).",
            "s",
        )
    )
    b.add(
        timeseries(
            "Spool commits",
            targets(
                (f"sum(rate(postwarden_spool_commits_total[{RATE}]))", "group commits"),
                (
                    f"sum(rate(postwarden_spool_recovered_inflight_total[{RATE}]))",
                    "recovered in flight after a crash",
                ),
                (
                    f"sum(rate(postwarden_scheduler_record_failures_total[{RATE}]))",
                    "outcome writes failed",
                ),
            ),
            "Durable group commits of the spool per second; recipients found leased at a "
            "start after a crash; failed writes of outcomes (each retried).",
            "ops",
        )
    )
    return b


SITE = query_variable(
    "site",
    "Provider site",
    'label_values(postwarden_delivery_attempts_total{instance=~"$instance"}, site)',
)
SOURCE = query_variable(
    "source",
    "Source",
    'label_values(postwarden_shaping_connections_total{instance=~"$instance"}, source)',
)


def delivery() -> Board:
    b = Board(
        "postwarden-delivery",
        "Postwarden / Delivery",
        "Delivery by provider site and source IP: attempts, deferrals, TLS, shaping.",
        SITE,
        SOURCE,
    )

    def at(result: str = "") -> str:
        extra = f', result="{result}"' if result else ""
        return f'postwarden_delivery_attempts_total{{site=~"$site"{extra}}}'

    b.row("Attempts by provider site")
    b.add(
        timeseries(
            "Attempts by result",
            targets((f"sum by (result) (rate({at()}[{RATE}]))", "{{result}}")),
            "Delivery attempts per second by result: delivered (2xx), temporary (4xx, "
            "network), permanent (5xx).",
            "ops",
            stack=True,
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Delivered by site",
            targets(
                (
                    f"sum by (site) (rate({at('delivered')}[{RATE}]))",
                    "{{site}}",
                )
            ),
            "Recipients delivered (2xx) per second, by provider site.",
            "ops",
            stack=True,
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Deferral share by site",
            targets(
                (
                    f"sum by (site) (rate({at('temporary')}[{RATE}]))"
                    f" / sum by (site) (rate({at()}[{RATE}]))",
                    "{{site}}",
                )
            ),
            "The share of attempts answered 4xx (or failed on the network), by site "
            "(alert PostwardenDeferralSpike: over 30 % for 10 minutes).",
            "percentunit",
            limits=thresholds((None, "green"), (0.3, "red")),
            maximum=1,
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Deferrals by site",
            targets(
                (
                    f"sum by (site) (rate({at('temporary')}[{RATE}]))",
                    "{{site}}",
                )
            ),
            "Temporary failures per second, by provider site.",
            "ops",
            stack=True,
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Bounces (5xx) by site",
            targets(
                (
                    f"sum by (site) (rate({at('permanent')}[{RATE}]))",
                    "{{site}}",
                )
            ),
            "Permanent failures during delivery per second, by provider site.",
            "ops",
            stack=True,
        ),
        w=8,
    )
    b.add(
        timeseries(
            "TLS share by site",
            targets(
                (
                    "sum by (site) (rate(postwarden_delivery_connections_total"
                    f'{{site=~"$site", tls="yes"}}[{RATE}]))'
                    " / sum by (site) (rate(postwarden_delivery_connections_total"
                    f'{{site=~"$site"}}[{RATE}]))',
                    "{{site}}",
                )
            ),
            "Of the delivery connections that got to MAIL FROM, the share with STARTTLS in "
            "force, by site.",
            "percentunit",
            maximum=1,
        ),
        w=8,
    )
    pair = 'source=~"$source", site=~"$site"'
    b.row("Shaping by source and site")
    b.add(
        timeseries(
            "Message rate in force",
            targets(
                (
                    f"max by (source, site) (postwarden_shaping_rate_per_minute{{{pair}}})",
                    "{{source}} → {{site}}",
                )
            ),
            "The message rate each (source, site) pair may send at now: the rules' limit, "
            "lowered by backoff (4xx push-back) and response rules, raised again as "
            "deliveries succeed (adaptive rate changes). 0: not metered.",
            "short",
        )
    )
    b.add(
        timeseries(
            "Response-rule actions",
            targets(
                (
                    "sum by (source, site, rule, action) (increase("
                    f"postwarden_shaping_actions_total{{{pair}}}[{RATE}]))",
                    "{{source}} → {{site}}: {{rule}} ({{action}})",
                )
            ),
            "Actions the response rules took (suspend, lower_rate, lower_connections, "
            "bounce) on a provider's answer.",
            "short",
        )
    )
    b.add(
        timeseries(
            "Suspended pairs",
            targets(
                (
                    f"max by (source, site) (postwarden_shaping_suspended{{{pair}}})",
                    "{{source}} → {{site}}",
                )
            ),
            "1 while a response rule suspends the (source, site) pair.",
            maximum=1,
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Connections held and limit",
            targets(
                (
                    f"sum by (source, site) (postwarden_shaping_connections_open{{{pair}}})",
                    "{{source}} → {{site}} open",
                ),
                (
                    f"max by (source, site) (postwarden_shaping_connection_limit{{{pair}}})",
                    "{{source}} → {{site}} limit",
                ),
            ),
            "Delivery connections held per (source, site), all workers, and the limit in force.",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Connections opened by source",
            targets(
                (
                    "sum by (source) (rate(postwarden_shaping_connections_total"
                    f'{{source=~"$source"}}[{RATE}]))',
                    "{{source}}",
                )
            ),
            "Delivery connections opened per second, by source address.",
            "ops",
            stack=True,
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Shaping waits by reason",
            targets(
                (f"sum by (reason) (rate(postwarden_shaping_waits_total[{RATE}]))", "{{reason}}")
            ),
            "Recipients the shaping broker held back per second (not attempts), by reason.",
            "ops",
            stack=True,
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Connections yielded",
            targets(
                (f"sum by (reason) (rate(postwarden_shaping_yields_total[{RATE}]))", "{{reason}}")
            ),
            "Delivery connections ended early to give their slot to a request waiting for "
            "one: idle, or bulk before transactional.",
            "ops",
        ),
        w=12,
    )
    return b


KEY = query_variable(
    "key", "Warming key", 'label_values(postwarden_warming_day{instance=~"$instance"}, key)'
)


def warming() -> Board:
    b = Board(
        "postwarden-warming",
        "Postwarden / Warming",
        "Sources and sending domains on warming plans: day, cap, sent today, health, pauses.",
        KEY,
    )
    k = 'key=~"$key"'
    b.row("Plans")
    b.add(
        timeseries(
            "Plan day",
            targets((f"max by (key) (postwarden_warming_day{{{k}}})", "{{key}}")),
            "The day of its warming plan each key is on (it moves on at midnight in "
            "shaping.timezone, only after a healthy day).",
        )
    )
    b.add(
        timeseries(
            "Sent today and cap",
            targets(
                (f"max by (key) (postwarden_warming_sent_today{{{k}}})", "{{key}} sent"),
                (f"max by (key) (postwarden_warming_cap{{{k}}})", "{{key}} cap"),
            ),
            "Attempts counted today against today's cap.",
        )
    )
    b.add(
        timeseries(
            "Cap used",
            targets(
                (
                    f"max by (key) (postwarden_warming_sent_today{{{k}}})"
                    f" / max by (key) (postwarden_warming_cap{{{k}}})",
                    "{{key}}",
                )
            ),
            "Today's attempts as a share of today's cap.",
            "percentunit",
            limits=thresholds((None, "green"), (1, "orange")),
        )
    )
    b.add(
        timeseries(
            "Health score",
            targets(("max by (key) (postwarden_health_score)", "{{key}}")),
            "Health score 0-100 of each source and sending domain over shaping.health_window "
            "(bounces, complaints, deliveries; docs/shaping.md).",
            limits=thresholds((None, "red"), (65, "orange"), (80, "green")),
            maximum=100,
        )
    )
    b.row("Pauses")
    b.add(
        stat(
            "Paused now",
            targets(("sum(postwarden_warming_paused)", "paused")),
            "Sources and sending domains paused (by an operator or by their health).",
            limits=thresholds((None, "green"), (1, "red")),
        ),
        w=6,
    )
    b.add(
        timeseries(
            "Paused",
            targets(("max by (key) (postwarden_warming_paused)", "{{key}}")),
            "1 while paused: `postwarden warming resume` ends it.",
            maximum=1,
        ),
        w=18,
    )
    return b


def bounces() -> Board:
    b = Board(
        "postwarden-bounces",
        "Postwarden / Bounces and complaints",
        "Bounce and complaint rates against the ESPs' limits, bounces by category, the "
        "inbound MX, suppressions.",
    )
    b.row("Rates")
    b.add(
        timeseries(
            "Bounce rate (1 h)",
            targets(("max(instance:postwarden_bounce_rate:ratio_rate1h)", "bounce rate")),
            "Bounces (5xx during delivery, and DSNs afterwards) per recipient sent, over an "
            "hour (recording rule; alert PostwardenBounceRateHigh above 5 %).",
            "percentunit",
            limits=thresholds((None, "green"), (0.02, "orange"), (0.05, "red")),
        )
    )
    b.add(
        timeseries(
            "Complaint rate (24 h)",
            targets(("max(instance:postwarden_complaint_rate:ratio_rate24h)", "complaint rate")),
            "Feedback-loop complaints per delivered recipient over a day (recording rule; "
            "alert PostwardenComplaintRateHigh above 0.1 %).",
            "percentunit",
            limits=thresholds((None, "green"), (0.0005, "orange"), (0.001, "red")),
        )
    )
    b.row("Categories")
    b.add(
        timeseries(
            "Bounces by category",
            targets(
                (
                    f"sum by (category, hard) (rate(postwarden_bounce_categories_total[{RATE}]))",
                    "{{category}} (hard={{hard}})",
                )
            ),
            "Permanent failures per second by the classifier's category.",
            "ops",
            stack=True,
        )
    )
    b.add(
        timeseries(
            "Bounces: during delivery or afterwards",
            targets(
                (
                    f"sum by (stage) (rate(postwarden_bounce_categories_total[{RATE}]))",
                    "{{stage}}",
                )
            ),
            "sync: the recipient's MX said 5xx while delivering; async: a DSN came back "
            "later through the inbound MX.",
            "ops",
            stack=True,
        )
    )
    b.add(
        timeseries(
            "Reports by outcome",
            targets(
                (
                    f"sum by (outcome) (rate(postwarden_bounce_reports_total[{RATE}]))",
                    "{{outcome}}",
                )
            ),
            "Reports from the inbox processed per second: bounce, complaint, feedback, "
            "auto_reply, delayed, delivered, unsubscribe, unparsed.",
            "ops",
            stack=True,
        )
    )
    b.add(
        timeseries(
            "Suppressions written",
            targets(
                (
                    f"sum by (reason) (rate(postwarden_bounce_suppressions_total[{RATE}]))",
                    "written: {{reason}}",
                ),
                (
                    f"sum by (reason) (rate(postwarden_recipients_dropped_total[{RATE}]))",
                    "dropped: {{reason}}",
                ),
            ),
            "Suppressions written because of bounces and complaints; recipients not sent "
            "because they are suppressed.",
            "ops",
        )
    )
    b.row("Inbound MX")
    b.add(
        timeseries(
            "Inbound MX",
            targets(
                (f"sum(rate(postwarden_inbound_accepted_total[{RATE}]))", "accepted"),
                (
                    f"sum by (reason) (rate(postwarden_inbound_refused_total[{RATE}]))",
                    "refused: {{reason}}",
                ),
            ),
            "Reports the bounce and feedback-loop MX accepted, and the commands it refused.",
            "ops",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Inbox",
            targets(
                ("max(postwarden_inbound_pending)", "pending"),
                ("max(postwarden_inbound_unparsed)", "kept unparsed"),
                ("sum(postwarden_inbound_sessions_open)", "sessions open"),
            ),
            "Reports waiting in the inbox, those kept because nothing could be made of "
            "them (`postwarden bounces unparsed`), open inbound sessions.",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Return-path tokens",
            targets(
                (
                    f"sum by (verdict) (rate(postwarden_return_path_tokens_total[{RATE}]))",
                    "{{verdict}}",
                )
            ),
            "Return-path tokens read from reports: forged ones are someone sending fake bounces.",
            "ops",
        ),
        w=8,
    )
    return b


ROUTE = query_variable(
    "route", "Route", 'label_values(postwarden_http_requests_total{instance=~"$instance"}, route)'
)


def control() -> Board:
    b = Board(
        "postwarden-control",
        "Postwarden / Control plane",
        "The HTTP API and its neighbours: requests, latency and errors by route; "
        "webhooks, tracking and unsubscribes.",
        ROUTE,
    )
    r = 'route=~"$route"'
    b.row("Requests")
    b.add(
        timeseries(
            "Requests by route",
            targets(
                (
                    f"sum by (route) (rate(postwarden_http_requests_total{{{r}}}[{RATE}]))",
                    "{{route}}",
                )
            ),
            "Control-plane requests per second by route template (other: no route matched).",
            "reqps",
            stack=True,
        )
    )
    b.add(
        timeseries(
            "Requests by status",
            targets(
                (
                    f"sum by (status) (rate(postwarden_http_requests_total{{{r}}}[{RATE}]))",
                    "{{status}}",
                )
            ),
            "Control-plane requests per second by status class.",
            "reqps",
            stack=True,
        )
    )
    b.add(
        timeseries(
            "Errors by route",
            targets(
                (
                    "sum by (route, status) (rate(postwarden_http_requests_total"
                    f'{{{r}, status=~"4xx|5xx"}}[{RATE}]))',
                    "{{route}} {{status}}",
                )
            ),
            "Requests answered 4xx (the client's error: auth, validation, not found) or "
            "5xx (ours, or the database down) per second, by route.",
            "reqps",
        )
    )
    b.add(
        timeseries(
            "Latency by route (p99)",
            quantiles("postwarden_http_request_seconds", by="route", qs=(0.99,), matchers=r),
            "99th percentile of the control-plane request latency, by route.",
            "s",
        )
    )
    b.add(
        timeseries(
            "Latency (all routes)",
            quantiles("postwarden_http_request_seconds", matchers=r),
            "Request latency quantiles over the routes selected.",
            "s",
        )
    )
    b.row("Webhooks, tracking, unsubscribes")
    b.add(
        timeseries(
            "Webhook attempts",
            targets(
                (
                    f"sum by (outcome) (rate(postwarden_webhook_attempts_total[{RATE}]))",
                    "{{outcome}}",
                )
            ),
            "Tries to deliver events to webhook endpoints; a rising failed rate is an "
            "endpoint down or refusing.",
            "ops",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Tracking requests",
            targets(
                (
                    f"sum by (kind, verdict) (rate(postwarden_tracking_requests_total[{RATE}]))",
                    "{{kind}} {{verdict}}",
                )
            ),
            "Open pixels and click redirects by verdict (valid, forged, lost).",
            "reqps",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Unsubscribe requests",
            targets(
                (
                    "sum by (method, verdict) (rate(postwarden_unsubscribe_requests_total"
                    f"[{RATE}]))",
                    "{{method}} {{verdict}}",
                )
            ),
            "List-Unsubscribe links and mailto; forged tokens at a steady rate are someone "
            "probing.",
            "reqps",
        ),
        w=8,
    )
    return b


def process() -> Board:
    b = Board(
        "postwarden-process",
        "Postwarden / Process health",
        "The appliance's processes: memory, CPU, descriptors, event-loop lag, workers, "
        "spool disk, certificates, the shaping broker.",
    )
    b.row("Appliance")
    b.add(
        stat(
            "Up",
            [target('up{instance=~"$instance"}', "{{instance}}")],
            "Whether Prometheus could scrape /metrics (1) or not (0).",
            mappings=[
                {"type": "value", "options": {"0": {"text": "down", "color": "red"}}},
                {"type": "value", "options": {"1": {"text": "up", "color": "green"}}},
            ],
        ),
        w=4,
        h=4,
    )
    b.add(
        stat(
            "Uptime",
            targets(("time() - max by (instance) (postwarden_start_time_seconds)", "{{instance}}")),
            "Since the appliance (the supervisor, or the process alone) started.",
            "s",
        ),
        w=4,
        h=4,
    )
    b.add(
        stat(
            "Previous stop",
            targets(("min by (instance) (postwarden_previous_stop_clean)", "{{instance}}")),
            "Whether the run before this one stopped cleanly; unclean: a crash, kill -9, "
            "the OOM killer or systemd's watchdog (alert PostwardenUncleanRestart).",
            mappings=[
                {"type": "value", "options": {"0": {"text": "unclean", "color": "red"}}},
                {"type": "value", "options": {"1": {"text": "clean", "color": "green"}}},
            ],
        ),
        w=4,
        h=4,
    )
    b.add(
        stat(
            "Workers alive / configured",
            targets(
                ("sum(postwarden_workers_alive)", "alive"),
                ("sum(postwarden_workers)", "configured"),
            ),
            "Worker processes running now and configured (server.workers).",
        ),
        w=4,
        h=4,
    )
    b.add(
        stat(
            "Worker restarts (1 h)",
            targets(("sum(increase(postwarden_worker_restarts_total[1h]))", "restarts")),
            "Workers the supervisor started again after one died, over the last hour.",
            limits=thresholds((None, "green"), (1, "red")),
        ),
        w=4,
        h=4,
    )
    b.add(
        stat(
            "Spool disk free",
            targets(
                (
                    "min by (instance) (postwarden_spool_disk_free_bytes"
                    " / postwarden_spool_disk_size_bytes)",
                    "{{instance}}",
                )
            ),
            "Free space on the spool's file system (alert PostwardenSpoolDiskLow below 10 %).",
            "percentunit",
            limits=thresholds((None, "red"), (0.10, "orange"), (0.25, "green")),
        ),
        w=4,
        h=4,
    )
    b.row("Resources")
    b.add(
        timeseries(
            "Resident memory",
            targets(
                ("sum by (instance) (postwarden_process_resident_memory_bytes)", "{{instance}}")
            ),
            "RSS summed over the appliance's processes (supervisor and workers).",
            "bytes",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "CPU",
            targets(
                (
                    f"sum by (instance) (rate(postwarden_process_cpu_seconds_total[{RATE}]))",
                    "{{instance}}",
                )
            ),
            "CPU time (user and system) of all processes per second: 1 is one core busy.",
            "short",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "File descriptors",
            targets(
                ("sum by (instance) (postwarden_process_open_fds)", "{{instance}} open (all)"),
                (
                    "min by (instance) (postwarden_process_max_fds)",
                    "{{instance}} limit (per process)",
                ),
            ),
            "Open descriptors summed over the processes, and each process's limit "
            "(RLIMIT_NOFILE); a process near the limit refuses connections.",
            "short",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Event-loop lag",
            quantiles("postwarden_event_loop_lag_seconds", qs=(0.5, 0.99)),
            "How late a timer fires on the workers' event loops: a busy or blocked loop "
            "delays every session. Seconds of lag make systemd's watchdog restart the "
            "service.",
            "s",
        )
    )
    b.add(
        timeseries(
            "Workers",
            targets(
                ("sum(postwarden_workers_alive)", "alive"),
                ("sum(postwarden_workers)", "configured"),
                (f"sum(increase(postwarden_worker_restarts_total[{RATE}]))", "restarted"),
            ),
            "Workers alive and configured, and restarts by the supervisor.",
        )
    )
    b.row("Dependencies")
    b.add(
        timeseries(
            "Spool disk",
            targets(
                ("min by (instance) (postwarden_spool_disk_free_bytes)", "{{instance}} free"),
                ("max by (instance) (postwarden_spool_disk_size_bytes)", "{{instance}} size"),
            ),
            "The spool's file system: free for the appliance's user, and size.",
            "bytes",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Certificate expiry",
            targets(
                (
                    "min by (listener) (postwarden_tls_certificate_expiry_timestamp_seconds)"
                    " - time()",
                    "{{listener}}",
                )
            ),
            "Time left before the certificate each listener serves expires (alert "
            "PostwardenCertificateExpiry within 14 days).",
            "s",
            limits=thresholds((None, "red"), (3 * 86400, "orange"), (14 * 86400, "green")),
            minimum=None,
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Shaping broker",
            targets(
                ("sum(postwarden_shaping_broker_connected)", "workers connected"),
                (
                    f"sum(increase(postwarden_shaping_broker_reconnects_total[{RATE}]))",
                    "reconnects",
                ),
                (
                    f"sum by (op) (rate(postwarden_shaping_broker_fallback_total[{RATE}]))",
                    "local fallback: {{op}}",
                ),
            ),
            "Workers connected to the supervisor's shaping broker (fewer than the workers: "
            "some run on local limits), reconnects, calls answered locally.",
        ),
        w=8,
    )
    return b


BOARDS = (ingress, queue, delivery, warming, bounces, control, process)


def dashboards() -> dict[str, dict[str, Any]]:
    """File name under grafana/ → dashboard."""
    out = {}
    for make in BOARDS:
        board = make()
        out[board.uid.removeprefix("postwarden-") + ".json"] = board.json()
    return out


# -------------------------------------------------------------- promtool unit tests

INST = {"instance": "pw1:8025", "job": "postwarden"}


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    ls = {**INST, **labels}
    inner = ", ".join(f'{k}="{v}"' for k, v in ls.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


# Each case: a name, its input series (interval 1m unless given), and checks:
# (eval time, alert, labels of each alert expected to fire beyond alertname and
# severity, with "value" the rendered {{ $value }} of its annotations).
CASES: list[dict[str, Any]] = [
    {
        "name": "down: scrape failing for 2 minutes",
        "series": [_series("up", "1 1 0x10")],
        "checks": [
            ("3m", "PostwardenDown", []),  # pending for 1 minute only
            ("5m", "PostwardenDown", [{**INST}]),
        ],
    },
    {
        "name": "down: up",
        "series": [_series("up", "1x10")],
        "checks": [("5m", "PostwardenDown", [])],
    },
    {
        "name": "queue stale: queued mail older than 15 minutes",
        "series": [
            _series("postwarden_queue_oldest_seconds", "0+60x40", state="queued"),
            _series("postwarden_queue_oldest_seconds", "0x40", state="deferred"),
        ],
        "checks": [
            ("18m", "PostwardenQueueStale", []),  # over 900 s since 16m: pending
            ("25m", "PostwardenQueueStale", [{"instance": INST["instance"], "value": "25m 0s"}]),
        ],
    },
    {
        "name": "queue stale: old deferred mail is no alert",
        "series": [
            _series("postwarden_queue_oldest_seconds", "60x40", state="queued"),
            _series("postwarden_queue_oldest_seconds", "86400x40", state="deferred"),
        ],
        "checks": [("25m", "PostwardenQueueStale", [])],
    },
    {
        "name": "deferral spike at one site",
        "series": [
            _series(
                "postwarden_delivery_attempts_total", "0+40x40", result="temporary", site="gmail"
            ),
            _series(
                "postwarden_delivery_attempts_total", "0+40x40", result="delivered", site="gmail"
            ),
            _series("postwarden_delivery_attempts_total", "0x40", result="permanent", site="gmail"),
            _series(
                "postwarden_delivery_attempts_total", "0+1x40", result="temporary", site="yahoo"
            ),
            _series(
                "postwarden_delivery_attempts_total", "0+40x40", result="delivered", site="yahoo"
            ),
        ],
        "checks": [
            (
                "25m",
                "PostwardenDeferralSpike",
                [{"instance": INST["instance"], "site": "gmail", "value": "50%"}],
            ),
        ],
    },
    {
        "name": "deferral spike: too few attempts to judge",
        "series": [
            _series(
                "postwarden_delivery_attempts_total", "0+2x40", result="temporary", site="gmail"
            ),
            _series(
                "postwarden_delivery_attempts_total", "0+2x40", result="delivered", site="gmail"
            ),
        ],
        "checks": [("25m", "PostwardenDeferralSpike", [])],
    },
    {
        "name": "bounce rate over 5 %",
        "series": [
            _series("postwarden_recipients_delivered_total", "0+90x90"),
            _series("postwarden_recipients_bounced_total", "0+6x90", reason="rcpt"),
            _series("postwarden_bounce_reports_total", "0+4x90", outcome="bounce"),
            _series("postwarden_bounce_reports_total", "0x90", outcome="complaint"),
        ],
        "checks": [
            ("10m", "PostwardenBounceRateHigh", []),  # pending
            (
                "80m",
                "PostwardenBounceRateHigh",
                [{"instance": INST["instance"], "value": "10.42%"}],
            ),
        ],
    },
    {
        "name": "bounce rate under 5 %",
        "series": [
            _series("postwarden_recipients_delivered_total", "0+97x90"),
            _series("postwarden_recipients_bounced_total", "0+2x90", reason="rcpt"),
            _series("postwarden_bounce_reports_total", "0+1x90", outcome="bounce"),
        ],
        "checks": [("80m", "PostwardenBounceRateHigh", [])],
    },
    {
        "name": "bounce rate over 5 % on too few recipients",
        "series": [
            _series("postwarden_recipients_delivered_total", "0+0.5x90"),
            _series("postwarden_recipients_bounced_total", "0+0.5x90", reason="rcpt"),
            _series("postwarden_bounce_reports_total", "0x90", outcome="bounce"),
        ],
        "checks": [("80m", "PostwardenBounceRateHigh", [])],
    },
    {
        "name": "complaint rate over 0.1 %",
        "interval": "10m",
        "series": [
            _series("postwarden_recipients_delivered_total", "0+1000x12"),
            _series("postwarden_bounce_reports_total", "0+2x12", outcome="complaint"),
        ],
        "checks": [
            (
                "90m",  # a day's window of which 90 minutes hold data
                "PostwardenComplaintRateHigh",
                [{"instance": INST["instance"], "value": "0.2%"}],
            ),
        ],
    },
    {
        "name": "complaint rate under 0.1 %",
        "interval": "10m",
        "series": [
            _series("postwarden_recipients_delivered_total", "0+1000x12"),
            _series("postwarden_bounce_reports_total", "0+0.5x12", outcome="complaint"),
        ],
        "checks": [("90m", "PostwardenComplaintRateHigh", [])],
    },
    {
        "name": "delivered rate drops by half while mail waits",
        "series": [
            _series("postwarden_recipients_delivered_total", "0+100x90 9050+50x60"),
            _series("postwarden_queue_recipients", "500x150", state="queued"),
            _series("postwarden_queue_recipients", "0x150", state="held"),
        ],
        "checks": [
            ("90m", "PostwardenDeliveredRateDrop", []),
            ("110m", "PostwardenDeliveredRateDrop", [{"instance": INST["instance"]}]),
        ],
    },
    {
        "name": "delivered rate drops because no mail waits",
        "series": [
            _series("postwarden_recipients_delivered_total", "0+100x90 9050+50x60"),
            _series("postwarden_queue_recipients", "0x150", state="queued"),
        ],
        "checks": [("110m", "PostwardenDeliveredRateDrop", [])],
    },
    {
        "name": "delivered rate steady",
        "series": [
            _series("postwarden_recipients_delivered_total", "0+100x150"),
            _series("postwarden_queue_recipients", "500x150", state="queued"),
        ],
        "checks": [("110m", "PostwardenDeliveredRateDrop", [])],
    },
    {
        "name": "delivered rate drops by 10 % only",
        "series": [
            _series("postwarden_recipients_delivered_total", "0+100x90 9090+90x60"),
            _series("postwarden_queue_recipients", "500x150", state="queued"),
        ],
        "checks": [("110m", "PostwardenDeliveredRateDrop", [])],
    },
    {
        "name": "spool disk 5 % free",
        "series": [
            _series("postwarden_spool_disk_free_bytes", "5e9x20"),
            _series("postwarden_spool_disk_size_bytes", "100e9x20"),
        ],
        "checks": [("10m", "PostwardenSpoolDiskLow", [{**INST, "value": "5%"}])],
    },
    {
        "name": "spool disk 50 % free",
        "series": [
            _series("postwarden_spool_disk_free_bytes", "50e9x20"),
            _series("postwarden_spool_disk_size_bytes", "100e9x20"),
        ],
        "checks": [("10m", "PostwardenSpoolDiskLow", [])],
    },
    {
        "name": "spool disk filling up",
        "series": [
            _series("postwarden_spool_disk_free_bytes", "20e9-1e8x120"),
            _series("postwarden_spool_disk_size_bytes", "100e9x120"),
        ],
        "checks": [("60m", "PostwardenSpoolDiskFillingUp", [{**INST}])],
    },
    {
        "name": "spool disk low but steady",
        "series": [
            _series("postwarden_spool_disk_free_bytes", "20e9x120"),
            _series("postwarden_spool_disk_size_bytes", "100e9x120"),
        ],
        "checks": [("60m", "PostwardenSpoolDiskFillingUp", [])],
    },
    {
        "name": "a worker restarted",
        "series": [_series("postwarden_worker_restarts_total", "0 0 0 1x30")],
        "checks": [
            ("5m", "PostwardenWorkerRestarted", [{**INST}]),
            ("25m", "PostwardenWorkerRestarted", []),  # over after 15 minutes
        ],
    },
    {
        "name": "no worker restarted",
        "series": [_series("postwarden_worker_restarts_total", "0x30")],
        "checks": [("5m", "PostwardenWorkerRestarted", [])],
    },
    {
        "name": "a worker down for 5 minutes",
        "series": [
            _series("postwarden_workers", "4x20"),
            _series("postwarden_workers_alive", "4 4 3x18"),
        ],
        "checks": [("10m", "PostwardenWorkersDown", [{**INST, "value": "3"}])],
    },
    {
        "name": "a worker restarted within a minute",
        "series": [
            _series("postwarden_workers", "4x20"),
            _series("postwarden_workers_alive", "4 4 3 4x17"),
        ],
        "checks": [("10m", "PostwardenWorkersDown", [])],
    },
    {
        "name": "started after an unclean stop",
        "series": [
            _series("postwarden_previous_stop_clean", "0x100"),
            _series("postwarden_start_time_seconds", "0x100"),
        ],
        "checks": [
            ("30m", "PostwardenUncleanRestart", [{**INST}]),
            ("70m", "PostwardenUncleanRestart", []),  # an hour after the start
        ],
    },
    {
        "name": "started after a clean stop",
        "series": [
            _series("postwarden_previous_stop_clean", "1x100"),
            _series("postwarden_start_time_seconds", "0x100"),
        ],
        "checks": [("30m", "PostwardenUncleanRestart", [])],
    },
    {
        "name": "certificate expires in 10 days",
        "series": [
            _series(
                "postwarden_tls_certificate_expiry_timestamp_seconds",
                "864000x60",
                listener="submission",
            ),
            _series(
                "postwarden_tls_certificate_expiry_timestamp_seconds",
                "86400000x60",
                listener="inbound",
            ),
        ],
        "checks": [
            (
                "20m",
                "PostwardenCertificateExpiry",
                [{**INST, "listener": "submission", "value": "9d 23h 40m 0s"}],
            )
        ],
    },
    {
        "name": "certificate expires in 40 days",
        "series": [
            _series(
                "postwarden_tls_certificate_expiry_timestamp_seconds",
                "3456000x60",
                listener="submission",
            ),
        ],
        "checks": [("20m", "PostwardenCertificateExpiry", [])],
    },
    {
        "name": "a worker lost the shaping broker",
        "series": [
            _series("postwarden_workers", "4x10"),
            _series("postwarden_workers_alive", "4x10"),
            _series("postwarden_shaping_broker_connected", "4 4 3x8"),
        ],
        "checks": [
            ("3m", "PostwardenShapingBrokerDisconnected", []),
            ("6m", "PostwardenShapingBrokerDisconnected", [{**INST, "value": "1"}]),
        ],
    },
    {
        "name": "one process has no broker to connect to",
        "series": [
            _series("postwarden_workers", "1x10"),
            _series("postwarden_workers_alive", "1x10"),
            _series("postwarden_shaping_broker_connected", "0x10"),
        ],
        "checks": [("6m", "PostwardenShapingBrokerDisconnected", [])],
    },
]

_LABEL = re.compile(r"\{\{\s*\$labels\.(\w+)\s*\}\}")
_VALUE = re.compile(r"\{\{\s*\$value(\s*\|\s*\w+)?\s*\}\}")


def render(text: str, labels: dict[str, str], value: str | None) -> str:
    """An annotation as Prometheus renders it, for the few template forms ours use:
    ``{{ $labels.NAME }}`` and ``{{ $value }}`` (with a function; the case gives the
    rendered value, which promtool then checks)."""
    if _VALUE.search(text) and value is None:
        raise ValueError(f"a case must give the value rendered in {text!r}")
    text = _LABEL.sub(lambda m: labels.get(m.group(1), ""), text)
    return _VALUE.sub(lambda m: value or "", text)


def alert_rules(path: Path = PROMETHEUS / "alerts.yml") -> dict[str, dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def alert_tests() -> dict[str, Any]:
    rules = alert_rules()
    for fires in (True, False):
        tested = {check[1] for case in CASES for check in case["checks"] if bool(check[2]) == fires}
        untested = sorted(set(rules) - tested)
        if untested:
            what = "fire" if fires else "stay quiet"
            raise ValueError(f"alerts without a case in which they {what}: {untested}")
    groups = []
    for case in CASES:
        checks = []
        for at, name, fired in case["checks"]:
            rule = rules[name]
            exp = []
            for want in fired:
                labels = {k: v for k, v in want.items() if k != "value"}
                exp_labels = {**rule.get("labels", {}), **labels}
                exp.append(
                    {
                        "exp_labels": exp_labels,
                        "exp_annotations": {
                            k: render(v, labels, want.get("value"))
                            for k, v in rule.get("annotations", {}).items()
                        },
                    }
                )
            checks.append({"eval_time": at, "alertname": name, "exp_alerts": exp})
        groups.append(
            {
                "name": case["name"],
                "interval": case.get("interval", "1m"),
                "input_series": case["series"],
                "alert_rule_test": checks,
            }
        )
    return {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": groups}


# ---------------------------------------------------------------------------- output

_TEST_HEADER = (
    "# promtool unit tests of alerts.yml: `promtool test rules alerts_test.yml`.\n"
    "# Generated by dashboards/generate.py (the cases are there): edit that, not this file.\n"
)


def outputs() -> dict[Path, str]:
    files = {
        GRAFANA / name: json.dumps(board, indent=2, ensure_ascii=False) + "\n"
        for name, board in dashboards().items()
    }
    files[PROMETHEUS / "alerts_test.yml"] = _TEST_HEADER + yaml.safe_dump(
        alert_tests(), sort_keys=False, allow_unicode=True, width=100
    )
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    extra = [p for p in GRAFANA.glob("*.json") if p not in set(outputs())]
    for path in stale:
        what = "differs from its generated text" if args.check else "written"
        print(f"{path.relative_to(HERE.parent)}: {what}", file=sys.stderr)
    for path in extra:
        print(f"{path.relative_to(HERE.parent)}: not generated by this script", file=sys.stderr)
    return 1 if args.check and (stale or extra) else 0


if __name__ == "__main__":
    sys.exit(main())
