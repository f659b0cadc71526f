"""``postwarden lab`` / ``make run``: the appliance delivering into the simulated internet.

Starts the lab (an authoritative DNS server on a fixed port, 127.0.0.1:10053 unless
``--dns`` says otherwise, and sink MX hosts on 127.0.1.x), points the appliance's
resolver and MX port at it, signs as ``demo.lab.test`` with generated DKIM keys
published in the lab DNS, publishes the records of every sending domain made through
the API there too (:mod:`postwarden.lab.publish`), sends demo messages through the
submission port, and prints every message the lab's MX hosts receive with its DKIM
verdict. Nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
from dkim.util import parse_tag_value

from postwarden.appliance import Appliance
from postwarden.config import Config, load_config
from postwarden.dns.resolver import DnsError, Resolver
from postwarden.lab import Lab
from postwarden.lab.inbox_http import inbox_routes
from postwarden.lab.publish import DomainPublisher
from postwarden.mta.dkim import generate_key, load_key
from postwarden.supervisor import check_files

DEMO_DOMAIN = "demo.lab.test"
API_DOMAIN = "shop.lab.test"  # a sending domain made through the API by the demo
SELECTORS = {"rsa-sha256": "lab-rsa", "ed25519-sha256": "lab-ed"}
#: Where ``postwarden lab`` serves its DNS: fixed, so that ``dig @127.0.0.1 -p 10053``
#: finds it run after run (tests' labs take random free ports instead).
DEFAULT_DNS = "127.0.0.1:10053"


def _say(text: str) -> None:
    print(text, flush=True)


def lab_dkim_keys(var_dir: Path) -> list[dict[str, str]]:
    """Generate (once) the demo domain's RSA and Ed25519 keys under ``var_dir/dkim``."""
    keydir = var_dir / "dkim"
    keydir.mkdir(parents=True, exist_ok=True)
    out = []
    for algorithm, selector in SELECTORS.items():
        path = keydir / f"{selector}.pem"
        if not path.exists():
            path.write_bytes(generate_key(algorithm))  # type: ignore[arg-type]
            path.chmod(0o600)
        out.append(
            {
                "domain": DEMO_DOMAIN,
                "selector": selector,
                "key_file": str(path),
                "algorithm": algorithm,
            }
        )
    return out


#: What the lab lets delivery connect to: its sinks (127.0.1.x) and test peers on loopback.
LAB_NETWORKS = ["127.0.0.0/8"]


def lab_config(config_path: str | None, lab: Lab, var_dir: Path) -> Config:
    """The user's config (or defaults) with the resolver and MX port aimed at the lab.

    The spool stays where the config puts it (``./var/spool`` by default), so the
    queue and events commands find it without options.
    """
    keys = lab_dkim_keys(var_dir)
    overrides: dict[str, Any] = {
        "dns": {"nameservers": [lab.nameserver]},
        # The lab's MX hosts live on loopback, which delivery refuses unless allowed.
        "delivery": {"mx_port": lab.mx_port, "allowed_private_networks": LAB_NETWORKS},
        "dkim": {"keys": keys},
        # The lab is for trying things out: bring the control database up to date.
        "database": {"auto_upgrade": True},
        # Short retries so greylisting visibly resolves within the demo.
        "queue": {"retry_initial": "10s", "retry_max": "60s"},
    }
    cfg = load_config(config_path, overrides=overrides)
    if not cfg.inbound.listen:
        # The inbound MX, so that the demo can return a bounce to a return path.
        overrides["inbound"] = {"listen": ["127.0.0.1:0"]}
        cfg = load_config(config_path, overrides=overrides)
    return check_files(cfg)  # the rules and patterns files, as serve checks them


def publish_keys(lab: Lab, cfg: Config) -> None:
    for k in cfg.dkim.keys:
        key = load_key(k.domain, k.selector, k.key_file, k.algorithm)
        lab.dns.add(f"{k.selector}._domainkey.{k.domain}", "TXT", key.public_txt(), ttl=300)


