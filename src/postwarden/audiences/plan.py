"""A parsed rule bound to one tenant: names of lists and topics resolved to ids,
attributes typed by the tenant's declarations, values checked and converted (emails
and domains as contacts store them, dates as the text they are compared by, days of
``created_at`` as ranges of times). The result, a :class:`Plan`, is what
``store.audiences`` turns into SQL: every name and type question is settled here,
with the rule's position when it fails. Pure: no I/O.

Every condition of a plan is true or false for each contact, never unknown: a
comparison with an attribute the contact does not have, or has with a value of
another type, is false (and ``not`` of it true).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from postwarden.audiences.syntax import (
    COMPARISONS,
    BoolOp,
    Call,
    Compare,
    Field,
    Literal,
    Node,
    Not,
    RuleError,
    parse,
)
from postwarden.mail.addresses import suppression_key

#: Columns that may be NULL (a comparison with a NULL is false).
NULLABLE = ("locale", "timezone")
#: Most different lists, topics and consent purposes one rule names (each is a join;
#: SQLite joins at most 64 tables).
MAX_REFERENCES = 30
#: Width of the text a date attribute is compared by: a day, or a time to the second.
DAY, SECOND = 10, 19

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class AttrTest:
    """An attribute of ``type`` compared with ``value`` (a tuple for ``in``).

    ``string``: == != < <= > >= (code point order), in, contains (a substring),
    startswith, endswith. ``number``: == != < <= > >=, in. ``boolean``: == !=.
    ``date``: == != < <= > >= on the first ``width`` characters of the stored text
    after ``T00:00:00`` is appended (``width`` :data:`DAY` or :data:`SECOND`).
    ``list``: contains (an item equal to the value), in (an item equal to any)."""

    name: str
    type: str
    op: str
    value: str | int | float | bool | tuple[str | int | float, ...]
    width: int = 0


@dataclass(frozen=True)
class AttrExists:
    name: str


@dataclass(frozen=True)
class ColumnTest:
    """A text column (``email``, ``name``, ``status``, ``locale``, ``timezone``):
    ops as a string attribute's."""

    column: str
    op: str
    value: str | tuple[str, ...]


@dataclass(frozen=True)
class TimeTest:
    """``created_at`` or ``updated_at`` compared with a time (== != < <= > >=)."""

    column: str
    op: str
    value: dt.datetime


@dataclass(frozen=True)
class InList:
    list_id: int


@dataclass(frozen=True)
class OptedIn:
    """Opted in to the topic: a choice recorded as in, or no choice and the topic is
    opt-in by default."""

    topic_id: int
    default_opt_in: bool


@dataclass(frozen=True)
class HasConsent:
    purpose: str


@dataclass(frozen=True)
class AllOf:
    items: tuple[Cond, ...]


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Cond, ...]


@dataclass(frozen=True)
class Negation:
    item: Cond


Cond = (
    AttrTest | AttrExists | ColumnTest | TimeTest | InList | OptedIn | HasConsent
    | AllOf | AnyOf | Negation
)  # fmt: skip


@dataclass(frozen=True)
class Schema:
    """What a tenant's rule may name: declared attribute types by name, lists by name
    (their ids), topics by name (id, default opt-in), and the contact statuses."""

    attributes: Mapping[str, str] = field(default_factory=dict)
    lists: Mapping[str, int] = field(default_factory=dict)
    topics: Mapping[str, tuple[int, bool]] = field(default_factory=dict)
    statuses: tuple[str, ...] = ("active",)


@dataclass(frozen=True)
class Plan:
    root: Cond
    #: Whether the rule names ``status`` (if not, only active contacts count).
    names_status: bool


# ---------------------------------------------------------------- binding


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string"


def _article(type_: str) -> str:
    return {"number": "a number", "boolean": "a boolean", "date": "a date",
            "list": "a list", "string": "a string"}[type_]  # fmt: skip


def parse_time(text: str) -> tuple[dt.datetime, bool] | None:
    """A date (``YYYY-MM-DD``: midnight UTC, ``True``) or an ISO 8601 time with its
    zone (in UTC, ``False``); None when it is neither."""
    text = text.strip()
    try:
        if _DATE.match(text):
            day = dt.date.fromisoformat(text)
            return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC), True
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        if when.tzinfo is None:
            return None
        return when.astimezone(dt.UTC), False
    except (ValueError, OverflowError):
        return None


