"""A campaign to 1 000 000 contacts through ``postwarden serve`` into the lab's sinks
(issue 21; not a test).

One run, all in this process's world (bench/run.py's: a DNS server on 127.0.1.53 that
publishes 50 recipient domains' MX, three ``smtp-sink`` MX hosts on 127.0.2.1-3):

1. **The plain SMTP bench** (bench/run.py's Postwarden run, one repetition: 20 000
   messages of 5 KB over 20 sessions, DKIM, fsync): its end-to-end rate, measured in
   this run, is the yardstick the campaign's rate is divided by.
2. **Render throughput** in this process: the 30 KB template rendered and built per
   contact as the runner's ``_render_all`` does (``content.render.render_message``,
   ``mail.build.build``), in messages per CPU second of one core; then the same plus
   cleanup and DKIM rsa-sha256 2048 signing (``mail.cleanup``, ``mta.dkim.DkimSigner``),
   the whole CPU a campaign message costs before the spool.
3. **The campaign.** ``postwarden serve`` on its defaults (one worker per CPU, DKIM, fsync,
   warming off: the sources are ``active``) against a private PostgreSQL (``--db
   sqlite`` for a SQLite file). Through the API: a tenant with a postal address, a
   verified sending domain (its DKIM, SPF, DMARC and return-path records published in
   the bench's DNS), an audience, the template (lint-clean), a campaign validated,
   approved by a second key made by an operator key, and scheduled now. The contacts
   (spread over the 50 domains, with a few attributes) are written in SQL, not
   imported: ``generate_series`` makes 1M rows in seconds where the import API takes
   about 190 s (docs/performance.md, "Contact imports").

   Measured from the schedule call: **launch** (every send record written: the
   campaign's ``records_done``), **first delivery** (the appliance's delivered counter
   at 1), the **end-to-end rate** (deliveries per second up to ``--measure`` messages,
   the first 100 000 by default, 0 for all, or what ``--max-seconds`` after the
   schedule saw; and the steady rate from 10 % of that on),
   the appliance's CPU seconds and peak PSS (its whole process tree, bench/procstat.py).

It prints a table and then one line ``bench-campaign: launch_s=… first_delivery_s=…
e2e_msgs=… smtp_e2e_msgs=… ratio=… render_per_core=… peak_pss_mb=…``.

    python bench/campaign.py [--contacts 1000000] [--measure N] [--max-seconds S]
        [--db postgresql|sqlite]
        [--smtp-messages 20000] [--renders 2000] [--py-spy SECONDS]

``--py-spy S`` samples the appliance's processes for S seconds once delivery is under way
(py-spy must be installed: ``.venv/bin/pip install py-spy``) and prints where their
CPU went.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.pg

import httpx
from procstat import TreeMonitor
from run import (
    DOMAINS,
    SINK_HOSTS,
    Postwarden,
    bench_world,
    one_run,
    with_sinks,
)

from peers import ensure_postfix
from postwarden.lab.dnsserver import DNSServer

FROM_DOMAIN = "news.brand.bench.test"
ADDRESS = "Brand Ltd., 12 Harbour Street, 1011 AB Amsterdam, The Netherlands"
CITIES = ("Amsterdam", "Berlin", "Lisbon", "Oslo", "Madrid", "Vienna", "Dublin", "Prague")

# ---------------------------------------------------------------------- the template

PRODUCTS = [
    {
        "name": f"Trail runner {n}",
        "price": f"{49 + 10 * n}.00",
        "was": f"{79 + 10 * n}.00",
        "url": f"https://shop.brand.example/p/trail-{n}",
        "image": f"https://cdn.brand.example/img/trail-{n}.jpg",
        "blurb": "Light, grippy and made from recycled yarn: the shoe our testers took"
        " out again and again, on gravel, mud and wet stone.",
    }
    for n in range(1, 7)
]

_TD = 'style="padding:0 24px;font-family:Helvetica,Arial,sans-serif;color:#333333;'
_P = 'style="margin:0 0 14px 0;font-size:15px;line-height:22px;color:#333333;"'

_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Brand: the winter edit</title>
<style>
body { margin:0; padding:0; background:#f2f2f2; }
table { border-collapse:collapse; }
img { border:0; display:block; outline:none; text-decoration:none; }
a { color:#0b6e4f; }
@media only screen and (max-width:620px) {
  .container { width:100% !important; }
  .col { display:block !important; width:100% !important; }
  .hide-mobile { display:none !important; }
  .pad { padding-left:12px !important; padding-right:12px !important; }
}
</style></head>
<body style="margin:0;padding:0;background:#f2f2f2;">
<table role="presentation" width="100%" cellpadding="0" cellspacing="0" style="background:#f2f2f2;">
<tr><td align="center" style="padding:24px 0;">
<table role="presentation" class="container" width="600" cellpadding="0" cellspacing="0"
 style="width:600px;background:#ffffff;border-radius:6px;">
<tr><td style="padding:24px;text-align:center;">
<a href="https://www.brand.example/"><img src="https://cdn.brand.example/img/logo.png"
 width="160" height="40" alt="Brand"></a></td></tr>
<tr><td><a href="https://shop.brand.example/winter"><img
 src="https://cdn.brand.example/img/hero-winter.jpg" width="600" height="300"
 alt="The winter edit: new colours, same grip" style="width:100%;height:auto;"></a></td></tr>
"""

