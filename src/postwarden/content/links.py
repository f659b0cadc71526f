"""Links rewritten for click tracking, and the open pixel, in a rendered HTML body.

Each ``<a>`` and ``<area>`` whose ``href`` is an absolute ``http:``/``https:`` URL gets
the URL that ``click_url`` makes of it (the tracked link: a redirect to the original);
``mailto:``, ``tel:`` and every other scheme, fragments, relative and empty URLs, URLs
in ``skip`` (unsubscribe, preferences) and links marked ``data-notrack`` are left
alone. ``data-notrack`` is an instruction to us, not to the mail client: it is dropped
from every link. Everything else in the document stays as it was, byte for byte: only
the ``href`` values and ``data-notrack`` attributes are edited in place, where
:func:`postwarden.content.markup.walk` (linear, and reading tags, comments and raw text
as a browser does) finds them; a construct that never closes ends the edits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from html import escape

from postwarden.content.markup import Tag, walk

_LINKS = frozenset(("a", "area"))
_READ = _LINKS | {"body"}  # the tags the rewriter reads (the walk passes over the rest)
# A browser drops tabs and newlines from a URL and trims controls and spaces around it.
_TAB_NEWLINE = re.compile("[\t\n\r]")
_TRIMMED = "".join(map(chr, range(0x21)))
# An absolute http(s) URL with a host.
_TRACKABLE = re.compile(r"https?://[^/\\?#]", re.I)
_SPACE = "\t\n\f\r "
PIXEL_STYLE = "display:block;width:1px;height:1px;border:0;margin:0;padding:0"


@dataclass(frozen=True)
class Rewritten:
    html: str  # the HTML with tracked links and the pixel
    links: tuple[str, ...]  # the original URL of each tracked link, by index


def link_url(href: str) -> str:
    """The URL a browser follows for a decoded ``href`` value: tabs and newlines
    dropped, control characters and spaces trimmed from both ends."""
    return _TAB_NEWLINE.sub("", href).strip(_TRIMMED)


def trackable(url: str) -> bool:
    """Whether ``url`` (as :func:`link_url` gives it) is an absolute http(s) URL."""
    return _TRACKABLE.match(url) is not None


def pixel(url: str) -> str:
    """The open pixel's element: 1x1, no border or margin, a block of its own."""
    return f'<img src="{escape(url)}" width="1" height="1" alt="" style="{PIXEL_STYLE}">'


def rewrite_html(
    html: str,
    click_url: Callable[[int, str], str],
    *,
    skip: Collection[str] = (),
    pixel_url: str | Callable[[int], str] | None = None,
) -> Rewritten:
    """``html`` with each tracked link's ``href`` replaced by ``click_url(index,
    original URL)`` (HTML-escaped, in double quotes), ``data-notrack`` dropped from
    links, and the open pixel (when ``pixel_url`` is given: a URL, or a function of
    the number of tracked links that makes it) just before the last ``</body>``, else
    at the end. Indexes count tracked links from 0 in document
    order; a URL that appears twice gets two. Linear in the length of ``html``."""
    never = frozenset(link_url(u) for u in skip)
    edits: list[tuple[int, int, str]] = []  # (start, stop, replacement), in order
    links: list[str] = []
    body_end: int | None = None
    items = walk(html, _READ)
    while True:
        try:
            item = next(items)
        except StopIteration as done:
            stopped: int = done.value
            break
        if not isinstance(item, Tag):
            continue
        if item.end:
            if item.name == "body":
                body_end = item.start
            continue
        if item.name not in _LINKS:
            continue
        href = None
        notrack = False
        for a in item.attributes():
            if a.name == "data-notrack":
                notrack = True
                edits.append((_removal_start(html, a.start, a.stop), a.stop, ""))
            elif a.name == "href" and href is None:
                href = a
        if notrack or href is None or href.value is None or href.value_start is None:
            continue
        url = link_url(href.value)
        if not trackable(url) or url in never:
            continue
        tracked = click_url(len(links), url)
        links.append(url)
        edits.append((href.value_start, href.stop, f'"{escape(tracked)}"'))
    if pixel_url is not None:
        at = stopped if body_end is None else body_end
        url = pixel_url if isinstance(pixel_url, str) else pixel_url(len(links))
        edits.append((at, at, pixel(url)))
        edits.sort(key=lambda e: e[0])  # stable: the pixel is at a tag's "<"
    out: list[str] = []
    pos = 0
    for start, stop, text in edits:
        out.append(html[pos:start])
        out.append(text)
        pos = stop
    out.append(html[pos:])
    return Rewritten("".join(out), tuple(links))


def _removal_start(html: str, start: int, stop: int) -> int:
    """Where to cut an attribute from: with the spaces before it, unless the next
    attribute follows it with no space between (``data-notrack="1"href=...``)."""
    if stop < len(html) and html[stop] not in _SPACE and html[stop] not in "/>":
        return start
    cut = start
    while html[cut - 1] in _SPACE:
        cut -= 1
    return cut
