"""How well the bounce classifier generalizes: in-sample and leave-one-family-out (LOFO)
figures on the development corpus, side by side (not a test; docs/bounces.md,
"Measuring generalization").

A family is the reporting MTA or provider in a corpus file's name (``lhost-exim-01.eml``
is ``lhost-exim``, ``flufl-simple_15.eml`` is ``flufl-simple``). In-sample, every file is
parsed with every rule. LOFO, each family's files are parsed with
``Parser(exclude_families={family})``: no rule written from that family's files only
(``from`` in patterns.toml, ``provenance.SWITCHES`` in code) and backed by no source.
Each way, the findings are written as one JSONL file per message and the corpus's own
scorer (tests/corpus/score_bounces.py) replays them once over all files, as
tests/bounces/test_corpus.py does. Prints recall, status, hard/soft and reason both
ways, per-reason accuracy both ways, and per family the rows LOFO lost.

    python bench/bounce_lofo.py              # in-sample and LOFO
    python bench/bounce_lofo.py --in-sample  # in-sample only (the scorer's figures)
    python bench/bounce_lofo.py --strict     # LOFO where sources do not keep a rule
    python bench/bounce_lofo.py --json       # one JSON object, for scripts and tests

To measure another checkout's rules: ``PYTHONPATH=OTHER/src python bench/bounce_lofo.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from postwarden.bounces.classify import Classifier
from postwarden.bounces.parse import Parser
from postwarden.bounces.provenance import SWITCHES, is_family

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus" / "bounces-dev"
SCORER = ROOT / "tests" / "corpus" / "score_bounces.py"
# The scorer runs a command per message: this one prints the findings written for it.
REPLAY = 'exec cat "$0/${1#"$PW_CORPUS/"}.jsonl"'
FIGURES = ("recall", "status", "hard", "reason")
LABELS = {
    "recall": "recipient found",
    "status": "status right",
    "hard": "hard/soft right",
    "reason": "reason right",
}


def family(path: Path | str) -> str:
    """The family of a corpus file: its name without the number and ``.eml``."""
    return re.sub(r"[-_]\d+$", "", Path(path).name.removesuffix(".eml"))


@dataclass
class Score:
    """One scorer run: counts per figure (end to end) and each row's outcome."""

    ok: Counter[str] = field(default_factory=Counter)
    n: Counter[str] = field(default_factory=Counter)
    reasons: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    rows: list[dict[str, object]] = field(default_factory=list)

    def pct(self, figure: str) -> float:
        return 100 * self.ok[figure] / self.n[figure] if self.n[figure] else 0.0


def write_findings(parser_of: dict[str, Parser], corpus: Path, out: Path) -> None:
    """Each message's findings as ``<file>.jsonl`` under ``out``, parsed by its family's
    parser (``""``: the parser for any family not named)."""
    for path in sorted(corpus.glob("eml/*/*.eml")):
        parser = parser_of.get(family(path)) or parser_of[""]
        lines = [json.dumps(f.as_json()) + "\n" for f in parser.parse_file(path.read_bytes())]
        dest = out / f"{path.relative_to(corpus)}.jsonl"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("".join(lines))


