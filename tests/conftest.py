"""Shared fixtures: the lab and real peers are started here, never copied.

* ``lab``: the simulated internet (DNS server + sink MX hosts on 127.0.1.x), in the
  test's event loop.
* ``appliance``: a factory starting Postwarden in-process against that lab, with short
  retry and timeout settings; every appliance it made is stopped afterwards.
* ``dkim_keys``: RSA and Ed25519 keys for ``sender.test``, published in the lab DNS.
* ``subprocess_config``: writes a TOML config for running ``postwarden serve`` as a
  separate process (crash and strace tests).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import io
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from postwarden.appliance import Appliance
from postwarden.config import load_config
from postwarden.lab import Lab
from postwarden.mta.dkim import generate_key, load_key
from postwarden.store.db import upgrade_sync

SENDER_DOMAIN = "sender.test"
VENV_BIN = Path(sys.executable).parent


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (the controller): the workers share one PostgreSQL server,
    described in a directory named here (tests/pg.py)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        from tests.pg import SHARED

        root = tempfile.mkdtemp(prefix="pw-pgshared-")
        os.environ[SHARED] = root
        config.stash[_PG_SHARED] = root


def pytest_unconfigure(config: pytest.Config) -> None:
    root = config.stash.get(_PG_SHARED, None)
    if root is not None:
        from tests.pg import SHARED, stop_shared

        stop_shared(Path(root))
        os.environ.pop(SHARED, None)


_PG_SHARED = pytest.StashKey[str]()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now for a server a test starts later (a subprocess's listener).

    Taken below the kernel's ephemeral range: a port from that range (what binding to
    port 0 gives) may meanwhile become the source port of one of the thousands of
    connections the suite opens, and the server then fails with EADDRINUSE."""
    low, _high = _ephemeral_range()
    top = max(2048, low - 1)
    bottom = max(1024, top - 12000)
    for _ in range(200):
        port = random.randint(bottom, top)
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port between {bottom} and {top} on {host}")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with Lab() as the_lab:
        yield the_lab


@pytest.fixture
def dkim_keys(tmp_path: Path, lab: Lab) -> list[dict[str, str]]:
    keys = []
    for algorithm, selector in (("rsa-sha256", "rsa1"), ("ed25519-sha256", "ed1")):
        path = tmp_path / f"{selector}.pem"
        path.write_bytes(generate_key(algorithm))  # type: ignore[arg-type]
        key = load_key(SENDER_DOMAIN, selector, path, algorithm)  # type: ignore[arg-type]
        lab.dns.add(f"{selector}._domainkey.{SENDER_DOMAIN}", "TXT", key.public_txt())
        keys.append(
            {
                "domain": SENDER_DOMAIN,
                "selector": selector,
                "key_file": str(path),
                "algorithm": algorithm,
            }
        )
    return keys


_TEMPLATE_DB: list[Path] = []


def control_db(tmp_path: Path) -> str:
    """A migrated SQLite control database for one test: a copy of one made per run
    (running the migrations for every test would cost a fifth of a second each)."""
    if not _TEMPLATE_DB:
        tmpl = Path(tempfile.mkdtemp(prefix="pw-template-")) / "control.db"
        atexit.register(shutil.rmtree, tmpl.parent, True)
        upgrade_sync(f"sqlite+aiosqlite:///{tmpl}")
        _TEMPLATE_DB.append(tmpl)
    dest = tmp_path / "control.db"
    if not dest.exists():
        shutil.copyfile(_TEMPLATE_DB[0], dest)
    return f"sqlite+aiosqlite:///{dest}"


def base_overrides(tmp_path: Path, lab: Lab) -> dict[str, Any]:
    """Settings every test appliance shares: loopback only, lab DNS, fast retries."""
    return {
        "server": {"hostname": "postwarden.test", "shutdown_grace": "2s"},
        "smtp": {"listen": ["127.0.0.1:0"]},
        "control": {
            "listen": "127.0.0.1:0",
            "encryption_key_file": str(tmp_path / "control.key"),
            "cache_poll": "0.5s",
        },
        "database": {"url": control_db(tmp_path)},
        "spool": {"path": str(tmp_path / "spool")},
        "dns": {"nameservers": [lab.nameserver], "timeout": "3s"},
        "delivery": {
            "mx_port": lab.mx_port,
            # The lab's MX hosts and the tests' peers are on loopback.
            "allowed_private_networks": ["127.0.0.0/8"],
            "timeouts": {
                "connect": "2s",
                "greeting": "3s",
                "ehlo": "3s",
                "mail": "3s",
                "rcpt": "3s",
                "data_init": "3s",
                "data_block": "3s",
                "data_term": "5s",
                "idle": "0.5s",
            },
        },
        "queue": {
            "retry_initial": "0.3s",
            "retry_max": "1s",
            "retry_jitter": 0.0,
            "scan_interval": "0.25s",
        },
    }


ApplianceFactory = Callable[..., Awaitable[Appliance]]


