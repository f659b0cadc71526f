"""People versus machines: the verdicts on tracking hits (docs/verdicts.md, decision
0011 "Hits first, verdicts after").

The pixel and the redirect store every hit as it comes; a verdict pass later judges
the hits of one message together, because some rules need the others: every link
clicked at once, a pixel fetched just before a click. Pure: no I/O but reading the rule
files, once, in :func:`load_rules`.

A rule is a name (the verdict's reason), the hit kinds it judges, and one or more
conditions that must all hold:

``user_agent``      regular expressions (case-insensitive, searched), any one
``ip``              networks (CIDR, IPv4 or IPv6), any one; a truncated address
                    (``Hit.ip_prefix``) matches only a network at least as wide
``method``          request methods, any one (``HEAD``)
``ranged``          the request had a ``Range`` header
``mx``              the recipient's MX at delivery ends with one of these domains
``after_delivery``  the hit came less than this many seconds after delivery (or
                    before delivery was recorded: only a machine is that fast)
``burst``           every link of the message (at least ``min_links``) was clicked
                    within this many seconds; the clicks of the burst match
``before_click``    an open came less than this many seconds before a click of the
                    same message; both match (the rule's ``kinds`` can narrow it)

Rules are tried in order — the operator's file first, then the shipped
``verdicts.toml`` — and the first that matches a hit decides; a hit no rule matches is
a person's. An operator's rule named like a shipped one replaces it (``enabled =
false`` removes it); ``machine = false`` makes a rule that declares people.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: A network as plain integers, for speed: (IP version, first address, prefix length).
Span = tuple[int, int, int]

KINDS = frozenset({"open", "click"})
PERSON = "person"
SHIPPED = "verdicts.toml"

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_LIST_FIELDS = ("user_agent", "ip", "method", "mx")
_SECONDS_FIELDS = ("after_delivery", "burst", "before_click")
_FIELDS = frozenset(
    {"name", "kinds", "machine", "enabled", "ranged", "min_links"}
    | set(_LIST_FIELDS)
    | set(_SECONDS_FIELDS)
)


class VerdictRulesError(ValueError):
    """A verdict rules file is malformed; the message names the file, rule and field."""


@dataclass(frozen=True)
class Hit:
    id: int
    kind: str  # "open" or "click"
    at: float  # epoch seconds
    method: str  # "GET", "HEAD", "POST"...
    ip: str | None  # possibly truncated by tenant setting (last octet 0, /48)
    user_agent: str
    link_index: int | None  # clicks: which link
    delivered_at: float | None  # when the message was delivered (None: unknown)
    mx: str | None  # the recipient MX host name the message was delivered to
    links_in_message: int | None = None  # how many tracked links the message had
    ranged: bool = False  # the request had a Range header
    #: The address was truncated to this many leading bits (24 for IPv4's last octet,
    #: 48 for IPv6); None: a whole address. ``ip`` may also be written "net/len".
    ip_prefix: int | None = None


@dataclass(frozen=True)
class Verdict:
    machine: bool
    reason: str  # the rule's name; "person" when no rule matched


@dataclass(frozen=True)
class Rule:
    name: str
    source: str  # the file it came from
    kinds: frozenset[str]
    machine: bool = True
    user_agent: tuple[re.Pattern[str], ...] = ()
    ip: tuple[Network, ...] = ()
    method: frozenset[str] = frozenset()
    ranged: bool | None = None
    mx: tuple[str, ...] = ()
    after_delivery: float | None = None
    burst: float | None = None
    min_links: int = 2
    before_click: float | None = None
    _spans: tuple[Span, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_spans", tuple(_span(n) for n in self.ip))

    def matches(self, hit: Hit, net: Span | None) -> bool:
        """The conditions that need only the hit itself (``net``: its parsed IP)."""
        if hit.kind not in self.kinds:
            return False
        if self.user_agent and not any(rx.search(hit.user_agent or "") for rx in self.user_agent):
            return False
        if self._spans and (net is None or not _within(net, self._spans)):
            return False
        if self.method and hit.method.upper() not in self.method:
            return False
        if self.ranged is not None and hit.ranged != self.ranged:
            return False
        if self.mx and not _mx_matches(hit.mx, self.mx):
            return False
        if self.after_delivery is not None:
            if hit.delivered_at is None:
                return False
            # NaN compares false: an unknown time never makes a machine.
            if not hit.at - hit.delivered_at < self.after_delivery:
                return False
        return True

    @property
    def grouped(self) -> bool:
        return self.burst is not None or self.before_click is not None


@dataclass(frozen=True)
class Rules:
    rules: tuple[Rule, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules)

    @property
    def horizon(self) -> float:
        """How long a later hit can still change a verdict: the longest window that
        joins hits (``burst``, ``before_click``). Once a message's newest hit is older
        than this, the verdicts on its hits so far are final."""
        windows = [0.0]
        for r in self.rules:
            windows += [w for w in (r.burst, r.before_click) if w]
        return max(windows)


# -- loading ------------------------------------------------------------------------


def load_rules(extra: Path | str | None = None) -> Rules:
    """The shipped rules (src/postwarden/engagement/verdicts.toml, read with
    importlib.resources) and the operator's file, whose rules come first and win; a
    bad file raises VerdictRulesError naming the file, rule and field. ``extra`` may
    be the configured string as is: "" means no file."""
    operator: list[tuple[Rule | None, str]] = []
    if extra:
        path = Path(extra)
        try:
            text = path.read_text()
        except OSError as exc:
            raise VerdictRulesError(f"{path}: {exc.strerror or exc}") from exc
        operator = _parse(text, str(path))
    shipped = _parse(resources.files(__package__).joinpath(SHIPPED).read_text(), SHIPPED)
    replaced = {name for _, name in operator}
    ordered = operator + [(r, name) for r, name in shipped if name not in replaced]
    return Rules(tuple(r for r, _ in ordered if r is not None))


def _parse(text: str, where: str) -> list[tuple[Rule | None, str]]:
    """The rules of one file, in order; a disabled rule is (None, its name)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise VerdictRulesError(f"{where}: {exc}") from exc
    unknown = set(data) - {"rules"}
    if unknown:
        raise VerdictRulesError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    entries = data.get("rules", [])
    if not isinstance(entries, list):
        raise VerdictRulesError(f"{where}: rules: expected an array of tables [[rules]]")
    out: list[tuple[Rule | None, str]] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        rule, name = _rule(entry, where, i)
        if name in seen:
            raise VerdictRulesError(f"{where}: rules[{i}] {name!r}: name: used twice")
        seen.add(name)
        out.append((rule, name))
    return out


