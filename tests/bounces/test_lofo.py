"""Leaving a family of reports out (issue 25): the ``from`` tags of the patterns file and
the code-level family rules, obeyed by ``Classifier`` and ``Parser``; and the
leave-one-family-out figures of the development corpus (bench/bounce_lofo.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.bounce_lofo import CORPUS, FIGURES, family, measure

from postwarden.bounces.classify import Classifier, PatternsError, _shipped_rules
from postwarden.bounces.parse import Parser
from postwarden.bounces.parse.headers import _GATEWAYS
from postwarden.bounces.provenance import SWITCHES, is_family, switch_on

# Today's LOFO figures (docs/bounces.md), a little below: a change that makes the rules
# generalize worse fails here. Raise them as the rules improve.
LOFO_FLOOR = {"recall": 98.0, "status": 95.0, "hard": 94.5, "reason": 89.5}


def patterns(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "patterns.toml"
    f.write_text(text)
    return f


OPERATOR = """
[[texts]]
category = "mailbox_full"
from = ["lhost-exim"]
patterns = ["frobnicated"]

[[codes]]
category = "policy_blocked"
from = ["lhost-exim"]
codes = ["5.1.1"]

[[replies]]
category = "rate_limited"
from = ["lhost-exim"]
codes = [550]
"""


def test_a_tagged_rule_is_left_out_for_its_family_only(tmp_path: Path) -> None:
    f = patterns(tmp_path, OPERATOR)

    def verdicts(c: Classifier) -> tuple[str, ...]:
        return tuple(
            c.classify(text=t).category
            for t in ("550 5.7.0 frobnicated", "550 5.1.1 go away", "550 go away")
        )

    assert verdicts(Classifier(f)) == ("mailbox_full", "policy_blocked", "rate_limited")
    other = Classifier(f, exclude_families={"lhost-postfix"})
    assert verdicts(other) == verdicts(Classifier(f))
    assert Classifier(f, exclude_families={"lhost-nonesuch"}).rules_left_out == 0
    # Left out, the shipped rules answer in their place: 5.7.0 is a policy status
    # (RFC 3463), 5.1.1 and a bare 550 read as unknown users.
    out = Classifier(f, exclude_families={"lhost-exim"})
    assert verdicts(out) == ("policy_blocked", "user_unknown", "user_unknown")
    shipped = Classifier(None, exclude_families={"lhost-exim"}).rules_left_out
    assert out.rules_left_out == shipped + 3


def test_a_source_keeps_a_rule_and_every_family_must_be_out(tmp_path: Path) -> None:
    f = patterns(
        tmp_path,
        '[[texts]]\ncategory = "mailbox_full"\nfrom = ["lhost-exim", "rfc3463"]\n'
        'patterns = ["frobnicated"]\n\n'
        '[[texts]]\ncategory = "rate_limited"\nfrom = ["lhost-exim", "flufl-simple"]\n'
        'patterns = ["gronked"]\n',
    )

    def kept(c: Classifier) -> tuple[bool, bool]:
        return (
            c.classify(text="frobnicated").category == "mailbox_full",
            c.classify(text="gronked").category == "rate_limited",
        )

    assert kept(Classifier(f, exclude_families={"lhost-exim"})) == (True, True)
    both = {"lhost-exim", "flufl-simple"}
    assert kept(Classifier(f, exclude_families=both)) == (True, False)
    # strict: the source does not keep it (what the sources carry, measured).
    assert kept(Classifier(f, exclude_families={"lhost-exim"}, strict=True)) == (False, True)
    assert kept(Classifier(f, strict=True)) == (True, True)


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ('from = "lhost-exim"', "texts[0].from: expected a list"),
        ("from = [1]", "texts[0].from[0]: expected a string"),
        ('from = ["rfc3463", "Lhost-Exim"]', "texts[0].from[1]: 'Lhost-Exim' is neither"),
        ('from = ["exim"]', "texts[0].from[0]: 'exim' is neither"),
        ('from = ["sisimai:"]', "texts[0].from[0]: 'sisimai:' is neither"),
        ('from = ["lhost-"]', "texts[0].from[0]"),
    ],
)
def test_bad_from_is_refused_with_its_path(tmp_path: Path, entry: str, where: str) -> None:
    f = patterns(tmp_path, f'[[texts]]\ncategory = "other"\n{entry}\npatterns = ["x"]\n')
    with pytest.raises(PatternsError) as exc:
        Classifier(f)
    assert str(exc.value).startswith(f"{f}: {where}")


def test_tags_of_every_shape_are_read(tmp_path: Path) -> None:
    tags = [
        "lhost-exim",
        "rhost-franceptt",
        "flufl-simple",
        "rfc3464",
        "arf",
        "rfc7505",
        "sisimai:reason/filtered",
        "provider:google",
    ]
    body = ", ".join(f'"{t}"' for t in tags)
    f = patterns(tmp_path, f'[[codes]]\ncategory = "other"\nfrom = [{body}]\ncodes = ["5.9.9"]\n')
    assert Classifier(f).codes["5.9.9"] == "other"


def test_only_family_names_can_be_excluded() -> None:
    with pytest.raises(ValueError, match="'rfc3463'"):
        Classifier(None, exclude_families={"rfc3463"})
    with pytest.raises(ValueError, match="differs"):
        Parser(Classifier(None), exclude_families={"lhost-exim"})
    c = Classifier(None, exclude_families={"lhost-exim"})
    assert Parser(c, exclude_families={"lhost-exim"}).classifier is c


def findings(parser: Parser, name: str) -> list[tuple[object, ...]]:
    data = (CORPUS / "eml" / name).read_bytes()
    return [(f.recipient, f.reason, f.hard) for f in parser.parse_file(data)]


def test_the_gateway_switch_obeys() -> None:
    """McAfee's gateway headers make a report a content filter's; left out for its own
    family only."""
    import email
    import email.policy

    from postwarden.bounces.parse.headers import filter_gateway

    assert switch_on("gateway-mcafee", frozenset())
    assert not switch_on("gateway-mcafee", frozenset({"lhost-mcafee"}))
    raw = (CORPUS / "eml" / "sisimai" / "lhost-mcafee-01.eml").read_bytes()
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert filter_gateway(msg)
    assert filter_gateway(msg, frozenset({"lhost-postfix"}))
    assert not filter_gateway(msg, frozenset({"lhost-mcafee"}))


def test_the_sendmail_pipelining_switch_obeys() -> None:
    """Sendmail prints pipelined RCPT refusals after ">>> DATA": with its rule, a precise
    Status field makes that transcript's DATA not count; left out, the refusal reads as
    the end of DATA's (a disabled mailbox there is a filter's policy)."""
    from postwarden.bounces.parse.judge import judge

    context = ">>> DATA\n<<< 550 5.2.1 <a@b.example>... Mailbox disabled\n"

    def category(fams: set[str]) -> str:
        c = Classifier(None, exclude_families=fams)
        f = judge(c, "a@b.example", "5.2.1", "failed", "550 Mailbox disabled", None, context)
        return str(f.reason)

    assert category(set()) == category({"lhost-postfix"}) == "mailbox_disabled"
    assert category({"lhost-sendmail"}) == "policy_blocked"


def test_every_code_level_switch_is_used_and_tagged() -> None:
    assert set(SWITCHES) == set(_GATEWAYS) | {"sendmail-pipelining"}
    assert all(tags and all(is_family(t) for t in tags) for tags in SWITCHES.values())


def test_shipped_family_tags_name_corpus_families() -> None:
    """A misspelt family would never be left out: every family the shipped rules and
    the code name is one of the corpus's."""
    corpus = {family(p) for p in CORPUS.glob("eml/*/*.eml")}
    rules = _shipped_rules()
    tags = set().union(
        *(t for _c, _cat, t in rules.codes),
        *(r.tags for r in rules.texts),
        *(t for _r, _cat, t in rules.replies),
        *SWITCHES.values(),
    )
    families = {t for t in tags if is_family(t)}
    assert families, "no rule names a family"
    assert families <= corpus, families - corpus


