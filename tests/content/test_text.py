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


# ---------------------------------------------------------------- text templates

TEMPLATES = [
    "<h1>Hi {{ contact.name }}</h1><p>Plan {{ contact.attributes.plan | default('free') }}</p>",
    '<ul>{% for p in products %}<li><a href="{{ p.url }}">{{ p.name }}</a> {{ p.price }}'
    '</li>{% endfor %}</ul><img src="{{ logo }}" alt="{{ contact.name }}">',
    "{% if contact.attributes.plan == 'pro' %}<p>Pro &amp; more</p>{% else %}<p>Upgrade"
    ' &lt;now&gt;</p>{% endif %}<p><a href="{{ unsubscribe_url }}">Unsubscribe</a>'
    " {{ postal_address }}</p>",
    "<head><title>{{ contact.name }}</title><style>p { color: red }</style></head>"
    "<body>{# a comment #}<table><tr><td>{{ contact.email }}</td></tr></table></body>",
]
CONTEXTS = [
    {"contact": {"name": "Ann", "email": "a@x.test", "attributes": {"plan": "pro"}},
     "products": [{"url": "https://s.test/1", "name": "Cup", "price": "3 €"},
                  {"url": "https://s.test/2?a=1&b=2", "name": "Fish & <Chips>", "price": "9"}],
     "logo": "https://s.test/l.png", "unsubscribe_url": "https://pw.test/u/t",
     "postal_address": "1 Main St"},
    {"contact": {"name": "O'Brien <b>", "email": "o@x.test", "attributes": {}},
     "products": [], "logo": "", "unsubscribe_url": "https://pw.test/u/s",
     "postal_address": ""},
]  # fmt: skip


def test_a_text_template_gives_what_each_rendered_message_would() -> None:
    """The text template, rendered and tidied, equals html_to_text of the rendered
    HTML: once per template instead of once per message."""
    from postwarden.content.render import render_string
    from postwarden.content.text import text_template, tidy

    for source in TEMPLATES:
        derived = text_template(source)
        assert derived is not None, source
        for context in CONTEXTS:
            want = html_to_text(render_string(source, context, html=True))
            got = tidy(render_string(derived, context, html=False))
            assert got == want, (source, context, derived)


def test_a_text_template_is_refused_where_it_could_differ() -> None:
    from postwarden.content.text import text_template

    # A statement inside an attribute the text leaves out, a raw block, marker
    # characters, and text that reads as Jinja once unescaped.
    for source in (
        '<p class="{% if vip %}gold{% endif %}">Hi</p>',
        "{% raw %}{{ not a variable }}{% endraw %}<p>x</p>",
        "<p>\x02 0\x03 {{ a }}</p>",
        "<p>&#123;&#123; a &#125;&#125; {{ b }}</p>",
        "<style>{% if x %}p{}{% endif %}</style><p>{{ y }}</p>",
    ):
        assert text_template(source) is None, source
    assert text_template("<p>no Jinja</p>") == "no Jinja\n"
