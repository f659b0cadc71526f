"""Plain text from HTML (the text part a template without one gets, and the lab's
view), and the linear HTML walk under it."""

from __future__ import annotations

from postwarden.content.markup import Tag, walk
from postwarden.content.text import html_to_text

MB = 1_000_000


def test_blocks_lists_links_and_hidden_parts() -> None:
    html = (
        "<html><head><title>T</title><style>p{color:red}</style></head><body>"
        "<h1>Welcome&nbsp;back</h1><p>Read <a href='https://example.test/x'>this</a> &amp; "
        'that <a href="#top">here</a>.</p><ul><li>one</li><li>two\n   lines</li></ul>'
        "<script>if (a < b) { alert('</p>') }</script><div>last<br>line</div></body></html>"
    )
    assert html_to_text(html) == (
        "Welcome back\n\nRead this <https://example.test/x> & that here.\n\n"
        "* one\n\n* two lines\n\nlast\nline\n"
    )


def test_walk_gives_tags_with_decoded_attributes_and_positions() -> None:
    items = list(walk("a<p class=\"x y\" data-v='1 > 2'>\n  <IMG SRC=a&amp;b.png alt>"))
    assert items[0] == "a"
    p, img = items[1], items[3]
    assert isinstance(p, Tag) and isinstance(img, Tag)
    assert (p.name, p.attrs, p.line, p.column) == (
        "p", (("class", "x y"), ("data-v", "1 > 2")), 1, 2,
    )  # fmt: skip
    assert (img.name, img.attr("src"), img.attr("alt"), img.attr("title")) == (
        "img", "a&b.png", "", None,
    )  # fmt: skip
    assert (img.line, img.column) == (2, 3)


def test_unfinished_constructs_end_the_walk_in_linear_time() -> None:
    # Each of these made HTMLParser look again from every later "<" (quadratic); the
    # walk reads them once and stops at the construct that never closes.
    assert html_to_text("<p>shown</p><!--" + "<a" * MB) == "shown\n"
    assert html_to_text("<p>shown</p><a href='" + "<p>" * MB) == "shown\n"
    assert html_to_text("<p>shown</p><script>" + "<" * MB) == "shown\n"
    assert html_to_text("x" + "<a " * MB) == "x\n"
    text = html_to_text("<b>1 &lt; 2</b>" + "< " * MB)
    assert text.startswith("1 < 2< < <") and len(text) == 2 * MB + 5
