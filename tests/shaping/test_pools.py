"""Pools: weighted choice among the sources that may send, and the forward-confirmed
reverse DNS check, against the lab DNS server."""

from __future__ import annotations

from postwarden.config import load_config
from postwarden.dns.resolver import Resolver
from postwarden.dns.sources import check_source
from postwarden.lab import Lab
from tests.conftest import config_cli

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
    code, out = await config_cli(config, "sources", "check")
    assert code == 1, out
    lines = out.splitlines()
    assert lines[0].startswith("a ") and lines[0].endswith(" ok")
    assert lines[1].startswith("b ") and "PROBLEM: no PTR record" in lines[1]
