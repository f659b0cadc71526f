"""Pools: weighted choice among the sources that may send, and the forward-confirmed
reverse DNS check, against the lab DNS server."""

from __future__ import annotations

import random
from collections import Counter

from postwarden.config import load_config
from postwarden.dns.resolver import Resolver
from postwarden.lab import Lab
from postwarden.shaping.pools import check_source, choose_source

CFG = load_config(
    None,
    environ={},
    overrides={
        "server": {"hostname": "mta.lab.test"},
        "sources": [
            {"name": "a", "address": "127.0.3.1", "ehlo": "out1.lab.test"},
            {"name": "b", "address": "127.0.3.2", "ehlo": "out2.lab.test"},
            {"name": "c", "address": "127.0.3.3", "state": "paused"},
        ],
        "pools": [
            {
                "name": "bulk",
                "members": [
                    {"source": "a", "weight": 3},
                    {"source": "b", "weight": 1},
                    {"source": "c", "weight": 5},
                ],
            }
        ],
    },
)
SOURCES = {s.name: s for s in CFG.sources}


def test_weights_are_followed_and_paused_sources_skipped() -> None:
    rng = random.Random(7)
    picks = Counter(choose_source(CFG.pools[0], SOURCES, rng).name for _ in range(8000))  # type: ignore[union-attr]
    assert set(picks) == {"a", "b"}  # c is paused
    assert 2.8 < picks["a"] / picks["b"] < 3.2
    # A source the broker refuses (at its cap, suspended): the others take over.
    only_b = {choose_source(CFG.pools[0], SOURCES, rng, lambda n: n != "a").name for _ in range(50)}  # type: ignore[union-attr]
    assert only_b == {"b"}
    assert choose_source(CFG.pools[0], SOURCES, rng, lambda n: False) is None


async def test_forward_confirmed_reverse_dns(lab: Lab) -> None:
    lab.dns.add("1.3.0.127.in-addr.arpa", "PTR", "out1.lab.test.")
    lab.dns.add("out1.lab.test", "A", "127.0.3.1")
    lab.dns.add("2.3.0.127.in-addr.arpa", "PTR", "out2.lab.test.")
    lab.dns.add("out2.lab.test", "A", "127.0.9.9")  # points elsewhere
    resolver = Resolver([lab.nameserver], timeout=2)
    a = await check_source(resolver, SOURCES["a"], CFG)
    assert a.ok and a.ptr == ["out1.lab.test"] and a.forward_ok and a.ehlo_matches
    b = await check_source(resolver, SOURCES["b"], CFG)
    assert not b.ok and "does not resolve back" in b.problem
    c = await check_source(resolver, SOURCES["c"], CFG)
    assert not c.ok and c.problem == "no PTR record"


async def test_sources_check_command(lab: Lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import sys

    from tests.conftest import write_toml

    lab.dns.add("1.3.0.127.in-addr.arpa", "PTR", "out1.lab.test.")
    lab.dns.add("out1.lab.test", "A", "127.0.3.1")
    config = write_toml(
        tmp_path / "pw.toml",
        {
            "server": {"hostname": "mta.lab.test"},
            "dns": {"nameservers": [lab.nameserver], "timeout": "2s"},
            "sources": [
                {"name": "a", "address": "127.0.3.1", "ehlo": "out1.lab.test"},
                {"name": "b", "address": "127.0.3.2"},
            ],
        },
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "postwarden.cli",
        "sources",
        "check",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 1, out
    lines = out.splitlines()
    assert lines[0].startswith("a ") and lines[0].endswith(" ok")
    assert lines[1].startswith("b ") and "PROBLEM: no PTR record" in lines[1]
