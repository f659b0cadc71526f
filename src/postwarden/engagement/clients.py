"""Mail clients and devices of tracking hits (issue 23's per-campaign "devices and mail
clients" breakdown): :func:`client_of` names the mail client and the device class of a
hit from its user agent, as two short labels fit to be analytics keys.

The names come from a small data file next to this module, ``clients.toml``, read once
at import, and from ua-parser (uap-core's regexes):

1. the file's ``[[rules]]``, in order: the first whose ``user_agent`` regular
   expression (case-insensitive, searched) matches names the client, and the device if
   it says. They cover what ua-parser does not name or names wrongly: Apple Mail
   Privacy Protection's bare "Mozilla/5.0", Mail on iOS and macOS, Outlook's mobile
   apps, Gmail's prefetch;
2. otherwise ua-parser's browser family, looked up in the file's ``[families]``
   (a family not listed: ``other``);
3. the device class, where neither fixed it, from ua-parser's device and OS.

Device classes: ``desktop``, ``mobile``, ``tablet``, ``proxy`` (an image proxy fetching
on the reader's behalf: Gmail's, Yahoo's, Apple's), ``bot``, ``unknown``. Every label is
at most :data:`MAX_LABEL` characters of ``[a-z0-9.-]``, whatever the input.

Pure: no I/O but reading ``clients.toml`` at import. The user agent is cut to
:data:`USER_AGENT_MAX` characters first, as the tracking endpoints store it.

Cost, measured on the 2-core build machine (Python 3.11, ua-parser 1.0.2 with its
pure-Python resolver; a one-off script): a cache hit 0.2-0.3 µs; a miss (rules,
then ua-parser) 1.0 ms median, 1.6 ms p90 for real user agents, 4.3 ms for 500
characters of garbage (12-15 ms uncut at 3000); the first call of a process 136 ms more,
while ua-parser loads its regexes. With
``ua-parser[regex]`` (its Rust resolver, ``ua-parser-rs``, found and used by itself) a
miss is 22 µs median, 36 µs p90, 25 µs for 500 characters of garbage, and the labels
are the same (this module's tests pass with either). Hits repeat a few hundred user
agents, so the cache of :data:`CACHE_SIZE` entries answers nearly all of them.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import ua_parser

SHIPPED = "clients.toml"
#: The longest label: the client's or the device class's.
MAX_LABEL = 48
#: As the tracking endpoints store user agents (control/tracking.py): nothing after
#: this changes a stored hit's labels, and it bounds a miss's cost and the cache.
USER_AGENT_MAX = 500
CACHE_SIZE = 4096

OTHER = "other"
DESKTOP, MOBILE, TABLET, PROXY, BOT, UNKNOWN = (
    "desktop",
    "mobile",
    "tablet",
    "proxy",
    "bot",
    "unknown",
)
DEVICES = frozenset({DESKTOP, MOBILE, TABLET, PROXY, BOT, UNKNOWN})

_LABEL_RE = re.compile(rf"[a-z0-9][a-z0-9.-]{{0,{MAX_LABEL - 1}}}")
_RULE_FIELDS = frozenset({"name", "device", "user_agent"})
_FAMILY_FIELDS = frozenset({"name", "device"})

# ua-parser's OS families (uap-core's regexes.yaml, os_replacement or the captured
# name). Windows of every version is "Windows"; phones' Windows are named apart.
_MOBILE_OS = frozenset(
    {
        "iOS",
        "Android",
        "Windows Phone",
        "Windows Mobile",
        "Windows CE",
        "BlackBerry OS",
        "BlackBerry Tablet OS",
        "KaiOS",
        "Firefox OS",
        "Symbian OS",
        "Symbian^3",
        "HarmonyOS",
        "Tizen",
        "Sailfish",
        "webOS",
        "Bada",
    }
)
_DESKTOP_OS = frozenset(
    {
        "Mac OS X",
        "Mac OS",
        "Linux",
        "Ubuntu",
        "Kubuntu",
        "Debian",
        "Fedora",
        "Red Hat",
        "CentOS",
        "SUSE",
        "openSUSE",
        "Mint",
        "Linux Mint",
        "Arch Linux",
        "Gentoo",
        "Slackware",
        "Mandriva",
        "elementary OS",
        "Chrome OS",
        "FreeBSD",
        "OpenBSD",
        "NetBSD",
        "Solaris",
    }
)
_TABLET_DEVICES = frozenset({"iPad", "Kindle", "Generic Tablet"})
_PHONE_DEVICES = frozenset({"iPhone", "iPod", "Generic Smartphone", "Generic Feature Phone"})
# Chrome for Android and Android's web view write "Mobile" on phones and leave it out on
# tablets (https://developer.chrome.com/docs/multidevice/user-agent/); so does Firefox
# ("Android 14; Mobile; rv:..." against "Android 14; Tablet; rv:...").
_MOBILE_TOKEN = re.compile(r"\bMobile\b")
_TABLET_TOKEN = re.compile(r"\bTablet\b")


class ClientRulesError(ValueError):
    """The clients data file is malformed; the message names the file, entry and
    field."""


@dataclass(frozen=True)
class Rule:
    name: str  # the client's label
    device: str | None  # None: from ua-parser's device and OS
    user_agent: re.Pattern[str]


@dataclass(frozen=True)
class Table:
    rules: tuple[Rule, ...]
    #: ua-parser's browser family → (client label, device class or None)
    families: dict[str, tuple[str, str | None]]


def client_of(user_agent: str | None) -> tuple[str, str]:
    """(mail client, device class) of a tracking hit's user agent: ``("gmail",
    "proxy")``, ``("apple-mail", "desktop")``, ``("ios-mail", "mobile")``, ...;
    ``("other", "unknown")`` for None, an empty string or what nothing recognises.
    Total: any string gives two labels of at most :data:`MAX_LABEL` characters, the
    second one of :data:`DEVICES`."""
    return _classify((user_agent or "")[:USER_AGENT_MAX].strip())


@lru_cache(maxsize=CACHE_SIZE)
def _classify(ua: str) -> tuple[str, str]:
    return classify(ua, TABLE)


def classify(ua: str, table: Table) -> tuple[str, str]:
    """:func:`client_of` against another table, uncached (for tests and tools)."""
    if not ua:
        return OTHER, UNKNOWN
    for rule in table.rules:
        if rule.user_agent.search(ua):
            if rule.device is not None:
                return rule.name, rule.device
            return rule.name, _device(ua, ua_parser.parse(ua))
    result = ua_parser.parse(ua)
    family = result.user_agent.family if result.user_agent else None
    name, device = table.families.get(family or "", (OTHER, None))
    return name, device or _device(ua, result)


def _device(ua: str, result: ua_parser.Result) -> str:
    """The device class from ua-parser's device and OS families."""
    device = result.device
    family = device.family if device else ""
    if family == "Spider":
        return BOT
    if family in _TABLET_DEVICES or (
        device is not None and device.brand == "Generic_Android_Tablet"
    ):
        return TABLET
    os = result.os.family if result.os else ""
    if os in _MOBILE_OS:
        # Firefox's "Tablet" token, or a browser's or web view's string without "Mobile".
        if os == "Android" and (
            _TABLET_TOKEN.search(ua) or ("Safari/" in ua and not _MOBILE_TOKEN.search(ua))
        ):
            return TABLET
        return MOBILE
    if family in _PHONE_DEVICES:
        return MOBILE
    if os in _DESKTOP_OS or os.startswith("Windows") or family == "Mac":
        return DESKTOP
    return UNKNOWN


