"""Every PromQL expression of the dashboards and alerts, checked against a real Prometheus.

:func:`expressions` gathers them (panel targets, dashboard variables, recording rules,
alerts); :class:`Checker` asks Prometheus's HTTP API (``/api/v1/query``,
``/api/v1/series``) whether each returns data, and says where not. What is checked,
for an expression with the dashboard variables replaced by label values read from
Prometheus:

* each part between its top-level comparisons and set operators (``>``, ``==``,
  ``and``, ``unless`` …) that is not a number returns at least one sample: a panel's
  whole query, an alert without its thresholds, a guard clause on its own;
* each metric selector in it (the name with its matchers) returns at least one series:
  a misspelt metric, label name or label value in a matcher finds none;
* each label named in ``by``, ``without``, ``on``, ``ignoring``, ``group_left`` and
  ``group_right`` is on some series of its selectors;
* each ``{{label}}`` of a panel's legend is on every series the query returns.

``offset`` modifiers are dropped (the Prometheus of a test holds seconds of history).
A small lexer splits the expressions: PromQL's tokens are few, and Prometheus itself
then evaluates every piece, so a piece the lexer cut wrong fails as a query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import httpx

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>(?<=\[)[0-9smhdwy$_a-z]+(?=[\]:])|(?<=offset\s)-?[0-9smhdwy]+)
  | (?P<number>(?:0x[0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?![A-Za-z_]))
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=(){}\[\],:@])
    """,
    re.VERBOSE,
)
_COMPARE = {"==", "!=", ">", "<", ">=", "<="}
_SETOPS = {"and", "or", "unless"}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Aggregations may be followed by ``by (...)`` before their parenthesis.
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
}  # fmt: skip
_KEYWORDS = _SETOPS | _GROUPING | _AGGREGATIONS | {"bool", "offset", "inf", "nan", "Inf", "NaN"}
_LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    start: int
    end: int


def tokens(expr: str) -> list[Token]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read {expr[pos : pos + 20]!r} in {expr!r}")
        if m.lastgroup != "space":
            out.append(Token(m.lastgroup or "", m.group(), m.start(), m.end()))
        pos = m.end()
    return out


def without_offsets(expr: str) -> str:
    return re.sub(r"\s+offset\s+-?[0-9smhdwy]+", "", expr)


def top_level_parts(expr: str) -> list[str]:
    """The operands between top-level comparison and set operators (with their
    ``bool``/``on(...)``/``group_left(...)`` modifiers left out)."""
    toks = tokens(expr)
    parts, depth, start, i = [], 0, 0, 0
    while i < len(toks):
        t = toks[i]
        if t.text in "([{":
            depth += 1
        elif t.text in ")]}":
            depth -= 1
        elif depth == 0 and (t.text in _COMPARE or t.text in _SETOPS):
            parts.append(expr[start : t.start])
            i += 1
            while i < len(toks) and toks[i].text in ("bool", *_GROUPING):
                i += 1
                if i < len(toks) and toks[i].text == "(":
                    while toks[i].text != ")":
                        i += 1
                    i += 1
            start = toks[i].start if i < len(toks) else len(expr)
            continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def is_literal(part: str) -> bool:
    return all(t.kind == "number" or t.text in "()+-*/%^" for t in tokens(part))


def selectors(expr: str) -> list[str]:
    """The metric selectors of ``expr``: ``name`` or ``name{matchers}``."""
    toks = tokens(expr)
    out, i = [], 0
    while i < len(toks):
        t = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if t.text in _GROUPING and nxt is not None and nxt.text == "(":
            while toks[i].text != ")":  # a label list, no selectors
                i += 1
        elif t.kind == "ident" and t.text not in _KEYWORDS and (nxt is None or nxt.text != "("):
            if nxt is not None and nxt.text == "{":
                j = i + 1
                while toks[j].text != "}":
                    j += 1
                out.append(expr[t.start : toks[j].end])
                i = j
            else:
                out.append(t.text)
        elif t.text == "{":  # matchers without a name: none in ours
            raise ValueError(f"a selector without a metric name in {expr!r}")
        i += 1
    return out


def grouping_labels(expr: str) -> set[str]:
    toks = tokens(expr)
    out = set()
    for i, t in enumerate(toks):
        if t.text in _GROUPING and i + 1 < len(toks) and toks[i + 1].text == "(":
            j = i + 2
            while toks[j].text != ")":
                if toks[j].kind == "ident":
                    out.add(toks[j].text)
                j += 1
    return out


@dataclass
class Expression:
    origin: str  # where it is: "queue.json panel 7 'Oldest queued' A"
    expr: str
    legend: str = ""


@dataclass
class Variable:
    origin: str
    name: str
    query: str  # label_values(selector, label)


@dataclass
class Source:
    """The expressions of the dashboards and the rule file, as read."""

    expressions: list[Expression] = field(default_factory=list)
    variables: dict[str, list[Variable]] = field(default_factory=dict)  # by dashboard


