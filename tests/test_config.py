"""The config loader refuses unknown keys and bad values with the key's path."""

from __future__ import annotations

from pathlib import Path

import pytest

from postwarden.config import ConfigError, env_overrides, load_config, parse_duration, parse_size


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
