"""The lines of a report's text that concern one recipient, and those that give a
reason: what becomes a finding's diagnostic."""

from __future__ import annotations

import functools
import re

from postwarden.bounces.parse.address import addresses

REASON_HINT = re.compile(
    r"(?<![\d.])[245]\d\d(?![\d.])|(?<![\d.])[245]\.\d{1,3}\.\d{1,3}(?!\d|\.\d)|"
    r"unknown|not exist|no such|full|quota|reject|denied|refused|block|"
    r"spam|invalid|disabled|timed out|expired|unreachable|too (big|large)|"
    r"relay|policy|not found|doesn.t have|does not have",
    re.I,
)

# A line with an SMTP reply or an enhanced status code: the remote answer itself.
ANSWER_HINT = re.compile(r"(?<![\d.])[45]\d\d(?![\d.])|(?<![\d.])[45]\.\d{1,3}\.\d{1,3}(?!\d|\.\d)")


def has_reason(block: str) -> bool:
    return bool(REASON_HINT.search(block))


def block_at(text: str, pos: int, positions: list[int]) -> str:
    """The lines about the address at ``pos``: up to the next address of
    ``positions``, and no further than the reason they give."""
    start = text.rfind("\n", 0, pos) + 1
    later = [p for p in positions if p > pos]
    end = len(text)
    if later:
        end = text.rfind("\n", 0, later[0]) + 1 or later[0]
        if end <= start:
            end = later[0]
    block = text[start:end]
    lines = block.split("\n")
    if re.search(r"^\W*[245]\d\d[ -]", lines[0]):
        # "554 <a@b>... Remote protocol error": the line says it all; what follows
        # belongs to it only when indented (a wrapped line).
        kept_lines = [lines[0]]
        for ln in lines[1:]:
            if not ln[:1].isspace() or not ln.strip():
                break
            kept_lines.append(ln)
        return "\n".join(kept_lines)
    # A block ends at a blank line followed by unrelated prose, unless it has no reason yet.
    parts = re.split(r"\n\s*\n", block)
    kept = parts[0]
    for p in parts[1:]:
        if has_reason(kept):
            break
        kept += "\n" + p
    return kept


def block_for(text: str, rcpt: str | None) -> str:
    """The lines of ``text`` about ``rcpt``, or the lines giving a reason."""
    if not rcpt or not text:
        return error_lines(text)
    idx = text.lower().find(rcpt.lower())
    if idx < 0:
        return error_lines(text)
    others = [p for a, p in addresses(text) if a.lower() != rcpt.lower() and p > idx]
    block = block_at(text, idx, others[:1])
    return block if has_reason(block) else (block + "\n" + error_lines(text)).strip()


@functools.lru_cache(maxsize=8)
def error_lines(text: str) -> str:
    """The lines that give a reason, each with the indented lines around it that wrap
    the same answer (it may start before its code: "  SMTP error ... after MAIL\n
    FROM:<...>:\n    550 ..."), at most 12 lines. Lines with the remote answer (a reply
    or status code) when there are any: boilerplate about policies and viruses is no
    reason."""
    hint = ANSWER_HINT if ANSWER_HINT.search(text) else REASON_HINT
    keep: list[str] = []
    for para in re.split(r"\n[ \t]*\n", text):
        lines = para.strip("\n").splitlines()
        taken = -1
        for i, line in enumerate(lines):
            if not hint.search(line):
                continue
            first = i
            while first > max(i - 2, taken + 1) and lines[first - 1][:1].isspace():
                first -= 1  # the indented lines this wrapped answer starts on
            last = i + 1 if i + 1 < len(lines) and lines[i + 1][:1].isspace() else i
            for j in range(max(first, taken + 1), last + 1):
                keep.append(lines[j])
                taken = j
            if len(keep) >= 12:
                return "\n".join(keep[:12])
    return "\n".join(keep)


def squash(text: str) -> str:
    """``text`` without the blanks around its line breaks."""
    return re.sub(r"[ \t]*\n[ \t]*", "\n", text).strip()
