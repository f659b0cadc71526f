"""Issue 24's metrics on the appliance alone (no supervisor: server.workers = 1), read
through real scrapes of /metrics: delivery attempts and connections by provider site
and TLS, after deliveries to the lab's sinks; HTTP requests by route template; the
queue's oldest recipient; the event loop's lag; the process, the spool's disk, the
certificate, the appliance's start and its workers."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
from prometheus_client.parser import text_string_to_metric_families

from postwarden.lab import Lab
from postwarden.queue.gauges import update_gauges
from postwarden.tls import certificate_expiry, ensure_tls_files
from tests.waiting import eventually

RULES = """
[sites.labone]
mx_suffixes = ["mx1.lab.test"]
"""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by name and labels (prometheus-client's parser)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


async def scrape(app: Any) -> str:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get("http://{}:{}/metrics".format(*app.control_address))
    assert r.status_code == 200
    return r.text


async def send(app: Any, rcpts: list[str]) -> None:
    host, port = app.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        for rcpt in rcpts:
            await smtp.sendmail("a@sender.test", [rcpt], b"Subject: m\r\n\r\nx\r\n")


async def test_attempts_and_connections_by_site_and_tls(
    appliance: Any, lab: Lab, tmp_path: Path
) -> None:
    # labone: the rules name mx1 (sink 0), which offers STARTTLS; mx2 (sink 1) is no
    # named site (other), and delivery's policy keeps TLS off for its domain.
    lab.add_domain("one.test", hosts=[0])
    lab.add_domain("grey.test", hosts=[0], behaviour="tempfail")
    lab.add_domain("plain.test", hosts=[1])
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    app = await appliance(
        {
            "shaping": {"rules_file": str(rules)},
            "delivery": {"tls_policies": {"plain.test": "disabled"}},
            "queue": {"retry_initial": "1h", "retry_max": "1h"},
        }
    )
    text = await scrape(app)
    # Every site the rules name (the defaults' too) and other exist before traffic.
    for site in ("labone", "gmail", "other"):
        for result in ("delivered", "temporary", "permanent"):
            assert value(text, "postwarden_delivery_attempts_total", result=result, site=site) == 0
        for tls in ("yes", "no"):
            assert value(text, "postwarden_delivery_connections_total", site=site, tls=tls) == 0

    await send(app, ["r1@one.test", "r2@one.test", "r3@plain.test", "r4@grey.test"])
    await eventually(lambda: len(lab.messages) == 3, what="three deliveries")

    def attempts(text: str, result: str, site: str) -> float | None:
        return value(text, "postwarden_delivery_attempts_total", result=result, site=site)

    async def settled() -> str | None:
        text = await scrape(app)
        done = attempts(text, "temporary", "labone") == 1 and (
            (attempts(text, "delivered", "labone") or 0)
            + (attempts(text, "delivered", "other") or 0)
            == 3
        )
        return text if done else None

    text = await eventually(settled, what="three deliveries and one deferral counted")
    assert attempts(text, "delivered", "labone") == 2
    assert attempts(text, "delivered", "other") == 1
    assert attempts(text, "temporary", "other") == 0
    conns = {
        (site, tls): value(text, "postwarden_delivery_connections_total", site=site, tls=tls)
        for site in ("labone", "other")
        for tls in ("yes", "no")
    }
    # one.test's two messages may share a connection or not; grey.test's is its own.
    assert 2 <= (conns["labone", "yes"] or 0) <= 3, conns
    assert conns["labone", "no"] == 0 and conns["other", "yes"] == 0, conns
    assert conns["other", "no"] == 1, conns
    assert {m.tls for m in lab.messages if "r3@plain.test" in m.rcpt_tos} == {False}
    # Bounded labels: no MX host or recipient domain in the site label.
    assert "mx2.lab.test" not in text and "plain.test" not in text

    # The deferred recipient is the oldest deferred one (its age from acceptance).
    accepted = time.time()
    await update_gauges(app.spool, app.metrics)
    text = await scrape(app)
    age = value(text, "postwarden_queue_oldest_seconds", state="deferred")
    assert age is not None and 0 < age < time.time() - accepted + 30
    assert value(text, "postwarden_queue_oldest_seconds", state="queued") == 0


async def test_http_requests_by_route_template(appliance: Any) -> None:
    app = await appliance()
    base = "http://{}:{}".format(*app.control_address)
    async with httpx.AsyncClient(timeout=10) as c:
        for _ in range(3):
            assert (await c.get(f"{base}/v1/campaigns/4242")).status_code == 401
        assert (await c.get(f"{base}/v1/campaigns/4343")).status_code == 401
        assert (await c.get(f"{base}/no/such/path-9876")).status_code == 404
        assert (await c.delete(f"{base}/healthz")).status_code == 405
        assert (await c.get(f"{base}/t/o/not-a-token-5555")).status_code == 404
        assert (await c.get(f"{base}/healthz")).status_code == 200
        assert (await c.request("BREW", f"{base}/healthz")).status_code == 405
    text = await scrape(app)

    def requests(route: str, method: str, status: str) -> float | None:
        return value(
            text, "postwarden_http_requests_total", route=route, method=method, status=status
        )

    assert requests("/v1/campaigns/{campaign_id}", "GET", "4xx") == 4
    assert requests("other", "GET", "4xx") == 1
    assert requests("/healthz", "DELETE", "4xx") == 1
    assert requests("/healthz", "other", "4xx") == 1  # methods are a bounded set
    assert requests("/healthz", "GET", "2xx") == 1
    assert requests("/t/o/{token}", "GET", "4xx") == 1  # the public tracking routes count
    count = value(
        text, "postwarden_http_request_seconds_count", route="/v1/campaigns/{campaign_id}"
    )
    assert count == 4
    # Templates only: no id, token or raw path in a label (the values are numbers that
    # may hold these digits: only the labels are looked at).
    labels = " ".join(re.findall(r"\{[^}]*\}", text))
    assert "/v1/campaigns/{campaign_id}" in labels
    for raw in ("4242", "4343", "9876", "5555", "BREW"):
        assert raw not in labels


async def test_process_disk_certificate_and_start(appliance: Any, tmp_path: Path) -> None:
    before = time.time()
    app = await appliance({"inbound": {"listen": ["127.0.0.1:0"]}})

    async def read() -> str | None:
        text = await scrape(app)
        lag = value(text, "postwarden_event_loop_lag_seconds_count") or 0
        return text if lag >= 2 else None

    text = await eventually(read, what="two loop lag samples")  # 0.5 s apart
    assert (value(text, "postwarden_process_resident_memory_bytes") or 0) > 10 * 2**20
    assert (value(text, "postwarden_process_cpu_seconds_total") or 0) > 0
    assert (value(text, "postwarden_process_open_fds") or 0) > 5
    assert (value(text, "postwarden_process_max_fds") or 0) >= 256
    free = value(text, "postwarden_spool_disk_free_bytes") or 0
    size = value(text, "postwarden_spool_disk_size_bytes") or 0
    assert 0 < free <= size
    cert, _ = ensure_tls_files(app.cfg)
    expiry = value(
        text, "postwarden_tls_certificate_expiry_timestamp_seconds", listener="submission"
    )
    assert expiry == certificate_expiry(cert) and expiry > time.time() + 86400
    # The inbound MX serves the same certificate; the control plane serves no TLS.
    assert (
        value(text, "postwarden_tls_certificate_expiry_timestamp_seconds", listener="inbound")
        == expiry
    )
    assert 'listener="control"' not in text
    assert value(text, "postwarden_workers") == 1
    assert value(text, "postwarden_workers_alive") == 1
    assert value(text, "postwarden_worker_restarts_total") == 0
    started = value(text, "postwarden_start_time_seconds") or 0
    assert before - 1 <= started <= time.time()
    assert value(text, "postwarden_previous_stop_clean") == 1  # a fresh spool
    assert value(text, "postwarden_event_loop_lag_seconds_bucket", le="10.0") == value(
        text, "postwarden_event_loop_lag_seconds_count"
    )
