"""The field blocks of a report part (RFC 3464 delivery-status, RFC 5965
feedback-report): per-message and per-recipient groups of ``Name: value`` lines, parsed
by the email package or, when it could not, from the part's text."""

from __future__ import annotations

import re
from collections.abc import Callable
from email.message import Message

from postwarden.bounces.parse.mime import part_text

Fields = list[tuple[str, str]]

FIELD_RE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):[ \t]*(.*)$")


def fields_of(part: Message) -> Fields:
    """Every field of a report part, names in lower case, values unfolded."""
    payload = part.get_payload()
    if isinstance(payload, list):
        out: Fields = []
        for sub in payload:
            if isinstance(sub, Message):
                out += [(k.lower(), unfold(v)) for k, v in sub.items()]
        return out
    return [kv for block in blocks_from_text(part_text(part)) for kv in block]


def unfold(v: str) -> str:
    return re.sub(r"\r?\n[ \t]+", " ", str(v)).strip()


def blocks_of(part: Message) -> list[Fields]:
    """A delivery-status part's blocks: the per-message one, then one per recipient."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload:
        blocks = [
            [(k.lower(), unfold(v)) for k, v in sub.items()]
            for sub in payload
            if isinstance(sub, Message)
        ]
        blocks = [b for b in blocks if b]
        # A parser that met no blank line between blocks leaves them in one: split it.
        split: list[Fields] = []
        for b in blocks:
            split += split_recipients(b)
        if split:
            return split
    return blocks_from_text(part_text(part))


def split_recipients(block: Fields) -> list[Fields]:
    out: list[Fields] = [[]]
    seen_rcpt = False
    for k, v in block:
        starts = k in ("final-recipient", "original-recipient")
        if starts and seen_rcpt and any(kk == k for kk, _ in out[-1]):
            out.append([])
        if (
            k == "final-recipient"
            and not seen_rcpt
            and out[-1]
            and any(
                kk in ("reporting-mta", "arrival-date", "received-from-mta") for kk, _ in out[-1]
            )
            and not any(kk == "original-recipient" for kk, _ in out[-1])
        ):
            out.append([])
        seen_rcpt = seen_rcpt or starts
        out[-1].append((k, v))
    return [b for b in out if b]


def blocks_from_text(text: str) -> list[Fields]:
    """Field blocks written as text (blank lines between blocks)."""
    blocks: list[Fields] = []
    current: Fields = []
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = []
            continue
        if line[0] in " \t" and current:
            k, v = current[-1]
            current[-1] = (k, (v + " " + line.strip()).strip())
            continue
        m = FIELD_RE.match(line.strip())
        if m:
            current.append((m.group(1).lower(), m.group(2).strip()))
    if current:
        blocks.append(current)
    out: list[Fields] = []
    for b in blocks:
        out += split_recipients(b)
    return out


def getter(fields: Fields) -> Callable[[str], str | None]:
    """A lookup of the first non-empty value of a field."""

    def get(name: str) -> str | None:
        for k, v in fields:
            if k == name and v:
                return v
        return None

    return get


def diag_text(value: str) -> str:
    """A Diagnostic-Code's text without its type ("smtp; 550 ..." -> "550 ...")."""
    v = value.strip()
    m = re.match(r"^(smtp|x-[\w.-]+|x400|unix|mail|local)\s*;\s*", v, re.I)
    if m:
        v = v[m.end() :]
    return v
