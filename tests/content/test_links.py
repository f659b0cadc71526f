"""Link rewriting for click tracking and the open pixel (content.links), and what it
needs of the linear HTML walk under it (content.markup): offsets, and tags, comments,
raw text and attribute values read as a browser reads them."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from postwarden.content.design import sanitize_html
from postwarden.content.links import link_url, pixel, rewrite_html, trackable
from postwarden.content.markup import Tag, walk

PIXEL = "https://t.test/o/tok?a=1&b=2"


def tracked(i: int, url: str) -> str:
    return f"https://t.test/c/{i}?k=v&n={len(url)}"


def same(_i: int, url: str) -> str:
    return url


def hrefs(html: str) -> list[str | None]:
    return [
        t.attr("href") for t in walk(html) if isinstance(t, Tag) and t.name == "a" and not t.end
    ]


# ---------------------------------------------------------------- what is rewritten


def test_http_links_are_rewritten_in_order_and_the_rest_left_alone() -> None:
    html = (
        '<p><a href="https://shop.test/a">A</a> <a href="mailto:x@y.test">m</a>'
        '<a href="tel:+1555">t</a><a href="sms:+1555">s</a><a href="#top">top</a>'
        '<a href="/relative">r</a><a href="">e</a><a href>n</a><a href="ftp://f.test/">f</a>'
        '<a href="javascript:go()">j</a><a href="http://">no host</a><a name="x">anchor</a>'
        '<a href="HTTP://Shop.Test/B">B</a><map><area shape="rect" href="https://shop.test/c">'
        "</map><a href='https://shop.test/a'>A again</a></p>"
    )
    out = rewrite_html(html, tracked)
    assert out.links == (
        "https://shop.test/a", "HTTP://Shop.Test/B", "https://shop.test/c", "https://shop.test/a",
    )  # fmt: skip
    assert hrefs(out.html) == [
        tracked(0, "https://shop.test/a"), "mailto:x@y.test", "tel:+1555", "sms:+1555", "#top",
        "/relative", "", "", "ftp://f.test/", "javascript:go()", "http://", None,
        tracked(1, "HTTP://Shop.Test/B"), tracked(3, "https://shop.test/a"),
    ]  # fmt: skip
    area = next(t for t in walk(out.html) if isinstance(t, Tag) and t.name == "area")
    assert area.attr("href") == tracked(2, "https://shop.test/c")


def test_skipped_urls_and_data_notrack_are_not_tracked() -> None:
    html = (
        '<a href="https://pw.test/u/tok?x=1&amp;y=2">Unsubscribe</a>'
        '<a href="https://pw.test/p/tok">Preferences</a>'
        '<a data-notrack href="https://shop.test/private">private</a>'
        '<a href="https://shop.test/ok" DATA-NOTRACK="yes" class="c">also private</a>'
        '<a href="https://shop.test/ok">tracked</a>'
    )
    out = rewrite_html(
        html, tracked, skip=["https://pw.test/u/tok?x=1&y=2", " https://pw.test/p/tok\n"]
    )
    assert out.links == ("https://shop.test/ok",)
    assert out.html == (
        '<a href="https://pw.test/u/tok?x=1&amp;y=2">Unsubscribe</a>'
        '<a href="https://pw.test/p/tok">Preferences</a>'
        '<a href="https://shop.test/private">private</a>'
        '<a href="https://shop.test/ok" class="c">also private</a>'
        '<a href="https://t.test/c/0?k=v&amp;n=20">tracked</a>'
    )


def test_data_notrack_goes_whatever_its_form_and_the_tag_stays_whole() -> None:
    cases = {
        "<a data-notrack>x</a>": "<a>x</a>",
        "<a\n  data-notrack\n  href=mailto:a@b.test>x</a>": "<a\n  href=mailto:a@b.test>x</a>",
        '<a data-notrack="1"href="https://x.test/">x</a>': '<a href="https://x.test/">x</a>',
        "<a x=\"1\"data-notrack=''>x</a>": '<a x="1">x</a>',
        "<a data-notrack/>": "<a/>",
        "<a data-notrack data-notrack=2 href=#>x</a>": "<a href=#>x</a>",
        # On other elements it is not ours to drop.
        '<div data-notrack="1"><a href=#>x</a></div>': (
            '<div data-notrack="1"><a href=#>x</a></div>'
        ),
    }
    for html, want in cases.items():
        out = rewrite_html(html, tracked)
        assert (out.html, out.links) == (want, ()), html


def test_the_new_url_is_escaped_into_double_quotes_whatever_the_old_quoting() -> None:
    html = (
        "<a href=https://x.test/1?a=1&amp;b=2>u</a>"
        "<a href='https://x.test/2?q=\"hi\"'>s</a>"
        '<a href="https://x.test/3?q=&#39;hi&#39;">d</a>'
    )
    out = rewrite_html(html, lambda i, u: u + "&i=" + str(i) + "<'\">")
    assert out.links == (
        "https://x.test/1?a=1&b=2",
        'https://x.test/2?q="hi"',
        "https://x.test/3?q='hi'",
    )
    assert out.html == (
        '<a href="https://x.test/1?a=1&amp;b=2&amp;i=0&lt;&#x27;&quot;&gt;">u</a>'
        '<a href="https://x.test/2?q=&quot;hi&quot;&amp;i=1&lt;&#x27;&quot;&gt;">s</a>'
        '<a href="https://x.test/3?q=&#x27;hi&#x27;&amp;i=2&lt;&#x27;&quot;&gt;">d</a>'
    )


def test_hrefs_are_read_as_a_browser_reads_them() -> None:
    html = (
        '<A HREF="  https://x.test/a?b=1&amp;c=2\n">1</A>'
        '<a Href="\thttps://x.test/b\t?q\n=1 ">2</a>'
        '<a href="https://x.test/c?region=eu&region=us&copy=1&amp;lang=en">3</a>'
        '<a href="&#104;ttps://x.test/d">4</a>'
        '<a href = "https://x.test/e" href="https://x.test/ignored">5</a>'
        '<a title="x" href="https://x.test/f"title=y>6</a>'
    )
    out = rewrite_html(html, tracked)
    assert out.links == (
        "https://x.test/a?b=1&c=2",
        "https://x.test/b?q=1",
        # "&region" and "&copy" followed by "=" are not references in an attribute.
        "https://x.test/c?region=eu&region=us&copy=1&lang=en",
        "https://x.test/d",
        "https://x.test/e",
        "https://x.test/f",
    )
    assert out.html.startswith('<A HREF="https://t.test/c/0?k=v&amp;n=24">1</A>')
    assert '<a href = "https://t.test/c/4?k=v&amp;n=16" href="https://x.test/ignored">' in (
        out.html
    )
    assert '<a title="x" href="https://t.test/c/5?k=v&amp;n=16"title=y>6</a>' in out.html


def test_link_url_and_trackable() -> None:
    assert link_url(" \x00https://x.test/\ta\n \x1f") == "https://x.test/a"
    assert [trackable(u) for u in ("https://x", "HTTPS://x", "http:/x", "http:x", "//x")] == [
        True, True, False, False, False,
    ]  # fmt: skip


# ---------------------------------------------------------------- what is left alone


def test_comments_scripts_and_raw_text_are_left_alone() -> None:
    html = (
        '<!-- <a href="https://x.test/comment" data-notrack> -->'
        '<!--[if mso]><v:roundrect href="https://x.test/vml"><a href="https://x.test/mso">'
        "Outlook</a></v:roundrect><![endif]-->"
        '<!--[if !mso]><!--><a href="https://x.test/not-mso">button</a><!--<![endif]-->'
        "<script>document.write('<a href=\"https://x.test/script\">')</script>"
        '<style>a[href="https://x.test/style"] { color: red }</style>'
        '<title><a href="https://x.test/title"></title>'
        '<textarea><a href="https://x.test/textarea"></textarea>'
        '<!--> <a href="https://x.test/after-empty-comment">'
        '<!-- x --!> <a href="https://x.test/after-bang-comment">'
    )
    out = rewrite_html(html, tracked)
    assert out.links == (
        "https://x.test/not-mso",
        "https://x.test/after-empty-comment",
        "https://x.test/after-bang-comment",
    )
    untouched = html.split("<!--[if !mso]><!-->")[0]
    assert out.html.startswith(untouched + '<!--[if !mso]><!--><a href="https://t.test/c/0')
    for kept in ("script", "style", "title", "textarea"):
        assert f"https://x.test/{kept}" in out.html


def test_a_quote_typo_does_not_shift_the_tags() -> None:
    # A browser reads past the stray quote: the link after it is a link.
    html = '<td width="100""><a href="https://x.test/a">a</a></td><p class=a"b>"<a href=https://x.test/b>'
    out = rewrite_html(html, tracked)
    assert out.links == ("https://x.test/a", "https://x.test/b")
    assert tokens(out.html) == expected_tokens(html, tracked, frozenset(), None)
    # A quote in an unquoted value is part of it, as in a browser.
    assert rewrite_html("<a href=https://x.test/'q\"'>", same).links == ("https://x.test/'q\"'",)


# ---------------------------------------------------------------- the pixel


def test_the_pixel_goes_before_the_last_body_end_tag() -> None:
    img = pixel(PIXEL)
    assert img == (
        '<img src="https://t.test/o/tok?a=1&amp;b=2" width="1" height="1" alt="" '
        'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0">'
    )
    cases = {
        "<html><body><p>x</p></body></html>": f"<html><body><p>x</p>{img}</body></html>",
        "<p>fragment</p>": f"<p>fragment</p>{img}",
        "<body>a</body>b</BODY\n>c": f"<body>a</body>b{img}</BODY\n>c",
        "<body>a<!-- </body> --></body><script>'</body>'</script>": (
            f"<body>a<!-- </body> -->{img}</body><script>'</body>'</script>"
        ),
        # Nothing after a construct that never closes is shown: the pixel goes before it.
        '<body><p>x</p><a href="https://x.test/': f'<body><p>x</p>{img}<a href="https://x.test/',
        "<body>x<!-- never closed </body>": f"<body>x{img}<!-- never closed </body>",
        "<body>x<script>never closed</body>": f"<body>x{img}<script>never closed</body>",
        "": img,
    }
    for html, want in cases.items():
        assert rewrite_html(html, tracked, pixel_url=PIXEL).html == want, html
    assert rewrite_html("<body></body>", tracked).html == "<body></body>"


def test_rewritten_links_and_the_pixel_come_out_in_document_order() -> None:
    html = '<body><a href="https://x.test/1">1</a></body><a href="https://x.test/2">2</a>'
    out = rewrite_html(html, same, pixel_url=PIXEL)
    assert out.html == (
        f'<body><a href="https://x.test/1">1</a>{pixel(PIXEL)}</body>'
        '<a href="https://x.test/2">2</a>'
    )


def test_the_pixel_url_may_depend_on_how_many_links_were_tracked() -> None:
    html = '<body><a href="https://x.test/1">1</a><a href="mailto:a@b">m</a>' \
        '<a href="https://x.test/2">2</a></body>'  # fmt: skip
    out = rewrite_html(html, same, pixel_url=lambda n: f"https://t.test/o/{n}")
    assert pixel("https://t.test/o/2") in out.html and len(out.links) == 2


# ---------------------------------------------------------------- valid HTML


class _Tokens(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[tuple[Any, ...]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.out.append(("start", tag, tuple(attrs)))

    def handle_endtag(self, tag: str) -> None:
        self.out.append(("end", tag))

    def handle_data(self, data: str) -> None:
        if self.out and self.out[-1][0] == "data":
            self.out[-1] = ("data", self.out[-1][1] + data)
        else:
            self.out.append(("data", data))

    def handle_comment(self, data: str) -> None:
        self.out.append(("comment", data))

    def handle_decl(self, decl: str) -> None:
        self.out.append(("decl", decl))


def tokens(html: str) -> list[tuple[Any, ...]]:
    """The document as a browser-like tokenizer reads it (html.parser: a real parser,
    fine on these small documents)."""
    parser = _Tokens()
    parser.feed(html)
    parser.close()
    return parser.out


def expected_tokens(
    html: str, click: Any, skip: frozenset[str], pixel_url: str | None
) -> list[tuple[Any, ...]]:
    """The input's tokens with the rule applied to them: a restatement of the rule on
    the parser's reading, independent of the walk."""
    out: list[tuple[Any, ...]] = []
    index = 0
    for tok in tokens(html):
        if tok[0] == "start" and tok[1] in ("a", "area"):
            attrs = list(tok[2])
            notrack = any(k == "data-notrack" for k, _ in attrs)
            attrs = [(k, v) for k, v in attrs if k != "data-notrack"]
            first = next((i for i, (k, _) in enumerate(attrs) if k == "href"), None)
            if not notrack and first is not None and attrs[first][1]:
                url = link_url(attrs[first][1] or "")
                if url.lower().startswith(("http://", "https://")) and url not in skip:
                    attrs[first] = ("href", click(index, url))
                    index += 1
            tok = ("start", tok[1], tuple(attrs))
        out.append(tok)
    if pixel_url is not None:
        ends = [i for i, t in enumerate(out) if t == ("end", "body")]
        img = ("start", "img", tokens(pixel(pixel_url))[0][2])
        out.insert(ends[-1] if ends else len(out), img)
    merged: list[tuple[Any, ...]] = []
    for tok in out:  # the pixel may have split a text run, or not
        if merged and tok[0] == merged[-1][0] == "data":
            merged[-1] = ("data", merged[-1][1] + tok[1])
        else:
            merged.append(tok)
    return merged


