"""Plain text from HTML: the text part of a template that has none, and the lab's
readable view of an HTML-only message (``lab.text``). Block elements on their own
lines, list items as ``* ``, links followed by their URL in angle brackets, scripts,
styles and the head left out. Linear in the length of the HTML (``content.markup``).
"""

from __future__ import annotations

import html
import re

from postwarden.content.markup import Tag, walk

#: Elements that start and end a line.
BLOCKS = frozenset(
    "p div br tr li h1 h2 h3 h4 h5 h6 table ul ol blockquote pre hr section article".split()
)
_HIDDEN = frozenset(("script", "style", "head"))
_SPACES = re.compile(r"\s+")


def html_to_text(markup: str) -> str:
    """Readable plain text of an HTML body, ending in one newline."""
    parts: list[str] = []
    hidden = 0
    hrefs: list[str | None] = []
    for item in walk(markup):
        if not isinstance(item, Tag):
            if not hidden:
                parts.append(_SPACES.sub(" ", html.unescape(item)))
            continue
        name = item.name
        if name in _HIDDEN:
            hidden = max(0, hidden - 1) if item.end else hidden + 1
        elif name in BLOCKS:
            parts.append("\n")
        if item.end:
            if name == "a" and hrefs:
                href = hrefs.pop()
                if href and not href.startswith("#"):
                    parts.append(f" <{href}>")
        else:
            if name == "li":
                parts.append("* ")
            elif name == "a":
                hrefs.append(item.attr("href"))
    return tidy("".join(parts))


def tidy(text: str) -> str:
    """Lines stripped, at most one empty line in a row, one newline at the end."""
    lines = [line.strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)
_MARK = re.compile("\x02(\\d+)\x03")


def text_template(html_template: str) -> str | None:
    """A Jinja template of the plain text of an HTML *template*: what
    :func:`html_to_text` would make of each rendered message, made once per template
    instead of once per message (3 ms for 30 KB of HTML).

    Each Jinja construct is replaced by a marker, the marked HTML turned into text, and
    the constructs put back where their markers came out. Only when that is safe: every
    statement (``{% … %}``) must come out, in its order (an expression or comment inside
    an attribute that the text leaves out may go with it); a ``raw`` block or a marker
    character already in the source gives None, and the caller makes the text from each
    rendered message instead. The rendered text goes through :func:`tidy`, as
    :func:`html_to_text`'s own output does."""
    if "\x02" in html_template or "\x03" in html_template:
        return None
    if re.search(r"\{%-?\s*raw\b", html_template):
        return None
    found = _JINJA.findall(html_template)
    if not found:
        return html_to_text(html_template)
    counter = iter(range(len(found)))
    marked = _JINJA.sub(lambda _m: f"\x02{next(counter)}\x03", html_template)
    text = html_to_text(marked)
    # Every statement must come out, in order, and every expression that comes out
    # between the same two statements as in the source (a link's URL may follow its
    # text: "name <url>" from <a href="url">name</a>).
    segment, seen = [], 0
    for c in found:
        seen += c.startswith("{%")
        segment.append(seen)
    at = 0
    for i in (int(m) for m in _MARK.findall(text)):
        if found[i].startswith("{%"):
            if segment[i] != at + 1:
                return None
            at += 1
        elif segment[i] != at:
            return None
    if at != seen:
        return None
    out = _MARK.sub(lambda m: found[int(m.group(1))], text)
    # Text that reads as Jinja once unescaped (``&#123;&#123;``) would run: refused.
    if len(_JINJA.findall(out)) != len(_MARK.findall(text)):
        return None
    return out
