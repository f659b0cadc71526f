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
    lines = [line.strip() for line in "".join(parts).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