NEWSLETTER = """<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" "x.dtd">
<html xmlns="http://www.w3.org/1999/xhtml"><head><meta charset="utf-8">
<style type="text/css">a { color: #06c } td > a[href^="http"] { x: y }</style>
<!--[if mso]><xml><o:OfficeDocumentSettings><o:PixelsPerInch>96</o:PixelsPerInch>
</o:OfficeDocumentSettings></xml><![endif]--></head>
<BODY style="margin:0"><table role="presentation" width="100%"><tr>
<td align=center><a href=https://shop.test/?utm_source=news&amp;utm_medium=email
 target=_blank><img src="https://cdn.test/logo.png" alt="Shop" width=120></a></td></tr>
<tr><td><h1>Hello &amp; welcome</h1><p>Our <A HREF='https://shop.test/sale?a=1&amp;b=2'
 class="btn">sale</A> ends <b>soon</b>. Call <a href="tel:+15550100">us</a> or
<a href="mailto:help@shop.test?subject=Hi%20there">write</a>.</p>
<!--[if mso]><v:roundrect href="https://shop.test/vml" style="width:200px"><![endif]-->
<!--[if !mso]><!--><a href="https://shop.test/button" data-notrack style="display:block">
Button</a><!--<![endif]--><map name="m"><area shape="rect" coords="0,0,1,1"
href=" https://shop.test/area "></map><a href="#top">Top</a>
<p>1 < 2 and 3 > 2; "quotes" and 'apostrophes'</p>
<script type="text/javascript">var a = '<a href="https://shop.test/js">';</script>
<p><a href="https://pw.test/u/tok">Unsubscribe</a> <a href="https://pw.test/p/tok">
Preferences</a> <a href="https://shop.test/?utm_source=news&amp;utm_medium=email">again</a></p>
</td></tr></table></body>
</html>
"""


