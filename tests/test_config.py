"""The config loader refuses unknown keys and bad values with the key's path."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from postwarden.config import (
    ConfigError,
    SourceConfig,
    env_overrides,
    load_config,
    parse_duration,
    parse_size,
)
from postwarden.lab import Lab
from postwarden.supervisor import Supervisor, check_files
from tests.conftest import ApplianceFactory, base_overrides, cli_here, deep_merge, write_toml


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pw.toml"
    p.write_text(text)
    return p


def test_defaults_load_without_a_file() -> None:
    cfg = load_config(None, environ={})
    assert cfg.smtp.listen == ["127.0.0.1:2525"]
    assert cfg.control.listen == "127.0.0.1:8025"
    assert cfg.delivery.mx_port == 25
    assert cfg.queue.max_age == 5 * 86400
    assert cfg.spool.path == "./var/spool"


def test_file_values_and_units(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
[smtp]
listen = ["127.0.0.1:2600", "[::1]:2601"]
max_message_size = "10MB"
[queue]
max_age = "2d"
retry_initial = "90s"
[delivery]
tls_policies = { "bank.test" = "required" }
[delivery.timeouts]
connect = "250ms"
[[dkim.keys]]
domain = "a.test"
selector = "s1"
key_file = "k.pem"
algorithm = "ed25519-sha256"
""",
        ),
        environ={},
    )
    assert cfg.smtp.max_message_size == 10 * 1024 * 1024
    assert cfg.queue.max_age == 2 * 86400 and cfg.queue.retry_initial == 90
    assert cfg.delivery.timeouts.connect == 0.25
    assert cfg.delivery.tls_policies == {"bank.test": "required"}
    assert cfg.dkim.keys[0].algorithm == "ed25519-sha256"


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("[smtp]\nlisten = ['127.0.0.1']", "smtp.listen[0]"),
        ("[smtp]\nlisten = '127.0.0.1:25'", "smtp.listen"),
        ("[smtp]\nmax_recipents = 5", "smtp.max_recipents"),
        ("[smpt]\nlisten = []", "smpt"),
        ("[smtp]\ntrusted_networks = ['10.0.0.0/33']", "smtp.trusted_networks[0]"),
        ("[delivery]\ntls = 'maybe'", "delivery.tls"),
        ("[delivery]\nmx_port = 'x'", "delivery.mx_port"),
        ("[delivery]\nmx_port = 70000", "delivery.mx_port"),
        ("[delivery.timeouts]\nconnect = 'soon'", "delivery.timeouts.connect"),
        ("[queue]\nmax_age = -1", "queue.max_age"),
        ("[[dkim.keys]]\ndomain = 'a'\nselector = 's'", "dkim.keys[0].key_file"),
        ("[[smtp.users]]\nusername = 'u'\npassword_hash = 'plain'", "smtp.users[0].password_hash"),
        ("[smtp]\nmax_recipients = true", "smtp.max_recipients"),
        ("[control]\npublic_url = 'mail.example.com'", "control.public_url"),
        ("[control]\npublic_url = 'ftp://mail.example.com'", "control.public_url"),
        ("[control]\npublic_url = 'https://mail.example.com/?a=1'", "control.public_url"),
        ("[control]\npublic_url = 'https://u:p@mail.example.com'", "control.public_url"),
        ("[control]\npublic_url = 'https://mail example.com'", "control.public_url"),
        ("[control]\npublic_url = 'https://mail.example.com:99999'", "control.public_url"),
    ],
)
def test_bad_values_are_refused_with_their_path(tmp_path: Path, text: str, path: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text), environ={})
    assert str(exc.value).startswith(path + ":") or str(exc.value).startswith(path + " ")


def test_environment_overrides_win_and_are_validated(tmp_path: Path) -> None:
    f = write(tmp_path, "[delivery]\nmx_port = 2526\n")
    cfg = load_config(
        f,
        environ={
            "POSTWARDEN_DELIVERY__MX_PORT": "2600",
            "POSTWARDEN_SMTP__LISTEN": '["127.0.0.2:25"]',
            "POSTWARDEN_SERVER__HOSTNAME": "mx.example.test",
            "POSTWARDEN_CONFIG": "ignored: no double underscore",
        },
    )
    assert cfg.delivery.mx_port == 2600
    assert cfg.smtp.listen == ["127.0.0.2:25"]
    assert cfg.server.hostname == "mx.example.test"
    with pytest.raises(ConfigError, match=r"^delivery\.mx_prot:"):
        load_config(None, environ={"POSTWARDEN_DELIVERY__MX_PROT": "1"})


def test_env_override_parsing() -> None:
    assert env_overrides({"POSTWARDEN_A__B__C": "1", "OTHER": "x"}) == {"a": {"b": {"c": 1}}}


