"""A linear walk over HTML: text runs and tags (with their attributes and where they
start), for the HTML-to-text converter and the template linter.

Not :class:`html.parser.HTMLParser` fed the whole document: on 3.11 it looks for the
end of an unfinished construct again from every later ``<`` (an unclosed comment, a
quote left open in a tag; ``bounces.parse.htmltext`` tells the story), and the HTML
here is a tenant's. This walk looks at each character a bounded number of times: each
search starts where the last construct ended, and the walk stops at the first
construct that never closes (the rest is not shown, as a browser shows it). Quoted
attribute values keep their spaces and ``>`` (a link to ``{{ unsubscribe_url }}`` is
one attribute); character references are decoded with :func:`html.unescape`.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass

# A "<" that may open a construct; any other "<" is text.
_OPENS = re.compile(r"<[A-Za-z/!?]")
_NAME = re.compile(r"</?([A-Za-z][^\t\n\r\f />]*)")
# Inside a tag, up to the next quote or its end.
_IN_TAG = re.compile(r"[^\"'>]*")
# One attribute: a name, then maybe "=" and a quoted or bare value. Names hold no
# quote, "=", "/", ">" or space, so each match is found once, in one pass.
_ATTR = re.compile(r"""([^\s"'>/=][^\s"'>/=]*)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s>]*))?""")
# Elements whose content is raw text: a "<" in it opens nothing.
_RAW = frozenset(("script", "style"))
_RAW_END = {t: re.compile(f"</{t}", re.I) for t in _RAW}


@dataclass(frozen=True, slots=True)
class Tag:
    name: str  # lower case
    source: str  # what is between the name and ">" (attributes: read when asked for)
    end: bool  # an end tag (</name>)
    line: int  # where its "<" is: 1-based line and column
    column: int

    @property
    def attrs(self) -> tuple[tuple[str, str | None], ...]:
        """Names in lower case, values decoded (None: given without a value)."""
        return _attrs(self.source)

    def attr(self, name: str) -> str | None:
        """The first value of an attribute (``""`` for one given without a value),
        or None when the tag has none of that name."""
        for key, value in self.attrs:
            if key == name:
                return "" if value is None else value
        return None


def _attrs(inner: str) -> tuple[tuple[str, str | None], ...]:
    out = []
    for m in _ATTR.finditer(inner):
        raw = m.group(2)
        if raw is not None and raw[:1] in ("'", '"'):
            raw = raw[1:-1]
        out.append((m.group(1).lower(), None if raw is None else html.unescape(raw)))
    return tuple(out)


def _tag_end(markup: str, pos: int) -> int:
    """The index of the ">" that ends the tag whose name ends at ``pos`` (quotes
    hold a ">"), or -1 when it never ends."""
    while True:
        pos = _IN_TAG.match(markup, pos).end()  # type: ignore[union-attr]
        if pos >= len(markup):
            return -1
        if markup[pos] == ">":
            return pos
        close = markup.find(markup[pos], pos + 1)
        if close < 0:
            return -1
        pos = close + 1


def walk(markup: str) -> Iterator[str | Tag]:
    """Text runs (raw: decode them with :func:`html.unescape`) and tags, in order.
    Comments, declarations and processing instructions are left out, and so is the
    content of ``script`` and ``style`` (their tags are given)."""
    pos = 0
    line, line_start, counted = 1, 0, 0

    def where(at: int) -> tuple[int, int]:
        nonlocal line, line_start, counted
        newlines = markup.count("\n", counted, at)
        if newlines:
            line += newlines
            line_start = markup.rfind("\n", counted, at) + 1
        counted = at
        return line, at - line_start + 1

    while (m := _OPENS.search(markup, pos)) is not None:
        lt = m.start()
        if lt > pos:
            yield markup[pos:lt]
        second = markup[lt + 1]
        if markup.startswith("<!--", lt):
            end = markup.find("-->", lt + 4)
            if end < 0:
                return
            pos = end + 3
            continue
        name = _NAME.match(markup, lt) if second != "!" and second != "?" else None
        if name is None:  # a declaration or processing instruction; "</>" and "</ "
            gt = markup.find(">", lt)
            if gt < 0:
                return
            pos = gt + 1
            continue
        gt = _tag_end(markup, name.end())
        if gt < 0:
            return
        tag_name = name.group(1).lower()
        end_tag = second == "/"
        ln, col = where(lt)
        inner = "" if end_tag else markup[name.end() : gt]
        yield Tag(tag_name, inner, end_tag, ln, col)
        pos = gt + 1
        if not end_tag and tag_name in _RAW and not inner.rstrip().endswith("/"):
            closing = _RAW_END[tag_name].search(markup, pos)
            if closing is None:
                return
            gt = markup.find(">", closing.end())
            if gt < 0:
                return
            yield Tag(tag_name, "", True, *where(closing.start()))
            pos = gt + 1
    if pos < len(markup):
        yield markup[pos:]