class _Binder:
    def __init__(self, source: str, schema: Schema) -> None:
        self.source = source
        self.schema = schema
        self.names_status = False
        self.references: set[tuple[str, str]] = set()

    def refer(self, kind: str, name: str, pos: int) -> None:
        self.references.add((kind, name))
        if len(self.references) > MAX_REFERENCES:
            raise self.error(
                f"more than {MAX_REFERENCES} different lists, topics and consent purposes", pos
            )

    def error(self, message: str, pos: int) -> RuleError:
        return RuleError(message, self.source, pos)

    def bind(self, node: Node) -> Cond:
        if isinstance(node, BoolOp):
            items = tuple(self.bind(i) for i in node.items)
            return AllOf(items) if node.op == "and" else AnyOf(items)
        if isinstance(node, Not):
            return Negation(self.bind(node.item))
        if isinstance(node, Call):
            return self.call(node)
        return self.compare(node)

    # -------------------------------------------------------- calls

    def call(self, node: Call) -> Cond:
        if node.name == "exists":
            assert isinstance(node.arg, Field)
            f = node.arg
            if f.attribute:
                return AttrExists(f.name)
            if f.name in NULLABLE:
                return ColumnTest(f.name, "exists", "")
            raise self.error(f"every contact has {f.name}: exists() is for attributes", f.pos)
        assert isinstance(node.arg, Literal) and isinstance(node.arg.value, str)
        name, pos = node.arg.value, node.arg.pos
        self.refer("topic" if node.name.startswith("topic") else node.name, name, pos)
        if node.name == "in_list":
            if name not in self.schema.lists:
                raise self.error(f"no list named {name!r}", pos)
            return InList(self.schema.lists[name])
        if node.name in ("topic_opted_in", "topic_opted_out"):
            if name not in self.schema.topics:
                raise self.error(f"no topic named {name!r}", pos)
            tid, default = self.schema.topics[name]
            cond: Cond = OptedIn(tid, default)
            return cond if node.name == "topic_opted_in" else Negation(cond)
        if not name.strip() or len(name) > 100:
            raise self.error("a consent purpose is 1 to 100 characters", pos)
        return HasConsent(name)

    # -------------------------------------------------------- comparisons

    def values(self, node: Compare) -> tuple[Literal, ...]:
        return node.value if isinstance(node.value, tuple) else (node.value,)

    def compare(self, node: Compare) -> Cond:
        f = node.field
        if f.attribute:
            return self.attribute(node)
        if f.name in ("created_at", "updated_at"):
            return self.time(node)
        if f.name == "domain":
            return self.domain(node)
        if f.name == "status":
            self.names_status = True
            if node.op not in ("==", "!=", "in"):
                raise self.error("status compares with ==, != or in", node.pos)
            for v in self.values(node):
                if v.value not in self.schema.statuses:
                    raise self.error(f"status is one of {', '.join(self.schema.statuses)}", v.pos)
        for v in self.values(node):
            if not isinstance(v.value, str):
                raise self.error(f"{f.name} is text: compare it with a string", v.pos)
        return ColumnTest(f.name, node.op, self.text_value(node))

    def text_value(self, node: Compare) -> str | tuple[str, ...]:
        """The string(s) of a text column's comparison; an email as contacts store it."""
        email = node.field.name == "email"

        def one(v: Literal) -> str:
            s = str(v.value)
            if not email:
                return s
            whole = node.op in ("==", "!=", "in")
            return suppression_key(s) if whole else s.lower()

        if isinstance(node.value, tuple):
            return tuple(one(v) for v in node.value)
        return one(node.value)

    def domain(self, node: Compare) -> Cond:
        if node.op not in ("==", "!=", "in", "endswith"):
            raise self.error("domain compares with ==, !=, in or .endswith()", node.pos)
        suffixes = []
        for v in self.values(node):
            if not isinstance(v.value, str) or not v.value.strip() or "@" in v.value:
                raise self.error("a domain is a name such as example.com (no @)", v.pos)
            # As contacts store it: lower case, Unicode rather than xn-- labels.
            d = suppression_key("x@" + v.value.strip()).partition("@")[2]
            suffixes.append(d if node.op == "endswith" else "@" + d)
        tests: tuple[Cond, ...] = tuple(ColumnTest("email", "endswith", s) for s in suffixes)
        found = tests[0] if len(tests) == 1 else AnyOf(tests)
        return Negation(found) if node.op == "!=" else found

    def time(self, node: Compare) -> Cond:
        f = node.field
        if node.op not in COMPARISONS:
            raise self.error(f"{f.name} compares with == != < <= > >=", node.pos)
        assert isinstance(node.value, Literal)
        v = node.value
        parsed = parse_time(v.value) if isinstance(v.value, str) else None
        if parsed is None:
            raise self.error(
                f'{f.name} compares with a date ("2026-01-01") or a time with its zone'
                ' ("2026-01-01T12:00:00Z")',
                v.pos,
            )
        when, whole_day = parsed
        if not whole_day:
            return TimeTest(f.name, node.op, when)
        # A day is the range of its times [start, next).
        start, end = when, when + dt.timedelta(days=1)
        col = f.name
        ranges: dict[str, Cond] = {
            "==": AllOf((TimeTest(col, ">=", start), TimeTest(col, "<", end))),
            "!=": AnyOf((TimeTest(col, "<", start), TimeTest(col, ">=", end))),
            "<": TimeTest(col, "<", start),
            "<=": TimeTest(col, "<", end),
            ">": TimeTest(col, ">=", end),
            ">=": TimeTest(col, ">=", start),
        }
        return ranges[node.op]

    def attribute(self, node: Compare) -> Cond:
        f, op = node.field, node.op
        values = self.values(node)
        declared = self.schema.attributes.get(f.name)
        type_ = declared or _kind(values[0].value)
        for v in values:
            if declared is None and _kind(v.value) != type_:
                raise self.error(f"the values of one in [...] are of one type ({type_})", v.pos)
        if declared is None and op == "contains":
            # Not declared: an item of a list, or a part of a string.
            self.check(f, "list", op, values)
            return AnyOf(
                (AttrTest(f.name, "list", op, str(values[0].value)),
                 AttrTest(f.name, "string", op, str(values[0].value)))
            )  # fmt: skip
        self.check(f, type_, op, values, node.pos)
        if type_ == "date":
            return self.date(f, op, values)
        scalar = tuple(v.value for v in values)
        if op == "in":
            return AttrTest(f.name, type_, op, scalar)
        return AttrTest(f.name, type_, op, scalar[0])

    def check(
        self, f: Field, type_: str, op: str, values: tuple[Literal, ...], pos: int = -1
    ) -> None:
        allowed = {
            "string": (*COMPARISONS, "in", "contains", "startswith", "endswith"),
            "number": (*COMPARISONS, "in"),
            "boolean": ("==", "!="),
            "date": COMPARISONS,
            "list": ("contains", "in"),
        }[type_]
        if op not in allowed:
            shown = ", ".join(allowed)
            where = pos if pos >= 0 else f.pos
            raise self.error(f"{f} is {_article(type_)}: it takes {shown}", where)
        want = "string" if type_ in ("date", "list") else type_
        for v in values:
            if _kind(v.value) != want:
                raise self.error(f"{f} is {_article(type_)}: give {_article(want)}", v.pos)

    def date(self, f: Field, op: str, values: tuple[Literal, ...]) -> Cond:
        v = values[0]
        assert isinstance(v.value, str)
        parsed = parse_time(v.value)
        if parsed is None:
            raise self.error(
                f'{f} is a date: give "YYYY-MM-DD" or a time with its zone'
                ' ("2026-01-01T12:00:00Z")',
                v.pos,
            )
        when, whole_day = parsed
        if whole_day:
            return AttrTest(f.name, "date", op, when.date().isoformat(), DAY)
        return AttrTest(f.name, "date", op, when.strftime("%Y-%m-%dT%H:%M:%S"), SECOND)


def compile_rule(source: str, schema: Schema) -> Plan:
    """``source`` parsed and bound to ``schema``; :class:`RuleError` with the position
    of the first thing wrong."""
    binder = _Binder(source, schema)
    root = binder.bind(parse(source))
    return Plan(root, binder.names_status)
