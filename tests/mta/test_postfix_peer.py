"""Real peers nobody here wrote: Python's smtplib submits, Postfix's smtp-sink receives."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from postwarden.lab import Lab
from postwarden.queue.admin import QueueAdmin
from tests.conftest import SENDER_DOMAIN, ApplianceFactory
from tests.peers import require_binary

SINK_IP = "127.0.1.4"


@pytest.fixture
def dump_dir() -> Iterator[Path]:
    # smtp-sink drops privileges to nobody when run as root: the pytest tmp_path is
    # root-only, so the dumps go to a world-writable scratch directory of their own.
    path = Path(tempfile.mkdtemp(prefix="pw-smtp-sink-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def smtp_sink(port: int, dump: Path) -> Iterator[subprocess.Popen[bytes]]:
    binary = require_binary("smtp-sink")
    argv = [binary]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]
    argv += ["-d", f"{dump}/msg.", f"{SINK_IP}:{port}", "100"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def dumped(dump: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(dump.glob("msg.*"))]


async def test_delivery_to_postfix_smtp_sink_is_signed_and_intact(
    lab: Lab,
    appliance: ApplianceFactory,
    dkim_keys: list[dict[str, str]],
    dump_dir: Path,
) -> None:
    lab.dns.add("postfix.test", "MX", "10 pf.lab.test")
    lab.dns.add("pf.lab.test", "A", SINK_IP)
    with smtp_sink(lab.mx_port, dump_dir):
        app = await appliance(
            {"dkim": {"keys": dkim_keys}, "delivery": {"source_address": "127.0.0.7"}}
        )
        host, port = app.smtp_addresses[0]

        def submit() -> None:
            with smtplib.SMTP(host, port, timeout=10) as s:
                for i in range(5):
                    s.sendmail(
                        f"news@{SENDER_DOMAIN}",
                        [f"r{i}@postfix.test", f"s{i}@postfix.test"],
                        (
                            f"From: News <news@{SENDER_DOMAIN}>\r\nTo: r{i}@postfix.test\r\n"
                            f"Subject: to postfix {i}\r\n\r\n.leading dot\r\nbody {i}\r\n"
                        ).encode(),
                    )

        await asyncio.to_thread(submit)
        # smtp-sink writes a dump as the data arrives and answers 250 once it is
        # complete: wait for our spool to record every recipient delivered.
        admin = QueueAdmin(app.cfg.spool.path)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            delivered = [e for e in admin.events(limit=100) if e["type"] == "delivered"]
            if len(delivered) == 10:
                break
            await asyncio.sleep(0.1)
        admin.close()
        assert len(delivered) == 10
        assert all(e["detail"]["response"].startswith("250") for e in delivered)
    messages = dumped(dump_dir)
    assert len(messages) == 5
    txt = {}
    for k in dkim_keys:
        name = f"{k['selector']}._domainkey.{k['domain']}"
        txt[name] = "".join(await app.resolver.resolve_txt(name)).encode()
    for raw in messages:
        # smtp-sink prefixes what it saw of the envelope as X- lines.
        assert b"X-Client-Addr: 127.0.0.7\n" in raw
        rcpts = re.findall(rb"X-Rcpt-Args: <([^>]+)>", raw)
        assert len(rcpts) == 2  # both recipients in one transaction
        # The dump has LF line ends; the message after its envelope lines is ours.
        message = raw.split(b"\n", 5)[5].replace(b"\n", b"\r\n")
        assert b"\r\n.leading dot\r\n" in message  # dot-stuffing undone by the peer
        for idx in range(2):
            assert dkim.DKIM(message).verify(
                idx=idx, dnsfunc=lambda n, **_: txt[n.decode().rstrip(".")]
            )