def test_excluding_a_family_no_rule_names_changes_nothing() -> None:
    """The exclusion itself alters no verdict: only the rules it leaves out do."""
    plain, excluding = Parser(), Parser(exclude_families={"lhost-nonesuch"})
    assert excluding.classifier.rules_left_out == 0
    for path in sorted(CORPUS.glob("eml/*/*.eml")):
        data = path.read_bytes()
        want = [f.as_json() for f in plain.parse_file(data)]
        assert [f.as_json() for f in excluding.parse_file(data)] == want, path.name


@pytest.mark.long
def test_lofo_figures() -> None:
    """In-sample and leave-one-family-out on the development corpus, scored by the
    corpus's scorer: LOFO stays above its floor, and only families that lose a rule
    change."""
    r = measure()
    assert r.lofo is not None
    assert sum(r.families.values()) == 331
    got = {f: r.lofo.pct(f) for f in FIGURES}
    low = {f: (round(got[f], 1), v) for f, v in LOFO_FLOOR.items() if got[f] < v}
    assert not low, f"LOFO below the floor: {low}"
    # In-sample is the scorer's figure on every rule (test_corpus.py has its floor).
    assert r.insample.n["reason"] == r.lofo.n["reason"] == 234
    assert r.insample.pct("reason") >= 89.0
    changed = {family(str(row["file"])) for row, a in zip(r.lofo.rows, r.insample.rows,
                                                           strict=True) if row != a}  # fmt: skip
    assert changed, "LOFO left nothing out"
    assert all(r.left_out[f] for f in changed), {f: r.left_out[f] for f in changed}