def test_a_newsletter_stays_the_same_document() -> None:
    skip = frozenset({"https://pw.test/u/tok", "https://pw.test/p/tok"})
    out = rewrite_html(NEWSLETTER, tracked, skip=skip, pixel_url=PIXEL)
    assert out.links == (
        "https://shop.test/?utm_source=news&utm_medium=email",
        "https://shop.test/sale?a=1&b=2",
        "https://shop.test/area",
        "https://shop.test/?utm_source=news&utm_medium=email",
    )
    assert tokens(out.html) == expected_tokens(NEWSLETTER, tracked, skip, PIXEL)
    # The conditional comments and the script come out byte for byte.
    for part in (
        "<!--[if mso]><xml>",
        "<![endif]--></head>",
        '<v:roundrect href="https://shop',
        "<!--[if !mso]><!-->",
        "var a = '<a href=\"https://shop.test/js\">';",
    ):
        assert part in out.html


# ---------------------------------------------------------------- generated documents

_TEXT = st.sampled_from(
    ["hello", " ", "\n", "&amp;", "&lt;x&gt;", "1 < 2", "3 > 2", '"q"', "it's", "=", "é",
     "&region=eu", "x</y z>", "</>"]
)  # fmt: skip
# (raw href value, the URL when it is tracked)
_HREFS = st.sampled_from(
    [
        ('"https://e.test/a?b=1&amp;c=2"', "https://e.test/a?b=1&c=2"),
        ('"HTTP://E.TEST/"', "HTTP://E.TEST/"),
        ('"https://e.test/a?b=1&amp;c=2"', "https://e.test/a?b=1&c=2"),
        ('"https://e.test/q?x=&quot;&#x27;y"', "https://e.test/q?x=\"'y"),
        ('"https://e.test/unsubscribe"', None),  # in skip
        ('"mailto:a@e.test"', None), ('"tel:+1555"', None), ('"#top"', None),
        ('"/relative"', None), ('""', None), ('"javascript:void(0)"', None),
        ("'mailto:a@e.test'", None), ("#x", None),
    ]
)  # fmt: skip
_OTHER_ATTRS = st.sampled_from(
    ['class="btn"', "title='a > b'", "id=x1", "target=_blank", 'style="color:red"', "data-x",
     "TITLE=\"it's\""]
)  # fmt: skip
_NOTRACK = st.sampled_from(["data-notrack", 'data-notrack=""', "DATA-NOTRACK='1'"])
SKIP = frozenset({"https://e.test/unsubscribe"})


