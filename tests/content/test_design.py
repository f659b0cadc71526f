"""The design document: every block compiles, refusals name their field path, the
design's Jinja comes out byte for byte, the same design gives the same bytes, and
hostile or oversize designs are refused."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from postwarden.content.design import (
    BLOCK_TYPES,
    MAX_BLOCKS,
    MAX_HTML_CHARS,
    MAX_JSON_DEPTH,
    MAX_NESTING,
    MAX_SECTIONS,
    DesignError,
    compile_design,
    design_json,
    parse_design,
)
from tests.content.design_samples import SAMPLE_CONTEXT, every_block


def one_column(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "sections": [{"columns": [{"blocks": list(blocks)}]}]}


class Tags(HTMLParser):
    """Every start tag of a document with its attributes."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]


def render(html: str, context: dict[str, Any] = SAMPLE_CONTEXT) -> str:
    env = ImmutableSandboxedEnvironment(autoescape=True)
    return env.from_string(html).render(context)


def test_every_block_type_compiles_to_responsive_html() -> None:
    out = compile_design(every_block())
    html = out.html
    assert html.startswith("<!DOCTYPE html>")
    # Responsive: MJML's breakpoint (columns side by side from 480 px) survives inlining.
    assert "@media only screen and (min-width:480px)" in html
    assert ".mj-column-per-50" in html
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    tags = Tags(html)
    imgs = {a["src"]: a for a in tags.all("img")}
    # image: src, alt, link; the one without alt has none (the lint finds it).
    assert imgs["https://img.example.test/product.png"]["alt"] == "Product photo"
    assert "alt" not in imgs["https://img.example.test/decor.png"]
    hrefs = [a["href"] for a in tags.all("a")]
    assert "https://shop.test/p/42" in hrefs  # the image's link
    # hero: a section with the background image (and Outlook's VML twin).
    assert "url('https://img.example.test/hero.png')" in html
    assert 'src="https://img.example.test/hero.png"' in html  # v:fill
    assert "Hello, {{ contact.name }}</h1>" in html
    assert "https://shop.test/spring" in hrefs
    # button, divider, spacer.
    assert "https://shop.test/p/{{ contact.attributes.sku }}" in hrefs
    assert ">Buy now</a>" in html
    assert "border-top:solid 2px #999999" in html
    assert "height:40px" in html
    # social: profile links (not the networks' share forms), icons with alt text.
    assert "https://facebook.com/shop" in hrefs and "https://x.com/shop" in hrefs
    assert not any("sharer" in (h or "") for h in hrefs)
    assert {"Facebook", "X"} <= {a.get("alt") for a in tags.all("img")}
    # footer: the postal address and the unsubscribe and preferences links.
    assert re.search(r"<p[^>]*>\{\{ postal_address \}\}</p>", html)
    assert "{{ unsubscribe_url }}" in hrefs and "{{ preferences_url }}" in hrefs
    # variable, condition, loop.
    assert "{{ contact.attributes.city | default('your town', true) }}" in html
    assert html.index("{% if contact.attributes.plan == 'pro' %}") < html.index("Pro member")
    assert html.index("Pro member") < html.index("{% else %}") < html.index("Go pro")
    assert html.index("Go pro") < html.index("{% endif %}")
    assert "{% for order in contact.attributes.orders %}" in html
    assert "{% endfor %}" in html
    # The preheader.
    assert "Your {{ contact.attributes.plan }} news" in html
    # No remote font or stylesheet is pulled in.
    assert "<link" not in html and "@import" not in html
    # The text block's link takes the link colour (inlined from the design's style).
    orders = next(a for a in tags.all("a") if a["href"] == "https://shop.test/orders")
    assert "color: #0055aa" in (orders["style"] or "")
    assert [w.code for w in out.warnings] == ["image-missing-alt"]
    assert out.warnings[0].path == "sections[1].columns[1].blocks[3].alt"


def test_the_result_renders_as_a_template() -> None:
    page = render(compile_design(every_block()).html)
    assert "Hello, Ada</h1>" in page
    assert "Pro member" in page and "Go pro" not in page
    assert [t for t in ("Teapot", "Kettle", "Cups") if t in page] == ["Teapot", "Kettle", "Cups"]
    assert "your town" in page  # the variable's default
    assert 'href="https://shop.test/p/42"' in page
    assert "1 Quay Street, Harbour Town" in page
    assert 'href="https://pw.example.test/u/abc"' in page
    assert "{{" not in page and "{%" not in page
    free = {"name": "Bo", "attributes": {"plan": "free", "orders": []}}
    other = render(compile_design(every_block()).html, {**SAMPLE_CONTEXT, "contact": free})
    assert "Go pro" in other and "Pro member" not in other