@pytest.fixture
async def appliance(tmp_path: Path, lab: Lab) -> AsyncIterator[ApplianceFactory]:
    started: list[Appliance] = []

    async def make(overrides: dict[str, Any] | None = None, **kw: Any) -> Appliance:
        merged = deep_merge(base_overrides(tmp_path, lab), overrides or {})
        cfg = load_config(None, environ={}, overrides=merged)
        app = Appliance(cfg, **kw)
        await app.start()
        started.append(app)
        return app

    yield make
    for app in started:
        await app.stop()


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """A tiny TOML writer for test configs (tables, arrays of tables, scalars, lists)."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f'"{k}" = {scalar(x)}' for k, x in v.items()) + " }"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        simple = {
            k: v
            for k, v in d.items()
            if not isinstance(v, dict)
            and not (isinstance(v, list) and v and isinstance(v[0], dict))
        }
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {scalar(v)}" for k, v in simple.items())
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                table(name, v)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    lines.append(f"[[{name}]]")
                    lines.extend(f"{ik} = {scalar(iv)}" for ik, iv in item.items())

    table("", data)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def subprocess_config(tmp_path: Path, lab: Lab) -> Callable[..., tuple[Path, int]]:
    """Write a config for ``postwarden serve`` in a child process; returns (file, smtp port)."""

    def make(overrides: dict[str, Any] | None = None) -> tuple[Path, int]:
        port = free_port()
        data = deep_merge(
            base_overrides(tmp_path, lab),
            {
                "smtp": {"listen": [f"127.0.0.1:{port}"]},
                "control": {"listen": f"127.0.0.1:{free_port()}"},
            },
        )
        data = deep_merge(data, overrides or {})
        path = write_toml(tmp_path / "postwarden.toml", data)
        load_config(path, environ={})  # fail early, in the test, on a bad config
        return path, port

    return make


async def postwarden_cli(spool_path: str | Path, *args: str) -> tuple[int, str]:
    """Run ``python -m postwarden.cli ARGS`` against a spool; (exit code, output)."""
    import asyncio
    import os
    import subprocess

    env = {**os.environ, "POSTWARDEN_SPOOL__PATH": str(spool_path)}
    env.pop("POSTWARDEN_CONFIG", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "postwarden.cli",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


_CLI_LOCK = threading.Lock()


def cli_here(*argv: str) -> tuple[int, str, str]:
    """``postwarden ARGV`` through the CLI's ``main`` in this process (a subprocess costs
    a second of imports per call): exit code, stdout, stderr. One call at a time (the
    output is caught by redirecting ``sys.stdout``); the root logger is put back as it
    was. For a command that must run as its own process (signals, a crash, a module
    hidden from a fresh interpreter), start one."""
    from postwarden.cli import main

    # stdout has a buffer: commands that print a stored message write bytes to it
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline=""), io.StringIO()
    root = logging.getLogger()
    with _CLI_LOCK:
        handlers, level = root.handlers[:], root.level
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(list(argv))
                except SystemExit as exc:  # argparse's own refusals, --help
                    code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
    out.flush()
    return code, out.buffer.getvalue().decode("utf-8", "replace"), err.getvalue()


async def config_cli(config: Path, *args: str) -> tuple[int, str]:
    """``postwarden ARGS --config CONFIG`` (:func:`cli_here`, in a thread): exit code and
    stdout then stderr."""
    code, out, err = await asyncio.to_thread(cli_here, *args, "--config", str(config))
    return code, out + err


async def operator_key_via_cli(config: Path) -> str:
    """``postwarden admin create-key`` against ``config``'s database."""
    code, out, _ = await asyncio.to_thread(cli_here, "admin", "create-key", "--config", str(config))
    op = out.strip()
    assert code == 0 and op.startswith("pw_"), op
    return op


async def tenant_key_via_cli(config: Path, base: str, name: str = "acme") -> str:
    """An operator key (:func:`operator_key_via_cli`), then a tenant ``name`` and a key
    of it with every tenant scope, through the API at ``base``."""
    import httpx

    op = await operator_key_via_cli(config)
    async with httpx.AsyncClient(
        base_url=base, timeout=30, headers={"Authorization": f"Bearer {op}"}
    ) as c:
        tid = (await c.post("/v1/tenants", json={"name": name})).json()["id"]
        r = await c.post(f"/v1/tenants/{tid}/keys", json={"scopes": ["send", "read", "manage"]})
        key: str = r.json()["key"]
        return key


LONG_SECONDS = 10.0  # what a test marked ``long`` without a figure is taken to take


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: the shares are of what runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests marked ``long`` (``long(seconds)`` when one takes far more than the
    others) start first, spread over the workers. ``--dist worksteal`` gives each
    worker a contiguous share of the collection at the start, and an idle worker later
    takes from the end of another's queue: with the long tests all at the front, the
    first worker ran every one of them in turn, and the run waited for it. So each
    share starts with some of them, the longest placed where the least is."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))

    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("long")
        return float(mark.args[0]) if mark is not None and mark.args else LONG_SECONDS

    long = [item for item in items if item.get_closest_marker("long") is not None]
    rest = [item for item in items if item.get_closest_marker("long") is None]
    long.sort(key=seconds, reverse=True)  # stable: the same order on every worker
    if workers <= 1:
        items[:] = long + rest
        return
    sizes, left = [], len(items)
    for k in range(workers):  # the shares worksteal cuts, in its order
        sizes.append(left // (workers - k))
        left -= sizes[-1]
    heads: list[list[pytest.Item]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for item in long:
        k = min((j for j in range(workers) if len(heads[j]) < sizes[j]), key=lambda j: load[j])
        heads[k].append(item)
        load[k] += seconds(item)
    ordered: list[pytest.Item] = []
    others = iter(rest)
    for k in range(workers):
        ordered += heads[k]
        ordered += [next(others) for _ in range(sizes[k] - len(heads[k]))]
    items[:] = ordered + list(others)
