"""The rules of a contact import (issue 20): which column goes where, which delimiter a
file uses, and whether one CSV record makes a contact or a rejected row. Pure: the
store (``store.imports``) reads the records and writes what these rules return.

Rows are CSV *records*, numbered as a spreadsheet numbers them: the header is row 1,
the first data record row 2, and a quoted newline inside a cell does not start a new
row (blank lines count, and are skipped).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from postwarden.contacts.attributes import NAME_RE, AttributeValueError, check_attributes, coerce
from postwarden.mail.addresses import AddressError, normalize_address, suppression_key

#: What a column may be mapped to (``attribute:``, ``list:`` and ``topic:`` take a name;
#: lists and topics also an id).
TARGET_KINDS = ("email", "name", "attribute", "list", "topic", "ignore")
#: The delimiters a file may use; without one given, the header row decides.
DELIMITERS = (",", ";", "\t", "|")
ENCODINGS = ("utf-8", "latin-1")
#: Longest address (as the API's recipients), longest name (the contacts column).
MAX_EMAIL = 320
MAX_NAME = 200
MAX_COLUMNS = 250
# Control characters a name may not hold (a name goes into From/To display names).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class MappingError(ValueError):
    """The mapping does not fit the file; ``column`` names the column at fault."""

    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column


@dataclass(frozen=True)
class Target:
    kind: str  # one of TARGET_KINDS
    arg: str = ""  # the attribute's name, the list's or topic's name or id

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


def parse_target(value: str) -> Target:
    """``email``, ``name``, ``ignore``, ``attribute:<name>``, ``list:<name or id>`` or
    ``topic:<name or id>``; ValueError saying what is allowed."""
    kind, sep, arg = value.partition(":")
    kind, arg = kind.strip(), arg.strip()
    if kind in ("email", "name", "ignore") and not sep:
        return Target(kind)
    if kind in ("attribute", "list", "topic") and arg:
        return Target(kind, arg)
    raise ValueError(
        f"{value!r} is not one of email, name, ignore, attribute:<name>,"
        " list:<list name or id>, topic:<topic name or id>"
    )


def header_target(name: str) -> Target:
    """How a column is taken without a mapping: ``email``, ``name``, ``list:…`` and
    ``topic:…`` as they say, any other header as the attribute of that name."""
    low = name.strip().lower()
    if low in ("email", "name"):
        return Target(low)
    if low.startswith(("list:", "topic:")):
        try:
            return parse_target(name.strip())
        except ValueError:
            pass
    return Target("attribute", name.strip())


def plan_columns(header: Sequence[str], mapping: Mapping[str, str] | None) -> list[Target]:
    """The target of each column of ``header``. With a ``mapping`` (column → target),
    the columns it leaves out are ignored. Raises :class:`MappingError`."""
    if len(header) > MAX_COLUMNS:
        raise MappingError("", f"at most {MAX_COLUMNS} columns")
    names = [h.strip() for h in header]
    if mapping is not None:
        for col in mapping:
            if col not in names:
                raise MappingError(col, f"the file has no column {col!r}")
        targets = [parse_target(mapping[n]) if n in mapping else Target("ignore") for n in names]
    else:
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise MappingError(n, f"the header names {n!r} twice; give a mapping")
            seen.add(n)
        targets = [header_target(n) for n in names]
    emails = [n for n, t in zip(names, targets, strict=True) if t.kind == "email"]
    if not emails:
        raise MappingError("", "no column is the email (name one `email` or map one to email)")
    if len(emails) > 1:
        raise MappingError(emails[1], "only one column may be the email")
    for n, t in zip(names, targets, strict=True):
        if t.kind == "attribute" and not NAME_RE.match(t.arg):
            raise MappingError(
                n,
                f"{t.arg!r} is not an attribute name (a letter or _, then letters, digits"
                " or _): map the column to one, or to ignore",
            )
    for kind in ("name", "attribute", "list", "topic"):
        dests = [str(t) for t in targets if t.kind == kind]
        dupes = {d for d in dests if dests.count(d) > 1}
        if dupes:
            raise MappingError("", f"two columns go to {sorted(dupes)[0]}")
    return targets


def detect_delimiter(first_line: str) -> str:
    """The delimiter of a file whose header row is ``first_line``: the candidate seen
    most often outside quotes (``,`` when none is)."""
    counts = dict.fromkeys(DELIMITERS, 0)
    quoted = False
    for ch in first_line:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in counts:
            counts[ch] += 1
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


# An ASCII dot-atom local part: what the address check accepts without a question.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


@lru_cache(maxsize=4096)
def _domain(domain: str) -> str:
    return normalize_address(f"a@{domain}").rpartition("@")[2]


def check_email(cell: str) -> str:
    """``normalize_address`` (the check API recipients pass), its verdict on each
    domain remembered: most of the time of a large import went to checking the same
    few domains again. Only a plain ASCII dot-atom local part takes the short way
    (the check has nothing to say about one); anything else is checked whole."""
    value = cell.strip()
    local, sep, domain = value.rpartition("@")
    if sep and len(value) <= 254 and len(local) <= 64 and domain.isascii():
        if _DOT_ATOM.fullmatch(local):
            return f"{local}@{_domain(domain)}"
    return normalize_address(value)


def email_key(cell: str) -> str:
    """The key two rows of one file are duplicates by (as contacts store emails)."""
    return suppression_key(cell.strip())


@dataclass
class Reject:
    column: str  # the first column at fault ("" for the row as a whole)
    reason: str


@dataclass
class Row:
    """What one good record asks for."""

    email: str
    name: str | None
    attributes: dict[str, Any]
    lists: dict[str, bool] = field(default_factory=dict)  # list ref -> member
    topics: dict[str, bool] = field(default_factory=dict)  # topic ref -> opted in


def _flag(cell: str) -> bool | None:
    if not cell.strip():
        return None
    try:
        return bool(coerce(cell, "boolean", text=True))
    except AttributeValueError:
        raise ValueError(f"{cell!r} is not yes/no (true/false, 1/0)") from None


class RowRule:
    """Checks records against a file's header and targets, the tenant's attribute
    types and which lists and topics exist (``known``: ``list:x`` / ``topic:x`` refs
    found)."""

    def __init__(
        self,
        header: Sequence[str],
        targets: Sequence[Target],
        types: Mapping[str, str],
        known: set[str],
    ) -> None:
        self.header = [h.strip() for h in header]
        self.targets = list(targets)
        self.types = dict(types)
        self.known = known
        self.width = len(header)

    def check(self, cells: Sequence[str]) -> Row | Reject:
        if len(cells) != self.width:
            extra = cells[self.width :]
            if len(cells) < self.width or any(c.strip() for c in extra):
                return Reject("", f"{len(cells)} fields; the header has {self.width}")
        problems: list[tuple[str, str]] = []
        email = ""
        name: str | None = None
        attrs: dict[str, str] = {}
        attr_cols: dict[str, str] = {}
        lists: dict[str, bool] = {}
        topics: dict[str, bool] = {}
        for col, target, cell in zip(self.header, self.targets, cells, strict=False):
            if target.kind == "ignore":
                continue
            if "\x00" in cell:
                problems.append((col, "NUL is not allowed"))
                continue
            if target.kind == "email":
                try:
                    email = check_email(cell)
                    if len(email) > MAX_EMAIL:
                        raise AddressError(f"longer than {MAX_EMAIL} characters")
                except AddressError as exc:
                    problems.append((col, f"not a valid email: {exc}"))
            elif target.kind == "name":
                value = cell.strip()
                bad = _CONTROL.search(value)
                if len(value) > MAX_NAME:
                    problems.append((col, f"a name has at most {MAX_NAME} characters"))
                elif bad is not None:
                    problems.append((col, f"control character U+{ord(bad.group()):04X}"))
                elif value:
                    name = value
            elif target.kind == "attribute":
                attrs[target.arg] = cell
                attr_cols[target.arg] = col
            else:
                try:
                    flag = _flag(cell)
                except ValueError as exc:
                    problems.append((col, str(exc)))
                    continue
                if flag is None:
                    continue
                if str(target) not in self.known:
                    problems.append((col, f"no {target.kind} {target.arg!r}"))
                    continue
                (lists if target.kind == "list" else topics)[target.arg] = flag
        values, errors = check_attributes(attrs, self.types, text=True)
        for attr, reason in errors.items():
            problems.append((attr_cols.get(attr, attr), reason))
        if problems:
            first_col = problems[0][0]
            reason = "; ".join(r if c == first_col else f"{c}: {r}" for c, r in problems)
            return Reject(first_col, reason)
        return Row(email, name, values, lists, topics)