@st.composite
def _link(draw: st.DrawFn) -> tuple[str, str, list[str]]:
    name = draw(st.sampled_from(["a", "A", "area", "AREA"]))
    others = draw(st.lists(_OTHER_ATTRS, max_size=3))
    raw, url = draw(_HREFS)
    notrack = draw(st.none() | _NOTRACK)
    attrs = [*others, f"{draw(st.sampled_from(['href', 'HREF']))}={raw}"]
    at = draw(st.integers(0, len(attrs)))
    kept = "".join(" " + a for a in attrs)
    if notrack is not None:
        attrs.insert(at, notrack)
    src = f"<{name}{''.join(' ' + a for a in attrs)}>"
    inner = draw(_TEXT)
    end = f"</{name}>" if name.lower() == "a" else ""
    urls = [url] if url is not None and notrack is None else []
    return src + inner + end, f"<{name}{kept}>" + inner + end, urls


def _plain(draw: st.DrawFn, depth: int) -> tuple[str, str, list[str]]:
    kind = draw(st.sampled_from(["text", "tag", "link", "comment", "mso", "script"]))
    if kind == "text":
        s = draw(_TEXT)
        return s, s, []
    if kind == "tag":
        s = draw(st.sampled_from(
            ["<p>", "</p>", '<td width="1">', "<br/>", '<img src="x.png" alt="">',
             "<div class='c' data-notrack>", "</div>", "<TABLE BORDER=0>", "</table>",
             "<body>", "</body>", "<!DOCTYPE html>"]
        ))  # fmt: skip
        return s, s, []
    if kind == "link" or depth > 1:
        return draw(_link())
    inner = "".join(_plain(draw, depth + 1)[0] for _ in range(draw(st.integers(0, 3))))
    inner = inner.replace("-", "")  # no "--" that would end it early
    if kind == "comment":
        s = f"<!-- {inner} -->"
    elif kind == "mso":
        s = f"<!--[if mso]>{inner}<![endif]-->"
    else:
        s = "<script>" + inner.replace("</", "<\\/") + "</script>"
    return s, s, []


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, str, list[str]]:
    pieces = [_plain(draw, 0) for _ in range(draw(st.integers(0, 12)))]
    return (
        "".join(p[0] for p in pieces),
        "".join(p[1] for p in pieces),
        [u for p in pieces for u in p[2]],
    )


