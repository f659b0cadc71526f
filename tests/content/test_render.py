"""The template sandbox: what a template may do, and each hostile template stopped by
the limit meant for it (no clock: every limit but the deadline is a count, and the
deadline test's loop would run for hours without it)."""

from __future__ import annotations

import threading

import pytest

from postwarden.content import render as render_mod
from postwarden.content.render import (
    LIMITS,
    Limits,
    Parts,
    RenderError,
    compile_template,
    render_message,
    render_string,
)
from postwarden.content.variables import PLACEHOLDER_URLS, send_context

CONTEXT = {
    "contact": {"email": "ann@example.test", "name": "Ann <&>", "attributes": {"plan": "pro"}},
    "items": list(range(100_000)),
}


def render(source: str, *, html: bool = False, limits: Limits = LIMITS, **extra: object) -> str:
    return render_string(source, {**CONTEXT, **extra}, html=html, limits=limits)


def refused(source: str, code: str, limit: str | None = None, **kw: object) -> RenderError:
    with pytest.raises(RenderError) as err:
        render(source, **kw)  # type: ignore[arg-type]
    assert (err.value.code, err.value.limit) == (code, limit), err.value.message
    return err.value


def test_ordinary_templates_render() -> None:
    src = (
        "Hi {{ contact.name }}, plan {{ contact.attributes.plan }}"
        "{% if contact.attributes.missing %}!{% endif %}"
        " {{ contact.attributes.none | default('free') }}"
        "{% for i in range(3) %}{{ i }}{% if not loop.last %},{% endif %}{% endfor %}"
        "{{ ' ' ~ contact.email | upper }} {{ '%05.1f' % 3.14159 }}"
        " {{ 'a,b'.split(',') | join('+') }}"
        "{% macro b(x) %}<{{ x }}>{% endmacro %}{{ b(1) }}{{ unknown.deep.name }}"
        "{% for x in [3, 1, 2] | sort %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}"
    )
    assert render(src) == ("Hi Ann <&>, plan pro free0,1,2 ANN@EXAMPLE.TEST 003.1 a+b<1>1")
    # HTML is escaped, the other parts are not.
    assert render("{{ contact.name }}", html=True) == "Ann &lt;&amp;&gt;"
    assert render("{{ contact.name }}") == "Ann <&>"
    assert render("{{ '<b>' | safe }}{{ '<i>' }}", html=True) == "<b>&lt;i&gt;"
    assert render("{{ 'a' ~ '<' }}", html=True) == "a&lt;"


def test_the_same_source_compiles_once() -> None:
    src = "cached {{ 40 + 2 }} " + "x" * 17
    first = compile_template(src, html=True)
    assert compile_template(src, html=True) is first
    assert compile_template(src, html=False) is not first  # escaping differs
    assert render(src) == "cached 42 " + "x" * 17


def test_compile_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render_mod, "CACHE_SIZE", 3)
    for i in range(10):
        compile_template(f"bounded {i}", html=False)
    assert render_mod.cache_info()[0] <= 3


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''|attr('__class__') }}",
        "{{ self.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__['os'] }}",
        "{{ contact['__class__'] }}",
        "{{ contact.attributes.__class__ }}",
        "{{ range.__globals__ }}",
        "{{ 'x'.ljust(10) }}",
        "{{ '{0.__class__}'.format(1) }}",
        "{% set l = [] %}{{ l.append(1) }}",
        "{% set d = {} %}{{ d.update(a=1) }}",
        "{{ (1).to_bytes(1000000000, 'big') }}",
    ],
)
def test_no_way_to_internals_or_changes(source: str) -> None:
    err = refused(source, "security_error")
    assert err.line == 1 and "not" in err.message


@pytest.mark.parametrize(
    "source",
    ['{% include "/etc/passwd" %}', '{% extends "base.html" %}', '{% import "m" as m %}'],
)
def test_no_files(source: str) -> None:
    err = refused(source, "syntax_error")
    assert "no other files" in err.message


def test_loop_of_a_billion_is_refused_by_range() -> None:
    refused("{% for i in range(10**9) %}x{% endfor %}", "limit_exceeded", "range")
    refused("{% for i in range(10**30) %}x{% endfor %}", "limit_exceeded", "range")
    assert render("{{ range(10000) | length }}") == "10000"


def test_string_multiplication_is_refused_before_it_is_made() -> None:
    for src in ('{{ "x" * 10**9 }}', '{{ "x" * 1000000000 }}', "{{ [1] * 10**9 }}"):
        err = refused(src, "limit_exceeded", "value")
        assert "1000000000" in err.message
    refused('{{ "%0999999999d" % 1 }}', "limit_exceeded", "value")
    refused('{{ "%*d" % (10**9, 1) }}', "limit_exceeded", "value")
    refused('{{ "x" | center(1000000000) }}', "limit_exceeded", "value")
    refused('{{ "x\nx" | indent(10**8) }}', "limit_exceeded", "value")
    refused('{{ [1] | batch(10**9, "x") | list }}', "limit_exceeded", "value")
    refused("{{ 9 ** 99999 }}", "limit_exceeded", "value")
    refused("{{ ('wordy' * 150000) | wordwrap(3) }}", "limit_exceeded", "value")
    assert render('{{ "ab" * 3 }}') == "ababab"


