"""Where a rule of the bounce classifier comes from, so that its generalization can be
measured: leave one family of reports out, and score that family with no rule that was
written from its files (docs/bounces.md, "Measuring generalization").

A rule's ``from`` names its provenance with two kinds of tag:

- a **family**: the reporting MTA or provider of the development corpus's files it was
  written from, as the files are named (``lhost-exim``, ``rhost-franceptt``,
  ``flufl-simple``; ``rfc3464``, ``rfc3834`` and ``arf`` are Sisimai's sets of reports
  that name no MTA);
- a **source** outside the corpus: an RFC (``rfc3463``) or a named list
  (``sisimai:reason/filtered``, ``provider:google``).

A rule is left out for a set of excluded families when it has a family tag, all of its
family tags are excluded, and it has no source tag. A rule without ``from`` is general.

Rules written in code rather than in the patterns file (a gateway's header fields,
Sendmail's pipelining) are registered in :data:`SWITCHES` with the same tags; the code
asks :func:`switch_on`. Nothing is excluded in production, and then nothing is asked of
this module beyond an empty-set test.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: A family of the corpus: ``lhost-NAME``, ``rhost-NAME``, ``flufl-NAME`` or one of
#: Sisimai's sets of reports that name no MTA.
FAMILY_RE = re.compile(r"(?:lhost|rhost|flufl)-[a-z0-9]+|rfc3464|rfc3834|arf")
#: A source outside the corpus: ``rfcNNNN``, or ``kind:detail`` (``sisimai:reason/x``,
#: ``provider:google``).
SOURCE_RE = re.compile(r"rfc[0-9]{3,5}|[a-z][a-z0-9-]*:[a-z0-9][a-z0-9/._+-]*")

NOTHING: frozenset[str] = frozenset()

#: Rules written in code from one family's files: name -> its tags (as ``from``).
SWITCHES: dict[str, frozenset[str]] = {
    # Content-filtering gateways that write their own reports, by the header fields
    # they add (parse/headers.py): what they refuse, they refused after reading it.
    "gateway-mcafee": frozenset({"lhost-mcafee"}),
    "gateway-surfcontrol": frozenset({"lhost-surfcontrol"}),
    "gateway-m-filter": frozenset({"lhost-mfilter"}),
    "gateway-mailfoundry": frozenset({"lhost-mailfoundry"}),
    # Sendmail prints pipelined RCPT refusals after ">>> DATA" (parse/judge.py).
    "sendmail-pipelining": frozenset({"lhost-sendmail"}),
}


def is_family(tag: str) -> bool:
    return FAMILY_RE.fullmatch(tag) is not None


def tags_of(value: object, path: str, error: type[Exception] = ValueError) -> frozenset[str]:
    """The tags of a ``from`` value (a list of strings), each a family or a source;
    anything else raises ``error`` naming ``path``."""
    if not isinstance(value, list):
        raise error(f"{path}: expected a list of families and sources")
    for i, tag in enumerate(value):
        if not isinstance(tag, str):
            raise error(f"{path}[{i}]: expected a string: {tag!r}")
        if not (FAMILY_RE.fullmatch(tag) or SOURCE_RE.fullmatch(tag)):
            raise error(
                f"{path}[{i}]: {tag!r} is neither a family (lhost-NAME, rhost-NAME, "
                "flufl-NAME, rfc3464, rfc3834, arf) nor a source (rfcNNNN, kind:detail)"
            )
    return frozenset(value)


def excluded_families(families: Iterable[str]) -> frozenset[str]:
    """``families`` as a set, each checked to be a family name."""
    out = frozenset(families)
    bad = sorted(f for f in out if not is_family(f))
    if bad:
        raise ValueError(f"not a family name: {bad[0]!r}")
    return out


def left_out(tags: frozenset[str], excluded: frozenset[str], *, strict: bool = False) -> bool:
    """Whether a rule with these tags is left out when ``excluded`` families are: it
    has tags and every one is an excluded family (so none is a source). ``strict``:
    its source tags do not keep it (what the sources carry, measured)."""
    if not excluded or not tags:
        return False
    if strict:
        tags = frozenset(t for t in tags if is_family(t))
    return bool(tags) and tags <= excluded


def switch_on(name: str, excluded: frozenset[str]) -> bool:
    """Whether the code-level rule ``name`` (:data:`SWITCHES`) applies."""
    return not excluded or not left_out(SWITCHES[name], excluded)