def test_units() -> None:
    assert parse_duration("5d") == 432000
    assert parse_duration(1.5) == 1.5
    assert parse_size("1KB") == 1024
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_missing_and_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[smtp\n"), environ={})


# --------------------------------------------------------- pydantic values, files it names

BAD_RULES = "[sites.gmail]\nmx_suffixes = []\nconnection_limit = 0\n"
BAD_PATTERNS = '[[texts]]\ncategory = "nope"\npatterns = ["x"]\n'


def test_config_imports_nothing_else_from_postwarden() -> None:
    code = (
        "import sys, postwarden.config; print(sorted(m for m in sys.modules if 'postwarden' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["['postwarden',", "'postwarden.config']"]


def test_values_are_frozen_and_every_copy_is_validated() -> None:
    cfg = load_config(None, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.control.rate_limit = 1.0  # type: ignore[misc]
    smaller = dataclasses.replace(cfg.smtp, max_recipients=5)
    assert smaller.max_recipients == 5 and cfg.smtp.max_recipients == 1000
    with pytest.raises(ValueError, match="greater than 0"):
        dataclasses.replace(cfg.smtp, max_recipients=0)
    assert SourceConfig("a", "10.0.0.1").state == "active"  # positional, as dataclasses


def test_more_messages_name_the_key_path() -> None:
    cases = {
        "smtp.listen[1]: bad port in '127.0.0.1:99999'": {
            "smtp": {"listen": ["127.0.0.1:25", "127.0.0.1:99999"]}
        },
        "smtp: expected a table, got str": {"smtp": "x"},
        "control.rate_limit: must be greater than 0, got 0.0": {"control": {"rate_limit": 0}},
        "spool.segment_size: must be greater than 0, got 0": {"spool": {"segment_size": "0MB"}},
        "queue.retry_factor: expected a number, got '2'": {"queue": {"retry_factor": "2"}},
        "pools[0].members[0].wieght: unknown key (known here: source, weight)": {
            "pools": [{"name": "p", "members": [{"source": "a", "wieght": 1}]}]
        },
        "delivery.tls_policies.b.test: must be one of 'opportunistic', 'required', "
        "'disabled'; got 'x'": {"delivery": {"tls_policies": {"b.test": "x"}}},
        "source: unknown key": {"source": "elsewhere"},
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError) as exc:
            load_config(None, environ={}, overrides=overrides)
        assert str(exc.value).startswith(message), (message, str(exc.value))


BAD_VERDICTS = '[[rules]]\nname = "x"\nkinds = ["open"]\nip = ["not a network"]\n'


def test_loading_reads_no_rules_or_patterns_file(tmp_path: Path) -> None:
    """The files are read by who uses them; check-config, serve and reload check them."""
    cfg = load_config(
        None,
        environ={},
        overrides={
            "shaping": {"rules_file": str(tmp_path / "none.toml")},
            "bounces": {"patterns_file": str(tmp_path / "none.toml")},
        },
    )
    with pytest.raises(ConfigError, match=r"^bounces\.patterns_file: "):
        check_files(cfg)


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("shaping.rules_file", BAD_RULES),
        ("bounces.patterns_file", BAD_PATTERNS),
        ("tracking.verdicts_file", BAD_VERDICTS),
    ],
)
def test_check_config_and_the_supervisor_refuse_a_bad_file(
    tmp_path: Path, key: str, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "file.toml"
    bad.write_text(text)
    section, name = key.split(".")
    config = write(tmp_path, f'[{section}]\n{name} = "{bad}"\n[smtp]\nmax_recipients = 7\n')
    code, out, err = cli_here("check-config", "--no-database", "--config", str(config))
    assert code == 2 and out == "", (out, err)
    assert err.startswith(f"postwarden: config error: {key}: {bad}"), err

    # The supervisor checks a file before its workers reload it: refused, config kept.
    running = load_config(None, environ={})
    sup = Supervisor(running, str(config), 2)
    with caplog.at_level(logging.ERROR, logger="postwarden"):
        sup.reload()
    assert sup.cfg is running
    assert re.search(f"event=reload_refused error=.{re.escape(f'{key}: {bad}')}", caplog.text)

    bad.unlink()  # an empty file: nothing but the shipped rules
    bad.write_text("")
    code, out, err = cli_here("check-config", "--no-database", "--config", str(config))
    assert (code, out) == (0, f"config ok: {config} (database not checked)\n"), err
    sup.reload()
    assert sup.cfg.smtp.max_recipients == 7


async def test_serve_refuses_a_bad_patterns_file_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "patterns.toml"
    bad.write_text(BAD_PATTERNS)
    config = write(tmp_path, f'[bounces]\npatterns_file = "{bad}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTWARDEN_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "postwarden.cli", "serve", "--config", str(config),
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2
    assert err.decode().startswith(f"postwarden: config error: bounces.patterns_file: {bad}")


async def test_the_appliance_refuses_a_reload_with_a_bad_file(
    tmp_path: Path, lab: Lab, appliance: ApplianceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """One process (no supervisor): a bad rules or patterns file refuses the whole
    reload, as a bad key does; the running config stays."""
    rules, patterns = tmp_path / "rules.toml", tmp_path / "patterns.toml"
    rules.write_text("")
    patterns.write_text("")
    files = {
        "shaping": {"rules_file": str(rules)},
        "bounces": {"patterns_file": str(patterns)},
    }
    config = write_toml(tmp_path / "pw.toml", deep_merge(base_overrides(tmp_path, lab), files))
    app = await appliance(files, config_path=str(config))
    for key, path, text in (
        ("shaping.rules_file", rules, BAD_RULES),
        ("bounces.patterns_file", patterns, BAD_PATTERNS),
    ):
        path.write_text(text)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="postwarden"):
            assert app.reload() is False
        assert re.search(f"event=reload_refused error=.{re.escape(f'{key}: {path}')}", caplog.text)
        path.write_text("")
    assert app.reload() is True


async def test_the_lab_refuses_a_bad_rules_file_at_start(tmp_path: Path, lab: Lab) -> None:
    from postwarden.lab.demo import lab_config

    bad = tmp_path / "rules.toml"
    bad.write_text(BAD_RULES)
    config = write(tmp_path, f'[shaping]\nrules_file = "{bad}"\n')
    with pytest.raises(ConfigError, match=rf"^shaping\.rules_file: {re.escape(str(bad))}:3: "):
        lab_config(str(config), lab, tmp_path / "var")
