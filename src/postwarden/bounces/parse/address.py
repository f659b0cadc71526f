"""Addresses in a report's text and fields: found, cleaned, checked."""

from __future__ import annotations

import functools
import re

ADDR_RE = re.compile(
    r"(?<![\w.+\-=/%!#$&'*?^`{|}~])"
    r"([\w.+\-=/%!#$&'*?^`{|}~]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24})(?![\w\-]|\.[A-Za-z0-9])",
)


@functools.lru_cache(maxsize=8)
def addresses(text: str) -> tuple[tuple[str, int], ...]:
    """Every address in ``text`` with its position (kept for the few texts of the
    report being read: each recipient's block looks them up again)."""
    return tuple((m.group(1), m.start(1)) for m in ADDR_RE.finditer(text))


def clean_addr(a: str | None) -> str | None:
    """The address in a field or a quoted value ("rfc822; <a@b>"), else the value."""
    if not a:
        return None
    a = a.strip()
    if ";" in a:
        a = a.split(";", 1)[1]
    a = a.strip().strip("<>").strip().strip('"').strip("'").strip()
    m = ADDR_RE.search(a)
    if m:
        return m.group(1).strip(".")
    return a or None


def is_address(a: str | None) -> bool:
    return bool(a) and ADDR_RE.fullmatch(a or "") is not None


def clean_remote(value: str | None) -> str | None:
    """A Remote-MTA field's host ("dns; mx.example" -> "mx.example")."""
    if not value:
        return None
    v = value.split(";", 1)[-1].strip()
    return v or None