@settings(max_examples=200, deadline=None)
@given(documents())
def test_with_the_same_urls_only_data_notrack_goes(doc: tuple[str, str, list[str]]) -> None:
    html, want, urls = doc
    out = rewrite_html(html, same, skip=SKIP)
    assert out.html == want
    assert list(out.links) == urls


@settings(max_examples=200, deadline=None)
@given(documents(), st.booleans())
def test_generated_documents_stay_the_same_document(
    doc: tuple[str, str, list[str]], with_pixel: bool
) -> None:
    html, _want, urls = doc
    pixel_url = PIXEL if with_pixel else None
    out = rewrite_html(html, tracked, skip=SKIP, pixel_url=pixel_url)
    assert list(out.links) == urls
    assert tokens(out.html) == expected_tokens(html, tracked, SKIP, pixel_url)


# ---------------------------------------------------------------- hostile input


def test_hostile_markup_finishes() -> None:
    n = 100_000
    for html in (
        '<a href="' * n,
        "<!--" * n,
        "<a href=https://x.test/>" * n,
        "<a " * n,
        "<script>" * n,
        "<a href='" + "<p>" * n,
        "&amp;" * n + "<a href='&region" * n,
    ):
        out = rewrite_html(html, tracked, pixel_url=PIXEL)
        assert len(out.html) >= len(html)
    many = rewrite_html('<a href="https://x.test/">x</a>' * n, same)
    assert len(many.links) == n


