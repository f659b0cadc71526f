"""Lint findings: each code with its severity and location (part, line, column)."""

from __future__ import annotations

import pytest

from postwarden.content.lint import GMAIL_CLIP, Finding, Location, counts, link_problem, lint
from postwarden.content.render import Parts

GOOD_MARKETING = (
    "<html><body><p>Hi {{ contact.name }}</p>"
    '<img src="https://cdn.example.test/logo.png" alt="">'
    '<a href="{{ unsubscribe_url }}">Unsubscribe</a> <a href="{{ preferences_url }}">Prefs</a>'
    "<p>{{ postal_address }}</p></body></html>"
)


def codes(findings: list[Finding]) -> list[tuple[str, str, Location]]:
    return [(f.code, f.severity, f.location) for f in findings]


def test_a_clean_marketing_template_has_only_the_generated_text_note() -> None:
    found = lint(
        Parts(subject="News for {{ contact.name }}", html=GOOD_MARKETING),
        category="marketing",
        postal_address="1 Main St, Springfield",
    )
    assert codes(found) == [("text_generated", "info", Location("text"))]
    assert counts(found) == {"error": 0, "warning": 0, "info": 1}


def test_syntax_errors_have_line_and_column() -> None:
    found = lint(
        Parts(
            subject="Hello {{ contact.name }",
            preheader="{% if x %}",
            html=(
                "<p>\n  {% for x in contact.attributes.tags %}\n  {{ x | nosuch }}{% endfor %}</p>"
            ),
            text="ok\nthen {{ 1 +* 2 }}",
        ),
        category="transactional",
    )
    syntax = [(f.location, f.message) for f in found if f.code == "syntax_error"]
    assert [s[0] for s in syntax] == [
        Location("subject", 1, 23),  # the stray "}"
        Location("preheader", 1, 9),  # its last token: no endif follows
        Location("html", 3, 10),  # the filter's name
        Location("text", 2, 12),  # "*"
    ]
    assert "nosuch" in syntax[2][1] and all(f.severity == "error" for f in found[:4])


def test_unknown_variables_against_the_contract_and_declared_names() -> None:
    html = (
        "<p>{{ contact.email }} {{ contact.name }} {{ contact.attributes.plan }}\n"
        "{{ contact.attributes.plann }} {{ contact.emial }} {{ contact['attributes']['age'] }}\n"
        "{{ order_id }} {{ order_idd }} {{ unsubscribe_url }} {{ view_online_url }}\n"
        "{% for i in range(2) %}{{ loop.index }}{{ i }}{% endfor %}"
        "{% set mine = 1 %}{{ mine }}{{ contact.attributes.get('plan') }}</p>"
    )
    found = lint(
        Parts(subject="s", html=html, text="t"),
        category="transactional",
        variables=["order_id"],
        attributes={"plan", "age"},
    )
    assert codes(found) == [
        ("unknown_variable", "error", Location("html", 3, 19)),
        ("undeclared_attribute", "warning", Location("html", 2, 23)),
        ("unknown_variable", "error", Location("html", 2, 43)),
    ]
    assert "order_idd" in found[0].message and "contact.emial" in found[2].message


def test_a_template_of_its_own_contact_is_not_checked_against_the_contract() -> None:
    html = "{% set contact = {'x': 1} %}{{ contact.x }}"
    assert lint(Parts(subject="s", html=html, text="t"), category="other") == []


def test_marketing_needs_unsubscribe_link_and_postal_address() -> None:
    # The URL in text is not a link; the address is neither the variable nor the text.
    html = "<p>{{ unsubscribe_url }} 12 Other Rd</p>"
    found = lint(
        Parts(subject="s", html=html, text="t"), category="marketing", postal_address="1 Main St"
    )
    assert codes(found) == [
        ("missing_unsubscribe", "error", Location("html")),
        ("missing_postal_address", "error", Location("html")),
    ]
    # The literal address counts; a transactional template needs neither.
    found = lint(
        Parts(subject="s", html='<a href="{{unsubscribe_url}}">u</a> 1 Main St', text="t"),
        category="marketing",
        postal_address="1 Main St",
    )
    assert found == []
    assert lint(Parts(subject="s", html=html, text="t"), category="transactional") == []
    # Text only: the text must carry the unsubscribe URL.
    found = lint(Parts(subject="s", text="Bye: {{ postal_address }}"), category="marketing")
    assert codes(found) == [
        ("missing_unsubscribe", "error", Location("text")),
        ("postal_address_unset", "warning", Location("text")),
    ]