_GREETING = f"""<tr><td class="pad" {_TD}padding-top:24px;">
<h1 style="margin:0 0 12px 0;font-size:26px;line-height:32px;color:#111111;">
Hi {{{{ contact.name }}}}, the winter edit is here</h1>
<p {_P}>As a {{{{ contact.attributes.plan | default('free') }}}} member in
{{{{ contact.attributes.city | default('your city') }}}} you have
<strong>{{{{ contact.attributes.points | default(0) }}}} points</strong> to spend.
{{% if contact.attributes.plan == 'pro' or contact.attributes.plan == 'team' %}}
Your member price is already applied to everything below, and delivery is on us.
{{% else %}}
Upgrade to Pro before the end of the month and the points you have double.
{{% endif %}}</p>
{{% if contact.attributes.interests %}}<p {_P}>Picked for what you told us you like:
{{% for topic in contact.attributes.interests %}}<a
 href="https://shop.brand.example/t/{{{{ topic | urlencode }}}}"
 style="color:#0b6e4f;">{{{{ topic }}}}</a>{{% if not loop.last %}}, {{% endif %}}{{% endfor %}}.
</p>{{% endif %}}
</td></tr>
"""

_PRODUCT = f"""{{% for p in products %}}
<tr><td class="pad" style="padding:12px 24px;">
<table role="presentation" width="100%" cellpadding="0" cellspacing="0"
 style="border:1px solid #e5e5e5;border-radius:4px;">
<tr><td class="col" width="200" valign="top" style="width:200px;padding:12px;">
<a href="{{{{ p.url }}}}"><img src="{{{{ p.image }}}}" width="176" height="176"
 alt="{{{{ p.name }}}}" style="width:176px;height:176px;"></a></td>
<td class="col" valign="top" {_TD}padding:12px;">
<h2 style="margin:0 0 6px 0;font-size:18px;line-height:24px;color:#111111;">
{{{{ loop.index }}}}. {{{{ p.name }}}}</h2>
<p {_P}>{{{{ p.blurb }}}}</p>
<p style="margin:0 0 12px 0;font-size:16px;color:#111111;"><strong>EUR {{{{ p.price }}}}</strong>
<span style="color:#999999;text-decoration:line-through;">EUR {{{{ p.was }}}}</span></p>
<table role="presentation" cellpadding="0" cellspacing="0"><tr>
<td style="background:#0b6e4f;border-radius:4px;padding:10px 18px;">
<a href="{{{{ p.url }}}}?utm_source=email&amp;utm_medium=campaign&amp;utm_campaign=winter"
 style="color:#ffffff;text-decoration:none;font-weight:bold;font-size:14px;">
Shop {{{{ p.name }}}}</a></td></tr></table>
</td></tr></table></td></tr>
{{% endfor %}}
"""

