"""Split deployment: `serve --role mta` and `serve --role control` on one database.
The control process takes API messages and relays them to the MTA over SMTP with the
caller's key; the MTA signs, spools and delivers; the API follows them to delivery."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx

from postwarden.lab import Lab
from tests.conftest import free_port, tenant_key_via_cli, write_toml
from tests.queue.test_durability import serve


async def test_control_role_relays_to_the_mta_role(
    tmp_path: Path, lab: Lab, subprocess_config: Callable[..., tuple[Path, int]]
) -> None:
    lab.add_domain("inbox.test")
    mta_cfg, smtp_port = subprocess_config({"server": {"workers": 1}})
    data = tomllib.loads(mta_cfg.read_text())
    ctl_port = free_port()
    data["control"]["listen"] = f"127.0.0.1:{ctl_port}"
    data["control"]["submit_to"] = f"127.0.0.1:{smtp_port}"
    # The MTA's self-signed certificate (made when it starts) is what the relay trusts.
    spool_parent = Path(data["spool"]["path"]).resolve().parent
    data["control"]["submit_ca_file"] = str(spool_parent / "tls" / "selfsigned.crt")
    ctl_cfg = write_toml(tmp_path / "control.toml", data)
    mta_http = f"http://{tomllib.loads(mta_cfg.read_text())['control']['listen']}"
    ctl_http = f"http://127.0.0.1:{ctl_port}"
    async with (
        serve([], mta_cfg, smtp_port, tmp_path / "mta.log", "--role", "mta"),
        serve([], ctl_cfg, ctl_port, tmp_path / "control.log", "--role", "control"),
    ):
        key = await tenant_key_via_cli(ctl_cfg, ctl_http)
        auth = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=ctl_http, timeout=30, headers=auth) as c:
            d = (await c.post("/v1/domains", json={"name": "acme.test"})).json()
            for rec in d["records"]:
                lab.dns.remove(rec["name"], rec["type"])
                lab.dns.add(rec["name"], rec["type"], rec["value"])
            assert (await c.post(f"/v1/domains/{d['id']}/verify")).json()["verified"]
            r = await c.post("/v1/suppressions", json={"address": "no@inbox.test"})
            assert r.status_code == 201
            # The MTA's change feed (keys and the suppression). The MTA is another process
            # that shows no sign of having read it, and a probe message would change what
            # is asserted below: a fixed wait of several polls (0.2 s each here).
            await asyncio.sleep(1.0)
            r = await c.post(
                "/v1/messages",
                json={
                    "from": "shop@acme.test",
                    "to": ["ann@inbox.test", "no@inbox.test"],
                    "subject": "split",
                    "text": "relayed",
                    "tags": ["split"],
                    "metadata": {"k": "v"},
                },
            )
            assert r.status_code == 202, r.text
            sent = r.json()
            got = {x["email"]: x for x in sent["recipients"]}
            assert got["no@inbox.test"]["status"] == "dropped"
            assert got["no@inbox.test"]["reason"] == "manual"
            assert got["ann@inbox.test"]["status"] == "queued"
            for _ in range(150):
                m = (await c.get(f"/v1/messages/{sent['id']}")).json()
                states = {x["email"]: x["state"] for x in m.get("recipients", [])}
                if states.get("ann@inbox.test") == "delivered":
                    break
                await asyncio.sleep(0.1)
            assert states == {"ann@inbox.test": "delivered", "no@inbox.test": "dropped"}, m
            assert m["tags"] == ["split"] and m["metadata"] == {"k": "v"} and m["source"] == "api"
            assert {x["id"] for x in m["recipients"]} == {x["id"] for x in sent["recipients"]}
            # A From outside the tenant's verified domains is refused by the MTA too.
            r = await c.post(
                "/v1/messages",
                json={"from": "x@other.test", "to": ["a@inbox.test"], "subject": "s", "text": "t"},
            )
            assert r.status_code == 422
            # The control process exports its own requests by route and its readings.
            text = (await c.get("/metrics")).text
        posts = 'postwarden_http_requests_total{method="POST",route="/v1/messages",status="%s"}'
        counted = [x for x in text.splitlines() if "http_requests_total" in x]
        assert posts % "2xx" + " 1.0" in counted and posts % "4xx" + " 1.0" in counted, counted
        rss = [x for x in text.splitlines() if x.startswith("postwarden_process_resident_memory")]
        assert rss and float(rss[0].split()[-1]) > 1e6, rss
        msgs = await lab.wait_for_messages(1)
        assert msgs[0].rcpt_tos == ["ann@inbox.test"]
        assert b"X-Postwarden-Meta" not in msgs[0].data and b"d=acme.test" in msgs[0].data
        # The MTA role serves health and metrics, not the API.
        async with httpx.AsyncClient(base_url=mta_http, headers=auth) as c:
            assert (await c.get("/v1/domains")).status_code == 404
            assert (await c.get("/metrics")).status_code == 200


async def test_relay_checks_the_mta_certificate(appliance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Negative control for submit_ca_file: a certificate the MTA does not have fails
    the relay before any credentials are sent."""
    import dataclasses

    import pytest

    from postwarden.control.relay import Credentials, RelayError, SmtpRelay
    from postwarden.tls import self_signed
    from postwarden.values import Envelope

    app = await appliance()
    host, port = app.smtp_addresses[0]
    other, _ = self_signed(["elsewhere.test"], [])
    (tmp_path / "other.crt").write_bytes(other)
    cfg = dataclasses.replace(
        app.cfg,
        control=dataclasses.replace(
            app.cfg.control, submit_to=f"{host}:{port}", submit_ca_file=str(tmp_path / "other.crt")
        ),
    )
    relay = SmtpRelay(cfg)
    env = Envelope("a@acme.test", ["u@inbox.test"], meta={})
    with pytest.raises(RelayError, match=r"(?i)certificate verify failed"):
        await relay.inject(env, b"Subject: x\r\n\r\nx\r\n", "id", Credentials("acme", "pw_x"))