# ---------------------------------------------------------------- the walk under it


def test_tags_know_where_they_are_and_where_their_attributes_are() -> None:
    html = 'x<a  data-notrack href = "u&amp;v" title=t>y</a>'
    a, end = [t for t in walk(html) if isinstance(t, Tag)]
    assert (html[a.start : a.stop], html[end.start : end.stop]) == (html[1:-5], "</a>")
    notrack, href, title = a.attributes()
    assert (notrack.name, notrack.value, notrack.value_start) == ("data-notrack", None, None)
    assert html[notrack.start : notrack.stop] == "data-notrack"
    assert html[href.start : href.stop] == 'href = "u&amp;v"' and href.value == "u&v"
    assert href.value_start is not None and html[href.value_start : href.stop] == '"u&amp;v"'
    assert (title.value, html[title.start : title.stop]) == ("t", "title=t")


def test_the_walk_returns_where_it_stopped() -> None:
    def stop(html: str) -> int:
        items = walk(html)
        while True:
            try:
                next(items)
            except StopIteration as done:
                return int(done.value)

    assert stop("<p>all</p>") == 10
    assert stop("<p>x</p><!-- open") == 8
    assert stop('<p>x</p><a href="open') == 8
    assert stop("<p>x</p><script>open") == 8
    assert stop("<p>x</p><textarea>open</textarea>") == 33


def test_a_design_may_mark_a_link_data_notrack() -> None:
    html = sanitize_html('<p><a href="https://x.test/" data-notrack onclick="x()">x</a></p>')
    assert html == '<p><a href="https://x.test/" data-notrack="">x</a></p>'
    out = rewrite_html(html, tracked)
    assert (out.html, out.links) == ('<p><a href="https://x.test/">x</a></p>', ())


def _walked(html: str, names: frozenset[str] | None) -> tuple[list[str | Tag], int]:
    items = walk(html, names)
    out: list[str | Tag] = []
    while True:
        try:
            out.append(next(items))
        except StopIteration as done:
            return out, int(done.value)


_BITS = st.sampled_from(
    ["<a", "<A ", "<area", "<AREA/", "<p", "<x-y", "</a>", "</p ", "<body", "</body>", "</BODY",
     "<script>", "</script>", "</scripts>", "<style/>", "<title>", "</title>", "<textarea>",
     "<!--", "-->", "--!>", "<!-->", "<!", "<?", "</", "</ ", ">", "=", '"', "'", " ", "/",
     "-", "\n", "href", "x", "&amp;", "<", "<<", "\u017fcript", "\u212aa"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(_BITS, max_size=40), st.sampled_from([("a", "area", "body"), ("img",), ()]))
@example(["<!--", "--!>", "<a", ">", "-->"], ("a",))
@example(["<!-->", "<a", ">", "-->"], ("a",))
@example(["<!--", "-", "->", "<a", ">", "-->"], ("a",))
@example(["<title>", "<a", ">", "</title>", "<script>", "<a>", "</script", ">"], ("a",))
def test_a_walk_for_some_tags_gives_what_the_whole_walk_gives(
    bits: list[str], names: tuple[str, ...]
) -> None:
    html = "".join(bits)
    whole, stopped = _walked(html, None)
    some = [t for t in whole if isinstance(t, Tag) and t.name in names]
    assert _walked(html, frozenset(names)) == (some, stopped)