async def dkim_verdicts(message: bytes, resolver: Resolver) -> list[str]:
    """``["pass rsa-sha256 d=demo.lab.test", ...]`` for each signature, keys via the lab DNS."""
    verdicts = []
    try:
        headers = dkim.DKIM(message).headers
    except dkim.DKIMException as exc:
        return [f"FAIL unparsable message: {exc}"]
    sigs = [value for name, value in headers if name.lower() == b"dkim-signature"]
    for i, value in enumerate(sigs):
        try:
            tags = {k.decode(): v.decode() for k, v in parse_tag_value(value).items()}
        except Exception:
            verdicts.append("FAIL unparsable signature")
            continue
        try:
            txt = "".join(await resolver.resolve_txt(f"{tags.get('s')}._domainkey.{tags.get('d')}"))
        except DnsError:
            txt = ""
        record = txt.encode()
        try:
            ok = dkim.DKIM(message).verify(idx=i, dnsfunc=lambda *_a, _t=record, **_k: _t)
        except dkim.DKIMException:
            ok = False
        verdicts.append(f"{'pass' if ok else 'FAIL'} {tags.get('a')} d={tags.get('d')}")
    return verdicts


def parse_dns(value: str) -> tuple[str, int]:
    """``"127.0.0.1:10053"`` → ``("127.0.0.1", 10053)`` (port 0: any free one); ValueError
    saying what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--dns: expected host:port (e.g. {DEFAULT_DNS}), got {value!r}")
    return host.strip("[]"), int(port)


async def run_lab(
    config_path: str | None,
    *,
    var_dir: str = "./var/lab",
    demo: bool = True,
    once: bool = False,
    dns: str = DEFAULT_DNS,
) -> int:
    var = Path(var_dir)
    var.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before serving
    dns_host, dns_port = parse_dns(dns)
    # Keeps what it receives in var/maildir.
    async with Lab(dns_host=dns_host, dns_port=dns_port, state_dir=var) as lab:
        lab.populate_demo()
        cfg = lab_config(config_path, lab, var)
        publish_keys(lab, cfg)
        assert lab.inbox is not None
        app = Appliance(cfg, config_path=config_path, extra_routes=inbox_routes(lab.inbox))
        await app.start()
        app.install_signal_handlers()
        resolver = Resolver([lab.nameserver], timeout=2)
        smtp_host, smtp_port = app.smtp_addresses[0]
        assert app.control_address is not None
        ctl = "{}:{}".format(*app.control_address)
        _say("")
        _say("Postwarden is running against the built-in lab: a simulated internet on this")
        _say("machine (no mail leaves it). Lab domains and how their MX hosts behave:")
        for domain, behaviour in lab.demo_domains.items():
            _say(f"    {domain:<22} {behaviour}")
        trusted = ", ".join(cfg.smtp.trusted_networks)
        _say(f"  submission   {smtp_host}:{smtp_port}  (trusted: {trusted})")
        _say(f"  metrics      http://{ctl}/metrics")
        _say(
            f"  lab DNS      {lab.nameserver}  (dig @{lab.dns.host} -p {lab.dns.port} "
            f"{DEMO_DOMAIN} TXT)   lab MX hosts port {lab.mx_port}"
        )
        _say(f"  lab inbox    http://{ctl}/lab/messages  (postwarden lab inbox --var {var})")
        if app.inbound_addresses:
            ib_host, ib_port = app.inbound_addresses[0]
            _say(f"  inbound MX   {ib_host}:{ib_port}  (bounces and complaints to pwb.<domain>)")
        _say(f"  DKIM         {DEMO_DOMAIN}: selectors {', '.join(SELECTORS.values())}")
        _say("  send one:")
        _say(
            f"    swaks --server {smtp_host}:{smtp_port} --from you@{DEMO_DOMAIN} "
            "--to someone@inbox.lab.test"
        )
        _say(
            f"    python3 -c \"import smtplib; smtplib.SMTP('{smtp_host}', {smtp_port})"
            f".sendmail('you@{DEMO_DOMAIN}', ['someone@inbox.lab.test'], "
            f"'From: you@{DEMO_DOMAIN}\\r\\nTo: someone@inbox.lab.test\\r\\n"
            "Subject: hi\\r\\n\\r\\nhello\\r\\n')\""
        )
        _say(
            f"  API          http://{ctl}/v1  (schema: http://{ctl}/openapi.json, "
            f"page: http://{ctl}/docs)"
        )
        operator = await bootstrap_operator_key(app)
        if operator:
            _say(f"  operator key {operator}")
            _say(
                "               (shown once, stored hashed: keep it; "
                "`.venv/bin/postwarden admin create-key` makes another)"
            )
        else:
            _say(
                "  operator key shown on the first run only (stored hashed); "
                "make a new one: .venv/bin/postwarden admin create-key"
            )
        _say(
            "  your domain  POST /v1/domains: the lab publishes its DNS records, then "
            "/verify finds them (README: Your own domain, step by step)"
        )
        _say("  watch:  .venv/bin/postwarden events --tail    (Ctrl-C stops the appliance)")
        _say("")
        # Sending domains made through the API (or in an earlier run) get their records
        # in the lab DNS; the control plane's reload after a domain change wakes it.
        publisher = DomainPublisher(lab, app.cfg, app.control.sessions, say=_say)
        app.control.signing.on_keys.append(publisher.wake)
        await publisher.start()

        seen = 0
        delivered_ok = asyncio.Event()

        async def watch() -> None:
            nonlocal seen
            while True:
                msgs = lab.messages
                while seen < len(msgs):
                    m = msgs[seen]
                    seen += 1
                    verdicts = await dkim_verdicts(m.data, resolver)
                    subject = re.search(rb"(?im)^Subject:[ \t]*(.*?)\r?$", m.data)
                    _say(
                        f"lab: {m.sink_address} received <{m.mail_from}> -> "
                        f"{', '.join(m.rcpt_tos)} tls={'yes' if m.tls else 'no'} "
                        f"from={m.peer} dkim=[{'; '.join(verdicts) or 'none'}] "
                        f"subject={subject.group(1).decode(errors='replace') if subject else ''!r}"
                    )
                    if verdicts and all(v.startswith("pass") for v in verdicts):
                        delivered_ok.set()
                await asyncio.sleep(0.1)

        watcher = asyncio.create_task(watch())
        rc = 0
        try:
            if demo:
                await send_demo(smtp_host, smtp_port)
                try:
                    await asyncio.wait_for(delivered_ok.wait(), 30)
                    _say(
                        "demo: a message went submission -> spool -> DKIM -> lab MX, "
                        "signatures verified"
                    )
                except TimeoutError:
                    _say("demo: FAILED - no DKIM-verified message reached the lab in 30 s")
                    rc = 1
                if rc == 0:
                    try:
                        rc = await asyncio.wait_for(
                            api_demo(app, lab, publisher, f"http://{ctl}"), 60
                        )
                    except Exception as exc:
                        _say(f"demo: API demo FAILED: {exc!r}")
                        rc = 1
                if rc == 0 and app.shaper is not None:
                    status = await app.shaper.backend.command(op="status")
                    for p in status["pairs"]:
                        _say(
                            f"demo: shaping: source {p['source']} -> site {p['site']}: "
                            f"{p['connections']}/{p['connection_limit']} connections, "
                            + (
                                f"rate {p['rate_per_min']:g}/min"
                                if p["rate_limited"]
                                else "no rate limit"
                            )
                            + "  (`postwarden shaping status`)"
                        )
            if once:
                await asyncio.sleep(0.5)
            else:
                await app.wait_stopped()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await publisher.stop()
            await app.stop()
    return rc


async def send_demo(host: str, port: int) -> None:
    msgs = [
        ("someone@inbox.lab.test", "Hello from Postwarden"),
        ("friend@greylist.lab.test", "Greylisted first, delivered on retry"),
        ("nobody@nouser.lab.test", "Rejected with 550 5.1.1: bounces"),
    ]
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        for rcpt, subject in msgs:
            body = (
                f"From: Demo <hello@{DEMO_DOMAIN}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
                f"\r\nThis message was accepted by Postwarden and delivered into the lab.\r\n"
            )
            resp = await smtp.sendmail(f"hello@{DEMO_DOMAIN}", [rcpt], body.encode())
            _say(f"demo: submitted to <{rcpt}>: {resp[1]}")


async def bootstrap_operator_key(app: Appliance) -> str | None:
    """The first operator key, when the database has none: printed once, stored hashed."""
    from sqlalchemy import select

    from postwarden.store.feed import record_change
    from postwarden.store.models import ApiKey
    from postwarden.store.secrets import new_api_key

    async with app.control.sessions() as s:
        have = (await s.execute(select(ApiKey.id).where(
            ApiKey.tenant_id.is_(None), ApiKey.name == "bootstrap"))).first()  # fmt: skip
        if have is not None:
            return None
        new = new_api_key()
        s.add(ApiKey(tenant_id=None, prefix=new.prefix, secret_hash=new.secret_hash,
                     name="bootstrap", scopes="admin"))  # fmt: skip
        await record_change(s, "api_key", None, new.prefix)
        await s.commit()
        return new.plaintext


async def api_demo(app: Appliance, lab: Lab, publisher: DomainPublisher, base: str) -> int:
    """The control plane's path, as an application would take it: a tenant, its sending
    domain (records published in the lab DNS by ``publisher``, then verified), a message
    through POST /v1/messages, followed to delivery with GET /v1/messages/{id}."""
    import httpx
    from sqlalchemy import update

    from postwarden.store.models import ApiKey
    from postwarden.store.secrets import new_api_key

    # A short-lived operator key for the demo itself, revoked at the end.
    op = new_api_key()
    async with app.control.sessions() as s:
        row = ApiKey(
            tenant_id=None,
            prefix=op.prefix,
            secret_hash=op.secret_hash,
            name="lab demo",
            scopes="admin",
        )
        s.add(row)
        await s.commit()
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            adm = {"Authorization": f"Bearer {op.plaintext}"}
            tenants = (await http.get("/v1/tenants", headers=adm)).json()["data"]
            tenant = next((t for t in tenants if t["name"] == "demo"), None)
            if tenant is None:
                tenant = (await http.post("/v1/tenants", json={"name": "demo"}, headers=adm)).json()
            r = await http.post(
                f"/v1/tenants/{tenant['id']}/keys",
                headers=adm,
                json={"name": "lab demo", "scopes": ["send", "read", "manage"]},
            )
            key = {"Authorization": f"Bearer {r.json()['key']}"}
            doms = (await http.get("/v1/domains", headers=key)).json()["data"]
            dom = next((d for d in doms if d["name"] == API_DOMAIN), None)
            if dom is None:
                r = await http.post("/v1/domains", json={"name": API_DOMAIN}, headers=key)
                dom = r.json()
            await publisher.wait_published(API_DOMAIN)  # the lab follows the change feed
            v = (await http.post(f"/v1/domains/{dom['id']}/verify", headers=key)).json()
            _say(
                f"demo: API: tenant 'demo', domain {API_DOMAIN}: "
                + ", ".join(f"{x['purpose']} {x['status']}" for x in v["records"])
            )
            # The verified domain and its keys reach the signer through the change feed.
            signs = asyncio.Event()

            def keys_loaded(_keys: object) -> None:
                if any(API_DOMAIN in d for d in app.control.signing.verified.values()):
                    signs.set()

            app.control.signing.on_keys.append(keys_loaded)
            try:
                keys_loaded(None)
                await asyncio.wait_for(signs.wait(), 10)
            finally:
                app.control.signing.on_keys.remove(keys_loaded)
            r = await http.post(
                "/v1/messages",
                headers=key,
                json={
                    "from": {"email": f"orders@{API_DOMAIN}", "name": "Lab Shop"},
                    "to": ["someone@inbox.lab.test", BOUNCE_NOW, BOUNCE_LATER],
                    "subject": "Sent through POST /v1/messages",
                    "text": "Injected over HTTP, spooled, signed with the domain's own keys.",
                    "tags": ["demo"],
                },
            )
            sent = r.json()
            _say(f"demo: API: POST /v1/messages -> {r.status_code} id={sent.get('id')}")
            for _ in range(100):
                m = (await http.get(f"/v1/messages/{sent['id']}", headers=key)).json()
                states = [x["state"] for x in m.get("recipients", [])]
                if states and all(x in ("delivered", "bounced", "dropped") for x in states):
                    _say(
                        f"demo: API: GET /v1/messages/{sent['id']} -> "
                        + ", ".join(f"{x['email']} {x['state']}" for x in m["recipients"])
                    )
                    by = {x["email"]: x["state"] for x in m["recipients"]}
                    if by.get("someone@inbox.lab.test") != "delivered":
                        return 1
                    return await bounce_demo(app, lab, http, key, sent["id"])
                await asyncio.sleep(0.2)
            _say("demo: API: FAILED - the message was not delivered in 20 s")
            return 1
    finally:
        async with app.control.sessions() as s:
            from postwarden.store.models import utcnow

            await s.execute(
                update(ApiKey).where(ApiKey.prefix == op.prefix).values(revoked_at=utcnow())
            )
            await s.commit()


BOUNCE_NOW = "gone@nouser.lab.test"  # refused during delivery: 550 5.1.1
BOUNCE_LATER = "moved@inbox.lab.test"  # accepted, then a DSN to its return path


async def bounce_demo(app: Appliance, lab: Lab, http: Any, key: dict[str, str], msg_id: str) -> int:
    """Bounces both ways: one refused during delivery, one reported later by a DSN sent
    to its signed return path on the inbound MX; both end suppressed. The suppressions
    are removed at the end, so that the next run shows the same."""
    import aiosmtplib

    from postwarden.bounces.notify import Failed, build_dsn

    async def suppression(address: str) -> dict[str, Any] | None:
        for _ in range(100):
            r = await http.get(f"/v1/suppressions/{address}", headers=key)
            if r.status_code == 200:
                return dict(r.json())
            await asyncio.sleep(0.1)
        return None

    try:
        events = (await http.get(f"/v1/events?message_id={msg_id}", headers=key)).json()["data"]
        now = next((e for e in events if e["type"] == "bounced"), None)
        if now is None:
            _say("demo: bounces: FAILED - no bounce during delivery")
            return 1
        d = now["detail"]
        sup = await suppression(BOUNCE_NOW)
        _say(
            f"demo: bounces: {BOUNCE_NOW} refused during delivery: {d['response']!r} -> "
            f"{d['category']}, hard={d['hard']}, suppressed: {sup and sup['reason']}"
        )
        copy = next((x for x in lab.messages if x.rcpt_tos == [BOUNCE_LATER]), None)
        if copy is None or not app.inbound_addresses:
            _say("demo: bounces: FAILED - no copy at the lab MX, or no inbound MX")
            return 1
        dsn = build_dsn(
            reporting_mta="mx1.lab.test",
            sender=copy.mail_from,
            recipients=[Failed(BOUNCE_LATER, "5.1.6", "550 5.1.6 mailbox has moved", "store.lab")],
            original_headers=copy.data.split(b"\r\n\r\n", 1)[0] + b"\r\n",
            arrival=time.time(),
            queue_id="LAB1",
        )
        host, port = app.inbound_addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
            await smtp.sendmail("", [copy.mail_from], dsn)
        sup = await suppression(BOUNCE_LATER)
        _say(
            f"demo: bounces: {BOUNCE_LATER} accepted, then a DSN to {copy.mail_from} -> "
            f"suppressed: {sup and sup['reason']}"
        )
        return 0 if sup is not None else 1
    finally:
        for address in (BOUNCE_NOW, BOUNCE_LATER):
            await http.delete(f"/v1/suppressions/{address}", headers=key)


def main() -> None:  # pragma: no cover - convenience
    sys.exit(asyncio.run(run_lab(None)))