_ARTICLE = f"""<tr><td class="pad" {_TD}padding-top:18px;">
<h2 style="margin:0 0 10px 0;font-size:20px;line-height:26px;color:#111111;">{{title}}</h2>
<p {_P}>Winter running is mostly about the first ten minutes: once you are warm, the
cold is a friend. Start slower than you want to, run the first kilometre into the
wind so that the way home has it at your back, and keep a dry layer by the door.
Our coaches put together a short plan for the darkest weeks of the year.</p>
<p {_P}>Three runs a week is enough to keep what you built in the autumn: one easy,
one with a few strides on a flat road, and one longer run at the weekend when there
is light. Reflective details on every jacket in this edit, and a head torch that
weighs less than a phone, make the evenings safer.</p>
<p {_P}>Read the whole guide on our journal, with the routes our members shared from
twelve cities, and a playlist for the long ones.
<a href="https://journal.brand.example/{{slug}}" style="color:#0b6e4f;">Read more</a></p>
</td></tr>
"""

_FOOTER = f"""<tr><td class="pad" {_TD}padding-top:24px;padding-bottom:24px;
 font-size:12px;line-height:18px;color:#777777;text-align:center;">
<p style="margin:0 0 8px 0;font-size:12px;color:#777777;">
<a href="https://www.brand.example/stores" style="color:#777777;">Stores</a> |
<a href="https://www.brand.example/help" style="color:#777777;">Help</a> |
<a href="https://www.brand.example/returns" style="color:#777777;">Free returns</a></p>
<p style="margin:0 0 8px 0;font-size:12px;color:#777777;">You get this because you
are a member of Brand ({{{{ contact.email }}}}).
<a href="{{{{ unsubscribe_url }}}}" style="color:#777777;">Unsubscribe</a></p>
<p style="margin:0;font-size:12px;color:#777777;">{{{{ postal_address }}}}</p>
</td></tr>
</table></td></tr></table></body></html>
"""


def template_html(target: int = 30_000) -> str:
    """A marketing email of about ``target`` bytes of HTML source: header, a
    personalised greeting with a loop over the contact's interests, a loop over six
    products (a declared variable), journal articles, and the footer with the
    unsubscribe link and the postal address."""
    html = _HEAD + _GREETING + _PRODUCT
    n = 0
    while len(html) + len(_FOOTER) + len(_ARTICLE) < target:
        n += 1
        html += _ARTICLE.format(title=f"Running through winter, part {n}", slug=f"winter-{n}")
    return html + _FOOTER


def template_body() -> dict[str, Any]:
    """The POST /v1/templates body."""
    return {
        "name": "winter edit",
        "category": "marketing",
        "subject": "{{ contact.name }}, the winter edit ({{ contact.attributes.points }} points)",
        "preheader": "New colours, same grip: six picks for {{ contact.attributes.city }}",
        "html": template_html(),
        "variables": [{"name": "products", "sample": PRODUCTS}],
    }


def contact_values(g: int) -> dict[str, Any]:
    """Contact ``g``'s name and attributes, as the SQL below makes them (for the
    in-process render)."""
    return {
        "email": f"user{g}@d{g % DOMAINS}.bench.test",
        "name": f"User {g}",
        "attributes": {
            "plan": ("free", "pro", "team", "enterprise")[g % 4],
            "points": (g * 7919) % 5000,
            "city": CITIES[g % len(CITIES)],
            "interests": [f"topic-{g % 7}", f"topic-{g % 11 + 7}"],
        },
    }


# ---------------------------------------------------------------------- render micro


