"""The unit of ``systemd/``, as ``postwarden install`` renders it (its ExecStart the
test environment's ``postwarden``): ``systemd-analyze verify`` accepts it,
``systemd-analyze security`` scores it at most :data:`MAX_EXPOSURE`, and ``postwarden
serve`` runs under what it asks of the kernel.

No systemd runs as PID 1 where the tests run (a container or a VM with another init),
so the last test applies the unit's seccomp rules itself
(tests/sandbox.py: the system-call filter, native ABI, MemoryDenyWriteExecute,
address families, namespaces, from systemd's own tables) and its capability bounding
set (``setpriv``): two workers, the fork server (ctypes' prctl), a PostgreSQL control
database (asyncpg), STARTTLS on port 587 with a certificate made at start
(cryptography), DKIM with RSA and Ed25519 (PyNaCl's cffi), the inbound MX on port 25,
all with CAP_NET_BIND_SERVICE as the only capability. Not covered: the mount
namespace (ProtectSystem=strict and the rest), the user switch, the device policy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import asyncpg
import httpx
import pytest

from postwarden.commands.install import render_unit, shipped
from postwarden.lab import Lab
from postwarden.lab.dkim_check import lab_keys, verify_dkim
from tests import sandbox
from tests.conftest import SENDER_DOMAIN
from tests.peers import require_binary
from tests.pg import postgres  # noqa: F401  (the fixture)
from tests.waiting import eventually

#: The highest exposure `systemd-analyze security` may give the unit ("OK" ends at 3.9).
MAX_EXPOSURE = 2.0
#: What the score still counts, each needed by an MTA (the unit's comments say why).
ACCEPTED = {
    "RootDirectory=/RootImage=",  # the program and its interpreter are the host's
    "AmbientCapabilities=",  # binding 25 and 587 without root
    "CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)",
    "PrivateNetwork=",  # delivery to any MX, listeners on the host's addresses
    "IPAddressDeny=",
    "RestrictAddressFamilies=~AF_(INET|INET6)",
    "RestrictAddressFamilies=~AF_UNIX",  # notify socket, journal, local PostgreSQL
    "PrivateUsers=",  # would take the capability's effect away
    "DeviceAllow=",  # ProtectClock= lets it read the RTC
}


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    path = tmp_path / "postwarden.service"
    path.write_text(render_unit(os.path.join(sys.prefix, "bin", "postwarden")))
    return path


def test_systemd_analyze_verify_accepts_the_rendered_unit(unit: Path, tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert str(unit) not in proc.stderr, proc.stderr  # not even a warning about a line
    # A program that is not there is what verify catches.
    broken = tmp_path / "broken" / "postwarden.service"
    broken.parent.mkdir()
    broken.write_text(render_unit("/nonexistent/bin/postwarden"))
    proc = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True)
    assert proc.returncode != 0 and "/nonexistent/bin/postwarden" in proc.stderr, proc.stderr


def test_security_exposure_is_ok(unit: Path) -> None:
    analyze = require_binary("systemd-analyze")
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    found = re.search(r"Overall exposure level for postwarden\.service: (\d+\.\d+) (\w+)", out)
    assert found, out
    assert float(found[1]) <= MAX_EXPOSURE and found[2] == "OK", out
    counted = {ln.split()[1] for ln in out.splitlines() if ln.startswith("✗")}
    assert counted <= ACCEPTED, sorted(counted - ACCEPTED)


def test_the_sandbox_refuses_what_the_unit_forbids(tmp_path: Path) -> None:
    """The control for the test below: under tests/sandbox.py a program meets the
    unit's refusals (EPERM), and what it allows still works."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(sandbox.spec(shipped("postwarden.service"),
                                            require_binary("systemd-analyze"))))  # fmt: skip
    probe = """
import ctypes, mmap, os, socket
def t(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return e.errno
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE)
print({
    "wx": t(lambda: mmap.mmap(-1, 4096, prot=7)),
    "rw": t(lambda: mmap.mmap(-1, 4096, prot=3)),
    "x": libc.mprotect(ctypes.addressof(ctypes.c_char.from_buffer(page)), 4096, 5),
    "netlink": t(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)),
    "inet6": t(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()),
    "affinity": t(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0))),
    "unshare": libc.unshare(0x04000000),
    "fork": os.waitpid(os.fork() or os._exit(0), 0)[1],
})
"""
    proc = subprocess.run(
        [sys.executable, sandbox.__file__, str(spec), "--", sys.executable, "-c", probe],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str({
        "wx": 1, "rw": "ok", "x": -1, "netlink": 1, "inet6": "ok", "affinity": 1,
        "unshare": -1, "fork": 0,
    })  # fmt: skip


@pytest.mark.serial
async def test_serve_runs_in_the_units_sandbox(
    tmp_path: Path,
    lab: Lab,
    subprocess_config: Callable[..., tuple[Path, int]],
    dkim_keys: list[dict[str, str]],
    postgres: object,  # noqa: F811
) -> None:
    setpriv = require_binary("setpriv")
    analyze = require_binary("systemd-analyze")
    if os.geteuid() != 0:
        pytest.skip("binds ports 25 and 587 with CAP_NET_BIND_SERVICE: run as root")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(sandbox.spec(shipped("postwarden.service"), analyze)))
    # Ports 25 and 587 on a loopback address of its own: nothing else binds them there.
    addr = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    lab.add_domain("inbox.test")
    db_url: str = postgres.new_database()  # type: ignore[attr-defined]
    config, _ = subprocess_config(
        {
            "server": {"workers": 2},
            "smtp": {"listen": [f"{addr}:587"], "trusted_networks": ["127.0.0.0/8"]},
            "inbound": {"listen": [f"{addr}:25"]},
            "database": {"url": db_url},
            "dkim": {"keys": dkim_keys},
        }
    )
    control = tomllib.loads(config.read_text())["control"]["listen"]
    log = tmp_path / "serve.log"
    argv = [
        setpriv, "--bounding-set=-all,+net_bind_service", "--inh-caps=-all", "--",
        sys.executable, sandbox.__file__, str(spec), "--",
        sys.executable, "-m", "postwarden.cli", "serve", "--config", str(config),
    ]  # fmt: skip
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        async with httpx.AsyncClient(timeout=2) as http:

            async def ready() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return (await http.get(f"http://{control}/readyz")).status_code == 200
                assert proc.returncode is None, log.read_text()
                return False

            # Ready: the control plane on PostgreSQL through asyncpg.
            await eventually(ready, 60, "/readyz")

        # The supervisor, its fork server and its workers: all under the filter, with
        # no new privileges and CAP_NET_BIND_SERVICE (bit 10) as their only capability.
        pids, todo = [], [proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            with contextlib.suppress(FileNotFoundError):
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                todo += [int(c) for c in children]
        assert len(pids) >= 4, pids  # supervisor, fork server, two workers
        for pid in pids:
            status = dict(
                line.split(":\t", 1)
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":\t" in line
            )
            assert (status["Seccomp"], status["NoNewPrivs"]) == ("2", "1"), (pid, status)
            assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 1 << 10, status

        # The inbound MX greets on port 25.
        reader, writer = await asyncio.open_connection(addr, 25)
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 ")
        writer.close()
        # Submission on 587 under STARTTLS, with the certificate made at start.
        message = (
            f"From: a@{SENDER_DOMAIN}\r\nTo: r@inbox.test\r\nSubject: sandboxed\r\n\r\nhello\r\n"
        )
        async with aiosmtplib.SMTP(
            hostname=addr, port=587, start_tls=True, validate_certs=False, timeout=20
        ) as smtp:
            assert smtp.is_connected and smtp.get_transport_info("sslcontext") is not None
            await smtp.sendmail(f"a@{SENDER_DOMAIN}", ["r@inbox.test"], message.encode())
        (got,) = await lab.wait_for_messages(1, timeout=30)
        verdicts = verify_dkim(got.data, lab_keys(lab.dns, got.data))
        assert sorted((v.algorithm, v.result) for v in verdicts) == [
            ("ed25519-sha256", "pass"), ("rsa-sha256", "pass"),
        ], verdicts  # fmt: skip

        # The control plane copies the spool's events (accepted, delivered) through
        # asyncpg: the shard's cursor in PostgreSQL moves past both (mail relayed
        # without a tenant leaves no rows of its own).
        name = db_url.rsplit("/", 1)[1]
        port = int(re.search(r":(\d+)/", db_url)[1])  # type: ignore[index]
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="pw", database=name)
        try:

            async def copied() -> bool:
                sql = "SELECT max(last_id) FROM event_cursors WHERE shard LIKE 'spool:%'"
                return int(await conn.fetchval(sql) or 0) >= 2

            await eventually(copied, 30, "the spool's events copied into PostgreSQL")
        finally:
            await conn.close()

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    text = log.read_text()
    for bad in ("Traceback", "Operation not permitted", "PermissionError", "worker_died"):
        assert bad not in text, text