ODD_EXPRESSIONS = [
    "{{ contact.name }}",
    "{{contact.name}}",
    "{{   contact.name|upper   }}",
    "{{ contact.attributes['plan'] ~ \"&\" ~ '<b>' }}",
    "{{ 1 < 2 and 3 > 2 }}",
    "{{ 'a}b' }}",
    "{{ contact.attributes.tags | join(', ') }}",
    "{{ 'ünï—☃' }}",
    "{{ contact.attributes['plan'] ~ '&' ~ '<b>' }}",
]


def test_jinja_comes_out_byte_for_byte() -> None:
    text = " · ".join(ODD_EXPRESSIONS)
    test = 'contact.attributes.score >= 10 and contact.name != "<&>"'
    over = "contact.attributes.orders | sort(attribute='date') | list"
    design = {
        "version": 1,
        "settings": {"preheader": ODD_EXPRESSIONS[3]},
        "sections": [
            {
                "columns": [
                    {
                        "blocks": [
                            {"type": "text", "html": f"<p>{text}</p>"},
                            {
                                "type": "button",
                                "text": ODD_EXPRESSIONS[4],
                                "href": "{{ view_online_url }}",
                            },
                            {
                                "type": "image",
                                "src": "https://img.test/{{ contact.attributes.id }}.png",
                                "alt": ODD_EXPRESSIONS[-1],
                                "href": "mailto:{{ contact.email }}",
                            },
                            {
                                "type": "condition",
                                "test": test,
                                "blocks": [
                                    {
                                        "type": "loop",
                                        "item": "o",
                                        "over": over,
                                        "blocks": [{"type": "variable", "name": "o.title"}],
                                    }
                                ],
                            },
                        ]
                    }
                ]
            }
        ],
    }
    html = compile_design(design).html
    for expr in ODD_EXPRESSIONS:
        assert expr in html, expr
    assert f"{{% if {test} %}}" in html
    assert f"{{% for o in {over} %}}" in html
    assert "{{ o.title | default('', true) }}" in html
    assert 'href="{{ view_online_url }}"' in html
    assert 'href="mailto:{{ contact.email }}"' in html
    assert 'src="https://img.test/{{ contact.attributes.id }}.png"' in html
    # Exactly the Jinja of the design, nothing lost or added, and no token left over.
    found = re.findall(r"\{\{.*?\}\}(?!\})|\{%.*?%\}", html)
    assert len([f for f in found if f.startswith("{%")]) == 4
    assert "pwjinja" not in html
    assert html.count("{{") == len(ODD_EXPRESSIONS) + 7
    # The whole is a template Jinja accepts.
    ImmutableSandboxedEnvironment(autoescape=True).parse(html)


def test_text_that_looks_like_a_token_is_left_alone() -> None:
    design = one_column(
        {"type": "text", "html": "<p>pwjinja0z and pwjinja1q0z {{ contact.name }}</p>"},
        {"type": "text", "html": "<p>pwj&#105;nja0z {{ contact.email }}</p>"},
        {"type": "button", "text": "pwjinja2z", "href": "https://x.test/pwjinja0z"},
    )
    html = compile_design(design).html
    assert "pwjinja0z and pwjinja1q0z {{ contact.name }}" in html
    assert "pwjinja0z {{ contact.email }}" in html
    assert ">pwjinja2z</a>" in html and 'href="https://x.test/pwjinja0z"' in html


PIECES = [*"ab <>&\"'/=;#{}%-!pwjinaz019", "&amp;", "&#105;", "<b>", "</p>", "<!--", "pwjinja"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)
EXPRESSIONS = st.sampled_from(
    ["{{ contact.name }}", "{{ a < b }}", "{{ 'x\"y' }}", "{{ x | default('&') }}", "{{x}}"]
)