def render_bench(n: int) -> dict[str, Any]:
    """Messages per CPU second (this thread) of render + build, then of render + build +
    cleanup + DKIM rsa-sha256 2048, for ``n`` contacts, as the runner's ``_render_all``
    and ``Acceptance.submit`` do it (the same calls; the List-Unsubscribe fields and
    Feedback-ID included); and the CPU milliseconds of each stage per message."""
    from postwarden.campaigns import unsubscribe as tokens
    from postwarden.content.render import Parts, render_message
    from postwarden.content.text import html_to_text
    from postwarden.content.variables import PLACEHOLDER_URLS, send_context
    from postwarden.mail.build import Draft, Mailbox, build_alternative
    from postwarden.mail.cleanup import Cleanup, Origin
    from postwarden.mta.dkim import DkimSigner, generate_key, parse_key
    from postwarden.queue.spool import new_message_id

    t = template_body()
    parts = Parts(subject=t["subject"], preheader=t["preheader"], html=t["html"], text=None)
    samples = {"products": PRODUCTS}
    key = tokens.derive_key(os.urandom(32))
    signer = DkimSigner([parse_key(FROM_DOMAIN, "pw1", generate_key("rsa-sha256"), "rsa-sha256")])
    cleanup = Cleanup("postwarden.bench.test")
    origin = Origin("local")
    clock = time.thread_time
    cpu: collections.Counter[str] = collections.Counter()
    sizes = []
    for g in range(n + 1):  # contact 0 compiles the template (the runner caches it)
        c0 = clock()
        person = contact_values(g)
        links = dict(PLACEHOLDER_URLS)
        token = tokens.make_token(key, 1, 1, g)
        links["unsubscribe_url"] = f"http://127.0.0.1:8025/u/{token}"
        headers = tokens.headers(links["unsubscribe_url"], f"unsubscribe+{token}@pwb.{FROM_DOMAIN}")
        headers.append(("Feedback-ID", "c1:t1:campaign:postwarden"))
        context = send_context(contact=person, postal_address=ADDRESS, samples=samples, urls=links)
        c1 = clock()
        out = render_message(parts, context)
        c2 = clock()
        assert out.html is not None
        html_to_text(out.html)  # alone: what the text part would cost made per message
        c3 = clock()
        draft = Draft(
            sender=Mailbox(f"news@{FROM_DOMAIN}", "Brand"),
            to=[Mailbox(person["email"], person["name"])],
            reply_to=None,
            subject=out.subject,
            text=out.text,
            html=out.html,
            headers=headers,
        )
        data = build_alternative(
            draft, message_id=f"<{new_message_id()}@postwarden.bench.test>", date=time.time()
        )
        c4 = clock()
        cleaned = cleanup.clean(data, msg_id=new_message_id(), origin=origin, rcpt=person["email"])
        c5 = clock()
        signer.sign_fields(cleaned.headers, cleaned.body, cleaned.signing_domain)
        c6 = clock()
        if g:
            sizes.append(len(data))
            cpu.update(context=c1 - c0, render=c2 - c1, text=c3 - c2, build=c4 - c3,
                       cleanup=c5 - c4, dkim=c6 - c5)  # fmt: skip
    render_cpu = cpu["context"] + cpu["render"] + cpu["build"]
    return {
        "n": n,
        "template_bytes": len(t["html"]),
        "message_bytes": int(sum(sizes) / len(sizes)),
        "render_per_cpu_s": n / render_cpu,
        "full_per_cpu_s": n / (render_cpu + cpu["cleanup"] + cpu["dkim"]),
        "ms": {k: 1000 * v / n for k, v in cpu.items()},
    }


# ---------------------------------------------------------------------- the database


PG_CONTACTS = """
INSERT INTO attribute_defs (tenant_id, name, type, created_at) VALUES
  ({t}, 'plan', 'string', now()), ({t}, 'points', 'number', now()),
  ({t}, 'city', 'string', now()), ({t}, 'interests', 'list', now());
INSERT INTO contacts (tenant_id, email, name, status, attributes, created_at, updated_at)
SELECT {t}, 'user' || g || '@d' || (g % {d}) || '.bench.test', 'User ' || g, 'active',
  jsonb_build_object('plan', (ARRAY['free','pro','team','enterprise'])[1 + g % 4],
    'points', (g::bigint * 7919) % 5000, 'city', (ARRAY[{cities}])[1 + g % {nc}],
    'interests', jsonb_build_array('topic-' || (g % 7), 'topic-' || (g % 11 + 7))),
  now(), now()
FROM generate_series(1, {n}) g;
"""

SQLITE_CONTACTS = """
WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < {n})
INSERT INTO contacts (tenant_id, email, name, status, attributes, created_at, updated_at)
SELECT {t}, 'user' || g || '@d' || (g % {d}) || '.bench.test', 'User ' || g, 'active',
  json_object('plan', json_extract('["free","pro","team","enterprise"]', '$[' || (g % 4) || ']'),
    'points', (g * 7919) % 5000,
    'city', json_extract('[{cities}]', '$[' || (g % {nc}) || ']'),
    'interests', json_array('topic-' || (g % 7), 'topic-' || (g % 11 + 7))),
  datetime('now'), datetime('now')
FROM s
"""


