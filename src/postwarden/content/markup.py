"""A linear walk over HTML: text runs and tags (with their attributes and where they
are), for the HTML-to-text converter, the template linter and the link rewriter.

Not :class:`html.parser.HTMLParser` fed the whole document: on 3.11 it looks for the
end of an unfinished construct again from every later ``<`` (an unclosed comment, a
quote left open in a tag; ``bounces.parse.htmltext`` tells the story), and the HTML
here is a tenant's. This walk looks at each character a bounded number of times: each
search starts where the last construct ended, and the walk stops at the first
construct that never closes (the rest is not shown, as a browser shows it).

Where a browser's tokenizer (HTML5) and the walk could disagree about where a tag or a
comment ends, the walk follows the browser, so that a tool editing tags in place (the
link rewriter) edits what a browser sees as that tag: a quote opens a value only after
``=`` (``<td width="1"">`` is a typo a browser reads past), a comment ends at the first
``-->`` or ``--!>`` (``<!-->`` is a whole one), ``</script`` ends a script only as a
whole name, and the content of ``title``, ``textarea``, ``xmp``, ``iframe``,
``noembed`` and ``noframes`` is text, not markup. Attribute values are decoded as a
browser decodes them in an attribute: ``&region=`` in a link stays as it is.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Collection, Generator, Iterator
from dataclasses import dataclass
from html.entities import html5

# A "<" that may open a construct; any other "<" is text.
_OPENS = re.compile(r"<[A-Za-z/!?]")
_NAME = re.compile(r"</?([A-Za-z][^\t\n\r\f />]*)")
_COMMENT_END = re.compile(r"--!?>")
# Inside a tag, from where the last attribute ended: spaces and slashes, then at most
# one attribute, a name and maybe "=" and a value (as an HTML5 tokenizer reads them:
# quotes and "=" may be part of a name, a quote opens a value only after "=", an
# unquoted value runs to a space or ">"). Possessive: one pass over each character; a
# quote left open runs to the end (the tag never closes).
_ATTR_SOURCE = (
    r"""[\t\n\f\r /]*+"""
    r"""(?:(?P<name>[^\t\n\f\r />][^\t\n\f\r />=]*+)"""
    r"""(?:[\t\n\f\r ]*+=[\t\n\f\r ]*+(?P<value>"[^"]*+"?|'[^']*+'?|[^\t\n\f\r >]*+))?)?"""
)
_ATTR = re.compile(_ATTR_SOURCE)
# A whole tag that closes: its name, then its attributes (what is between the name and
# ">"). One that does not match never closes: only the end of the markup stops the
# attributes before a ">".
_ATTRS_SOURCE = "(?:" + re.sub(r"\(\?P<\w+>", "(?:", _ATTR_SOURCE) + ")*+"
_TAG = re.compile(r"</?([A-Za-z][^\t\n\r\f />]*+)(" + _ATTRS_SOURCE + ")>")
# Elements whose content is raw text, where a "<" opens nothing: script and style (not
# given), and those whose text is shown (given as one text run).
_HIDDEN_RAW = frozenset(("script", "style"))
_SHOWN_RAW = frozenset(("title", "textarea", "xmp", "iframe", "noembed", "noframes"))
_RAW_END = {t: re.compile(f"</{t}(?=[\t\n\f\r />])", re.I) for t in _HIDDEN_RAW | _SHOWN_RAW}
# What a walk for some tags passes over in one match: text, "<" that opens nothing,
# comments, declarations, and whole tags of other names (see _skipper).
_SKIP_SOURCE = (
    r"(?:[^<]++|<(?![A-Za-z/!?])"
    r"|<!--(?:>|->|(?:[^-]++|-(?!-!?>))*+--!?>)"
    r"|<(?:!(?!--)|\?|/(?![A-Za-z]))[^>]*+>"
    r"|<(?!(?i:{starts})[\t\n\f\r />])[A-Za-z][^\t\n\r\f />]*+" + _ATTRS_SOURCE + ">"
    r"|</(?!(?i:{ends})[\t\n\f\r />])[A-Za-z][^\t\n\r\f />]*+" + _ATTRS_SOURCE + ">"
    r")*+"
)
# A character reference, as html.unescape finds them.
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")


@dataclass(frozen=True, slots=True)
class Attribute:
    name: str  # lower case
    value: str | None  # decoded; None when given without "="
    start: int  # where its name starts in the markup
    stop: int  # one past its value's end (or its name's, without a value)
    value_start: int | None  # where its raw value (quotes included) starts


@dataclass(frozen=True, slots=True)
class Tag:
    name: str  # lower case
    source: str  # what is between the name and ">" (attributes: read when asked for)
    end: bool  # an end tag (</name>)
    line: int  # where its "<" is: 1-based line and column
    column: int
    start: int  # where its "<" is in the markup, and one past its ">"
    stop: int

    @property
    def attrs(self) -> tuple[tuple[str, str | None], ...]:
        """Names in lower case, values decoded (None: given without a value)."""
        return tuple((a.name, a.value) for a in self.attributes())

    def attr(self, name: str) -> str | None:
        """The first value of an attribute (``""`` for one given without a value),
        or None when the tag has none of that name."""
        for key, value in self.attrs:
            if key == name:
                return "" if value is None else value
        return None

    def attributes(self) -> tuple[Attribute, ...]:
        """The attributes in order, with where each is in the markup."""
        return tuple(_attributes(self.source, self.stop - 1 - len(self.source)))


def _attributes(inner: str, offset: int) -> Iterator[Attribute]:
    """The attributes of a tag's source, which starts at ``offset`` in the markup."""
    pos, n = 0, len(inner)
    while pos < n:
        m = _ATTR.match(inner, pos)
        assert m is not None  # it matches the empty string
        pos = m.end()
        if m["name"] is None:  # only spaces and slashes were left
            break
        raw = m["value"]
        value = at = None
        if raw is not None:
            value = attribute_value(raw[1:-1] if raw[:1] in ("'", '"') else raw)
            at = m.start("value") + offset
        yield Attribute(m["name"].lower(), value, m.start("name") + offset, pos + offset, at)


def attribute_value(raw: str) -> str:
    """An attribute's raw value decoded as a browser decodes it: as
    :func:`html.unescape`, except that a named reference without ";" followed by "="
    or a letter or digit stays as it is (``?a=1&region=eu`` is not ``?a=1®ion=eu``)."""
    return _CHARREF.sub(_attribute_ref, raw) if "&" in raw else raw


def _attribute_ref(m: re.Match[str]) -> str:
    ref = m.group(1)
    if ref[0] == "#" or (ref.endswith(";") and ref in html5):
        return html.unescape(m.group(0))
    if ref in html5:  # a whole legacy name: what follows is no name character
        return html5[ref]
    for cut in range(len(ref) - 1, 1, -1):  # the longest name that starts it
        if ref[:cut] in html5:
            after = ref[cut]
            if after == "=" or (after.isascii() and after.isalnum()):
                return m.group(0)
            return html5[ref[:cut]] + ref[cut:]
    return m.group(0)


@functools.lru_cache(maxsize=16)
def _skipper(names: frozenset[str]) -> re.Pattern[str]:
    """One regex that passes over everything a walk for ``names`` leaves out, as far as
    it goes: it stops at a tag of those names, at the start tag of a raw-text element
    (the walk must skip its content), or at a construct that never closes."""
    starts = "|".join(sorted(map(re.escape, names | _HIDDEN_RAW | _SHOWN_RAW)))
    ends = "|".join(sorted(map(re.escape, names))) or "(?!)"
    return re.compile(_SKIP_SOURCE.replace("{starts}", starts).replace("{ends}", ends))


def walk(markup: str, names: Collection[str] | None = None) -> Generator[str | Tag, None, int]:
    """Text runs (raw: decode them with :func:`html.unescape`) and tags, in order.
    Comments, declarations and processing instructions are left out, and so is the
    content of ``script`` and ``style`` (their tags are given). With ``names`` (lower
    case), only the tags of those names, and no text: the rest is passed over by one
    regex, several times faster. Returns where it stopped: the length of the markup, or
    where the construct that never closes starts (for a raw-text element left open, its
    start tag)."""
    skip = None if names is None else _skipper(frozenset(names))
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

    while True:
        if skip is not None:
            pos = skip.match(markup, pos).end()  # type: ignore[union-attr]
        m = _OPENS.search(markup, pos)
        if m is None:
            break
        lt = m.start()
        if lt > pos and skip is None:
            yield markup[pos:lt]
        second = markup[lt + 1]
        if markup.startswith("<!--", lt):
            if markup.startswith(">", lt + 4):  # "<!-->"
                pos = lt + 5
            elif markup.startswith("->", lt + 4):  # "<!--->"
                pos = lt + 6
            else:
                close = _COMMENT_END.search(markup, lt + 4)
                if close is None:
                    return lt
                pos = close.end()
            continue
        tag = _TAG.match(markup, lt) if second != "!" and second != "?" else None
        if tag is None:
            if second != "!" and second != "?" and _NAME.match(markup, lt):
                return lt  # a tag that never closes
            # a declaration or processing instruction; "</>" and "</ "
            gt = markup.find(">", lt)
            if gt < 0:
                return lt
            pos = gt + 1
            continue
        tag_name = tag.group(1).lower()
        end_tag = second == "/"
        ln, col = where(lt)
        inner = "" if end_tag else tag.group(2)
        pos = tag.end()
        if names is None or tag_name in names:
            yield Tag(tag_name, inner, end_tag, ln, col, lt, pos)
        raw = _RAW_END.get(tag_name)
        if raw is not None and not end_tag and not _self_closed(tag_name, inner):
            closing = raw.search(markup, pos)
            end = None if closing is None else _TAG.match(markup, closing.start())
            if end is None:
                return lt
            if tag_name in _SHOWN_RAW and end.start() > pos and skip is None:
                yield markup[pos : end.start()]
            if names is None or tag_name in names:
                yield Tag(tag_name, "", True, *where(end.start()), end.start(), end.end())
            pos = end.end()
    if pos < len(markup) and skip is None:
        yield markup[pos:]
    return len(markup)


def _self_closed(name: str, inner: str) -> bool:
    # Kept from the first walk, for script and style only (the linter and the text
    # view relied on it); a browser reads "<script/>" as a start tag.
    return name in _HIDDEN_RAW and inner.rstrip().endswith("/")