@settings(max_examples=80, deadline=None)
@given(parts=st.lists(st.one_of(TEXT, EXPRESSIONS), max_size=8))
def test_any_accepted_text_keeps_its_jinja(parts: list[str]) -> None:
    """Whatever text a design accepts, its expressions come through the sanitizer,
    MJML and the inliner byte for byte (or compiling says why it cannot)."""
    fragment = "".join(parts)
    try:
        design = parse_design(one_column({"type": "text", "html": fragment}, {"type": "spacer"}))
    except DesignError:
        return
    kept = design.sections[0].columns[0].blocks[0].html  # type: ignore[union-attr]
    html = compile_design(design).html
    for expr in re.findall(r"\{\{.*?\}\}", kept):
        assert expr in html
    assert html.count("{{") == kept.count("{{")
    assert html.count("pwjinja") == kept.count("pwjinja")  # no token left behind


def test_the_same_design_gives_the_same_bytes() -> None:
    design = every_block()
    first = compile_design(design).html
    assert compile_design(copy.deepcopy(design)).html == first
    # In other processes too, whose hash seeds (Python's and the Rust libraries') differ.
    code = (
        "import hashlib, json, sys\n"
        "from postwarden.content.design import compile_design\n"
        "print(hashlib.sha256(compile_design(json.load(sys.stdin)).html.encode()).hexdigest())\n"
    )
    digests = set()
    for seed in ("1", "2"):
        run = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(design),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        digests.add(run.stdout.strip())
    assert digests == {hashlib.sha256(first.encode()).hexdigest()}


def test_the_canonical_json_compiles_to_the_same_html() -> None:
    design = every_block()
    canonical = design_json(parse_design(design))
    again = json.loads(canonical)
    assert design_json(parse_design(again)) == canonical
    assert again["sections"][1]["columns"][1]["blocks"][0]["align"] == "center"  # defaults
    assert compile_design(again).html == compile_design(design).html