def score(corpus: Path, found: Path, details: Path) -> Score:
    """The corpus's scorer over ``found``, once over all files."""
    command = [sys.executable, str(SCORER), "--jobs", "4", "--misses", "0"]
    command += ["--details", str(details), str(corpus), "--", "sh", "-c", REPLAY, str(found)]
    run = subprocess.run(
        command,
        env={**os.environ, "PW_CORPUS": str(corpus)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    s = Score()
    for line in details.read_text().splitlines():
        row = json.loads(line)
        s.rows.append(row)
        if row["recipient"] is not None:
            s.n["recall"] += 1
            s.ok["recall"] += bool(row["found"])
        for figure in ("status", "hard", "reason"):
            if figure in row:
                s.n[figure] += 1
                s.ok[figure] += bool(row[figure][2])
        if "reason" in row:
            s.reasons[row["reason"][0]]["n"] += 1
            s.reasons[row["reason"][0]]["ok"] += bool(row["reason"][2])
    # The scorer's own last line, to be sure these counts are its figures.
    last = run.stdout.strip().splitlines()[-1]
    m = re.fullmatch(
        r"bounce-score: recall=([\d.]+) status=([\d.]+) hard=([\d.]+) reason=([\d.]+) n=\d+",
        last,
    )
    if not m:
        raise RuntimeError(f"the scorer's output ends unexpectedly: {last!r}")
    for figure, value in zip(FIGURES, m.groups(), strict=True):
        if abs(s.pct(figure) / 100 - float(value)) > 0.0006:
            raise RuntimeError(f"{figure}: details give {s.pct(figure):.1f} %, scorer {value}")
    return s


@dataclass
class Result:
    insample: Score
    lofo: Score | None
    families: dict[str, int]  # family -> its files
    left_out: dict[str, int]  # family -> rules and switches left out for it

    def as_json(self) -> dict[str, object]:
        def figures(s: Score) -> dict[str, object]:
            return {
                **{f: round(s.pct(f), 1) for f in FIGURES},
                "counts": {f: [s.ok[f], s.n[f]] for f in FIGURES},
                "reasons": {r: [c["ok"], c["n"]] for r, c in sorted(s.reasons.items())},
            }

        out: dict[str, object] = {"in_sample": figures(self.insample)}
        if self.lofo is not None:
            out["lofo"] = figures(self.lofo)
            out["lost"] = {
                fam: [f"{r['file']}: {what}" for r, what in rows]
                for fam, rows in sorted(lost_by_family(self.insample, self.lofo).items())
            }
            out["left_out"] = self.left_out
        return out


def measure(corpus: Path = CORPUS, *, lofo: bool = True, strict: bool = False) -> Result:
    files = sorted(corpus.glob("eml/*/*.eml"))
    families = Counter(family(p) for p in files)
    left_out: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bounce-lofo-") as tmp:
        work = Path(tmp)
        write_findings({"": Parser()}, corpus, work / "in-sample")
        insample = score(corpus, work / "in-sample", work / "in-sample.jsonl")
        if not lofo:
            return Result(insample, None, dict(families), left_out)
        # A name no tag can take (is-not-bounce) has no rules to leave out.
        parsers: dict[str, Parser] = {"": Parser()}
        for fam in filter(is_family, families):
            classifier = Classifier(None, exclude_families={fam}, strict=strict)
            switches = sum(fam in tags and tags <= {fam} for tags in SWITCHES.values())
            left_out[fam] = classifier.rules_left_out + switches
            parsers[fam] = Parser(classifier)
        write_findings(parsers, corpus, work / "lofo")
        lofo_score = score(corpus, work / "lofo", work / "lofo.jsonl")
    return Result(insample, lofo_score, dict(families), left_out)


def lost_by_family(a: Score, b: Score) -> dict[str, list[tuple[dict[str, object], str]]]:
    """Per family, the rows right in ``a`` and wrong in ``b`` (or the other way round,
    marked ``+``), with what changed."""
    out: dict[str, list[tuple[dict[str, object], str]]] = defaultdict(list)
    for ra, rb in zip(a.rows, b.rows, strict=True):
        changes = []
        if ra["found"] != rb["found"]:
            changes.append("recipient " + ("lost" if ra["found"] else "+found"))
        for figure in ("status", "hard", "reason"):
            if figure in ra:
                want, got_a, ok_a = ra[figure]  # type: ignore[misc]
                _, got_b, ok_b = rb[figure]  # type: ignore[misc]
                if ok_a != ok_b:
                    sign = "" if ok_a else "+"
                    changes.append(f"{sign}{figure} {got_a}->{got_b} (want {want})")
        if changes:
            out[family(str(ra["file"]))].append((ra, "; ".join(changes)))
    return out


def report(r: Result) -> None:
    a, b = r.insample, r.lofo
    print(f"corpus: {len(r.families)} families, {sum(r.families.values())} files")
    if b is None:
        print(f"{'figure':<18}{'in-sample':>20}")
        for f in FIGURES:
            print(f"{LABELS[f]:<18}{a.pct(f):>8.1f} % ({a.ok[f]}/{a.n[f]})")
    else:
        print(f"{'figure':<18}{'in-sample':>20}{'LOFO':>20}{'difference':>12}")
        for f in FIGURES:
            print(
                f"{LABELS[f]:<18}{a.pct(f):>8.1f} % ({a.ok[f]:>3}/{a.n[f]})"
                f"{b.pct(f):>8.1f} % ({b.ok[f]:>3}/{b.n[f]}){b.pct(f) - a.pct(f):>+10.1f}"
            )
    print("\nreason right by expected (Sisimai) reason:")
    print(f"  {'reason':<16}{'n':>4}{'in-sample':>11}" + (f"{'LOFO':>9}" if b else ""))
    for reason, c in sorted(a.reasons.items(), key=lambda x: (-x[1]["n"], x[0])):
        line = f"  {reason:<16}{c['n']:>4}{100 * c['ok'] / c['n']:>9.1f} %"
        if b is not None:
            d = b.reasons[reason]
            line += f"{100 * d['ok'] / d['n']:>7.1f} %"
        print(line)
    if b is None:
        return
    lost = lost_by_family(a, b)
    print(f"\nper family, what LOFO changed ({len(lost)} of {len(r.families)} families):")
    for fam in sorted(lost, key=lambda f: (-len(lost[f]), f)):
        print(f"  {fam} ({r.families[fam]} files, {r.left_out.get(fam, 0)} rules left out)")
        for row, what in lost[fam]:
            print(f"      {Path(str(row['file'])).name}: {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--in-sample", action="store_true", help="only the in-sample figures")
    ap.add_argument("--strict", action="store_true", help="sources keep no rule (LOFO)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    r = measure(args.corpus, lofo=not args.in_sample, strict=args.strict)
    if args.json:
        print(json.dumps(r.as_json(), indent=1))
    else:
        report(r)


if __name__ == "__main__":
    main()