async def load_contacts(url: str, tenant: int, n: int) -> float:
    """Write ``n`` contacts of ``tenant`` (and the attributes' definitions) in SQL;
    seconds taken (statistics included)."""
    t0 = time.perf_counter()
    fmt = {"t": tenant, "n": n, "d": DOMAINS, "nc": len(CITIES)}
    if url.startswith("postgresql"):
        import asyncpg

        host_port, db = url.split("@", 1)[1].split("/", 1)
        host, port = host_port.split(":")
        conn = await asyncpg.connect(host=host, port=int(port), user="pw", database=db)
        try:
            cities = ",".join(f"'{c}'" for c in CITIES)
            await conn.execute(PG_CONTACTS.format(cities=cities, **fmt))
            await conn.execute("VACUUM ANALYZE contacts")
        finally:
            await conn.close()
    else:
        path = url.split(":///", 1)[1]

        def go() -> None:
            db = sqlite3.connect(path, timeout=60)
            try:
                db.executemany(
                    "INSERT INTO attribute_defs (tenant_id, name, type, created_at)"
                    " VALUES (?, ?, ?, datetime('now'))",
                    [(tenant, "plan", "string"), (tenant, "points", "number"),
                     (tenant, "city", "string"), (tenant, "interests", "list")],
                )  # fmt: skip
                cities = ",".join(f'"{c}"' for c in CITIES)
                db.execute(SQLITE_CONTACTS.format(cities=cities, **fmt))
                db.commit()
                db.execute("ANALYZE")
            finally:
                db.close()

        await asyncio.to_thread(go)
    return time.perf_counter() - t0


class CampaignState:
    """Reads the campaign's row straight from the database (a cheap poll: the stats
    route counts a million records by state)."""

    def __init__(self, url: str) -> None:
        from postwarden.store.db import create_engine

        self.engine = create_engine(url)

    async def row(self, cid: int) -> tuple[str, bool]:
        from sqlalchemy import text

        async with self.engine.connect() as conn:
            state, done = (
                await conn.execute(
                    text("SELECT state, records_done FROM campaigns WHERE id = :id"), {"id": cid}
                )
            ).one()
        return str(state), bool(done)

    async def by_state(self, cid: int) -> dict[str, int]:
        from sqlalchemy import text

        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT state, count(*) FROM send_records WHERE campaign_id = :id"
                     " GROUP BY state"), {"id": cid},
            )  # fmt: skip
            return {str(s): int(n) for s, n in rows.all()}

    async def close(self) -> None:
        await self.engine.dispose()


# ---------------------------------------------------------------------- the appliance


class CampaignAppliance(Postwarden):
    """bench/run.py's ``postwarden serve`` with the control database at ``url``."""

    def __init__(self, scratch: Path, dns: DNSServer, sink_port: int, key: Path, url: str):
        super().__init__(scratch, dns, sink_port, key)
        self.url = url

    def config(self, extra: str = "") -> Path:
        path = super().config(extra)
        text = re.sub(r'(?m)^url = ".*"$', f'url = "{self.url}"', path.read_text(), count=1)
        path.write_text(text)
        return path


async def operator_key(url: str) -> str:
    from tests.control.test_imports_crash import operator_key as make

    return await make(url)


def client(base: str, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, timeout=120, headers={"Authorization": f"Bearer {key}"})


def check(r: httpx.Response, *codes: int) -> dict[str, Any]:
    if r.status_code not in (codes or (200, 201)):
        raise RuntimeError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}")
    body: dict[str, Any] = r.json()
    return body


