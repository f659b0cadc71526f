"""The Grafana dashboards and the Prometheus rules in dashboards/ (issue 24).

* the checked-in files are what dashboards/generate.py writes;
* the dashboards' structure (Grafana itself is not in Debian): ids, grid, datasource
  variable on every panel and query, every variable defined;
* promtool: the rules and the example scrape config check, the unit tests of every
  alert pass (each fires when it should and not when it should not);
* each alert's runbook is in docs/operations.md, "Dashboards and alerts";
* a real Prometheus scrapes ``postwarden serve`` (2 workers) under lab load, with the
  rule file loaded: every expression of a panel, variable, recording rule and alert
  returns data through its HTTP API (tests/dashboards/promql.py says what that
  means), and a typo in a metric, a label or a legend makes that check fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from postwarden.lab import Lab
from tests.conftest import free_port
from tests.dashboards.promql import (
    Checker,
    expressions,
    grouping_labels,
    is_literal,
    selectors,
    top_level_parts,
)
from tests.peers import require_binary
from tests.queue.test_durability import serve
from tests.shaping.test_lab_shaping import send
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
RULES = DASHBOARDS / "prometheus" / "alerts.yml"
OPERATIONS = ROOT / "docs" / "operations.md"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def boards() -> dict[str, dict[str, Any]]:
    return {
        p.name: json.loads(p.read_text()) for p in sorted((DASHBOARDS / "grafana").glob("*.json"))
    }


def rules() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return doc


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rules()["groups"] for r in g["rules"] if "alert" in r}


# --------------------------------------------------------------------------- static


def test_checked_in_files_are_the_generators_output() -> None:
    expected = generator().outputs()
    assert {p.name for p in (DASHBOARDS / "grafana").glob("*.json")} == {
        p.name for p in expected if p.suffix == ".json"
    }
    for path, text in expected.items():
        assert path.read_text() == text, f"{path}: run .venv/bin/python dashboards/generate.py"


@pytest.mark.parametrize("name", sorted(boards()))
def test_dashboard_structure(name: str) -> None:
    board = boards()[name]
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    assert "postwarden" in board["tags"]
    variables = board["templating"]["list"]
    names = [v["name"] for v in variables]
    assert len(names) == len(set(names))
    ds = variables[0]
    assert (ds["name"], ds["type"], ds["query"]) == ("datasource", "datasource", "prometheus")
    for v in variables[1:]:
        assert v["type"] == "query" and v["datasource"] == {
            "type": "prometheus",
            "uid": "${datasource}",
        }
        assert v["query"]["query"].startswith("label_values(")
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["w"] >= 1 and g["h"] >= 1 and g["x"] >= 0 and g["y"] >= 0, panel["title"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["description"], panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for t in panel["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            used = set(re.findall(r"\$\{?(\w+)", t["expr"])) - {"__rate_interval"}
            assert used <= set(names), f"{panel['title']}: undefined {used - set(names)}"
            # Every selector is scoped to the appliances picked.
            for sel in selectors(t["expr"]):
                assert 'instance=~"$instance"' in sel, f"{panel['title']}: {sel}"
    # The rows follow one another from the top, none left empty at the end.
    assert board["panels"][0]["gridPos"]["y"] == 0
    assert board["panels"][-1]["type"] != "row"


def test_every_area_of_the_issue_has_its_dashboard() -> None:
    text = json.dumps(boards())
    for metric in (
        # ingress, queue, delivery, warming, bounces, control plane, process health
        "postwarden_smtp_rejected_total",
        "postwarden_acceptance_seconds_bucket",
        "postwarden_queue_oldest_seconds",
        "postwarden_scheduler_inflight",
        "postwarden_delivery_connections_total",
        "postwarden_shaping_suspended",
        "postwarden_shaping_rate_per_minute",
        "postwarden_warming_cap",
        "postwarden_health_score",
        "postwarden_bounce_categories_total",
        "instance:postwarden_complaint_rate:ratio_rate24h",
        "postwarden_http_request_seconds_bucket",
        "postwarden_event_loop_lag_seconds_bucket",
        "postwarden_process_open_fds",
        "postwarden_worker_restarts_total",
    ):
        assert metric in text, metric


def test_provisioning_files() -> None:
    prov = DASHBOARDS / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "postwarden.yml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    dash = yaml.safe_load((prov / "dashboards" / "postwarden.yml").read_text())
    assert dash["apiVersion"] == 1
    provider = dash["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_promql_lexer_splits_alerts_at_their_thresholds() -> None:
    expr = (
        "instance:postwarden_delivered:rate5m < 0.8 * sum by (instance) "
        '(rate(postwarden_recipients_delivered_total[1h])) and on (instance) x{a="b>c"} > bool 0'
    )
    assert top_level_parts(expr) == [
        "instance:postwarden_delivered:rate5m",
        "0.8 * sum by (instance) (rate(postwarden_recipients_delivered_total[1h]))",
        'x{a="b>c"}',
        "0",
    ]
    assert selectors(expr) == [
        "instance:postwarden_delivered:rate5m",
        "postwarden_recipients_delivered_total",
        'x{a="b>c"}',
    ]
    assert grouping_labels(expr) == {"instance"}
    assert is_literal("14 * 86400") and not is_literal("time() - x")


def test_promtool_checks_the_rules_and_runs_their_unit_tests(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    prom = DASHBOARDS / "prometheus"
    run = subprocess.run(
        [promtool, "check", "rules", "--lint=all", "--lint-fatal", str(RULES)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    run = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=prom, capture_output=True, text=True
    )
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr
    # Every alert is tested firing (the generator refuses otherwise) and quiet.
    tests = yaml.safe_load((prom / "alerts_test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for t in tests for c in t["alert_rule_test"] if not c["exp_alerts"]}
    assert fired == quiet == set(alerts())
    # The example scrape config, with its token file where a test may write it.
    token = tmp_path / "postwarden.token"
    token.write_text("secret\n")
    config = (prom / "prometheus.yml").read_text()
    assert "/etc/prometheus/postwarden.token" in config
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/postwarden.token", str(token))
    )
    shutil.copy(RULES, tmp_path / "alerts.yml")
    run = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_each_alert_has_its_runbook_in_the_docs() -> None:
    docs = OPERATIONS.read_text()
    section = docs[docs.index("## Dashboards and alerts") :]
    section = section[: section.find("\n## ", 1)]
    flat = " ".join(section.split())
    for name, rule in alerts().items():
        ann = rule["annotations"]
        assert ann.get("summary") and ann.get("description") and ann.get("runbook"), name
        assert rule["labels"]["severity"] in ("page", "warning"), name
        assert f"\n#### {name}\n" in section, f"{name}: no heading in docs/operations.md"
        assert " ".join(ann["runbook"].split()) in flat, f"{name}: runbook differs from the docs"


# ------------------------------------------------------------------ real Prometheus

SRC_A, SRC_B = "127.0.2.1", "127.0.2.2"
SHAPING_RULES = """\
[sites.lab]
mx_suffixes = ["lab.test"]
"""


@contextlib.contextmanager
def prometheus(
    tmp_path: Path, target: str, token: Path
) -> Iterator[tuple[str, Callable[[], Awaitable[bool]]]]:
    """A Prometheus on loopback scraping ``target`` every second, with our rules
    evaluated every second; yields its base URL and a check that it is ready (which
    fails with its log if it exited); stopped (by its PID) on exit."""
    binary = require_binary("prometheus")
    home = tmp_path / "prometheus"
    home.mkdir()
    shutil.copy(RULES, home / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {
                "job_name": "postwarden",
                "metrics_path": "/metrics",
                "authorization": {"type": "Bearer", "credentials_file": str(token)},
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (home / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={home / 'prometheus.yml'}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        if proc.poll() is not None:
            log = (home / "prometheus.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log}")
        async with httpx.AsyncClient(timeout=2) as c:
            try:
                return (await c.get(f"{url}/-/ready")).status_code == 200
            except httpx.HTTPError:
                return False

    try:
        yield url, ready
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def instant(c: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    body = (await c.get("/api/v1/query", params={"query": expr})).json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


# The moves the load must have made before every expression can return data: a
# counter's label set exists only once counted (bounce categories, HTTP routes,
# response-rule actions), and a ratio needs its counters to have moved.
MOVED = (
    'sum(postwarden_delivery_attempts_total{result="delivered", site="lab"}) > 0',
    'sum(postwarden_delivery_attempts_total{result="delivered", site="other"}) > 0',
    'sum(postwarden_delivery_attempts_total{result="temporary"}) > 0',
    'sum(postwarden_delivery_attempts_total{result="permanent"}) > 0',
    'sum(postwarden_delivery_connections_total{tls="yes"}) > 0',
    'sum(postwarden_delivery_connections_total{tls="no"}) > 0',
    "sum(postwarden_bounce_categories_total) > 0",
    "sum(postwarden_shaping_actions_total) > 0",
    'sum(postwarden_http_requests_total{status="4xx"}) > 0',
    "count(postwarden_warming_day) > 0",
    'count(postwarden_tls_certificate_expiry_timestamp_seconds{listener="inbound"}) > 0',
    # rate() over the checker's 10 s window needs two samples after the load
    "count(count_over_time(postwarden_recipients_delivered_total[10s]) >= 3) > 0",
)

# Typos a review might miss, each in a copy of one file: (file, text, replacement).
MUTATIONS = (
    ("queue.json", "postwarden_queue_oldest_seconds{", "postwarden_queue_oldest_second{"),
    ("delivery.json", "sum by (site) (rate(", "sum by (sites) (rate("),
    ("delivery.json", 'result=\\"delivered\\"', 'result=\\"delivred\\"'),
    ("ingress.json", '"legendFormat": "{{reason}}"', '"legendFormat": "{{reasons}}"'),
    ("control.json", ", route)", ", routes)"),  # a variable's label
    (
        "process.json",
        "postwarden_event_loop_lag_seconds_bucket",
        "postwarden_event_loop_lag_bucket",
    ),
    ("alerts.yml", 'outcome="complaint"', 'outcome="complaints"'),
    ("alerts.yml", "postwarden_workers_alive - ", "postwarden_worker_alive - "),
    (
        "alerts.yml",
        "(postwarden_queue_oldest_seconds{state=",
        "(postwarden_queue_oldest_seconds{stat=",
    ),
)


def mutated(file: str, old: str, new: str) -> tuple[dict[str, Any], dict[str, Any]]:
    dashboards, rule_text = boards(), RULES.read_text()
    if file == "alerts.yml":
        assert old in rule_text, old
        return dashboards, yaml.safe_load(rule_text.replace(old, new, 1))
    text = json.dumps(dashboards[file], indent=2)
    assert old in text, old
    return {**copy.deepcopy(dashboards), file: json.loads(text.replace(old, new, 1))}, rules()


@pytest.mark.serial  # a load and Prometheus's 1 s scrapes against a deadline
@pytest.mark.long(30)
async def test_every_query_returns_data_from_a_real_prometheus(
    tmp_path: Path, lab: Lab, subprocess_config: Any
) -> None:
    require_binary("prometheus")
    # The lab: a site "lab" (mx1, mx2 of lab.test, with STARTTLS) and one the rules do
    # not name ("other": mx3 under another name, without STARTTLS); recipients
    # accepted, deferred (451), refused (550) and answered "too many connections"
    # (421: the shipped response rule lowers the connections).
    lab.add_domain("inbox.test", hosts=[0])
    lab.add_domain("full.test", "tempfail", hosts=[1])
    lab.add_domain("nouser.test", "reject", hosts=[0])
    lab.add_domain("busy.test", "disconnect", hosts=[1])
    lab.sinks[2].tls = False
    await lab.sinks[2].apply()
    lab.dns.add("mx.plain.test", "A", lab.sinks[2].host)
    lab.dns.add("plain.test", "MX", "10 mx.plain.test.")
    rules_file = tmp_path / "shaping.toml"
    rules_file.write_text(SHAPING_RULES)
    token = tmp_path / "metrics.token"
    token.write_text("s3cret-scrape-token\n")
    inbound = free_port()
    config, port = subprocess_config(
        {
            "server": {"workers": 2},
            "sources": [
                {"name": "a", "address": SRC_A, "ehlo": "a.out.test"},
                {"name": "b", "address": SRC_B, "ehlo": "b.out.test", "state": "warming"},
            ],
            "pools": [
                {
                    "name": "default",
                    "overflow": "spill",
                    "members": [{"source": "a", "weight": 1}, {"source": "b", "weight": 1}],
                }
            ],
            "shaping": {"rules_file": str(rules_file)},
            "inbound": {"listen": [f"127.0.0.1:{inbound}"], "domains": ["fbl.test"]},
            "metrics": {"bearer_token_file": str(token)},
        }
    )
    control = tomllib.loads(config.read_text())["control"]["listen"]
    async with serve([], config, port, tmp_path / "serve.log"):
        with prometheus(tmp_path, control, token) as (url, ready):
            await eventually(ready, 30, "Prometheus ready")
            rcpts = (
                [f"r{i}@inbox.test" for i in range(12)]
                + [f"p{i}@plain.test" for i in range(6)]
                + [f"f{i}@full.test" for i in range(3)]
                + [f"n{i}@nouser.test" for i in range(3)]
                + [f"b{i}@busy.test" for i in range(3)]
            )
            await send(port, rcpts, 4)
            async with httpx.AsyncClient(base_url=f"http://{control}", timeout=10) as api:
                for path, status in (
                    ("/healthz", 200),
                    ("/v1/tenants", 401),
                    ("/v1/campaigns/42", 401),
                    ("/no/such/route", 404),
                    ("/metrics", 401),  # no token
                ):
                    assert (await api.get(path)).status_code == status, path
            async with httpx.AsyncClient(base_url=url, timeout=10) as prom:

                async def targets_up() -> bool:
                    body = (await prom.get("/api/v1/targets")).json()
                    active = body["data"]["activeTargets"]
                    return bool(active) and all(t["health"] == "up" for t in active)

                await eventually(targets_up, 30, "the scrape to succeed (bearer token)")
                for expr in MOVED:
                    await eventually(lambda e=expr: instant(prom, e), 60, expr)
                body = (await prom.get("/api/v1/rules")).json()
                loaded = [r for g in body["data"]["groups"] for r in g["rules"]]
                assert len(loaded) == sum(len(g["rules"]) for g in rules()["groups"])
                assert all(r["health"] == "ok" for r in loaded), [
                    (r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"
                ]

            with httpx.Client(base_url=url, timeout=10) as client:
                src = expressions(boards(), rules())
                assert len(src.expressions) > 100  # panels, variables, rules: all of them
                checker = Checker(client)
                problems: list[str] = []

                async def clean() -> bool:
                    # Afresh each time: the recording rules' series appear at their
                    # first evaluation, the load's last counts at the next scrape.
                    nonlocal checker, problems
                    checker = Checker(client)
                    problems = await asyncio.to_thread(checker.check, src)
                    return not problems

                with contextlib.suppress(AssertionError):
                    await eventually(clean, 15, "every expression to return data", interval=1)
                assert problems == [], "\n".join(problems)
                # The variables took the label values the load made.
                values, _ = checker.variable_values(src, "delivery.json")
                assert {"lab", "other"} <= set(values["site"].strip("()").split("|"))
                assert values["source"] == "(a|b)"
                values, _ = checker.variable_values(src, "warming.json")
                assert values["key"] == "(source:b)"
                # Each typo makes the check fail, naming the file it is in.
                for file, old, new in MUTATIONS:
                    dashboards, rule_doc = mutated(file, old, new)
                    found = await asyncio.to_thread(
                        checker.check, expressions(dashboards, rule_doc)
                    )
                    assert found and all(p.startswith(file) for p in found), (file, new, found)