def expressions(dashboards: dict[str, dict[str, Any]], rules: dict[str, Any]) -> Source:
    src = Source()
    for name, board in dashboards.items():
        src.variables[name] = [
            Variable(f"{name} variable ${v['name']}", v["name"], v["query"]["query"])
            for v in board["templating"]["list"]
            if v["type"] == "query"
        ]
        for panel in board["panels"]:
            for t in panel.get("targets", []):
                legend = t.get("legendFormat", "")
                src.expressions.append(
                    Expression(
                        f"{name} panel {panel['id']} {panel['title']!r} {t['refId']}",
                        t["expr"],
                        "" if legend == "__auto" else legend,
                    )
                )
    for group in rules["groups"]:
        for rule in group["rules"]:
            what = rule.get("alert") or rule.get("record")
            src.expressions.append(Expression(f"alerts.yml {what}", without_offsets(rule["expr"])))
    return src


_LABEL_VALUES = re.compile(r"^label_values\((?P<sel>.+),\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\)$")
# Grafana's own variables, as a panel of the last minutes would have them (the rate
# window is at least four scrape intervals: here of 1 s).
BUILTINS = {"__rate_interval": "10s", "__interval": "2s", "__range": "1m"}


def substitute(expr: str, values: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in values:
            return values[name]
        if name in BUILTINS:
            return BUILTINS[name]
        raise KeyError(f"the variable ${name} is not defined")

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


class Checker:
    """Asks one Prometheus; answers are cached (a mutated copy asks only what differs)."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self._cache: dict[tuple[str, str], Any] = {}

    def _get(self, path: str, key: str, **params: str) -> Any:
        if (path, key) not in self._cache:
            r = self.client.get(path, params=params)
            body = r.json()
            if body.get("status") != "success":
                self._cache[path, key] = ValueError(body.get("error", r.text))
            else:
                self._cache[path, key] = body["data"]
        data = self._cache[path, key]
        if isinstance(data, ValueError):
            raise data
        return data

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query", expr, query=expr)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data]

    def series(self, selector: str) -> list[dict[str, str]]:
        return self._get("/api/v1/series", selector, **{"match[]": selector})

    def variable_values(self, src: Source, board: str) -> tuple[dict[str, str], list[str]]:
        """Each variable of ``board`` as Grafana substitutes it with every value
        selected: ``(v1|v2|…)``, the values read from Prometheus as Grafana reads them."""
        values: dict[str, str] = {}
        problems = []
        for var in src.variables.get(board, []):
            m = _LABEL_VALUES.match(var.query.strip())
            if m is None:
                problems.append(f"{var.origin}: not label_values(selector, label): {var.query}")
                continue
            try:
                sel = substitute(m["sel"], values)
                found = sorted({s[m["label"]] for s in self.series(sel) if m["label"] in s})
            except (KeyError, ValueError) as exc:
                problems.append(f"{var.origin}: {exc}")
                continue
            if not found:
                problems.append(f"{var.origin}: no values of {m['label']!r} on {sel}")
                continue
            # As Grafana's Prometheus datasource writes them: regex-escaped, and that
            # escaped again inside the PromQL string.
            alternatives = "|".join(re.escape(v).replace("\\", "\\\\") for v in found)
            values[var.name] = f"({alternatives})"
        return values, problems

    def check(self, src: Source) -> list[str]:
        """What does not return data, one line each (empty: all of it does)."""
        problems: list[str] = []
        values: dict[str, dict[str, str]] = {}
        for board in src.variables:
            values[board], found = self.variable_values(src, board)
            problems += found
        for e in src.expressions:
            board = e.origin.split(" ", 1)[0]
            try:
                expr = substitute(e.expr, values.get(board, {}))
            except KeyError as exc:
                problems.append(f"{e.origin}: {exc.args[0]}")
                continue
            problems += [f"{e.origin}: {p}" for p in self.check_one(expr, e.legend)]
        return problems

    def check_one(self, expr: str, legend: str = "") -> list[str]:
        problems = []
        try:
            parts = top_level_parts(expr)
            sels = selectors(expr)
        except ValueError as exc:
            return [str(exc)]
        labels: set[str] = set()
        for sel in dict.fromkeys(sels):
            try:
                found = self.series(sel)
            except ValueError as exc:
                problems.append(f"selector {sel}: {exc}")
                continue
            if not found:
                problems.append(f"no series match {sel}")
            for s in found:
                labels.update(s)
        for label in sorted(grouping_labels(expr) - labels):
            problems.append(f"no series of {sorted(set(sels))} has the label {label!r}")
        for part in parts:
            if is_literal(part):
                continue
            try:
                result = self.query(part)
            except ValueError as exc:
                problems.append(f"{part}: {exc}")
                continue
            if not result:
                problems.append(f"no data for {part}")
            elif part == expr.strip() and legend:
                for label in _LEGEND.findall(legend):
                    if any(label not in r.get("metric", {}) for r in result):
                        problems.append(f"legend {{{{{label}}}}}: not a label of every series")
        return problems
