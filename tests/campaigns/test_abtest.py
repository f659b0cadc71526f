"""A/B tests: assignment by hash (stable across processes and hash seeds, close to the
weights, portion independent of variant) and the decision (a real lift is found,
equal arms rarely win, small samples say so, the power calculation is the textbook
one, bad input is refused). Every simulation has a fixed seed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.campaigns.abtest import (
    NOT_SIGNIFICANT,
    SAMPLE_TOO_SMALL,
    WINNER,
    ABTestError,
    Split,
    Variant,
    decide,
    needed_sample,
)

N_IDS = 100_000
# Generous: a correct hash fails one of these checks once in 10 000 runs (and the
# ids are fixed, so the outcome is too); a biased one fails by orders of magnitude.
P_FLOOR = 1e-4


def stats() -> Any:
    """scipy.stats, imported by the tests that use it: at module level it cost every
    pytest worker a second at collection."""
    import scipy.stats

    return scipy.stats


def split(portion: float = 1.0, weights: tuple[float, ...] = (1, 1, 2)) -> Split:
    names = "ABCDEFG"
    return Split(
        "campaign:7/ab",
        tuple(Variant(names[i], w) for i, w in enumerate(weights)),
        portion=portion,
    )


# -- assignment -------------------------------------------------------------------


def test_assignment_is_pinned_and_stable() -> None:
    s = split(portion=0.2)
    # Pinned: a change of encoding would move contacts between variants mid-test.
    variants = "".join(s.variant_of(i) for i in range(1, 41))
    portion = "".join("x" if s.in_test(i) else "." for i in range(1, 41))
    assert variants == "ACBACCCABCAACACBACCCCBCCCCCCACCBBBABAACC"
    assert portion == "x........x......xx.......x..x.x........."
    assert [s.assign(i) for i in range(1, 41)] == [
        v if p == "x" else None for v, p in zip(variants, portion, strict=True)
    ]
    again = split(portion=0.2)
    assert all(again.assign(i) == s.assign(i) for i in range(1, 2000))
    # A contact id is compared as text: 42 and "42" are one contact.
    assert s.variant_of(42) == s.variant_of("42")
    assert s.in_test(42) == s.in_test("42")


def test_assignment_is_the_same_in_other_processes_and_hash_seeds() -> None:
    s = split(portion=0.3)
    ids: list[int | str] = [*range(1, 1001), *(f"contact-{i}@example.com" for i in range(500))]
    here = [s.assign(c) for c in ids]
    program = (
        "import json, sys\n"
        "from postwarden.campaigns.abtest import Split, Variant\n"
        "s = Split('campaign:7/ab', (Variant('A', 1), Variant('B', 1), Variant('C', 2)),"
        " portion=0.3)\n"
        "ids = json.load(sys.stdin)\n"
        "print(json.dumps([s.assign(c) for c in ids]))\n"
        # Assigning never loads scipy (a second and 100 MB): only deciding does.
        "assert 'scipy' not in sys.modules\n"
    )
    for seed in ("0", "4242"):
        out = subprocess.run(
            [sys.executable, "-c", program],
            input=json.dumps(ids),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert json.loads(out.stdout) == here, f"PYTHONHASHSEED={seed}"


@pytest.mark.parametrize("weights", [(1, 1), (1, 1, 2), (0.1, 0.3, 0.6), (5, 1, 1, 1)])
def test_variants_follow_the_weights(weights: tuple[float, ...]) -> None:
    s = split(weights=weights)
    counts = Counter(s.variant_of(i) for i in range(N_IDS))
    names = [v.name for v in s.variants]
    observed = [counts[n] for n in names]
    expected = [N_IDS * w / sum(weights) for w in weights]
    p = stats().chisquare(observed, expected).pvalue
    assert p > P_FLOOR, f"{observed} against {expected}: p = {p:.2g}"
    # The check can fail: the same counts against even weights are far off (unless
    # the weights are even).
    if len(set(weights)) > 1:
        assert stats().chisquare(observed, [N_IDS / len(weights)] * len(weights)).pvalue < 1e-9


def test_portion_share_and_independence_from_the_variant() -> None:
    s = split(portion=0.2, weights=(1, 1, 2))
    names = [v.name for v in s.variants]
    table = [[0] * len(names) for _ in range(2)]
    for i in range(N_IDS):
        table[int(s.in_test(i))][names.index(s.variant_of(i))] += 1
    inside = sum(table[1])
    p_share = stats().chisquare([inside, N_IDS - inside], [0.2 * N_IDS, 0.8 * N_IDS]).pvalue
    assert p_share > P_FLOOR, f"{inside} of {N_IDS} in the test portion"
    p_indep = stats().chi2_contingency(table).pvalue
    assert p_indep > P_FLOOR, f"portion x variant {table}: p = {p_indep:.2g}"
    # Within the portion, the variants still follow the weights.
    p_weights = stats().chisquare(table[1], [inside / 4, inside / 4, inside / 2]).pvalue
    assert p_weights > P_FLOOR, f"variants in the portion {table[1]}"

    # The check can fail: a portion read from the variant's own hash (the first 20 %
    # of the same number) would be all "A" and is flagged at once.
    correlated = [[0] * len(names) for _ in range(2)]
    for i in range(N_IDS):
        v = s.variant_of(i)
        correlated[int(v == "A" and i % 5 != 0)][names.index(v)] += 1
    assert stats().chi2_contingency(correlated).pvalue < 1e-9


def test_two_tests_divide_the_same_contacts_independently() -> None:
    first = split(weights=(1, 1))
    second = Split("campaign:8/ab", first.variants)
    pairs = Counter((first.variant_of(i), second.variant_of(i)) for i in range(N_IDS))
    table = [[pairs["A", "A"], pairs["A", "B"]], [pairs["B", "A"], pairs["B", "B"]]]
    assert stats().chi2_contingency(table).pvalue > P_FLOOR, table


@settings(max_examples=100, deadline=None)
@given(
    contact=st.one_of(st.integers(min_value=0, max_value=2**63), st.text(max_size=40)),
    small=st.floats(min_value=0.001, max_value=1.0),
    grow=st.floats(min_value=0.0, max_value=1.0),
    test_id=st.text(min_size=1, max_size=20),
)
def test_growing_the_portion_only_adds_contacts(
    contact: int | str, small: float, grow: float, test_id: str
) -> None:
    variants = (Variant("A"), Variant("B", 3))
    narrow = Split(test_id, variants, portion=small)
    wide = Split(test_id, variants, portion=min(1.0, small + grow))
    if narrow.in_test(contact):
        assert wide.in_test(contact)
    assert narrow.variant_of(contact) == wide.variant_of(contact)
    assert wide.assign(contact) in {None, "A", "B"}


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Split("t", (Variant("A"),)), "variants"),
        (lambda: Split("t", (Variant("A"), Variant("A"))), "variants[1].name"),
        (lambda: Split("t", (Variant("A"), Variant(""))), "variants[1].name"),
        (lambda: Split("t", (Variant("A"), Variant("B", 0))), "variants[1].weight"),
        (lambda: Split("t", (Variant("A", -1), Variant("B"))), "variants[0].weight"),
        (lambda: Split("t", (Variant("A", math.nan), Variant("B"))), "variants[0].weight"),
        (lambda: Split("t", (Variant("A"), Variant("B")), portion=0), "portion"),
        (lambda: Split("t", (Variant("A"), Variant("B")), portion=1.5), "portion"),
        (lambda: Split("", (Variant("A"), Variant("B"))), "test_id"),
        (lambda: Split("t", (Variant("A"), Variant("B"))).assign(True), "contact_id"),
        (lambda: Split("t", (Variant("A"), Variant("B"))).assign(1.5), "contact_id"),
    ],
)
def test_bad_split_is_refused(make: object, field: str) -> None:
    with pytest.raises(ValueError, match=r"^" + field.replace("[", r"\[").replace("]", r"\]")):
        make()  # type: ignore[operator]
    try:
        make()  # type: ignore[operator]
    except ABTestError as e:
        assert e.field == field


# -- decision ---------------------------------------------------------------------


def yates_p(a: tuple[int, int], b: tuple[int, int]) -> float:
    """The textbook 2 x 2 chi-squared with Yates's correction, by hand: rows are
    (sends, successes)."""
    (n1, s1), (n2, s2) = a, b
    f1, f2 = n1 - s1, n2 - s2
    n = n1 + n2
    stat = n * max(0.0, abs(s1 * f2 - s2 * f1) - n / 2) ** 2 / (n1 * n2 * (s1 + s2) * (f1 + f2))
    return float(stats().chi2.sf(stat, 1))


def simulate(rng: np.random.Generator, n: int, rates: tuple[float, ...]) -> dict[str, tuple]:
    return {"AB"[i]: (n, int(rng.binomial(n, r))) for i, r in enumerate(rates)}


def test_a_real_two_point_lift_is_found() -> None:
    # Exactly the expected counts: 10 % against 12 % of 5 000.
    v = decide({"A": (5000, 500), "B": (5000, 600)}, metric="clicks")
    assert (v.winner, v.reason, v.significant) == ("B", WINNER, True)
    assert v.p_value == pytest.approx(yates_p((5000, 500), (5000, 600)), rel=1e-9)
    assert v.p_value < 0.05
    assert v.rates == {"A": 0.10, "B": 0.12}
    # The better arm wins wherever it stands.
    assert decide({"A": (5000, 600), "B": (5000, 500)}, metric="clicks").winner == "A"

    # Simulated outcomes: one test with seed 21, then the rate it is found at.
    rng = np.random.default_rng(21)
    one = decide(simulate(rng, 5000, (0.10, 0.12)), metric="clicks")
    assert one.winner == "B" and one.p_value < 0.05, one
    verdicts = [decide(simulate(rng, 5000, (0.10, 0.12)), metric="clicks") for _ in range(200)]
    found = sum(v.winner == "B" for v in verdicts) / len(verdicts)
    assert not any(v.winner == "A" for v in verdicts)
    # Power at n = 5 000 is 0.89 by the formula; under 0.80 here is a broken test.
    assert found >= 0.80, f"lift found in {found:.1%} of 200 simulated tests"


def test_equal_arms_declare_no_winner_in_95_percent_of_tests() -> None:
    rng = np.random.default_rng(2026)
    verdicts = [decide(simulate(rng, 5000, (0.10, 0.10)), metric="clicks") for _ in range(200)]
    quiet = sum(v.winner is None for v in verdicts) / len(verdicts)
    assert quiet >= 0.95, f"no winner in {quiet:.1%} of 200 tests of equal arms"
    assert all(v.reason in {WINNER, NOT_SIGNIFICANT} for v in verdicts)
    assert all((v.winner is not None) == (v.p_value < 0.05) for v in verdicts)
    # 200 tests measure the false-positive rate coarsely (at a true 5 %, a third of
    # seeds would see more than 10 winners); 2 000 more hold it under alpha.
    more = [decide(simulate(rng, 5000, (0.10, 0.10)), metric="clicks") for _ in range(2000)]
    false_winners = sum(v.winner is not None for v in more) / len(more)
    assert false_winners <= 0.055, f"a winner in {false_winners:.2%} of 2 000 equal tests"


def test_too_small_a_sample_says_so_even_when_significant() -> None:
    # 10 % against 20 % of 500 is significant, but under the minimum of 1 000.
    v = decide({"A": (500, 50), "B": (500, 100)}, metric="conversions")
    assert v.p_value < 0.05 and v.significant
    assert (v.winner, v.reason) == (None, SAMPLE_TOO_SMALL)
    assert decide({"A": (500, 50), "B": (500, 100)}, metric="conversions", min_sample=500).winner
    # One arm short is enough to wait.
    assert decide({"A": (999, 100), "B": (5000, 800)}, metric="clicks").reason == SAMPLE_TOO_SMALL
    # Too few successes for the chi-squared approximation (expected count under 5).
    few = decide({"A": (2000, 0), "B": (2000, 6)}, metric="conversions")
    assert (few.winner, few.reason) == (None, SAMPLE_TOO_SMALL)
    # Nothing sent yet: no rates, no evidence.
    empty = decide({"A": (0, 0), "B": (0, 0)}, metric="clicks")
    assert empty.rates == {"A": None, "B": None}
    assert (empty.p_value, empty.reason, empty.needed_per_variant) == (1.0, SAMPLE_TOO_SMALL, None)


def textbook_n(p1: float, p2: float) -> tuple[float, float]:
    """Two proportions, alpha 0.05 two-sided, power 0.8: (without, with Fleiss's
    continuity correction), z values written out."""
    z_a, z_b = 1.959963984540054, 0.8416212335729143
    bar = (p1 + p2) / 2
    d = abs(p1 - p2)
    n = (
        z_a * math.sqrt(2 * bar * (1 - bar)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    ) ** 2 / d**2
    return n, n / 4 * (1 + math.sqrt(1 + 4 / (n * d))) ** 2


@pytest.mark.parametrize(("p1", "p2"), [(0.10, 0.12), (0.02, 0.025), (0.30, 0.25)])
def test_needed_sample_is_the_textbook_value(p1: float, p2: float) -> None:
    plain, corrected = textbook_n(p1, p2)
    got = needed_sample(p1, p2)
    assert got == pytest.approx(corrected, rel=0.02)
    assert got == math.ceil(corrected)
    if (p1, p2) == (0.10, 0.12):
        assert math.ceil(plain) == 3841  # the figure the usual calculators print


def test_the_needed_sample_is_reported_and_gives_the_power_it_promises() -> None:
    v = decide({"A": (400, 40), "B": (400, 48)}, metric="clicks")
    assert v.reason == SAMPLE_TOO_SMALL
    assert v.needed_per_variant == needed_sample(0.10, 0.12) == 3941
    assert decide({"A": (5000, 500), "B": (5000, 500)}, metric="clicks").needed_per_variant is None
    # At that sample, decide finds the lift in about 80 % of tests.
    rng = np.random.default_rng(7)
    n = v.needed_per_variant
    found = sum(
        decide(simulate(rng, n, (0.10, 0.12)), metric="clicks").winner == "B" for _ in range(300)
    )
    assert 0.72 <= found / 300 <= 0.88, f"power {found / 300:.1%} at n = {n}"


def test_more_than_two_variants_need_the_best_to_beat_the_runner_up() -> None:
    # Overall significant (A is low), but B and C are close: no winner.
    close = decide({"A": (5000, 500), "B": (5000, 600), "C": (5000, 590)}, metric="clicks")
    assert close.p_value < 0.05
    assert close.pairwise_p is not None and close.pairwise_p > 0.05
    assert (close.winner, close.reason, close.significant) == (None, NOT_SIGNIFICANT, False)
    # The needed sample is for the difference the decision rests on (B against C).
    assert close.needed_per_variant == needed_sample(0.12, 0.118)
    # A clear best wins.
    clear = decide({"A": (5000, 500), "B": (5000, 700), "C": (5000, 560)}, metric="clicks")
    assert (clear.winner, clear.reason) == ("B", WINNER)
    assert clear.pairwise_p == pytest.approx(yates_p((5000, 700), (5000, 560)), rel=1e-9)
    # A variant with no sends neither leads nor lets the others win.
    idle = decide({"A": (5000, 500), "B": (5000, 700), "C": (0, 0)}, metric="clicks")
    assert idle.rates["C"] is None and idle.reason == SAMPLE_TOO_SMALL


def test_opens_only_when_asked_for() -> None:
    results = {"A": (5000, 2000), "B": (5000, 2300)}
    with pytest.raises(ValueError, match="opens are not a winning metric"):
        decide(results, metric="opens")
    v = decide(results, metric="opens", allow_opens=True)
    assert (v.metric, v.winner) == ("opens", "B")


@pytest.mark.parametrize(
    ("results", "kwargs", "field", "words"),
    [
        ({"A": (-1, 0), "B": (10, 1)}, {}, "results.A.sends", "must not be negative"),
        ({"A": (10, -2), "B": (10, 1)}, {}, "results.A.successes", "must not be negative"),
        ({"A": (10, 11), "B": (10, 1)}, {}, "results.A.successes", "more successes (11)"),
        ({"A": (10, 1)}, {}, "results", "at least 2 variants"),
        ({}, {}, "results", "at least 2 variants"),
        ({"A": (10, 1), "B": (10.0, 1)}, {}, "results.B.sends", "must be an integer"),
        ({"A": (10, 1), "B": (10, True)}, {}, "results.B.successes", "must be an integer"),
        ({"A": (10, 1), "B": (10,)}, {}, "results.B", "a pair (sends, successes)"),
        ({"A": (10, 1), "B": (10, 1)}, {"metric": "revenue"}, "metric", "unknown metric"),
        ({"A": (10, 1), "B": (10, 1)}, {"alpha": 0}, "alpha", "must be in (0, 1)"),
        ({"A": (10, 1), "B": (10, 1)}, {"min_sample": 0}, "min_sample", "positive integer"),
    ],
)
def test_bad_results_are_refused(
    results: dict[str, tuple], kwargs: dict[str, object], field: str, words: str
) -> None:
    args: dict = {"metric": "clicks", **kwargs}
    with pytest.raises(ABTestError) as caught:
        decide(results, **args)
    assert isinstance(caught.value, ValueError)
    assert caught.value.field == field
    assert words in str(caught.value) and str(caught.value).startswith(field)


def test_needed_sample_refuses_what_it_cannot_compute() -> None:
    with pytest.raises(ValueError, match="equal rates"):
        needed_sample(0.1, 0.1)
    with pytest.raises(ValueError, match=r"p1: must be a rate in \[0, 1\]"):
        needed_sample(1.5, 0.1)
    with pytest.raises(ValueError, match="power"):
        needed_sample(0.1, 0.2, power=1.0)