@pytest.mark.parametrize(
    "step",
    [
        "{% set ns.s = ns.s ~ ns.s %}",
        "{% set ns.s = ns.s + ns.s %}",
        '{% set ns.s = ns.s.replace("x", "xx") %}',
        "{% set ns.s = [ns.s, ns.s] | join %}",
        '{% set ns.s = ns.s | replace("x", "xx") %}',
    ],
)
def test_doubling_a_string_stops_at_the_value_cap(step: str) -> None:
    src = '{% set ns = namespace(s="x") %}{% for i in range(64) %}' + step + "{% endfor %}"
    err = refused(src, "limit_exceeded", "value")
    assert str(LIMITS.max_value) in err.message


def test_a_capture_that_doubles_stops_at_the_produced_cap() -> None:
    src = (
        '{% set ns = namespace(s="x") %}{% for i in range(64) %}'
        "{% set t %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = t %}{% endfor %}"
    )
    refused(src, "limit_exceeded", "produced")


def test_recursive_macro_stops_at_the_depth_cap() -> None:
    err = refused(
        "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}", "limit_exceeded", "recursion"
    )
    assert "64" in err.message
    refused(
        "{% for x in items recursive %}{{ loop(items) }}{% endfor %}",
        "limit_exceeded",
        "recursion",
    )
    # Nesting within the cap is fine.
    src = "{% macro m(n) %}{% if n %}{{ m(n - 1) }}{% endif %}{{ n }}{% endmacro %}{{ m(30) }}"
    assert render(src).startswith("0123")


def test_nested_loops_stop_at_the_step_cap() -> None:
    # 10^5 x 10^5 = 10^10 steps: stopped after 10^6.
    err = refused(
        "{% for i in items %}{% for j in items %}{% endfor %}{% endfor %}",
        "limit_exceeded",
        "iterations",
    )
    assert "1000000" in err.message
    refused(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "limit_exceeded",
        "range",
    )


def test_nested_loops_stop_at_the_deadline() -> None:
    # Without the step cap, 10^10 empty steps would take hours: the deadline, checked
    # at every step, stops the render, in the thread that runs it.
    limits = Limits(deadline=0.05, max_iterations=10**12)
    seen: list[RenderError] = []

    def run() -> None:
        with pytest.raises(RenderError) as err:
            render(
                "{% for i in items %}{% for j in items %}{% endfor %}{% endfor %}",
                limits=limits,
            )
        seen.append(err.value)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert not worker.is_alive()
    assert (seen[0].code, seen[0].limit) == ("limit_exceeded", "deadline")


def test_output_is_capped_while_it_is_generated() -> None:
    limits = Limits(max_output=10_000)
    src = "{% for i in items %}0123456789{% endfor %}"
    err = refused(src, "limit_exceeded", "output", limits=limits)
    assert "10000" in err.message
    assert len(render("{% for i in range(1000) %}0123456789{% endfor %}", limits=limits)) == 10_000


def test_errors_name_the_line() -> None:
    err = refused("line one\n{{ 1 / 0 }}", "render_error")
    assert err.line == 2 and "ZeroDivisionError" in err.message
    err = refused("a\nb {{ foo( }}", "syntax_error")
    assert err.line == 2
    err = refused("{{ (" * 5000 + "1" + ") }}" * 5000, "syntax_error")


def test_message_parts_and_text_made_from_html() -> None:
    parts = Parts(
        subject="Hello {{ contact.name }}\n{{ '\\r\\n' }}again",
        preheader="Read {{ contact.attributes.plan }}",
        html=(
            "<html><body><h1>Hi {{ contact.name }}</h1>"
            '<p>See <a href="{{ view_online_url }}">online</a></p>'
            "<ul><li>{{ contact.email }}</li></ul></body></html>"
        ),
    )
    ctx = send_context(
        contact=CONTEXT["contact"],  # type: ignore[arg-type]
        postal_address="1 Main St",
        data={"contact": {"attributes": {"plan": "gold"}}},
    )
    out = render_message(parts, ctx)
    assert out.subject == "Hello Ann <&> again"
    assert out.preheader == "Read gold"
    assert out.text_generated
    assert out.html is not None and out.html.startswith(
        '<html><body><div style="display:none;max-height:0;overflow:hidden;mso-hide:all">'
        "Read gold</div><h1>Hi Ann &lt;&amp;&gt;</h1>"
    )
    assert out.text == (
        f"Hi Ann <&>\n\nSee online <{PLACEHOLDER_URLS['view_online_url']}>\n\n* ann@example.test\n"
    )
    own = render_message(Parts(subject="s", html="<p>x</p>", text="{{ postal_address }}"), ctx)
    assert own.text == "1 Main St" and not own.text_generated


def test_one_deadline_for_all_parts_of_a_message() -> None:
    slow = "{% for i in items %}{% for j in items %}{% endfor %}{% endfor %}"
    with pytest.raises(RenderError) as err:
        render_message(
            Parts(subject="ok", html="<p>fine</p>", text=slow),
            CONTEXT,
            limits=Limits(deadline=0.05, max_iterations=10**12),
        )
    assert (err.value.part, err.value.limit) == ("text", "deadline")


def test_a_block_called_again_counts_as_written() -> None:
    block = "{% block b %}" + "x" * 100_000 + "{% endblock %}"
    src = block + "{% set t %}{% for i in range(100) %}{{ self.b() }}{% endfor %}{% endset %}"
    refused(src, "limit_exceeded", "produced")
    # Output that runs once is counted by the output cap alone.
    assert len(render("y" * 900_000 + "{{ 'z' * 100_000 }}")) == 1_000_000
