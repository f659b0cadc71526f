"""Shaping rules: limits per (source, provider site), from a TOML file.

Pure policy, no I/O beyond reading the file. The shipped defaults
(``default_rules.toml``) are read first and an operator's file on top of them: a key
given again wins, a new site or domain adds. A bad file is refused with the line and
the key (``shaping.toml:12: sites.gmail.connection_limit: must be a positive
integer``); the caller keeps the rules in force.

* ``[default]``: the limits every (source, site) gets.
* ``[sites.<name>]``: ``mx_suffixes`` (which MX host names make a destination part of
  this provider) and limits for it.
* ``[domains."<domain>"]``: limits for one recipient domain; they win over its site's.

Limits: ``connection_limit`` (concurrent connections), ``max_messages_per_connection``,
``max_message_rate`` and ``max_connection_rate`` (``"300/min"``, ``"10/s"``,
``"1000/h"``, ``"50000/day"``). Backoff (what a deferral that speaks of pace does,
``shaping.adaptive``): ``backoff_rate`` (the factor a push-back multiplies the rate
by), ``backoff_retry_interval`` (how often a pair in backoff may probe),
``backoff_to_normal_after`` (how long without push-back before the full rate is back).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from postwarden.config import ConfigError, parse_duration
from postwarden.shaping.adaptive import ACTIONS, SHIPPED_RULES, ResponseRule, rule

LIMIT_KEYS = (
    "connection_limit",
    "max_messages_per_connection",
    "max_message_rate",
    "max_connection_rate",
    "provider_connection_limit",
    "provider_max_message_rate",
    "retry_initial",
    "retry_factor",
    "retry_max",
    "bounce_after",
    "backoff_rate",
    "backoff_retry_interval",
    "backoff_to_normal_after",
)
#: The backoff keys as :class:`~postwarden.shaping.adaptive.Aimd` fields.
BACKOFF_KEYS = {
    "backoff_rate": "decrease",
    "backoff_retry_interval": "retry_interval",
    "backoff_to_normal_after": "to_normal_after",
}
RETRY_KEYS = {
    "retry_initial": "initial",
    "retry_factor": "factor",
    "retry_max": "maximum",
    "bounce_after": "max_age",
}
_PER = {
    "s": 1.0,
    "sec": 1.0,
    "min": 60.0,
    "m": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")


class RulesError(ValueError):
    """A rules file that cannot be used; the message names file, line and key."""


@dataclass(frozen=True)
class Rate:
    """A number of events per ``period`` seconds, as written (``"300/min"``)."""

    count: float
    period: float
    text: str

    @property
    def per_second(self) -> float:
        return self.count / self.period


def parse_rate(value: object, where: str = "rate") -> Rate:
    if isinstance(value, str) and (m := _RATE.match(value.lower())) and m.group(2) in _PER:
        count = float(m.group(1))
        if count > 0:
            return Rate(count, _PER[m.group(2)], value.strip())
    raise RulesError(f'{where}: expected a rate like "300/min", "10/s", "1000/h"; got {value!r}')


@dataclass(frozen=True)
class Limits:
    connection_limit: int | None = None
    max_messages_per_connection: int | None = None
    max_message_rate: Rate | None = None
    max_connection_rate: Rate | None = None
    # The site's budget across every source (of every pool and worker): what a
    # provider allows the sender as a whole, where the limits above are per source.
    provider_connection_limit: int | None = None
    provider_max_message_rate: Rate | None = None
    # Retry schedule overrides (seconds, factor): queue.retry_* for this site or domain.
    retry_initial: float | None = None
    retry_factor: float | None = None
    retry_max: float | None = None
    # How long a recipient may stay deferred here before it bounces (queue.max_age).
    bounce_after: float | None = None
    # Backoff (None: the built-in defaults, shaping.adaptive.Aimd).
    backoff_rate: float | None = None
    backoff_retry_interval: float | None = None  # seconds
    backoff_to_normal_after: float | None = None  # seconds

    @property
    def retry(self) -> dict[str, float]:
        """The overrides as :class:`~postwarden.queue.retry.RetryPolicy` fields."""
        return {f: v for k, f in RETRY_KEYS.items() if (v := getattr(self, k)) is not None}

    @property
    def backoff(self) -> dict[str, float]:
        """The backoff settings given, as :class:`~postwarden.shaping.adaptive.Aimd`
        fields."""
        return {f: v for k, f in BACKOFF_KEYS.items() if (v := getattr(self, k)) is not None}

    def over(self, other: Limits) -> Limits:
        """These limits, with ``other``'s wherever ``other`` sets one."""
        return replace(
            self, **{k: getattr(other, k) for k in LIMIT_KEYS if getattr(other, k) is not None}
        )