# -- the data file ------------------------------------------------------------------


def load_table(text: str, where: str) -> Table:
    """A clients data file's rules and families; a bad file raises ClientRulesError
    naming the file, entry and field."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ClientRulesError(f"{where}: {exc}") from exc
    unknown = set(data) - {"rules", "families"}
    if unknown:
        raise ClientRulesError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise ClientRulesError(f"{where}: rules: expected an array of tables [[rules]]")
    families = data.get("families", {})
    if not isinstance(families, dict):
        raise ClientRulesError(f"{where}: families: expected a table [families]")
    return Table(
        rules=tuple(_rule(entry, f"{where}: rules[{i}]") for i, entry in enumerate(rules)),
        families={
            family: _family(value, f"{where}: families.{family!r}")
            for family, value in families.items()
        },
    )


def _rule(entry: Any, where: str) -> Rule:
    if not isinstance(entry, dict):
        raise ClientRulesError(f"{where}: expected a table")
    unknown = set(entry) - _RULE_FIELDS
    if unknown:
        raise ClientRulesError(f"{where}: {sorted(unknown)[0]}: unknown field")
    pattern = entry.get("user_agent")
    if not isinstance(pattern, str) or not pattern:
        raise ClientRulesError(f"{where}: user_agent: expected a regular expression")
    try:
        compiled = re.compile(pattern, re.I)
    except re.error as exc:
        raise ClientRulesError(f"{where}: user_agent: bad regular expression: {exc}") from exc
    return Rule(
        name=_label(entry.get("name"), f"{where}: name"),
        device=_device_class(entry.get("device"), f"{where}: device"),
        user_agent=compiled,
    )


def _family(value: Any, where: str) -> tuple[str, str | None]:
    if isinstance(value, str):
        return _label(value, where), None
    if not isinstance(value, dict):
        raise ClientRulesError(f"{where}: expected a label or a table {{name, device}}")
    unknown = set(value) - _FAMILY_FIELDS
    if unknown:
        raise ClientRulesError(f"{where}: {sorted(unknown)[0]}: unknown field")
    return (
        _label(value.get("name"), f"{where}: name"),
        _device_class(value.get("device"), f"{where}: device"),
    )


def _label(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _LABEL_RE.fullmatch(value):
        raise ClientRulesError(
            f"{where}: expected lowercase letters, digits, - and . "
            f"(at most {MAX_LABEL}), got {value!r}"
        )
    return value


def _device_class(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value not in DEVICES:
        raise ClientRulesError(f"{where}: expected one of {sorted(DEVICES)}, got {value!r}")
    return str(value)


TABLE = load_table(resources.files(__package__).joinpath(SHIPPED).read_text(), SHIPPED)
