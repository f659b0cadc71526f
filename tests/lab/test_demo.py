"""`postwarden lab` (what `make run` starts): the demo shows signed mail reaching the lab."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import write_toml


def lab_toml(tmp_path: Path) -> Path:
    """A config for `postwarden lab` with port 0 everywhere (so it never collides with a
    `make run` on this machine) and its state under ``tmp_path``."""
    return write_toml(
        tmp_path / "lab.toml",
        {
            "smtp": {"listen": ["127.0.0.1:0"]},
            "control": {
                "listen": "127.0.0.1:0",
                "encryption_key_file": str(tmp_path / "control.key"),
            },
            "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'control.db'}"},
            "spool": {"path": str(tmp_path / "spool")},
        },
    )


async def test_lab_demo_delivers_dkim_verified_mail(tmp_path: Path) -> None:
    config = lab_toml(tmp_path)
    lab_args = [
        sys.executable, "-m", "postwarden.cli", "lab",
        "--config", str(config), "--var", str(tmp_path / "var"), "--once",
        "--dns", "127.0.1.53:0",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *lab_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "signatures verified" in text, text
    assert "dkim=[pass rsa-sha256 d=demo.lab.test; pass ed25519-sha256 d=demo.lab.test]" in text
    assert "received <hello@demo.lab.test> -> someone@inbox.lab.test tls=yes" in text
    # The control plane's path: tenant, domain verified in the lab DNS, POST /v1/messages.
    assert "operator key pw_" in text
    assert "dkim ok, dkim ok, spf ok" in text
    assert "dkim=[pass rsa-sha256 d=shop.lab.test; pass ed25519-sha256 d=shop.lab.test]" in text
    assert re.search(r"GET /v1/messages/\w+ -> someone@inbox.lab.test delivered", text), text
    # The API domain's records were published by the lab itself, and said so.
    assert re.search(
        r"lab: published DNS for shop\.lab\.test \(DKIM s=pw1-\w+-ed, s=pw1-\w+-rsa; SPF; "
        r"DMARC; return path pwb\.shop\.lab\.test MX\+SPF; tracking CNAME\) - verify with "
        r"POST /v1/domains/1/verify",
        text,
    ), text
    # Bounces both ways: during delivery (the remote reply whole), and by a DSN later.
    assert re.search(
        r"gone@nouser.lab.test refused during delivery: '550 5.1.1 <gone@nouser.lab.test>: "
        r"Recipient address rejected: User unknown' -> user_unknown, hard=True, "
        r"suppressed: hard_bounce",
        text,
    ), text
    # The demo's own API calls are not logged between its lines.
    assert "HTTP Request:" not in text, text
    assert re.search(
        r"moved@inbox.lab.test accepted, then a DSN to b-\w+-\w+-\w+@pwb.shop.lab.test -> "
        r"suppressed: hard_bounce",
        text,
    ), text
    # The shaping broker saw the deliveries: the lab MX hosts' site, the default source.
    assert re.search(
        r"shaping: source default -> site mx:mx\d\.lab\.test: \d+/32 connections, no rate limit",
        text,
    ), text
    # The run's queue is where the config put it, for `postwarden queue` and `events`.
    env = {**os.environ, "POSTWARDEN_SPOOL__PATH": str(tmp_path / "spool")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "postwarden.cli", "events", "--limit", "100", "--json",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and '"type": "delivered"' in out.decode()

    # A second run: same database. The operator key is not shown again, but how to get
    # one is; the domain made through the API in the first run is published at start.
    proc = await asyncio.create_subprocess_exec(*lab_args, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "operator key pw_" not in text, text
    assert "make a new one: .venv/bin/postwarden admin create-key" in text, text
    start = text.index("lab: published DNS for shop.lab.test")
    assert start < text.index("demo: submitted to"), text