async def set_up(
    base: str, admin: str, dns: DNSServer, url: str, contacts: int
) -> tuple[str, int, dict[str, Any]]:
    """Tenant, domain, contacts, audience, template and an approved campaign: (the
    tenant's key, the campaign's id, figures of the set-up)."""
    figures: dict[str, Any] = {}
    async with client(base, admin) as c:
        tid = check(await c.post("/v1/tenants", json={"name": "brand"}))["id"]
        check(await c.patch(f"/v1/tenants/{tid}", json={"settings": {"postal_address": ADDRESS}}))
        keys = f"/v1/tenants/{tid}/keys"
        ops = {"name": "ops", "scopes": ["send", "read", "manage"]}
        key = check(await c.post(keys, json=ops))["key"]
        approver = check(await c.post(keys, json={"name": "boss", "scopes": ["approve"]}))["key"]
    async with client(base, key) as c:
        d = check(await c.post("/v1/domains", json={"name": FROM_DOMAIN}))
        for rec in d["records"]:
            dns.remove(rec["name"], rec["type"])
            dns.add(rec["name"], rec["type"], rec["value"])
        if not check(await c.post(f"/v1/domains/{d['id']}/verify"))["verified"]:
            raise RuntimeError(f"the sending domain did not verify: {d}")
        figures["load_s"] = await load_contacts(url, tid, contacts)
        rule = 'email.endswith(".bench.test")'
        audience = check(await c.post("/v1/audiences", json={"name": "all", "rule": rule}))["id"]
        t = check(await c.post("/v1/templates", json=template_body()))
        lint = check(await c.post(f"/v1/templates/{t['id']}/lint", json={}))
        findings = [f for f in lint.get("findings", []) if f["severity"] != "info"]
        if findings:
            raise RuntimeError(f"the template is not lint-clean: {findings}")
        new = {"name": "winter edit", "audience_id": audience, "template_id": t["id"],
               "from": {"email": f"news@{FROM_DOMAIN}", "name": "Brand"},
               "tags": ["winter"]}  # fmt: skip
        cid = int(check(await c.post("/v1/campaigns", json=new))["id"])
        problems = check(await c.post(f"/v1/campaigns/{cid}/validate", json={}))["problems"]
        if problems:
            raise RuntimeError(f"validation: {problems}")
    async with client(base, approver) as a:
        check(await a.post(f"/v1/campaigns/{cid}/approve", json={}))
    return key, cid, figures


# ---------------------------------------------------------------------- py-spy


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def summarize_profile(path: Path, top: int = 22) -> list[str]:
    """Where the sampled CPU went, from py-spy's raw (collapsed) stacks of all the
    appliance's processes: by leaf function (self), and by postwarden function
    (inclusive)."""
    leaf: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")

        def name(f: str) -> str:
            m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", f)
            if not m:
                return f[:70]
            mod = m.group(2).split("site-packages/")[-1].split("/src/")[-1]
            return f"{m.group(1)} ({mod})"

        leaf[name(frames[-1])] += n
        for f in {name(f) for f in frames[1:] if "postwarden/" in f}:
            incl[f] += n
    out = [f"py-spy: {total} samples"]
    out.append("  self (leaf) time:")
    out += [f"    {100 * n / total:5.1f} %  {f}" for f, n in leaf.most_common(top)]
    out.append("  inclusive, postwarden functions:")
    out += [f"    {100 * n / total:5.1f} %  {f}" for f, n in incl.most_common(top)]
    return out


# ---------------------------------------------------------------------- the campaign