def _rule(entry: Any, where: str, i: int) -> tuple[Rule | None, str]:
    if not isinstance(entry, dict):
        raise VerdictRulesError(f"{where}: rules[{i}]: expected a table")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise VerdictRulesError(
            f"{where}: rules[{i}]: name: expected lowercase letters, digits and -_. "
            f"(at most 63), got {name!r}"
        )

    def fail(field: str, msg: str) -> VerdictRulesError:
        return VerdictRulesError(f"{where}: rules[{i}] {name!r}: {field}: {msg}")

    unknown = set(entry) - _FIELDS
    if unknown:
        raise fail(sorted(unknown)[0], "unknown field")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise fail("enabled", f"expected true or false, got {enabled!r}")
    if not enabled:
        return None, name
    if name == PERSON:
        raise fail("name", f"{PERSON!r} is the reason when no rule matches")

    def boolean(field: str, default: bool | None) -> bool | None:
        v = entry.get(field, default)
        if v is not None and not isinstance(v, bool):
            raise fail(field, f"expected true or false, got {v!r}")
        return v

    def strings(field: str) -> list[str]:
        v = entry.get(field, [])
        if not isinstance(v, list) or (not v and field in entry):
            raise fail(field, "expected a non-empty list of strings")
        for j, s in enumerate(v):
            if not isinstance(s, str) or not s:
                raise fail(f"{field}[{j}]", f"expected a non-empty string, got {s!r}")
        return v

    def seconds(field: str) -> float | None:
        v = entry.get(field)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf:
            raise fail(field, f"expected a positive number of seconds, got {v!r}")
        return float(v)

    kinds = entry.get("kinds", sorted(KINDS))
    if not isinstance(kinds, list) or not kinds or not set(kinds) <= KINDS:
        raise fail("kinds", f"expected a non-empty list of 'open' and 'click', got {kinds!r}")

    patterns: list[re.Pattern[str]] = []
    for j, p in enumerate(strings("user_agent")):
        try:
            patterns.append(re.compile(p, re.I))
        except re.error as exc:
            raise fail(f"user_agent[{j}]", f"bad regular expression: {exc}") from exc
    if len(patterns) > 1:  # one search instead of many, when the patterns allow it
        try:
            patterns = [re.compile("|".join(f"(?:{p.pattern})" for p in patterns), re.I)]
        except re.error:
            pass  # e.g. an inline global flag: keep them apart
    networks: list[Network] = []
    for j, cidr in enumerate(strings("ip")):
        try:
            networks.append(ipaddress.ip_network(cidr))
        except ValueError as exc:
            raise fail(f"ip[{j}]", f"not a network in CIDR notation: {exc}") from exc
    methods = frozenset(m.upper() for m in strings("method"))
    suffixes = tuple(s.lower().strip(".") for s in strings("mx"))
    min_links = entry.get("min_links", 2)
    if isinstance(min_links, bool) or not isinstance(min_links, int) or min_links < 2:
        raise fail("min_links", f"expected a whole number of at least 2, got {min_links!r}")
    if "min_links" in entry and "burst" not in entry:
        raise fail("min_links", "only for a burst rule")

    rule = Rule(
        name=name,
        source=where,
        kinds=frozenset(kinds),
        machine=bool(boolean("machine", True)),
        user_agent=tuple(patterns),
        ip=tuple(networks),
        method=methods,
        ranged=boolean("ranged", None),
        mx=suffixes,
        after_delivery=seconds("after_delivery"),
        burst=seconds("burst"),
        min_links=min_links,
        before_click=seconds("before_click"),
    )
    conditions = [*_LIST_FIELDS, *_SECONDS_FIELDS, "ranged"]
    if not any(field in entry for field in conditions):
        raise fail("name", f"a rule needs at least one condition: {', '.join(conditions)}")
    if rule.burst is not None and rule.kinds != {"click"}:
        raise fail("kinds", "a burst rule judges clicks only: kinds = ['click']")
    return rule, name


