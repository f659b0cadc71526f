"""README's "Your own domain, step by step": exactly its commands, against `postwarden lab`.

The walkthrough uses the lab's fixed default ports (control 8025, submission 2525, lab
DNS 10053), so this test cannot run next to a `make run`; it says which port is taken
when one is. No other test binds those ports (the others take free ephemeral ones), so
it runs in the parallel part of `make test`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import httpx
import pytest

from tests.peers import require_binary

README = Path(__file__).resolve().parents[2] / "README.md"
PORTS = [(8025, "control.listen"), (2525, "smtp.listen"), (10053, "the lab DNS")]


def readme_block(marker: str) -> str:
    """The fenced ``sh`` block right after ``<!-- marker -->`` in README.md."""
    text = README.read_text()
    m = re.search(rf"<!-- {re.escape(marker)} -->\s*```sh\n(.*?)\n```", text, re.S)
    assert m is not None, f"README.md has no ```sh block after <!-- {marker} -->"
    return m.group(1) + "\n"


def require_free_ports() -> None:
    for port, what in PORTS:
        kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if port == 10053 else [])
        for kind in kinds:
            with contextlib.closing(socket.socket(socket.AF_INET, kind)) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError as exc:
                    pytest.fail(
                        f"127.0.0.1:{port} ({what}) is taken ({exc}): this test runs the "
                        "README's commands on the default ports; stop `make run` (or whatever "
                        "holds the port) and run it again"
                    )


def clean_env(bin_dir: Path) -> dict[str, str]:
    """The environment without config overrides, the venv's bin first on PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("POSTWARDEN_") and ("__" in k or k == "POSTWARDEN_CONFIG"))
    }
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", ""), "/usr/sbin", "/sbin"])
    return env


@contextlib.contextmanager
def lab_process(cwd: Path, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = cwd / "lab.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "postwarden.cli", "lab", "--no-demo"],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_ready(proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"postwarden lab exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get("http://127.0.0.1:8025/healthz", timeout=2).status_code == 200:
                # The banner (and the bootstrap key) come right after the listeners.
                if "watch:" in log.read_text():
                    return
        time.sleep(0.1)
    pytest.fail(f"postwarden lab did not answer /healthz in 90 s:\n{log.read_text()}")


def run_bash(script: str, cwd: Path, env: dict[str, str]) -> str:
    try:
        done = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + script],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"the README's commands did not finish in 60 s:\n{exc.stdout!r}\n{exc.stderr!r}"
        )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"the README's commands failed ({done.returncode}):\n{out}"
    return done.stdout


def test_newcomer_path_from_tenant_to_delivered_mail(tmp_path: Path) -> None:
    require_binary("curl")
    require_binary("jq")
    require_free_ports()
    script = readme_block("newcomer-path")
    # The commands run from the checkout as `.venv/bin/postwarden`; here the "checkout"
    # is a fresh directory (so ./var is new) whose .venv/bin is this interpreter's.
    bin_dir = Path(sys.executable).parent
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "bin").symlink_to(bin_dir, target_is_directory=True)
    env = clean_env(bin_dir)
    with lab_process(tmp_path, env) as (proc, log):
        wait_ready(proc, log)
        out = run_bash(script, tmp_path, env)
        # Verified by looking the records up in the lab DNS (not by turning the rule off).
        assert '"verified":true' in out, out
        assert re.search(r'"records":\["dkim ok","dkim ok","spf ok"', out), out
        # Both messages, from the API and over SMTP AUTH, delivered.
        delivered = re.findall(r"^(\S+) someone@inbox\.lab\.test delivered: 250", out, re.M)
        assert len(set(delivered)) == 2, out
        # `postwarden events` has them too (whatever its line format: the message id and
        # the event type on one line), besides the GET /v1/messages line above.
        lines = out.splitlines()
        for msg_id in delivered:
            n = sum(msg_id in line and "delivered" in line for line in lines)
            assert n >= 2, f"no delivered event for {msg_id} in `postwarden events`:\n{out}"
        lab_out = log.read_text()
        assert "lab: published DNS for acme.lab.test (DKIM s=pw1-" in lab_out, lab_out
        assert "verify with POST /v1/domains/1/verify" in lab_out, lab_out
        # Both reached the lab's MX signed with the domain's own keys.
        signed = "dkim=[pass rsa-sha256 d=acme.lab.test; pass ed25519-sha256 d=acme.lab.test]"
        assert lab_out.count(signed) == 2, lab_out
        # The records answer on the fixed, documented port, as `dig` would ask.
        q = dns.message.make_query("acme.lab.test", "TXT")
        r = dns.query.udp(q, "127.0.0.1", port=10053, timeout=5)
        assert any("v=spf1" in rd.to_text() for rrset in r.answer for rd in rrset), r
        if shutil.which("dig"):
            dug = run_bash(readme_block("newcomer-dig"), tmp_path, env)
            assert "v=spf1" in dug and "10 " in dug, dug