def _at(design: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``design`` with the value at ``path`` (``sections[1].columns[0].width``) set."""
    out = copy.deepcopy(design)
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node: Any = out
    for part in parts[:-1]:
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    last = parts[-1]
    if last.startswith("["):
        node[int(last[1:-1])] = value
    else:
        node[last] = value
    return out


B = "sections[1].columns[1].blocks"


@pytest.mark.parametrize(
    ("path", "value", "want_path", "want"),
    [
        (f"{B}[0].href", "javascript:alert(1)", f"{B}[0].href", "must start with"),
        (f"{B}[0].href", "https://x.test/a b", f"{B}[0].href", "spaces"),
        (f"{B}[0].href", "{{ contact.attributes.site }}", f"{B}[0].href", "unsubscribe_url"),
        (f"{B}[0].href", "https:///nohost", f"{B}[0].href", "needs a host"),
        (f"{B}[0].background_color", "red", f"{B}[0].background_color", "pattern"),
        (f"{B}[0].text", "", f"{B}[0].text", "at least 1"),
        (f"{B}[0].colour", "#fff", f"{B}[0].colour", "unknown field"),
        (f"{B}[0].type", "buton", f"{B}[0].type", "'buton' is not a block type"),
        (f"{B}[1]", {"color": "#fff"}, f"{B}[1].type", "a block needs a type"),
        (f"{B}[2].height", 1000, f"{B}[2].height", "less than or equal to 200"),
        ("sections[1].columns[0].width", 40, "sections[1].columns", "add up to 100"),
        ("sections[1].columns[0].width", None, "sections[1].columns", "every column a width"),
        ("settings.width", 2000, "settings.width", "less than or equal to 800"),
        ("settings.font_family", "x;}</style>", "settings.font_family", "pattern"),
        ("version", 2, "version", "2 is not one of 1"),
        ("sections[0].columns[0].blocks[0].background_image", "https://i.test/{{ x }}.png",
         "sections[0].columns[0].blocks[0].background_image", "Jinja is not allowed"),
        ("sections[0].columns[0].blocks[0].background_image", "https://i.test/a).png",
         "sections[0].columns[0].blocks[0].background_image", "parentheses"),
        ("sections[2].columns[0].blocks[1].test", "plan ==",
         "sections[2].columns[0].blocks[1].test", "Jinja expression 'plan =='"),
        ("sections[2].columns[0].blocks[1].test", "x %}{% include 'y'",
         "sections[2].columns[0].blocks[1].test", "delimiter"),
        ("sections[2].columns[0].blocks[1].blocks[0].html", "<p>{% if x %}y{% endif %}</p>",
         "sections[2].columns[0].blocks[1].blocks[0].html", "condition and loop blocks"),
        ("sections[2].columns[0].blocks[1].else_blocks[0].html", "<p>{{ a b }}</p>",
         "sections[2].columns[0].blocks[1].else_blocks[0].html", "Jinja expression"),
        ("sections[2].columns[0].blocks[2].item", "loop",
         "sections[2].columns[0].blocks[2].item", "taken"),
        ("sections[2].columns[0].blocks[2].item", "2x",
         "sections[2].columns[0].blocks[2].item", "letters"),
        ("sections[2].columns[0].blocks[2].blocks[0].name", "order title",
         "sections[2].columns[0].blocks[2].blocks[0].name", "dotted name"),
        ("sections[2].columns[0].blocks[2].blocks[0].default", "{{ x }}",
         "sections[2].columns[0].blocks[2].blocks[0].default", "without Jinja"),
        ("sections[2].columns[0].blocks[3].links[1].network", "myspace",
         "sections[2].columns[0].blocks[3].links[1].network", "is not one of"),
        ("sections[1].columns[0].blocks[0].html", '<a href="javascript:x()">x</a>',
         "sections[1].columns[0].blocks[0].html", "link 'javascript:x()'"),
        ("sections[1].columns[0].blocks[0].html", '<a href="/relative">x</a>',
         "sections[1].columns[0].blocks[0].html", "must start with"),
        ("settings.preheader", "a\x00b", "settings.preheader", "control characters"),
        ("sections[1].columns[0].blocks[1].alt", '{{ "x" }}',
         "sections[1].columns[0].blocks[1].alt", "single quotes"),
        ("sections[1].columns[0].blocks[0].html", '<a href="https://a.test/{{ "x" }}">x</a>',
         "sections[1].columns[0].blocks[0].html", "single quotes"),
        ("sections[1].columns[0].blocks[0].html", '<a title="{{ "x" }}">x</a>',
         "sections[1].columns[0].blocks[0].html", "single quotes"),
        ("sections[1].columns[0].blocks[1].alt", "{% if x %}",
         "sections[1].columns[0].blocks[1].alt", "condition and loop"),
        ("sections[2].columns[0].blocks[3].links[0].label", "{{ x",
         "sections[2].columns[0].blocks[3].links[0].label", "outside a Jinja expression"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(path: str, value: Any, want_path: str, want: str) -> None:
    with pytest.raises(DesignError) as caught:
        compile_design(_at(every_block(), path, value))
    err = caught.value
    assert err.path == want_path, err.fields
    assert want in err.fields[0]["message"], err.fields
    assert str(err).startswith(f"{want_path}: ")


def test_every_problem_is_listed_and_paths_go_under_a_prefix() -> None:
    design = _at(every_block(), f"{B}[0].href", "ftp://x")
    design = _at(design, f"{B}[2].height", 0)
    with pytest.raises(DesignError) as caught:
        parse_design(design)
    paths = [f["path"] for f in caught.value.fields]
    assert paths == [f"{B}[0].href", f"{B}[2].height"]
    assert caught.value.under("design")[0]["path"] == f"design.{B}[0].href"
    assert DesignError([{"path": "", "message": "x"}]).under("design")[0]["path"] == "design"


def test_text_html_is_cut_to_the_allow_list() -> None:
    hostile = (
        '<p onclick="x()" style="position:fixed">Hi <script>alert(1)</script>'
        '<img src="https://x.test/t.gif"><iframe src="https://x.test"></iframe>'
        '<a href="https://ok.test/" target="_top" onmouseover="x()">ok</a>'
        "<!-- </mj-text><mj-raw> --></mj-text><mj-raw><b>still text</b></p>"
        "<style>body{display:none}</style><form><input></form>"
    )
    html = compile_design(one_column({"type": "text", "html": hostile})).html
    body = html[html.index("<body") :]
    banned = ("<script", "alert(1)", "onclick", "onmouseover", "<iframe", "t.gif",
              "position:fixed", "display:none", "<form", "<input", "target=", "mj-raw")  # fmt: skip
    for word in banned:
        assert word not in body, word
    assert '<a href="https://ok.test/"' in body and "<b>still text</b>" in body


def test_plain_text_and_attributes_are_escaped() -> None:
    design = one_column(
        {
            "type": "button",
            "text": "</mj-button><mj-raw><script>x()</script>",
            "href": "https://b.test",
        },
        {"type": "image", "src": "https://i.test/a.png", "alt": '" onerror="x()'},
        {"type": "variable", "name": "contact.name", "default": "</mj-text>'\\"},
    )
    html = compile_design(design).html
    assert "&lt;/mj-button&gt;&lt;mj-raw&gt;&lt;script&gt;x()&lt;/script&gt;</a>" in html
    img = next(a for a in Tags(html).all("img") if a["src"] == "https://i.test/a.png")
    assert img["alt"] == '" onerror="x()' and "onerror" not in img
    # The default is a Jinja string literal that means exactly what was typed.
    page = render(compile_design(design).html, {"contact": {}})
    assert "&lt;/mj-text&gt;&#39;\\" in page


def test_hero_placement_and_nesting_are_checked() -> None:
    hero = every_block()["sections"][0]["columns"][0]["blocks"][0]
    with pytest.raises(DesignError) as caught:
        compile_design(one_column({"type": "spacer"}, hero))
    assert caught.value.path == "sections[0].columns[0].blocks[1]"
    assert "alone" in str(caught.value)
    with pytest.raises(DesignError) as caught:
        compile_design(one_column({"type": "condition", "test": "x", "blocks": [hero]}))
    assert caught.value.fields[0] == {
        "path": "sections[0].columns[0].blocks[0].blocks[0]",
        "message": "a hero cannot be inside a condition or loop",
    }
    block: dict[str, Any] = {"type": "spacer"}
    for _ in range(MAX_NESTING):
        block = {"type": "condition", "test": "x", "blocks": [block]}
    compile_design(one_column(block))
    with pytest.raises(DesignError) as caught:
        compile_design(one_column({"type": "loop", "item": "i", "over": "y", "blocks": [block]}))
    assert caught.value.path == "sections[0].columns[0].blocks[0].blocks[0].blocks[0].blocks[0]"


def test_an_image_with_empty_alt_is_decorative() -> None:
    out = compile_design(one_column({"type": "image", "src": "https://i.test/a.png", "alt": ""}))
    assert out.warnings == ()
    assert Tags(out.html).all("img")[0]["alt"] == ""


def test_oversize_designs_are_refused() -> None:
    spacer = {"type": "spacer"}
    section = {"columns": [{"blocks": [spacer]}]}
    too_many_sections = {"version": 1, "sections": [section] * (MAX_SECTIONS + 1)}
    with pytest.raises(DesignError) as caught:
        compile_design(too_many_sections)
    assert caught.value.path == "sections"
    full = {"columns": [{"blocks": [spacer] * 50} for _ in range(4)]}
    too_many_blocks = {"version": 1, "sections": [full] * (MAX_BLOCKS // 200 + 1)}
    with pytest.raises(DesignError, match=f"more than {MAX_BLOCKS} blocks"):
        compile_design(too_many_blocks)
    with pytest.raises(DesignError) as caught:
        compile_design(one_column(*[spacer] * 51))
    assert caught.value.path == "sections[0].columns[0].blocks"
    with pytest.raises(DesignError) as caught:
        compile_design(one_column({"type": "text", "html": "x" * (MAX_HTML_CHARS + 1)}))
    assert caught.value.path == "sections[0].columns[0].blocks[0].html"
    with pytest.raises(DesignError) as caught:
        compile_design(
            one_column({"type": "button", "text": "x", "href": "https://a.test/" + "a" * 3000})
        )
    assert caught.value.path == "sections[0].columns[0].blocks[0].href"


def test_hostile_shapes_are_refused_before_the_models() -> None:
    deep: Any = {}
    for _ in range(100_000):  # deep enough to break any recursive walker
        deep = {"x": deep}
    with pytest.raises(DesignError, match=f"deeper than {MAX_JSON_DEPTH}"):
        parse_design({"version": 1, "sections": [deep]})
    with pytest.raises(DesignError, match="more than 20000 values"):
        parse_design({"version": 1, "sections": [0] * 1_000_000})
    with pytest.raises(DesignError, match="characters of text"):
        parse_design({"version": 1, "junk": ["x" * 600_000, "y" * 600_000]})
    with pytest.raises(DesignError) as caught:
        parse_design([1, 2])  # type: ignore[arg-type]
    assert caught.value.fields == [{"path": "", "message": "a design is a JSON object"}]
    assert str(caught.value) == "design: a design is a JSON object"


def test_the_documented_examples_compile() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "design-json.md").read_text()
    examples = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", doc, re.S)]
    blocks = [e for e in examples if "type" in e]
    assert {b["type"] for b in blocks} == set(BLOCK_TYPES)
    for example in examples:
        if "type" not in example:
            compile_design(example)
        elif example["type"] == "hero":
            compile_design(one_column(example))
        else:
            compile_design(one_column({"type": "spacer"}, example))
