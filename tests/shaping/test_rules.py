"""Shaping rules: rates, provider sites from MX names, precedence, and a bad file
refused with its line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from postwarden.shaping.rules import RulesError, load_rules, parse_rate, parse_rules, shipped_rules


def test_rates() -> None:
    assert parse_rate("300/min").per_second == 5.0
    assert parse_rate("10/s").per_second == 10.0
    assert parse_rate("3600/h").per_second == 1.0
    assert parse_rate("86400/day").per_second == 1.0
    for bad in ("300", "0/min", "5/fortnight", 300, "-1/s"):
        with pytest.raises(RulesError):
            parse_rate(bad)


def test_shipped_sites_group_providers_by_mx() -> None:
    rules = shipped_rules()
    assert (
        rules.site_for(["gmail-smtp-in.l.google.com.", "alt1.gmail-smtp-in.l.google.com"])
        == "gmail"
    )
    assert rules.site_for(["aspmx.l.GOOGLE.com"]) == "gmail"  # Google Workspace too
    assert rules.site_for(["example-com.mail.protection.outlook.com"]) == "microsoft"
    assert rules.site_for(["mta5.am0.yahoodns.net"]) == "yahoo"
    assert rules.site_for(["mx00.gmx.net", "mx01.gmx.net"]) == "gmx_webde"
    # Unknown providers: one site per set of MX hosts, whatever their order.
    assert rules.site_for(["b.mx.test", "a.mx.test"]) == rules.site_for(["a.mx.test", "b.mx.test"])
    assert rules.site_for(["notgoogle.com"]) != "gmail"
    for name in (
        "gmail",
        "microsoft",
        "yahoo",
        "apple",
        "gmx_webde",
        "mailru",
        "yandex",
        "comcast",
    ):
        assert name in rules.sites


def test_precedence_default_site_domain(tmp_path: Path) -> None:
    path = tmp_path / "shaping.toml"
    path.write_text(
        "[default]\nconnection_limit = 4\n\n"
        '[sites.gmail]\nmax_message_rate = "100/min"\n\n'
        '[sites.lab]\nmx_suffixes = ["lab.test"]\nconnection_limit = 2\n\n'
        '[domains."Slow.Example"]\nconnection_limit = 1\nmax_messages_per_connection = 5\n'
    )
    rules = load_rules(path)
    d = rules.limits_for("mx:other.test")
    assert d.connection_limit == 4 and d.max_message_rate is None  # no shipped default rate
    assert d.max_messages_per_connection == 100  # the shipped default, kept
    g = rules.limits_for("gmail")
    assert g.max_message_rate is not None and g.max_message_rate.text == "100/min"
    assert g.connection_limit == 20  # the shipped gmail value, not replaced
    assert rules.site_for(["mx1.lab.test"]) == "lab"
    assert rules.limits_for("lab").connection_limit == 2
    s = rules.limits_for("lab", "slow.example")
    assert (s.connection_limit, s.max_messages_per_connection) == (1, 5)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("[default]\nconnection_limit = 0\n", 2, "default.connection_limit: must be a positive"),
        ('[default]\n\nmax_message_rate = "fast"\n', 3, "default.max_message_rate"),
        ("[sites.gmail]\nconection_limit = 3\n", 2, "sites.gmail.conection_limit: unknown key"),
        ("[sites.new]\nconnection_limit = 3\n", 1, "a new site needs its MX suffixes"),
        ('[domains."a.test"]\nmx_suffixes = ["x"]\n', 2, "unknown key"),
        ("[limits]\nx = 1\n", 1, "limits: unknown table"),
        ("[default\n", None, "shaping.toml"),
        ("[default]\nbackoff_rate = 1.5\n", 2, "default.backoff_rate: must be a number between"),
        ("[sites.gmail]\n\nbackoff_rate = 0\n", 3, "sites.gmail.backoff_rate"),
        ('[default]\nbackoff_rate = "half"\n', 2, "default.backoff_rate"),
        (
            '[sites.yahoo]\nbackoff_retry_interval = "soon"\n',
            2,
            "sites.yahoo.backoff_retry_interval: expected a duration",
        ),
        (
            '[domains."a.test"]\nbackoff_to_normal_after = 0\n',
            2,
            'domains."a.test".backoff_to_normal_after: must be greater than 0',
        ),
    ],
)
def test_a_bad_file_names_line_and_key(text: str, line: int | None, words: str) -> None:
    with pytest.raises(RulesError) as exc:
        parse_rules(text, "shaping.toml", shipped_rules())
    msg = str(exc.value)
    assert words in msg, msg
    if line is not None:
        assert msg.startswith(f"shaping.toml:{line}: "), msg


def test_backoff_settings_per_site_and_domain() -> None:
    rules = parse_rules(
        '[default]\nbackoff_retry_interval = "20s"\n'
        '[sites.yahoo]\nbackoff_rate = 0.25\nbackoff_to_normal_after = "5m"\n'
        '[domains."aol.test"]\nbackoff_retry_interval = 60\n',
        "shaping.toml",
        shipped_rules(),
    )
    assert shipped_rules().limits_for("mx:a.test").backoff == {}  # the built-in defaults
    assert rules.limits_for("mx:a.test").backoff == {"retry_interval": 20.0}
    assert rules.limits_for("yahoo").backoff == {
        "decrease": 0.25,
        "retry_interval": 20.0,
        "to_normal_after": 300.0,
    }
    assert rules.limits_for("yahoo", "aol.test").backoff["retry_interval"] == 60.0
