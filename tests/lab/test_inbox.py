"""The lab inbox: what the lab's MX hosts receive is kept in a maildir with their
verdicts, and shown by ``postwarden lab inbox`` and ``GET /lab/messages``.

Messages travel over real SMTP: through an appliance (so DKIM signatures are real and
verify against the lab DNS) or straight to a sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import httpx
import pytest

from postwarden import cli
from postwarden.appliance import Appliance
from postwarden.control.app import create_app
from postwarden.lab import Lab, inbox_path
from postwarden.lab.inbox import LabInbox
from postwarden.lab.inbox_http import inbox_routes
from postwarden.mta.dkim import generate_key
from tests.conftest import SENDER_DOMAIN, ApplianceFactory, free_port, write_toml


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    """The lab with a state directory (it overrides conftest's, for its fixtures too)."""
    async with Lab(state_dir=tmp_path / "labstate") as the_lab:
        yield the_lab


def message(to: str, subject: str, body: str = "hello", sender: str = "news") -> bytes:
    return (
        f"From: Sender <{sender}@{SENDER_DOMAIN}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Date: Mon, 01 Jun 2026 12:00:00 +0000\r\n\r\n{body}\r\n"
    ).encode()


async def to_sink(lab: Lab, rcpts: list[str], data: bytes, *, tls: bool = False) -> str:
    """Hand a message straight to the first sink; returns its reply to DATA."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    async with aiosmtplib.SMTP(
        hostname=lab.sinks[0].host, port=lab.mx_port, start_tls=tls, tls_context=ctx
    ) as smtp:
        _, reply = await smtp.sendmail(f"news@{SENDER_DOMAIN}", rcpts, data)
    return reply


async def submit(app: Appliance, to: str, subject: str, body: str = "hello") -> None:
    host, port = app.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
        await smtp.sendmail(f"news@{SENDER_DOMAIN}", [to], message(to, subject, body))


async def test_delivered_message_is_kept_with_the_sinks_verdicts(
    lab: Lab, appliance: ApplianceFactory, dkim_keys: list[dict[str, str]], tmp_path: Path
) -> None:
    lab.add_domain("inbox.test")
    app = await appliance({"dkim": {"keys": dkim_keys}})
    await submit(app, "Someone@inbox.test", "Signed and kept", "a body line")
    got = (await lab.wait_for_messages(1))[0]

    # A real maildir: the file is in new/, named by the id the sink gave the message.
    assert lab.inbox is not None and got.id
    path = tmp_path / "labstate" / "maildir" / "new" / got.id
    stored = path.read_bytes()
    assert stored.startswith(f"X-Lab-Id: {got.id}\r\n".encode())
    assert stored.endswith(got.data)  # the message as received follows the trace block
    assert (tmp_path / "labstate" / "maildir" / "tmp").is_dir()
    assert list((tmp_path / "labstate" / "maildir" / "tmp").iterdir()) == []

    meta = lab.inbox.get(got.id)
    assert [str(v) for v in meta.dkim] == [
        f"pass rsa-sha256 d={SENDER_DOMAIN} s=rsa1",
        f"pass ed25519-sha256 d={SENDER_DOMAIN} s=ed1",
    ]
    assert meta.tls and meta.tls_version.startswith("TLSv1") and meta.tls_cipher
    assert (meta.sink_name, meta.sink_address) == ("mx1.lab.test", "127.0.1.1")
    assert meta.peer == got.peer and meta.helo == "postwarden.test"
    assert meta.mail_from == got.mail_from != ""
    assert meta.rcpt_tos == ["Someone@inbox.test"]
    assert meta.subject == "Signed and kept" and meta.size == len(got.data)
    assert abs(meta.received_at - got.received_at) < 1e-5
    # The raw message is exactly what arrived: its signatures still verify.
    raw = lab.inbox.raw(got.id)
    assert raw == got.data
    txt = {k: "".join(await app.resolver.resolve_txt(k)).encode() for k in
           (f"{d['selector']}._domainkey.{SENDER_DOMAIN}" for d in dkim_keys)}  # fmt: skip
    assert dkim.DKIM(raw).verify(idx=0, dnsfunc=lambda n, **_: txt[n.decode().rstrip(".")])
    text = lab.inbox.render(got.id)
    assert f"DKIM:        pass rsa-sha256 d={SENDER_DOMAIN} s=rsa1; pass ed25519" in text
    assert "Subject:     Signed and kept" in text and text.endswith("\na body line\n")


async def test_dkim_verdicts_fail_and_permerror(lab: Lab, tmp_path: Path) -> None:
    lab.add_domain("inbox.test")
    key = generate_key("rsa-sha256")
    from postwarden.mta.dkim import load_key

    (tmp_path / "k.pem").write_bytes(key)
    published = load_key(SENDER_DOMAIN, "pub", tmp_path / "k.pem", "rsa-sha256")
    lab.dns.add(f"pub._domainkey.{SENDER_DOMAIN}", "TXT", published.public_txt())
    plain = message("a@inbox.test", "signed")

    def sign(selector: str, data: bytes) -> bytes:
        return dkim.sign(data, selector.encode(), SENDER_DOMAIN.encode(), key) + data

    good = sign("pub", plain)
    cases = {
        "pass": good,
        "tampered": good.replace(b"hello", b"HELLO"),
        "unpublished": sign("nokey", plain),
        "garbage": b"DKIM-Signature: this is not a tag list\r\n" + plain,
        "unsigned": plain,
    }
    ids = {}
    for name, data in cases.items():
        reply = await to_sink(lab, ["a@inbox.test"], data)
        ids[name] = reply.rsplit(" ", 1)[-1]
    assert lab.inbox is not None
    results = {n: [(v.result, v.selector) for v in lab.inbox.get(i).dkim] for n, i in ids.items()}
    assert results == {
        "pass": [("pass", "pub")],
        "tampered": [("fail", "pub")],
        "unpublished": [("fail", "nokey")],
        "garbage": [("permerror", "")],
        "unsigned": [],
    }
    # Without STARTTLS the verdict says so.
    assert lab.inbox.get(ids["pass"]).tls is False


async def test_reader_lists_newest_first_filters_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    state = tmp_path / "labstate"
    async with Lab(state_dir=state) as lab:
        lab.add_domain("inbox.test")
        lab.add_domain("other.test")
        for to, subject in [
            ("ann@inbox.test", "first"),
            ("bob@other.test", "second"),
            ("ann@inbox.test", "third"),
        ]:
            await to_sink(lab, [to], message(to, subject), tls=True)
        # Two recipients in one transaction: one message, found under either.
        await to_sink(lab, ["cy@inbox.test", "bob@other.test"], message("cy", "fourth"))
        ids = [m.id for m in lab.messages]
    inbox = LabInbox(inbox_path(state))  # a reader of its own, as another process has
    assert [m.id for m in inbox.list()] == ids[::-1] == sorted(ids, reverse=True)
    assert [m.subject for m in inbox.list()] == ["fourth", "third", "second", "first"]
    assert [m.subject for m in inbox.list(to="ANN@Inbox.test")] == ["third", "first"]
    assert [m.subject for m in inbox.list(to="<bob@other.test>")] == ["fourth", "second"]
    assert [m.subject for m in inbox.list(to="other.test")] == ["fourth", "second"]
    assert [m.subject for m in inbox.list(to="nobody@inbox.test")] == []
    assert [m.subject for m in inbox.list(limit=2)] == ["fourth", "third"]
    assert inbox.get(ids[3]).rcpt_tos == ["cy@inbox.test", "bob@other.test"]
    with pytest.raises(KeyError):
        inbox.get("../../etc/passwd")
    with pytest.raises(KeyError):
        inbox.get("20200101-000000-000000-abcdef")

    # The lab again on the same directory: what it received before is still listed,
    # behind what arrives now.
    async with Lab(state_dir=state) as lab:
        lab.add_domain("inbox.test")
        await to_sink(lab, ["ann@inbox.test"], message("ann@inbox.test", "after restart"))
        assert lab.inbox is not None
        assert [m.subject for m in lab.inbox.list(to="ann@inbox.test")] == [
            "after restart",
            "third",
            "first",
        ]
        assert len(lab.inbox.list()) == 5
    # A mail client reading the maildir moves a message to cur/ with flags: still found.
    new = inbox_path(state) / "new" / ids[0]
    new.rename(inbox_path(state) / "cur" / f"{ids[0]}:2,S")
    assert inbox.get(ids[0]).subject == "first" and len(inbox.list()) == 5


async def test_lab_without_state_dir_writes_nothing(tmp_path: Path) -> None:
    async with Lab() as lab:
        lab.add_domain("inbox.test")
        reply = await to_sink(lab, ["a@inbox.test"], message("a@inbox.test", "x"))
        assert lab.inbox is None and lab.messages[0].id == ""
        assert reply.endswith("queued as mx1.lab.test-1")


async def test_a_message_that_cannot_be_stored_is_not_accepted(tmp_path: Path) -> None:
    """A real MX answers 250 only once the message is safe: a lab that cannot write its
    maildir answers 451, so the sender keeps the message and retries."""
    (tmp_path / "labstate").mkdir()
    (tmp_path / "labstate" / "maildir").write_text("not a directory")
    async with Lab(state_dir=tmp_path / "labstate") as lab:
        lab.add_domain("inbox.test")
        with pytest.raises(aiosmtplib.SMTPDataError) as err:
            await to_sink(lab, ["a@inbox.test"], message("a@inbox.test", "x"))
        assert err.value.code == 451 and lab.messages == []


async def test_html_only_message_is_rendered_as_text(lab: Lab) -> None:
    lab.add_domain("inbox.test")
    data = (
        b"From: a@sender.test\r\nTo: b@inbox.test\r\nSubject: html\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n\r\n"
        b"<html><head><style>p{color:red}</style></head><body><h1>Welcome</h1>"
        b"<p>Read <a href='https://example.test/x'>this</a> &amp; that.</p>"
        b"<script>alert(1)</script></body></html>\r\n"
    )
    reply = await to_sink(lab, ["b@inbox.test"], data)
    assert lab.inbox is not None
    text = lab.inbox.detail(reply.rsplit(" ", 1)[-1])["text"]
    assert text == "Welcome\n\nRead this <https://example.test/x> & that.\n"


async def test_cli_lists_shows_raw_and_json(
    lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab.add_domain("inbox.test")
    await to_sink(lab, ["ann@inbox.test"], message("ann@inbox.test", "one"), tls=True)
    await to_sink(lab, ["bob@inbox.test"], message("bob@inbox.test", "two", "body two"))
    first, second = (m.id for m in lab.messages)
    var = str(tmp_path / "labstate")

    assert cli.main(["lab", "inbox", "--var", var]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [second, first]
    assert (
        "mx1.lab.test  tls=yes  dkim=none  <news@sender.test> -> ann@inbox.test  'one'"
        in (lines[1])
    )
    assert cli.main(["lab", "inbox", "--var", var, "--to", "ann@inbox.test", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in listed] == [first] and listed[0]["tls"]["used"] is True

    assert cli.main(["lab", "inbox", second, "--var", var]) == 0
    out = capsys.readouterr().out
    assert f"Id:          {second}" in out and "Subject:     two" in out
    assert out.endswith("\nbody two\n")

    assert cli.main(["lab", "inbox", second, "--var", var, "--json"]) == 0
    detail = json.loads(capsys.readouterr().out)
    assert detail["raw"] == lab.messages[1].data.decode() and detail["text"] == "body two\n"

    assert cli.main(["lab", "inbox", second, "--var", var, "--raw"]) == 0
    assert capsys.readouterr().out == lab.messages[1].data.decode()

    assert cli.main(["lab", "inbox", "20200101-000000-000000-abcdef", "--var", var]) == 1
    assert "no message 20200101-000000-000000-abcdef" in capsys.readouterr().err
    assert cli.main(["lab", "inbox", "--var", str(tmp_path / "none")]) == 0
    assert "no messages in" in capsys.readouterr().out
    assert cli.main(["lab", "run", second, "--var", var]) == 2
    assert "go with `postwarden lab inbox`" in capsys.readouterr().err
    assert cli.main(["lab", "inbox", "--var", var, "--limit", "0"]) == 2


async def test_http_endpoints(lab: Lab, appliance: ApplianceFactory) -> None:
    lab.add_domain("inbox.test")
    assert lab.inbox is not None
    app = await appliance(extra_routes=inbox_routes(lab.inbox))
    await to_sink(lab, ["ann@inbox.test"], message("ann@inbox.test", "one"))
    await to_sink(lab, ["bob@inbox.test"], message("bob@inbox.test", "two", "body two"))
    first, second = (m.id for m in lab.messages)
    base = "http://{}:{}".format(*app.control_address or ("", 0))
    async with httpx.AsyncClient(base_url=base) as http:
        r = await http.get("/lab/messages")
        assert r.status_code == 200
        assert [m["id"] for m in r.json()["data"]] == [second, first]
        r = await http.get("/lab/messages", params={"to": "bob@inbox.test"})
        assert [m["subject"] for m in r.json()["data"]] == ["two"]
        r = await http.get("/lab/messages", params={"limit": "1"})
        assert [m["id"] for m in r.json()["data"]] == [second]
        r = await http.get("/lab/messages", params={"limit": "0"})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["path"] == "limit"

        r = await http.get(f"/lab/messages/{second}")
        body = r.json()
        assert r.status_code == 200 and body["id"] == second
        assert body["raw"] == lab.messages[1].data.decode() and body["text"] == "body two\n"
        assert ["Subject", "two"] in body["headers"]
        assert body["mx"] == {"name": "mx1.lab.test", "address": "127.0.1.1"}
        assert body["mail_from"] == f"news@{SENDER_DOMAIN}"

        r = await http.get(f"/lab/messages/{first}/raw")
        assert r.status_code == 200 and r.headers["content-type"] == "message/rfc822"
        assert r.content == lab.messages[0].data

        for missing in ("20200101-000000-000000-abcdef", "..%2F..%2Fetc"):
            r = await http.get(f"/lab/messages/{missing}", headers={"X-Request-Id": "rq1"})
            assert r.status_code == 404
            assert r.json()["error"]["type"] == "not_found"
            assert r.json()["error"]["request_id"] == "rq1"
        r = await http.post("/lab/messages")
        assert r.status_code == 405


async def test_lab_routes_only_with_the_lab_and_only_for_loopback(lab: Lab) -> None:
    assert lab.inbox is not None
    await to_sink(lab, ["ann@inbox.test"], message("ann@inbox.test", "one"))

    def app(extra: bool) -> httpx.AsyncClient:
        asgi = create_app(
            lambda: b"", lambda: (True, {}), extra_routes=inbox_routes(lab.inbox) if extra else None
        )
        transport = httpx.ASGITransport(app=asgi, client=("192.0.2.10", 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://lab")

    async with app(extra=False) as http:
        assert (await http.get("/lab/messages")).status_code == 404
    async with app(extra=True) as http:
        r = await http.get("/lab/messages")
        assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"
        assert (await http.get(f"/lab/messages/{lab.messages[0].id}/raw")).status_code == 403


async def test_postwarden_lab_keeps_and_serves_what_it_receives(tmp_path: Path) -> None:
    """`postwarden lab` (run_lab, in process): the lab keeps its messages under --var
    and the control listener serves them."""
    from postwarden.lab.demo import run_lab

    control, smtp_port = free_port(), free_port()
    config = write_toml(
        tmp_path / "lab.toml",
        {
            "smtp": {"listen": [f"127.0.0.1:{smtp_port}"]},
            "control": {
                "listen": f"127.0.0.1:{control}",
                "encryption_key_file": str(tmp_path / "control.key"),
            },
            "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'control.db'}"},
            "spool": {"path": str(tmp_path / "spool")},
            "queue": {"scan_interval": "0.05s"},
        },
    )
    var = tmp_path / "var"
    # A port of its own for the lab DNS: the default (10053) is the README walkthrough's
    # (tests/lab/test_readme_path.py), which another worker may be running.
    dns = "127.0.0.1:0"
    task = asyncio.create_task(run_lab(str(config), var_dir=str(var), demo=False, dns=dns))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{control}") as http:
            for _ in range(600):
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/lab/messages")).status_code == 200:
                        break
                assert not task.done(), task
                await asyncio.sleep(0.05)
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=smtp_port, start_tls=False
            ) as smtp:
                await smtp.sendmail(
                    "you@demo.lab.test",
                    ["someone@inbox.lab.test"],
                    b"From: you@demo.lab.test\r\nTo: someone@inbox.lab.test\r\n"
                    b"Subject: kept\r\n\r\nhello\r\n",
                )
            listed: list[dict[str, Any]] = []
            for _ in range(600):
                r = await http.get("/lab/messages", params={"to": "someone@inbox.lab.test"})
                listed = r.json()["data"]
                if listed:
                    break
                await asyncio.sleep(0.05)
        assert [m["subject"] for m in listed] == ["kept"]
        assert [d["result"] for d in listed[0]["dkim"]] == ["pass", "pass"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    inbox = LabInbox(inbox_path(var))
    assert [m.subject for m in inbox.list(to="someone@inbox.lab.test")] == ["kept"]