@dataclass(frozen=True)
class Route:
    """A routing rule (``[[routes]]``): mail that names no pool of its own leaves from
    ``pool`` when it is for one of ``domains`` (recipient domains) or from one of
    ``senders`` (sending domains), or, decided when a connection opens, for a provider
    site of ``sites``. Criteria given together must all match; the first route that
    matches wins."""

    pool: str
    domains: frozenset[str] = frozenset()
    senders: frozenset[str] = frozenset()
    sites: frozenset[str] = frozenset()

    def matches(self, domain: str, sender: str, site: str | None) -> bool:
        return (
            (not self.domains or domain in self.domains)
            and (not self.senders or sender in self.senders)
            and (not self.sites or (site is not None and site in self.sites))
        )


@dataclass(frozen=True)
class Site:
    name: str
    mx_suffixes: tuple[str, ...]
    limits: Limits


@dataclass(frozen=True)
class Rules:
    default: Limits
    sites: Mapping[str, Site] = field(default_factory=dict)
    domains: Mapping[str, Limits] = field(default_factory=dict)
    # Response rules, first match wins: the operator's, then the shipped ones.
    responses: tuple[ResponseRule, ...] = SHIPPED_RULES
    routes: tuple[Route, ...] = ()

    def route(self, domain: str, sender: str, site: str | None = None) -> str | None:
        """The pool a route gives mail for ``domain`` from ``sender`` (a sending
        domain): routes by domain and sender when ``site`` is None (the mail is being
        queued), routes by site when it is given (a connection opens)."""
        domain, sender = domain.lower(), sender.lower()
        for r in self.routes:
            if bool(r.sites) == (site is not None) and r.matches(domain, sender, site):
                return r.pool
        return None

    def site_for(self, mx_hosts: Iterable[str]) -> str:
        """The provider site of a destination, from its MX host names: the first site
        one of whose suffixes ends an MX host; else the destination's own site, named
        after its sorted MX hosts (domains sharing MX hosts share it)."""
        hosts = [h.lower().rstrip(".") for h in mx_hosts]
        for site in self.sites.values():
            for h in hosts:
                if any(h == s or h.endswith("." + s) for s in site.mx_suffixes):
                    return site.name
        return "mx:" + ",".join(sorted(set(hosts))) if hosts else "mx:-"

    def limits_for(self, site: str, domain: str | None = None) -> Limits:
        """The limits in force: default, then the site's, then the domain's."""
        limits = self.default
        if site in self.sites:
            limits = limits.over(self.sites[site].limits)
        if domain is not None and domain.lower() in self.domains:
            limits = limits.over(self.domains[domain.lower()])
        return limits


# ---------------------------------------------------------------- loading


def _line_of(text: str, table: str, key: str | None) -> int:
    """Best effort: the line of ``key`` inside ``[table]`` (tomllib gives no positions)."""
    lines = text.splitlines()
    if not table:  # a top-level key or table
        assert key is not None
        top = re.compile(rf'^\s*\[*\s*(?:"{re.escape(key)}"|{re.escape(key)})\b')
        return next((i + 1 for i, ln in enumerate(lines) if top.match(ln)), 0)
    header = re.compile(
        r"^\s*\[\s*"
        + r"\s*\.\s*".join(rf'(?:"{re.escape(p)}"|{re.escape(p)})' for p in table.split("\0"))
        + r"\s*\]\s*(#.*)?$"
    )
    start = next((i for i, ln in enumerate(lines) if header.match(ln)), None)
    if start is None:
        return 0
    if key is None:
        return start + 1
    key_re = re.compile(rf'^\s*(?:"{re.escape(key)}"|{re.escape(key)})\s*=')
    for i in range(start + 1, len(lines)):
        if lines[i].lstrip().startswith("["):
            break
        if key_re.match(lines[i]):
            return i + 1
    return start + 1


