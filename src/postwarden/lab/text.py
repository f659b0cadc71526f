"""A received message's body as text, for ``postwarden lab inbox`` and the lab's HTTP
view: the text/plain part, else the HTML part made readable (block elements on their
own lines, links with their URL). Display only; the bounce parser has its own,
capped converter (``bounces.parse.htmltext``)."""

from __future__ import annotations

import email.message
import html.parser
import re
from collections.abc import Callable
from typing import Any


class _HTMLText(html.parser.HTMLParser):
    """Rough text from HTML: block elements on their own lines, links with their URL,
    scripts and styles left out."""

    BLOCKS = frozenset(
        "p div br tr li h1 h2 h3 h4 h5 h6 table ul ol blockquote pre hr section article".split()
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._href: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("* ")
        if tag == "a":
            self._href.append(dict(attrs).get("href"))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head"):
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")
        if tag == "a" and self._href:
            href = self._href.pop()
            if href and not href.startswith("#"):
                self.parts.append(f" <{href}>")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(re.sub(r"\s+", " ", data))

    def text(self) -> str:
        joined = "".join(self.parts)
        lines = [line.strip() for line in joined.splitlines()]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def html_to_text(markup: str) -> str:
    """Rough plain text from an HTML body."""
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return parser.text()


def body_text(message: email.message.Message) -> str:
    """The text/plain part, else the HTML part as rough text, else ``""``."""
    get_body: Callable[..., Any] | None = getattr(message, "get_body", None)
    if get_body is None:
        return ""
    try:
        part = get_body(preferencelist=("plain", "html"))
        if part is None:
            return ""
        content = part.get_content()
    except Exception:  # undecodable or malformed: show nothing rather than fail
        return ""
    if not isinstance(content, str):
        return ""
    if part.get_content_subtype() == "html":
        return html_to_text(content)
    return content.replace("\r\n", "\n")
