"""Who reads /metrics, and what its labels show (issue 15, item 8): a bearer token
(compared in constant time), a listener of its own (metrics.listen), with one process
and with a supervisor's workers; sending domains (tenants' names) stay out of label
values unless metrics.tenant_labels is on."""

from __future__ import annotations

import asyncio
import hashlib
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from postwarden.lab import Lab
from tests.conftest import config_cli, free_port
from tests.queue.test_durability import serve

TOKEN = "s3cret-metrics-token"


async def get(url: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=30) as c:
        return await c.get(url, headers=headers)


async def test_separate_listener_and_token(appliance: Any, tmp_path: Path) -> None:
    token_file = tmp_path / "metrics.token"
    token_file.write_text(TOKEN + "\n")
    app = await appliance(
        {"metrics": {"listen": "127.0.0.1:0", "bearer_token_file": str(token_file)}}
    )
    control = "http://{}:{}".format(*app.control_address)
    metrics = "http://{}:{}/metrics".format(*app.metrics_address)
    assert (await get(f"{control}/metrics", TOKEN)).status_code == 404
    assert (await get(f"{control}/healthz")).status_code == 200
    r = await get(metrics)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "unauthorized"
    assert (await get(metrics, "wrong")).status_code == 401
    assert (await get(metrics, TOKEN + "x")).status_code == 401
    r = await get(metrics, TOKEN)
    assert r.status_code == 200 and "postwarden_messages_received" in r.text


async def test_token_hash_on_the_control_listener(appliance: Any) -> None:
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    app = await appliance({"metrics": {"bearer_token_sha256": digest}})
    url = "http://{}:{}/metrics".format(*app.control_address)
    assert (await get(url)).status_code == 401
    assert (await get(url, TOKEN)).status_code == 200


@pytest.mark.parametrize("opt_in", [False, True])
async def test_sending_domains_stay_out_of_labels(appliance: Any, opt_in: bool) -> None:
    app = await appliance({"metrics": {"tenant_labels": opt_in}})
    for target, name in (("domain", "secret-tenant.test"), ("source", "default")):
        app.shaping.command(
            {"op": "warming_start", "target": target, "name": name, "plan": "conservative"}
        )
    app.shaping.update_metrics(app.shaping.metrics)
    text = (await get("http://{}:{}/metrics".format(*app.control_address))).text
    assert 'postwarden_warming_cap{key="source:default"}' in text
    assert ("secret-tenant.test" in text) is opt_in


@pytest.mark.long
async def test_workers_serve_the_separate_listener(
    tmp_path: Path, lab: Lab, subprocess_config: Any
) -> None:
    mport = free_port()
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    config, port = subprocess_config(
        {
            "server": {"workers": 2},
            "metrics": {"listen": f"127.0.0.1:{mport}", "bearer_token_sha256": digest},
        }
    )
    control = tomllib.loads(config.read_text())["control"]["listen"]
    async with serve([], config, port, tmp_path / "serve.log"):
        # The port answers before the supervisor's broker listens: retried until it does.
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            code, out = await config_cli(
                config, "warming", "start", "--domain", "secret-tenant.test", "--plan",
                "conservative",
            )  # fmt: skip
            if code == 0 or "is not running here" not in out:
                break
            assert asyncio.get_running_loop().time() < deadline, out
            await asyncio.sleep(0.1)
        assert code == 0, out
        code, out = await config_cli(
            config, "warming", "start", "--source", "default", "--plan", "conservative"
        )
        assert code == 0, out
        url = f"http://127.0.0.1:{mport}/metrics"
        while True:  # the broker's gauges are refreshed every couple of seconds
            r = await get(url, TOKEN)
            assert r.status_code == 200, r.text
            if 'postwarden_warming_cap{key="source:default"}' in r.text:
                break
            await asyncio.sleep(0.2)
        assert "secret-tenant.test" not in r.text
        assert "postwarden_messages_received" in r.text  # the workers' sum
        for _ in range(4):  # whichever worker accepts, the token holds
            assert (await get(url)).status_code == 401
        assert (await get(f"http://{control}/metrics", TOKEN)).status_code == 404
        assert (await get(f"http://{control}/healthz")).status_code == 200


async def test_no_created_series(appliance: Any) -> None:
    """Issue 16, item 8c: no ``_created`` series (one more per counter and label set,
    as most exporters leave out); the counters themselves are there. The separate
    listener (metrics.listen) answers with a request id too."""
    app = await appliance({"metrics": {"listen": "127.0.0.1:0"}})
    r = await get("http://{}:{}/metrics".format(*app.metrics_address))
    assert r.status_code == 200 and len(r.headers["x-request-id"]) == 16
    lines = r.text.splitlines()
    created = [x for x in lines if "_created" in x]
    assert not created, created[:5]
    assert "# TYPE postwarden_recipients_received_total counter" in lines
    assert "postwarden_recipients_received_total 0.0" in lines
    assert any(x.startswith("postwarden_acceptance_seconds_count") for x in lines)
    r = await get("http://{}:{}/nowhere".format(*app.metrics_address))
    assert r.status_code == 404 and r.json()["error"]["request_id"] == r.headers["x-request-id"]