def _limits(data: Mapping[str, Any], where: str, err: Any, allowed: Iterable[str]) -> Limits:
    allowed = set(allowed)
    for key in data:
        if key not in allowed:
            err(key, f"{where}.{key}: unknown key (known: {', '.join(sorted(allowed))})")
    out: dict[str, Any] = {}
    for key in ("connection_limit", "max_messages_per_connection", "provider_connection_limit"):
        if key in data:
            v = data[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                err(key, f"{where}.{key}: must be a positive integer, got {v!r}")
            out[key] = v
    for key in ("max_message_rate", "max_connection_rate", "provider_max_message_rate"):
        if key in data:
            try:
                out[key] = parse_rate(data[key], f"{where}.{key}")
            except RulesError as exc:
                err(key, str(exc))
    durations = (
        "retry_initial",
        "retry_max",
        "bounce_after",
        "backoff_retry_interval",
        "backoff_to_normal_after",
    )
    for key in durations:
        if key in data:
            try:
                out[key] = parse_duration(data[key], f"{where}.{key}")
            except ConfigError as exc:
                err(key, str(exc))
            if out.get(key) == 0:
                err(key, f"{where}.{key}: must be greater than 0")
    if "retry_factor" in data:
        v = data["retry_factor"]
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 1:
            err("retry_factor", f"{where}.retry_factor: must be a number >= 1, got {v!r}")
        out["retry_factor"] = float(v)
    if "backoff_rate" in data:
        v = data["backoff_rate"]
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
            err(
                "backoff_rate",
                f"{where}.backoff_rate: must be a number between 0 and 1 (the factor a"
                f" push-back multiplies the rate by), got {v!r}",
            )
        out["backoff_rate"] = float(v)
    return Limits(**out)


def parse_rules(text: str, source: str = "shaping.toml", base: Rules | None = None) -> Rules:
    """Rules from TOML text, on top of ``base`` (the shipped defaults, normally)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{source}: {exc}") from exc

    def fail(table: str, key: str | None, message: str) -> None:
        raise RulesError(f"{source}:{_line_of(text, table, key)}: {message}")

    for key in data:
        if key not in ("default", "sites", "domains", "responses", "routes"):
            fail(
                "",
                key,
                f"{key}: unknown table (known: default, sites, domains, responses, routes)",
            )
    default = base.default if base else Limits()
    if "default" in data:
        default = default.over(
            _limits(data["default"], "default", lambda k, m: fail("default", k, m), LIMIT_KEYS)
        )
    sites = dict(base.sites) if base else {}
    for name, table in data.get("sites", {}).items():
        if not isinstance(table, dict):
            fail("sites", name, f"sites.{name}: must be a table")
        where = f"sites.{name}"

        def site_err(k: str, m: str, _n: str = name) -> None:
            fail(f"sites\0{_n}", k, m)

        limits = _limits(table, where, site_err, (*LIMIT_KEYS, "mx_suffixes"))
        suffixes = table.get("mx_suffixes")
        prev = sites.get(name)
        if suffixes is None:
            if prev is None:
                site_err("mx_suffixes", f"{where}.mx_suffixes: a new site needs its MX suffixes")
            suffixes = list(prev.mx_suffixes) if prev else []
        if not isinstance(suffixes, list) or not all(
            isinstance(s, str) and s.strip(".") for s in suffixes
        ):
            site_err("mx_suffixes", f"{where}.mx_suffixes: must be a list of host name suffixes")
        merged = prev.limits.over(limits) if prev else limits
        sites[name] = Site(name, tuple(s.lower().strip(".") for s in suffixes), merged)
    domains = dict(base.domains) if base else {}
    for name, table in data.get("domains", {}).items():
        if not isinstance(table, dict):
            fail("domains", name, f"domains.{name}: must be a table")

        def dom_err(k: str, m: str, _n: str = name) -> None:
            fail(f"domains\0{_n}", k, m)

        limits = _limits(table, f'domains."{name}"', dom_err, LIMIT_KEYS)
        key = name.lower().rstrip(".")
        domains[key] = domains[key].over(limits) if key in domains else limits
    responses = list(base.responses) if base else list(SHIPPED_RULES)
    given = data.get("responses", [])
    if not isinstance(given, list):
        fail("", "responses", "responses: must be an array of tables ([[responses]])")
    mine: list[ResponseRule] = []
    headers = [
        n + 1
        for n, ln in enumerate(text.splitlines())
        if re.match(r"^\s*\[\[\s*responses\s*\]\]", ln)
    ]
    for i, table in enumerate(given):

        def resp_err(m: str, _i: int = i) -> None:
            line = headers[_i] if _i < len(headers) else _line_of(text, "", "responses")
            raise RulesError(f"{source}:{line}: {m}")

        r = _response(table, i, resp_err)
        responses = [x for x in responses if x.name != r.name]
        mine.append(r)
    routes = list(base.routes) if base else []
    given_routes = data.get("routes", [])
    if not isinstance(given_routes, list):
        fail("", "routes", "routes: must be an array of tables ([[routes]])")
    route_lines = [
        n + 1 for n, ln in enumerate(text.splitlines()) if re.match(r"^\s*\[\[\s*routes\s*\]\]", ln)
    ]
    for i, table in enumerate(given_routes):

        def route_err(m: str, _i: int = i) -> None:
            line = route_lines[_i] if _i < len(route_lines) else _line_of(text, "", "routes")
            raise RulesError(f"{source}:{line}: {m}")

        routes.append(_route(table, i, route_err))
    return Rules(default, sites, domains, (*mine, *responses), tuple(routes))


_ROUTE_KEYS = ("pool", "domains", "senders", "sites")


def _table(table: Any, where: str, known: tuple[str, ...], fail: Any) -> None:
    """An array-of-tables entry: a table, of ``known`` keys only."""
    if not isinstance(table, dict):
        fail(f"{where}: must be a table")
    for key in table:
        if key not in known:
            fail(f"{where}.{key}: unknown key (known: {', '.join(known)})")


def _route(table: Any, i: int, fail: Any) -> Route:
    where = f"routes[{i}]"
    _table(table, where, _ROUTE_KEYS, fail)
    pool = table.get("pool")
    if not isinstance(pool, str) or not pool:
        fail(f"{where}.pool: a route needs the name of a pool")
    lists: dict[str, frozenset[str]] = {}
    for key in ("domains", "senders", "sites"):
        v = table.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            fail(f"{where}.{key}: must be a list of names, got {v!r}")
        lists[key] = frozenset(x.lower().rstrip(".") for x in v)
    if not any(lists.values()):
        fail(f"{where}: give domains, senders or sites")
    if lists["sites"] and (lists["domains"] or lists["senders"]):
        # The site is known only once a connection opens, the others when mail is
        # queued: a route decides at one of the two.
        fail(f"{where}: sites cannot be combined with domains or senders")
    return Route(pool, lists["domains"], lists["senders"], lists["sites"])


_RESPONSE_KEYS = ("name", "action", "duration", "code", "enhanced", "text", "sites", "factor")


def _response(table: Any, i: int, fail: Any) -> ResponseRule:
    where = f"responses[{i}]"
    _table(table, where, _RESPONSE_KEYS, fail)
    name = table.get("name")
    if not isinstance(name, str) or not name:
        fail(f"{where}.name: a rule needs a name")
    if table.get("action") not in ACTIONS:
        fail(f"{where}.action: one of {', '.join(ACTIONS)}, got {table.get('action')!r}")
    try:
        duration = parse_duration(table.get("duration"), f"{where}.duration")
    except ConfigError as exc:
        fail(str(exc))
    code = table.get("code")
    if code is not None and (
        isinstance(code, bool) or not isinstance(code, int) or not 200 <= code <= 599
    ):
        fail(f"{where}.code: an SMTP reply code, got {code!r}")
    for key in ("enhanced", "text"):
        if key in table and not isinstance(table[key], str):
            fail(f"{where}.{key}: must be a string")
    sites = table.get("sites", [])
    if not isinstance(sites, list) or not all(isinstance(x, str) for x in sites):
        fail(f"{where}.sites: must be a list of site names")
    factor = table.get("factor", 0.5)
    try:
        return rule(
            name,
            table["action"],
            duration,
            code=code,
            enhanced=table.get("enhanced"),
            text=table.get("text"),
            sites=sites,
            factor=float(factor),
        )
    except (ValueError, re.error) as exc:
        fail(f"{where}: {exc}")
        raise  # unreachable: fail raises


def shipped_rules() -> Rules:
    text = resources.files("postwarden.shaping").joinpath("default_rules.toml").read_text()
    return parse_rules(text, "default_rules.toml")


def load_rules(path: str | Path | None) -> Rules:
    """The shipped rules, with the operator's file (if any) on top."""
    base = shipped_rules()
    if not path:
        return base
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"{p}: {exc.strerror or exc}") from exc
    return parse_rules(text, str(p), base)