def test_text_part_size_subject_and_empty_body() -> None:
    found = lint(Parts(subject="", html="<p>" + "x" * GMAIL_CLIP + "</p>"), category="other")
    assert codes(found) == [
        ("empty_subject", "warning", Location("subject")),
        ("html_too_large", "warning", Location("html")),
        ("text_generated", "info", Location("text")),
    ]
    found = lint(Parts(subject="s", html="<p>x</p>", text="x"), category="other",
                 rendered_html_bytes=GMAIL_CLIP + 1)  # fmt: skip
    assert codes(found) == [("html_too_large", "warning", Location("html"))]
    assert "rendered" in found[0].message
    found = lint(Parts(subject="s"), category="other")
    assert codes(found) == [("empty_body", "error", Location("html"))]


def test_images_without_alt_and_malformed_links_have_their_place() -> None:
    html = (
        '<p>\n<img src="a.png" alt="A"> <img src="b.png">\n'
        '  <a href="javascript:alert(1)">x</a><a href="/relative">r</a>\n'
        '<a href="https://ex ample.com">s</a><a href="https://">h</a><a href="mailto:">m</a>\n'
        '<a href="https://{{ host }}/p?a=1&amp;b=2">ok</a><a href="{{ view_online_url }}">ok</a>'
        '<a href="tel:+15551234">ok</a><a name="top">anchor</a><a href="#top">top</a>\n'
        "<a href='{{ unsubscribe_url }}' title=\"a > b\">ok</a><!-- <img src=c.png> --></p>"
    )
    found = lint(Parts(subject="s", html=html, text="t"), category="other", variables=["host"])
    assert codes(found) == [
        ("image_missing_alt", "warning", Location("html", 2, 27)),
        ("unsafe_link", "error", Location("html", 3, 3)),
        ("malformed_link", "warning", Location("html", 3, 38)),
        ("malformed_link", "warning", Location("html", 4, 1)),
        ("malformed_link", "warning", Location("html", 4, 37)),
        ("malformed_link", "warning", Location("html", 4, 61)),
        ("malformed_link", "warning", Location("html", 5, 142)),  # "#top"
    ]
    assert "b.png" in found[0].message


@pytest.mark.parametrize(
    ("href", "code"),
    [
        ("https://example.test/a", None),
        ("{{ unsubscribe_url }}", None),
        ("{{ base }}/x", None),
        ("https://{{ h }}/{{ p }}?q={{ q|urlencode }}", None),
        ("mailto:a@b.test", None),
        ("  https://example.test  ", None),
        ("JavaScript:void(0)", "unsafe_link"),
        ("data:text/html,x", "unsafe_link"),
        ("", "malformed_link"),
        ("ftp://example.test", "malformed_link"),
        ("example.test", "malformed_link"),
        ("https://a b", "malformed_link"),
        ("http:///x", "malformed_link"),
        ("tel:", "malformed_link"),
    ],
)
def test_link_rules(href: str, code: str | None) -> None:
    problem = link_problem(href)
    assert (problem[0] if problem else None) == code


def test_lint_stays_linear_on_hostile_markup() -> None:
    # Unclosed constructs over a megabyte: the walk stops at the first one.
    for html in ("<a " * 300_000, "<!--" + "<img src=x>" * 100_000, '<a href="' + "<" * 500_000):
        found = lint(Parts(subject="s", html=html, text="t"), category="other")
        assert [f.code for f in found] == ["html_too_large"]
