"""A/B tests: which variant a contact gets, who is in the test portion, and when a
variant has won (issue 21; docs/campaigns.md, "A/B tests"). Pure policy: no I/O.

Assignment (``Split``): a contact's variant is a function of (test id, contact id)
and the variants' weights only, through SHA-256 of a stable encoding, so it is the
same in every process, on every machine and under any ``PYTHONHASHSEED``. Whether a
contact is in the test portion (the share that gets the variants first; the rest
waits for the winner) comes from a second, independent hash of the same pair, so the
portion and the variant are uncorrelated.

Decision (``decide``): a winner only when a chi-squared test of independence on the
variants x {success, failure} table gives p < ``alpha`` (0.05) AND every variant has
at least ``min_sample`` sends (1 000). With more than two variants, the overall test
must be significant AND the best variant must beat the runner-up in a pairwise 2 x 2
test at the same ``alpha`` (the overall test as a gate, then the one comparison the
decision rests on: Fisher's protected test). Otherwise the answer says why, with p,
the observed rates and the sample per variant a test would need to detect the
observed difference (alpha 0.05, power 0.8).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: Metrics a test can be decided on. Successes are counted per send (a contact who
#: clicked three times is one success); clicks must be bot-filtered by the caller.
METRICS = ("clicks", "conversions", "opens")

#: Opens are refused unless asked for: Apple Mail Privacy Protection fetches every
#: pixel, so an open says little about the reader.
UNRELIABLE_METRICS = frozenset({"opens"})

#: ``Verdict.reason`` values.
WINNER = "winner"
NOT_SIGNIFICANT = "not significant"
SAMPLE_TOO_SMALL = "sample too small"

#: The smallest expected count in any cell for the chi-squared approximation to hold
#: (the usual rule of thumb); below it the answer is "sample too small".
MIN_EXPECTED = 5.0


class ABTestError(ValueError):
    """An A/B test's definition or results that cannot be used; ``field`` is the path
    of the bad value (``"variants[1].weight"``, ``"results.B.successes"``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


# -- assignment -------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One arm of a test: its name (what the campaign's ``ab`` settings call it) and
    its share of the test portion, relative to the other weights."""

    name: str
    weight: float = 1.0


def _unit(purpose: str, test_id: str, contact_id: int | str) -> float:
    """A number in [0, 1), uniform over contacts, fixed by its arguments: the first
    53 bits of SHA-256 over a JSON array (unambiguous, whatever the strings hold)."""
    key = json.dumps(["postwarden-ab", purpose, test_id, str(contact_id)], ensure_ascii=True)
    top = int.from_bytes(hashlib.sha256(key.encode("ascii")).digest()[:8], "big")
    return (top >> 11) / float(1 << 53)


def _check_contact(contact_id: object) -> None:
    # bool is an int, and True would read as the contact "True".
    if isinstance(contact_id, bool) or not isinstance(contact_id, int | str):
        raise ABTestError("must be an integer or a string", "contact_id")


@dataclass(frozen=True)
class Split:
    """How a test's audience is divided: ``portion`` of it (0 < portion <= 1) gets
    the variants, in proportion to their weights; the rest waits for the winner.

    ``test_id`` seeds both hashes: two tests with different ids divide the same
    contacts independently. Changing the variants or weights of a running test moves
    contacts between variants; growing ``portion`` only adds contacts (a contact in
    the portion at 10 % is in it at 20 %).
    """

    test_id: str
    variants: tuple[Variant, ...]
    portion: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.test_id, str) or not self.test_id:
            raise ABTestError("must be a non-empty string", "test_id")
        if len(self.variants) < 2:
            raise ABTestError("a test needs at least 2 variants", "variants")
        seen: set[str] = set()
        for i, v in enumerate(self.variants):
            if not isinstance(v.name, str) or not v.name:
                raise ABTestError("must be a non-empty string", f"variants[{i}].name")
            if v.name in seen:
                raise ABTestError(f"duplicate variant {v.name!r}", f"variants[{i}].name")
            seen.add(v.name)
            w = v.weight
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                raise ABTestError("must be a finite number", f"variants[{i}].weight")
            if w <= 0:
                raise ABTestError("must be greater than 0", f"variants[{i}].weight")
        p = self.portion
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ABTestError("must be a number in (0, 1]", "portion")

    def in_test(self, contact_id: int | str) -> bool:
        """Whether the contact is in the test portion (gets a variant now)."""
        _check_contact(contact_id)
        return _unit("portion", self.test_id, contact_id) < self.portion

    def variant_of(self, contact_id: int | str) -> str:
        """The contact's variant, whether or not it is in the test portion."""
        _check_contact(contact_id)
        u = _unit("variant", self.test_id, contact_id)
        total = math.fsum(v.weight for v in self.variants)
        edge = 0.0
        for v in self.variants[:-1]:
            edge += v.weight / total
            if u < edge:
                return v.name
        return self.variants[-1].name  # also catches rounding in the sum of shares

    def assign(self, contact_id: int | str) -> str | None:
        """The variant the contact gets in the test, or None if it waits for the
        winner (outside the test portion)."""
        return self.variant_of(contact_id) if self.in_test(contact_id) else None


# -- decision ---------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What a test's results say.

    ``significant`` is what the statistics say (p < alpha, and with more than two
    variants the best beat the runner-up); ``winner`` is set only when that holds AND
    every variant has its minimum sample. ``reason`` is ``"sample too small"`` (it
    wins over the others: early peeks at small samples are what it guards against),
    ``"not significant"`` or ``"winner"``. ``rates`` holds successes / sends per
    variant (None for a variant with no sends). ``needed_per_variant`` is the sample
    per variant that would detect the observed difference between the best and the
    runner-up at ``alpha`` with power 0.8 (None when their rates are equal or
    unknown). ``pairwise_p`` is the best-versus-runner-up p value with more than two
    variants (None with two: the overall test is that comparison).
    """

    metric: str
    winner: str | None
    significant: bool
    reason: str
    p_value: float
    rates: dict[str, float | None]
    needed_per_variant: int | None
    pairwise_p: float | None = None


def _p_value(table: list[list[int]]) -> tuple[float, bool]:
    """The chi-squared test of independence on rows of [successes, failures] (with
    Yates's correction on a 2 x 2 table, scipy's default): (p, whether every expected
    count reaches MIN_EXPECTED). A table where nothing varies (no row, one row, no
    success or no failure at all) is no evidence: p = 1."""
    rows = [r for r in table if r[0] + r[1] > 0]
    succ = sum(r[0] for r in rows)
    fail = sum(r[1] for r in rows)
    if len(rows) < 2 or succ == 0 or fail == 0:
        return 1.0, False
    # scipy.stats is imported on first use: it costs about a second and 100 MB, and a
    # process that only assigns variants (the feeder) never needs it.
    from scipy.stats import chi2_contingency

    result = chi2_contingency(rows)
    return float(result.pvalue), bool(result.expected_freq.min() >= MIN_EXPECTED)


def needed_sample(p1: float, p2: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Sends per variant (two equal arms) for a two-sided test at ``alpha`` to detect
    rates ``p1`` against ``p2`` with probability ``power``: the normal approximation
    for two proportions, with Fleiss's continuity correction to match the Yates
    correction ``decide`` applies (Fleiss, Levin & Paik, *Statistical Methods for
    Rates and Proportions*). 10 % against 12 % needs 3 841 without the correction,
    3 941 with it."""
    for name, p in (("p1", p1), ("p2", p2)):
        if not 0 <= p <= 1:
            raise ABTestError("must be a rate in [0, 1]", name)
    if p1 == p2:
        raise ABTestError("equal rates: no difference to detect", "p2")
    _check_level(alpha, power)
    d = abs(p1 - p2)
    bar = (p1 + p2) / 2
    from scipy.stats import norm  # on first use, as in _p_value

    z_a = norm.ppf(1 - alpha / 2)
    z_b = norm.ppf(power)
    root = z_a * math.sqrt(2 * bar * (1 - bar)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    n = (root / d) ** 2
    corrected = n / 4 * (1 + math.sqrt(1 + 4 / (n * d))) ** 2
    # The float sum can land a hair above a whole number; a sample is counted whole.
    return math.ceil(corrected - 1e-9)


def _rank(rate: float | None) -> float:
    return -1.0 if rate is None else rate


def _check_level(alpha: float, power: float) -> None:
    if not 0 < alpha < 1:
        raise ABTestError("must be in (0, 1)", "alpha")
    if not 0 < power < 1:
        raise ABTestError("must be in (0, 1)", "power")


def _check_results(results: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, int]]:
    if not isinstance(results, Mapping):
        raise ABTestError("must map variant names to (sends, successes)", "results")
    if len(results) < 2:
        raise ABTestError("a test needs at least 2 variants", "results")
    checked: dict[str, tuple[int, int]] = {}
    for name, pair in results.items():
        where = f"results.{name}"
        if not isinstance(name, str) or not name:
            raise ABTestError("variant names must be non-empty strings", "results")
        if isinstance(pair, str | bytes) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ABTestError("must be a pair (sends, successes)", where)
        sends, successes = pair
        for label, n in (("sends", sends), ("successes", successes)):
            if isinstance(n, bool) or not isinstance(n, int):
                raise ABTestError("must be an integer", f"{where}.{label}")
            if n < 0:
                raise ABTestError(f"must not be negative (got {n})", f"{where}.{label}")
        if successes > sends:
            raise ABTestError(
                f"more successes ({successes}) than sends ({sends})", f"{where}.successes"
            )
        checked[name] = (sends, successes)
    return checked


def decide(
    results: Mapping[str, Sequence[int]],
    *,
    metric: str,
    min_sample: int = 1000,
    alpha: float = 0.05,
    power: float = 0.8,
    allow_opens: bool = False,
) -> Verdict:
    """Whether a test has a winner, from ``results``: variant name -> (sends,
    successes), successes being the sends that led to at least one ``metric`` event
    (``"clicks"``, bot-filtered, or ``"conversions"``; ``"opens"`` only with
    ``allow_opens``). Raises ABTestError (a ValueError) on bad input."""
    if metric not in METRICS:
        raise ABTestError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}", "metric")
    if metric in UNRELIABLE_METRICS and not allow_opens:
        raise ABTestError(
            "opens are not a winning metric (Apple Mail Privacy Protection opens every"
            " message); use clicks or conversions, or pass allow_opens",
            "metric",
        )
    if isinstance(min_sample, bool) or not isinstance(min_sample, int) or min_sample < 1:
        raise ABTestError("must be a positive integer", "min_sample")
    _check_level(alpha, power)
    counts = _check_results(results)

    rates = {name: (s / n if n else None) for name, (n, s) in counts.items()}
    p_value, valid = _p_value([[s, n - s] for n, s in counts.values()])
    enough = valid and all(n >= min_sample for n, _ in counts.values())

    # Best last; a variant without sends has no rate and cannot lead.
    ranked = sorted(counts, key=lambda name: _rank(rates[name]))
    best, runner_up = ranked[-1], ranked[-2]
    pairwise_p: float | None = None
    significant = p_value < alpha
    if len(counts) > 2:
        pairwise_p, _ = _p_value([[s, n - s] for n, s in (counts[best], counts[runner_up])])
        significant = significant and pairwise_p < alpha

    rb, rr = rates[best], rates[runner_up]
    needed = None
    if rb is not None and rr is not None and rb != rr:
        needed = needed_sample(rb, rr, alpha=alpha, power=power)

    if not enough:
        reason = SAMPLE_TOO_SMALL
    elif not significant:
        reason = NOT_SIGNIFICANT
    else:
        reason = WINNER
    return Verdict(
        metric=metric,
        winner=best if reason == WINNER else None,
        significant=significant,
        reason=reason,
        p_value=p_value,
        rates=rates,
        needed_per_variant=needed,
        pairwise_p=pairwise_p,
    )