# -- judging ------------------------------------------------------------------------


def judge(hits: Sequence[Hit], rules: Rules) -> dict[int, Verdict]:
    """Verdicts for the hits of ONE message (all its opens and clicks so far, any
    order), judged together: some rules need the others (every link clicked at once,
    a pixel fetched just before a click)."""
    nets = {h.id: _network(h) for h in hits}
    verdicts: dict[int, Verdict] = {}
    for rule in rules.rules:
        pending = [h for h in hits if h.id not in verdicts]
        if not pending:
            break
        group: set[int] | None = None
        for h in pending:
            if not rule.matches(h, nets[h.id]):
                continue
            if rule.grouped:
                if group is None:
                    group = _grouped(rule, hits)
                if h.id not in group:
                    continue
            verdicts[h.id] = Verdict(rule.machine, rule.name)
    for h in hits:
        verdicts.setdefault(h.id, Verdict(False, PERSON))
    return verdicts


def _grouped(rule: Rule, hits: Sequence[Hit]) -> set[int]:
    """The ids of the hits that the rule's group conditions (all of them) select."""
    selected: set[int] | None = None
    if rule.burst is not None:
        selected = _burst(hits, rule.burst, rule.min_links)
    if rule.before_click is not None:
        pairs = _before_click(hits, rule.before_click)
        selected = pairs if selected is None else selected & pairs
    return selected or set()


def _burst(hits: Sequence[Hit], window: float, min_links: int) -> set[int]:
    """The clicks of windows of at most ``window`` seconds that hold a click of every
    link of the message (counted by ``links_in_message``, at least ``min_links``)."""
    clicks = sorted(
        (h.at, h.link_index, h.id)
        for h in hits
        if h.kind == "click" and h.link_index is not None and _finite(h.at)
    )
    counts = [h.links_in_message for h in hits if h.kind == "click" and h.links_in_message]
    if not clicks or not counts or max(counts) < min_links:
        return set()
    needed = max(counts)
    selected: set[int] = set()
    in_window: dict[int, int] = {}
    left = marked = 0
    for right, (at, link, _) in enumerate(clicks):
        in_window[link] = in_window.get(link, 0) + 1
        while at - clicks[left][0] > window:
            gone = clicks[left][1]
            in_window[gone] -= 1
            if not in_window[gone]:
                del in_window[gone]
            left += 1
        if len(in_window) >= needed:
            selected.update(c[2] for c in clicks[max(left, marked) : right + 1])
            marked = right + 1
    return selected


def _before_click(hits: Sequence[Hit], window: float) -> set[int]:
    """Opens less than ``window`` seconds before a click, and those clicks."""
    opens = sorted(h.at for h in hits if h.kind == "open" and _finite(h.at))
    clicks = sorted(h.at for h in hits if h.kind == "click" and _finite(h.at))
    selected: set[int] = set()
    for h in hits:
        if not _finite(h.at):
            continue
        if h.kind == "open":
            # a click at h.at <= t < h.at + window
            i = bisect.bisect_left(clicks, h.at)
            if i < len(clicks) and clicks[i] - h.at < window:
                selected.add(h.id)
        elif h.kind == "click":
            # an open at h.at - window < t <= h.at
            i = bisect.bisect_right(opens, h.at)
            if i and h.at - opens[i - 1] < window:
                selected.add(h.id)
    return selected


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _network(hit: Hit) -> Span | None:
    """The hit's address as a network: /32 or /128 for a whole address, wider when
    the tenant truncated it; None when there is none or it does not parse."""
    if not hit.ip:
        return None
    try:
        net = ipaddress.ip_network(hit.ip.strip(), strict=False)
        if hit.ip_prefix is not None and 0 <= hit.ip_prefix < net.prefixlen:
            net = net.supernet(new_prefix=hit.ip_prefix)
    except ValueError:
        return None
    return _span(net)


def _span(net: Network) -> Span:
    return net.version, int(net.network_address), net.prefixlen


def _within(net: Span, ranges: Iterable[Span]) -> bool:
    """Whether every address ``net`` may stand for lies in one of ``ranges``: a
    truncated address matches only a range at least as wide as the truncation."""
    version, first, length = net
    bits = 32 if version == 4 else 128
    for v, start, prefix in ranges:
        if (
            v == version
            and prefix <= length
            and first >> (bits - prefix) == start >> (bits - prefix)
        ):
            return True
    return False


def _mx_matches(mx: str | None, suffixes: Iterable[str]) -> bool:
    if not mx:
        return False
    host = mx.strip().lower().rstrip(".")
    return any(host == s or host.endswith("." + s) for s in suffixes)