def delivered(control: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{control}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("postwarden_recipients_delivered_total "):
                return int(float(line.split()[1]))
    return 0


async def campaign_run(
    args: argparse.Namespace, base: Path, dns: DNSServer, key: Path
) -> dict[str, Any]:
    from postwarden.store.db import upgrade

    server = None
    if args.db == "postgresql":
        from tests.pg import start_cluster

        # A durable server (tests/pg.py's default is a throwaway one without fsync),
        # with room for a million-row load.
        server = start_cluster(
            {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
             "maintenance_work_mem": "256MB", "max_wal_size": "4GB"},
            prefix="pw-campbench-",
        )  # fmt: skip
    scratch, sinks = with_sinks(base / "campaign")
    if server is not None:
        server._sql("CREATE DATABASE bench")
        url = server.url("bench")
    else:
        url = f"sqlite+aiosqlite:///{scratch / 'control.db'}"
    pw = CampaignAppliance(scratch, dns, sinks.port, key, url)
    state = CampaignState(url)
    out: dict[str, Any] = {"db": args.db, "contacts": args.contacts}
    profile = None
    try:
        await upgrade(url)
        admin = await operator_key(url)
        pid = await pw.start()
        http = f"http://127.0.0.1:{pw.control}"
        tenant_key, cid, figures = await set_up(http, admin, dns, url, args.contacts)
        out.update(figures)
        print(f"  set-up: {args.contacts} contacts written in SQL in {figures['load_s']:.1f} s;"
              f" campaign {cid} approved", flush=True)  # fmt: skip
        target = min(args.measure or args.contacts, args.contacts)
        monitor = TreeMonitor(pid, interval=1.0)
        monitor.start()
        async with client(http, tenant_key) as c:
            t0 = time.perf_counter()
            check(await c.post(f"/v1/campaigns/{cid}/schedule", json={}))
        launch_s = first_s = None
        samples: list[tuple[float, int]] = []
        deadline = time.monotonic() + args.timeout
        last_print = 0.0
        while True:
            now = time.perf_counter() - t0
            done_n = await asyncio.to_thread(delivered, pw.control)
            samples.append((now, done_n))
            if first_s is None and done_n >= 1:
                first_s = now
                print(f"    first delivery at {now:.1f} s", flush=True)
            if launch_s is None:
                _state, records_done = await state.row(cid)
                if records_done:
                    launch_s = now
                    print(f"    every record written at {now:.1f} s", flush=True)
            if launch_s is not None and (done_n >= target or now > args.max_seconds):
                break
            started = done_n >= target // 10 or now > args.max_seconds / 10
            if args.py_spy and profile is None and started and py_spy():
                profile = scratch / "py-spy.txt"
                spy = subprocess.Popen(
                    [py_spy() or "py-spy", "record", "--pid", str(pid), "--subprocesses",
                     "--nonblocking", "--rate", "25", "--duration", str(args.py_spy),
                     "--format", "raw", "--output", str(profile)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            if now - last_print >= 30:
                last_print = now
                print(f"    t={now:6.0f}s delivered={done_n} records_written="
                      f"{'all' if launch_s else 'no'}", flush=True)  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError(f"{done_n}/{target} delivered in {args.timeout} s")
            await asyncio.sleep(0.25)
        end_s = samples[-1][0]
        await monitor.stop()
        if profile is not None:
            await asyncio.to_thread(spy.wait, args.py_spy + 30)
        out["by_state"] = await state.by_state(cid)
        tenth, n_tenth = next((t, n) for t, n in samples if n >= samples[-1][1] // 10)
        out.update(
            cid=cid, measured=target, delivered=samples[-1][1], launch_s=launch_s,
            first_delivery_s=first_s, e2e_s=end_s, e2e_rate=samples[-1][1] / end_s,
            steady_rate=(samples[-1][1] - n_tenth) / max(1e-9, end_s - tenth),
            cpu_s=monitor.cpu_s, peak_pss=monitor.peak_rss,
            timeline=[(round(t, 1), n) for t, n in samples[:: max(1, len(samples) // 40)]],
        )  # fmt: skip
        if profile is not None and profile.exists():
            out["profile"] = summarize_profile(profile)
    finally:
        await state.close()
        await pw.stop()
        sinks.stop()
        if server is not None:
            from tests.pg import stop_server

            stop_server(server)
    return out


async def main(args: argparse.Namespace) -> int:
    ensure_postfix()
    base, dns, key = await bench_world()
    print(
        f"bench-campaign: contacts={args.contacts} measure={args.measure or args.contacts}"
        f" db={args.db} domains={DOMAINS} sinks={len(SINK_HOSTS)} cpus={os.cpu_count()};"
        " postwarden serve defaults (workers = CPUs, DKIM rsa-sha256 2048, fsync), warming off",
        flush=True,
    )
    try:
        smtp = None
        if args.smtp_messages:
            scratch, sinks = with_sinks(base / "smtp")
            try:
                smtp = await one_run(
                    Postwarden(scratch, dns, sinks.port, key), args.smtp_messages, 5000
                )
            finally:
                sinks.stop()
            print(f"  smtp bench: {smtp.messages} x 5 KB, e2e {smtp.e2e_rate:.0f}/s,"
                  f" cpu {smtp.cpu_s:.1f} s", flush=True)  # fmt: skip
        render = render_bench(args.renders)
        print(f"  render: template {render['template_bytes']} B,"
              f" message {render['message_bytes']} B,"
              f" {render['render_per_cpu_s']:.0f}/cpu-s render+build,"
              f" {render['full_per_cpu_s']:.0f}/cpu-s with cleanup+DKIM", flush=True)  # fmt: skip
        camp = await campaign_run(args, base, dns, key)
    finally:
        await dns.stop()
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(base, ignore_errors=True)

    smtp_rate = smtp.e2e_rate if smtp else float("nan")
    ratio = camp["e2e_rate"] / smtp_rate
    rows = [
        ("contacts written in SQL", f"{camp['contacts']} in {camp['load_s']:.1f} s"),
        ("launch (all records written)", f"{camp['launch_s']:.1f} s"
         f" ({camp['contacts'] / camp['launch_s']:.0f} records/s)"),
        ("first delivery", f"{camp['first_delivery_s']:.1f} s after schedule"),
        ("delivered (measured)", f"{camp['delivered']} in {camp['e2e_s']:.1f} s"),
        ("campaign e2e", f"{camp['e2e_rate']:.0f} msg/s (steady from 10 %:"
         f" {camp['steady_rate']:.0f})"),
        ("smtp bench e2e (same run)", f"{smtp_rate:.0f} msg/s"),
        ("ratio campaign / smtp", f"{ratio:.2f}"),
        ("render+build per core", f"{render['render_per_cpu_s']:.0f} msg/cpu-s"
         f" ({render['template_bytes'] / 1000:.0f} KB template,"
         f" {render['message_bytes'] / 1000:.0f} KB message)"),
        ("... + cleanup + DKIM", f"{render['full_per_cpu_s']:.0f} msg/cpu-s"),
        ("CPU ms per message by stage", ", ".join(f"{k} {v:.2f}" for k, v in render["ms"].items())
         + " (text: inside render, made from the HTML)"),
        ("appliance CPU", f"{camp['cpu_s']:.0f} s ({1000 * camp['cpu_s'] / camp['delivered']:.2f}"
         " ms per delivered message)"),
        ("appliance peak PSS", f"{camp['peak_pss'] / 2**20:.0f} MB"),
        ("records at the end", json.dumps(camp["by_state"])),
    ]  # fmt: skip
    print()
    for name, value in rows:
        print(f"  {name:<30} {value}")
    print("  timeline (s, delivered):", " ".join(f"{t:.0f}:{n}" for t, n in camp["timeline"]))
    for line in camp.get("profile", []):
        print(line)
    print(
        f"bench-campaign: launch_s={camp['launch_s']:.1f}"
        f" first_delivery_s={camp['first_delivery_s']:.1f} e2e_msgs={camp['e2e_rate']:.0f}"
        f" smtp_e2e_msgs={smtp_rate:.0f} ratio={ratio:.2f}"
        f" render_per_core={render['render_per_cpu_s']:.0f}"
        f" peak_pss_mb={camp['peak_pss'] / 2**20:.0f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"campaign": camp, "render": render,
                                               "smtp_e2e": smtp_rate}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contacts", type=int, default=1_000_000)
    ap.add_argument("--measure", type=int, default=100_000,
                    help="deliveries the e2e rate is taken over (0: every contact)")  # fmt: skip
    ap.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    ap.add_argument("--smtp-messages", type=int, default=20_000,
                    help="messages of the plain SMTP bench (0 skips it)")  # fmt: skip
    ap.add_argument("--renders", type=int, default=2000)
    ap.add_argument("--py-spy", type=int, default=0, metavar="SECONDS")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=3600,
        help="stop measuring this long after the schedule, --measure reached or"
        " not (once every record is written)",
    )
    ap.add_argument("--timeout", type=float, default=7200)
    ap.add_argument("--json", help="also write the figures to this file")
    # SIGTERM (and SIGINT, even when started in the background) stop the run and clean
    # up: the appliance, the sinks and PostgreSQL are this process's children.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(asyncio.run(main(ap.parse_args())))
