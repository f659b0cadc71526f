"""The lab DNS on a fixed port (`postwarden lab --dns`), and what happens when it is taken."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest

from postwarden.lab import Lab
from postwarden.lab.dnsserver import DNSServer
from tests.lab.test_demo import lab_toml


def free_udp_tcp_port(host: str) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return port
    raise OSError("no port free for UDP and TCP")


async def test_fixed_port_answers_on_udp_and_tcp_and_names_the_taken_address() -> None:
    port = free_udp_tcp_port("127.0.0.1")
    async with Lab(dns_host="127.0.0.1", dns_port=port) as lab:
        assert lab.nameserver == f"127.0.0.1:{port}"
        lab.add_domain("inbox.test")
        q = dns.message.make_query("inbox.test", "MX")
        for ask in (dns.asyncquery.udp, dns.asyncquery.tcp):
            r = await ask(q, "127.0.0.1", port=port, timeout=2)
            assert [rd.to_text() for rrset in r.answer for rd in rrset] == ["10 mx1.lab.test."]
        other = DNSServer("127.0.0.1", port=port)
        with pytest.raises(OSError, match=rf"lab DNS: cannot listen on 127\.0\.0\.1:{port}"):
            await other.start()
    # Stopped: the port is free again for the next run.
    again = DNSServer("127.0.0.1", port=port)
    await again.start()
    await again.stop()


async def test_discard_removes_one_record() -> None:
    server = DNSServer()
    server.add("x.test", "MX", "10 a.test")
    server.add("x.test", "MX", "20 b.test")
    server.discard("x.test", "MX", "10 a.test.")
    assert server.records("x.test", "MX") == ["20 b.test."]
    server.discard("x.test", "MX", "20 b.test")
    server.discard("gone.test", "TXT", "nothing")  # absent: ignored
    assert server.records("x.test", "MX") == []


async def lab_cli(tmp_path: Path, *args: str) -> tuple[int, str]:
    config = lab_toml(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "postwarden.cli", "lab", "--config", str(config),
        "--var", str(tmp_path / "var"), "--once", "--no-demo", *args,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_lab_says_when_its_dns_port_is_taken(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        rc, out = await lab_cli(tmp_path, "--dns", f"127.0.0.1:{port}")
    assert rc == 1, out
    assert f"lab DNS: cannot listen on 127.0.0.1:{port}" in out, out
    assert "choose another with --dns HOST:PORT" in out, out


async def test_lab_refuses_a_malformed_dns_address(tmp_path: Path) -> None:
    rc, out = await lab_cli(tmp_path, "--dns", "10053")
    assert rc == 2, out
    assert "--dns: expected host:port (e.g. 127.0.0.1:10053), got '10053'" in out, out
