"""The audience rule language without a database: parsing, precedence, binding to a
tenant's schema, errors with their line and column, and limits against hostile
input (nothing but RuleError ever comes out, and quickly)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.audiences import RuleError, Schema, compile_rule, parse
from postwarden.audiences.plan import (
    AllOf,
    AnyOf,
    AttrExists,
    AttrTest,
    ColumnTest,
    HasConsent,
    InList,
    Negation,
    OptedIn,
    TimeTest,
)
from postwarden.audiences.syntax import MAX_LENGTH, BoolOp, Compare, Not, tokenize

SCHEMA = Schema(
    attributes={"plan": "string", "age": "number", "vip": "boolean", "renewal": "date",
                "tags": "list"},
    lists={"beta": 3, "Gamma list": 4},
    topics={"news": (1, True), "offers": (2, False)},
    statuses=("active", "unsubscribed", "bounced", "complained"),
)  # fmt: skip


def bind(rule: str) -> object:
    return compile_rule(rule, SCHEMA).root


def test_the_issue_example_and_precedence() -> None:
    plan = compile_rule(
        'attributes.plan == "pro" and in_list("beta") and not topic_opted_out("news")', SCHEMA
    )
    assert plan.root == AllOf(
        (AttrTest("plan", "string", "==", "pro"), InList(3),
         Negation(Negation(OptedIn(1, True))))
    )  # fmt: skip
    assert not plan.names_status
    # and binds tighter than or; not tighter than and; parentheses override.
    tree = parse('email == "a" or email == "b" and not email == "c"')
    assert isinstance(tree, BoolOp) and tree.op == "or"
    assert isinstance(tree.items[1], BoolOp) and tree.items[1].op == "and"
    assert isinstance(tree.items[1].items[1], Not)
    tree = parse('(email == "a" or email == "b") and email == "c"')
    assert isinstance(tree, BoolOp) and tree.op == "and"
    tree = parse("not not exists(attributes.x)")
    assert isinstance(tree, Not) and isinstance(tree.item, Not) and tree.item.pos == 4


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ('attributes.plan in ["a", "b"]', AttrTest("plan", "string", "in", ("a", "b"))),
        ("attributes.age >= 3.5", AttrTest("age", "number", ">=", 3.5)),
        ("attributes.age != -2", AttrTest("age", "number", "!=", -2)),
        ("attributes.age < 1e3", AttrTest("age", "number", "<", 1000.0)),
        ("attributes.vip == false", AttrTest("vip", "boolean", "==", False)),
        ('attributes.tags contains "x"', AttrTest("tags", "list", "contains", "x")),
        ('attributes.renewal > "2026-01-01"', AttrTest("renewal", "date", ">", "2026-01-01", 10)),
        ('attributes.renewal <= "2026-01-01T10:00:00+02:00"',
         AttrTest("renewal", "date", "<=", "2026-01-01T08:00:00", 19)),
        ('attributes.plan.endswith("o")', AttrTest("plan", "string", "endswith", "o")),
        ("attributes.undeclared == 5", AttrTest("undeclared", "number", "==", 5)),
        ('attributes.undeclared contains "a"',
         AnyOf((AttrTest("undeclared", "list", "contains", "a"),
                AttrTest("undeclared", "string", "contains", "a")))),
        ("exists(attributes.anything)", AttrExists("anything")),
        ("exists(locale)", ColumnTest("locale", "exists", "")),
        ('email == "Bob@Xn--Bcher-Kva.Example"', ColumnTest("email", "==", "bob@bücher.example")),
        ('email.endswith("@X.COM")', ColumnTest("email", "endswith", "@x.com")),
        ('domain == "X.com"', ColumnTest("email", "endswith", "@x.com")),
        ('domain != "x.com"', Negation(ColumnTest("email", "endswith", "@x.com"))),
        ('domain in ["a.com", "b.com"]', AnyOf((ColumnTest("email", "endswith", "@a.com"),
                                               ColumnTest("email", "endswith", "@b.com")))),
        ('domain.endswith(".uk")', ColumnTest("email", "endswith", ".uk")),
        ('in_list("Gamma list")', InList(4)),
        ('topic_opted_in("offers")', OptedIn(2, False)),
        ("has_consent('marketing')", HasConsent("marketing")),
        ('created_at >= "2026-01-01T00:00:00Z"',
         TimeTest("created_at", ">=", dt.datetime(2026, 1, 1, tzinfo=dt.UTC))),
        ('created_at > "2026-01-01"',
         TimeTest("created_at", ">=", dt.datetime(2026, 1, 2, tzinfo=dt.UTC))),
        ('updated_at == "2026-01-01"',
         AllOf((TimeTest("updated_at", ">=", dt.datetime(2026, 1, 1, tzinfo=dt.UTC)),
                TimeTest("updated_at", "<", dt.datetime(2026, 1, 2, tzinfo=dt.UTC))))),
        ("name == 'it\\'s \\u00e9\\n'", ColumnTest("name", "==", "it's é\n")),
    ],
)  # fmt: skip
def test_binding(rule: str, expected: object) -> None:
    assert bind(rule) == expected


def test_status_turns_off_the_active_default() -> None:
    assert compile_rule('status == "bounced"', SCHEMA).names_status
    assert compile_rule('not (status in ["active", "bounced"])', SCHEMA).names_status
    assert not compile_rule('attributes.status == "x"', SCHEMA).names_status


# Each bad rule, the line and column of the error, and a word of its message.
ERRORS = [
    ("", 1, 1, "empty"),
    ("   \n  ", 2, 3, "empty"),
    ('attributes.plan = "pro"', 1, 17, "=="),
    ('attributes.plan == "pro" && in_list("beta")', 1, 26, "and, or, not"),
    ('in_list("nope")', 1, 9, "no list named 'nope'"),
    ('attributes.plan == "a" and\n  topic_opted_in("x")', 2, 18, "no topic named 'x'"),
    ('attributes.age > "old"', 1, 18, "give a number"),
    ("attributes.vip > true", 1, 16, "it takes ==, !="),
    ('attributes.tags == "a"', 1, 17, "contains, in"),
    ('attributes.renewal == "yesterday"', 1, 23, "YYYY-MM-DD"),
    ('attributes.renewal == "2026-01-01T10:00:00"', 1, 23, "YYYY-MM-DD"),
    ('attributes.renewal contains "2026"', 1, 20, "it takes"),
    ('attributes.undeclared in ["a", 1]', 1, 32, "one type"),
    ('status == "gone"', 1, 11, "status is one of"),
    ('status > "active"', 1, 8, "==, != or in"),
    ('domain == "a@b.com"', 1, 11, "no @"),
    ('domain.startswith("a")', 1, 8, "domain compares"),
    ("email == 5", 1, 10, "compare it with a string"),
    ('created_at > "soon"', 1, 14, "created_at compares"),
    ("exists(email)", 1, 8, "every contact has email"),
    ('exists("x")', 1, 8, "exists takes a field"),
    ("in_list(beta)", 1, 9, "takes a name in quotes"),
    ('frobnicate("x")', 1, 1, "unknown function"),
    ('colour == "red"', 1, 1, "unknown field 'colour'"),
    ('attributes.plan == "pro" attributes.age > 1', 1, 26, "expected and, or"),
    ('(email == "a"', 1, 14, "to close the '(' of column 1"),
    ('email == "a")', 1, 13, "unexpected ')'"),
    ('email == "a', 1, 10, "never closed"),
    ('email == "a\nb"', 1, 12, "end of its line"),
    ('email == "\\x"', 1, 11, "unknown escape"),
    ('email == "\\u0000"', 1, 11, "NUL"),
    ("attributes.age == 12abc", 1, 19, "not a number"),
    ("attributes.age == 1" + "0" * 50, 1, 19, "at most 40"),
    ("attributes.age == 1e999", 1, 19, "out of range"),
    ("email in []", 1, 7, "empty list"),
    ('email in ["a" "b"]', 1, 15, "to close the list"),
    ("attributes.", 1, 12, "attribute name"),
    ('email.lower("x")', 1, 7, "expected a method"),
    ("not", 1, 4, "expected a condition"),
    ("email", 1, 6, "expected a comparison"),
    ("and", 1, 1, "expected a condition"),
    ('has_consent("")', 1, 13, "1 to 100"),
    ("email == 'ok' # comment", 1, 15, "unexpected character '#'"),
]


@pytest.mark.parametrize(("rule", "line", "column", "words"), ERRORS)
def test_errors_say_where(rule: str, line: int, column: int, words: str) -> None:
    with pytest.raises(RuleError) as info:
        compile_rule(rule, SCHEMA)
    err = info.value
    assert (err.line, err.column) == (line, column), str(err)
    assert words in err.reason
    assert str(err).startswith(f"line {line}, column {column}: ")
    caret_line = err.caret().split("\n")[1]
    assert caret_line == " " * (column - 1) + "^"


def test_limits_against_hostile_rules() -> None:
    with pytest.raises(RuleError, match="at most 4000 characters"):
        parse("x" * (MAX_LENGTH + 1))
    with pytest.raises(RuleError, match="deeper than 32") as info:
        parse("(" * 33 + 'email == "a"' + ")" * 33)
    assert info.value.column == 33
    with pytest.raises(RuleError, match="deeper than 32"):
        parse("not " * 100 + 'email == "a"')
    parse("(" * 32 + 'email == "a"' + ")" * 32)  # the limit itself is fine
    many = " or ".join(f'email == "{i}"' for i in range(101))
    with pytest.raises(RuleError, match="more than 100 conditions") as info:
        parse(many)
    assert info.value.column == many.index('email == "100"') + 1
    parse(" or ".join(f'email == "{i}"' for i in range(100)))
    with pytest.raises(RuleError, match="at most 200 values"):
        parse("email in [" + ", ".join(f'"{i}"' for i in range(201)) + "]")
    # Deep nesting never reaches Python's recursion limit; a long caret line is cut.
    with pytest.raises(RuleError) as info:
        parse("(" * 3000)
    assert len(info.value.caret().split("\n")[0]) <= 120


def test_a_long_line_shows_the_place() -> None:
    rule = 'email == "a" or ' * 50 + "bad"
    with pytest.raises(RuleError) as info:
        parse(rule)
    text, caret = info.value.caret().split("\n")
    assert text[caret.index("^") :].startswith("bad")


def test_tokens_keep_positions() -> None:
    toks = tokenize('attributes.age>=-3.5 and\n"x"')
    assert [(t.kind, t.text, t.pos) for t in toks] == [
        ("name", "attributes", 0), ("op", ".", 10), ("name", "age", 11), ("op", ">=", 14),
        ("number", "-3.5", 16), ("name", "and", 21), ("string", '"x"', 25), ("end", "", 28),
    ]  # fmt: skip
    assert isinstance(parse("attributes.a > -1"), Compare)


@settings(max_examples=400, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list("()[]\"'\\.,=!<>- \nandortexis_0123456789@")), max_size=120
    )
)
def test_any_text_is_a_rule_or_a_rule_error(text: str) -> None:
    try:
        compile_rule(text, SCHEMA)
    except RuleError as err:
        assert 1 <= err.column and 1 <= err.line
        err.caret()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_unicode_is_a_rule_or_a_rule_error(text: str) -> None:
    try:
        compile_rule(text, SCHEMA)
    except RuleError:
        pass


def test_a_rule_names_at_most_30_lists_topics_and_purposes() -> None:
    ok = " or ".join(f'has_consent("p{i}")' for i in range(30))
    compile_rule(ok + ' or has_consent("p0")', SCHEMA)  # the same purpose twice is one
    with pytest.raises(RuleError, match="more than 30 different") as info:
        compile_rule(ok + ' or in_list("beta")', SCHEMA)
    assert info.value.column == len(ok) + len(' or in_list("') + 0
