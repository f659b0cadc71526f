"""One classifier for every failure: SMTP answers during delivery and the status and
diagnostic text of bounce messages (docs/bounces.md).

It decides in this order:

1. an enhanced status code (RFC 3463) precise enough to name the cause (``5.1.1``,
   ``5.2.2``, ``5.7.26`` ...): ``[[codes]]`` of the patterns file; except that a
   *strong* text rule (``strong = true``: a blocklist's name, DMARC, "user unknown")
   overrules the code, because servers answer 5.1.1 or 5.7.1 to nearly anything;
2. the diagnostic text against the other ``[[texts]]`` regular expressions, in file
   order (the operator's file first, then the shipped one), for the many answers
   whose code is vague (``5.7.1``, ``5.0.0``, ``550`` alone);
3. the code's subject alone (RFC 3463 section 3): ``X.7`` a policy refusal, ``X.6`` a
   content one;
4. the basic reply code (``[[replies]]``);
5. ``other``.

Then the SMTP stage: a refusal at MAIL FROM or at the greeting concerns the sender
(``policy_blocked``), and an address-like refusal at the end of DATA comes from a
content filter (``filtered`` for "user unknown", else ``policy_blocked``); neither says
the recipient's address is bad, unless the enhanced code itself names the address
(:data:`_ADDRESS_CODES`).

A category is *hard* only when it says the address itself cannot receive mail
(:data:`HARD`), the failure was permanent, and more than a basic reply code decided
it (:attr:`Verdict.basis`, :attr:`Verdict.weak`). A policy, reputation or content block
is soft even with a 5xx code: suppressing its address would throw away a good address.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from postwarden.bounces.provenance import excluded_families, left_out, tags_of

CATEGORIES = (
    "user_unknown",
    "mailbox_full",
    "mailbox_disabled",
    "domain_not_found",
    "no_mx",
    "null_mx",
    "policy_blocked",
    "filtered",
    "spam_content",
    "authentication_failed",
    "rate_limited",
    "message_too_big",
    "relay_denied",
    "expired",
    "network",
    "timeout",
    "other",
)
#: What an enhanced code's subject (RFC 3463 section 3) says when no rule names its
#: code: X.7 security or policy status, X.6 message content or media status.
_SUBJECTS = {"7": "policy_blocked", "6": "spam_content"}
#: Enhanced codes that name the recipient's address as the cause, by category: X.1.0
#: other address status, X.1.1 bad destination mailbox, X.1.3 bad destination mailbox
#: syntax, X.1.6 destination mailbox has moved (RFC 3463), X.7.13 user account
#: disabled (RFC 5248's registry). With one of these an answer is about the address
#: at any stage, the end of DATA included.
_ADDRESS_CODES = {
    "user_unknown": frozenset({"5.1.0", "5.1.1", "5.1.3", "5.1.6"}),
    "mailbox_disabled": frozenset({"5.7.13"}),
}
#: The address itself is undeliverable: a permanent failure of these suppresses it.
HARD = frozenset({"user_unknown", "domain_not_found", "no_mx", "null_mx"})

# An enhanced status code standing alone (not part of an IP address or version).
STATUS_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d]|\.\d)")
# A reply code and the enhanced code after it: "550 5.1.1", "550-5.1.1", "550 #5.1.1".
REPLY_STATUS_RE = re.compile(
    r"(?<![\d.])([245]\d\d)[ -]['\"#]?([245]\.\d{1,3}\.\d{1,3})(?![\d]|\.\d)"
)
# A reply code at the start of a line or after "said:" and the like.
REPLY_RE = re.compile(r"(?:^|[\s:(\[\"'=])([245][0-5]\d)(?:[ -](?=\D)|$)", re.M)


# Where in the SMTP dialogue the failure happened, as bounce texts tell it.
_STAGES = (
    (
        "data",
        r"\b(after|in reply to|response to|rejected after|did not like our) (the )?(final )?"
        r"(end of )?(data|message body|dot)\b|\bend of data\b|\bdata command\b|"
        r"\bfailed after i sent the message\b|"
        r"\bsmtp command\W{0,20}\n?\s*data\b",
    ),
    (
        "mail",
        r"\b(after|in reply to|response to|did not like our) (the )?mail from\b|"
        r"\bmail from command|\bsender address rejected|\bsender (was )?rejected",
    ),
    (
        "rcpt",
        r"\b(after|in reply to|response to|did not like our) (the )?rcpt( to)?\b|"
        r"\brcpt to (command|response)|\brecipient address rejected|"
        r"\bdoes not like recipient\b",
    ),
    (
        "connect",
        r"\bafter (the )?initial connection|\b(in reply to|after) (the )?(ehlo|helo)\b|"
        r"\bmy name was rejected|\bgreeting\b",
    ),
)
_TRANSCRIPT_RE = re.compile(
    r">>> ?(MAIL\s+FROM|RCPT\s+TO|DATA|EHLO|HELO)[^\n]{0,1000}\n(?:[^\n]{0,1000}\n)?<<< ?[45]\d\d",
    re.I,
)
# A space in these patterns matches any run of white space: MTAs wrap their lines
# anywhere ("in reply to\n    RCPT TO command").
_STAGE_RES = [(name, re.compile(rx.replace(" ", r"\s+"), re.I)) for name, rx in _STAGES]


def find_stage(text: str, *, transcript_only: bool = False) -> str | None:
    """The SMTP stage a bounce text names ("after RCPT TO", "in reply to end of DATA
    command", a transcript's last ">>> COMMAND")."""
    # A transcript: the command right before the first failing answer.
    m = _TRANSCRIPT_RE.search(text)
    if m:
        cmd = re.sub(r"\s+", " ", m.group(1).upper())
        return {"MAIL FROM": "mail", "RCPT TO": "rcpt", "DATA": "data"}.get(cmd, "connect")
    if transcript_only:
        return None
    for name, rx in _STAGE_RES:
        if rx.search(text):
            return name
    return None


class PatternsError(ValueError):
    """A patterns file is malformed; the message names the file, entry and key."""


@dataclass(frozen=True)
class Verdict:
    category: str
    hard: bool
    status: str | None  # the enhanced code given, found in the text, or implied
    reply_code: int | None
    #: The text rule that decided names the address whatever the command (any_stage).
    any_stage: bool = False
    #: What decided the category: a text rule or a precise code (``text``, ``code``),
    #: the code's subject (``subject``), the basic reply code alone (``reply``), or
    #: nothing (``none``: ``other``, "we could not tell").
    basis: str = "none"

    @property
    def weak(self) -> bool:
        """Whether the evidence is weak: nothing or only a basic reply code decided, or
        an address-like answer nothing confirms (``filtered``)."""
        return self.basis in ("reply", "none") or self.category == "filtered"


@dataclass(frozen=True)
class _TextRule:
    category: str
    regex: re.Pattern[str]
    strong: bool = False
    any_stage: bool = False
    #: Where the rule comes from (``from``: families and sources, provenance.py).
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Rules:
    """A patterns file's entries in file order, each with its ``from`` tags."""

    codes: tuple[tuple[str, str, frozenset[str]], ...]
    texts: tuple[_TextRule, ...]
    replies: tuple[tuple[int, str, frozenset[str]], ...]


def _first(rx: re.Pattern[str], text: str, group: int) -> str | None:
    """The first match's group, a failure (4xx/5xx) before a success: in a transcript
    ("250 2.1.5 Ok ... 451 4.3.0 Error") the failure is what counts."""
    found = None
    for m in rx.finditer(text):
        value = m.group(group)
        if value[0] in "45":
            return value
        found = found or value
    return found


def find_status(text: str) -> str | None:
    """The enhanced status code in a diagnostic text, preferring one right after a
    reply code ("550 5.1.1 ...") over any other, and a failure over a success."""
    return _prefer_failure(_first(REPLY_STATUS_RE, text, 2), _first(STATUS_RE, text, 0))


def find_reply_code(text: str) -> int | None:
    code = _prefer_failure(_first(REPLY_STATUS_RE, text, 1), _first(REPLY_RE, text, 1))
    return int(code) if code else None


def _prefer_failure(a: str | None, b: str | None) -> str | None:
    for v in (a, b):
        if v and v[0] in "45":
            return v
    return a or b


def _load(data: dict[str, Any], where: str) -> _Rules:
    codes: list[tuple[str, str, frozenset[str]]] = []
    texts: list[_TextRule] = []
    replies: list[tuple[int, str, frozenset[str]]] = []
    unknown = set(data) - {"codes", "texts", "replies"}
    if unknown:
        raise PatternsError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    for kind in ("codes", "texts", "replies"):
        for i, entry in enumerate(data.get(kind, [])):
            path = f"{where}: {kind}[{i}]"
            if not isinstance(entry, dict):
                raise PatternsError(f"{path}: expected a table")
            cat = entry.get("category")
            if cat not in CATEGORIES:
                raise PatternsError(f"{path}.category: unknown category {cat!r}")
            key = "patterns" if kind == "texts" else "codes"
            extra = set(entry) - {"category", key, "strong", "any_stage", "from"}
            if extra:
                raise PatternsError(f"{path}: unknown key {sorted(extra)[0]!r}")
            tags = tags_of(entry.get("from", []), f"{path}.from", PatternsError)
            values = entry.get(key)
            if not isinstance(values, list):
                raise PatternsError(f"{path}.{key}: expected a list")
            for j, v in enumerate(values):
                if kind == "texts":
                    try:
                        rx = re.compile(str(v), re.I)
                        texts.append(
                            _TextRule(
                                cat,
                                rx,
                                bool(entry.get("strong", False)),
                                bool(entry.get("any_stage", False)),
                                tags,
                            )
                        )
                    except re.error as exc:
                        raise PatternsError(f"{path}.patterns[{j}]: {exc}") from exc
                elif kind == "codes":
                    if not isinstance(v, str) or not STATUS_RE.fullmatch(v):
                        raise PatternsError(f"{path}.codes[{j}]: not a status code: {v!r}")
                    codes.append((v, cat, tags))
                else:
                    if not isinstance(v, int) or not 200 <= v <= 599:
                        raise PatternsError(f"{path}.codes[{j}]: not a reply code: {v!r}")
                    replies.append((v, cat, tags))
    return _Rules(tuple(codes), tuple(texts), tuple(replies))


@functools.cache
def _shipped_rules() -> _Rules:
    """The shipped patterns file, read and compiled once (every Classifier shares it)."""
    shipped = resources.files(__package__).joinpath("patterns.toml").read_text()
    return _load(tomllib.loads(shipped), "patterns.toml")


class Classifier:
    def __init__(
        self,
        patterns_file: str | Path | None = None,
        *,
        exclude_families: Iterable[str] = (),
        strict: bool = False,
    ) -> None:
        """The operator's rules (``patterns_file``) before the shipped ones.
        ``exclude_families``: leave out every rule written from those families' files
        only (provenance.py), to measure how the rest generalizes; empty in production.
        ``strict``: leave out such rules even when a source backs them too (what the
        sources carry, measured)."""
        self.exclude_families = excluded_families(exclude_families)
        self.codes: dict[str, str] = {}
        self.texts: list[_TextRule] = []
        self.replies: dict[int, str] = {}
        #: How many rules (patterns, codes, reply codes) the exclusion left out.
        self.rules_left_out = 0
        sources: list[_Rules] = []
        if patterns_file:
            path = Path(patterns_file)
            try:
                data = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise PatternsError(f"{path}: {exc}") from exc
            sources.append(_load(data, str(path)))
        sources.append(_shipped_rules())
        out = self.exclude_families

        for rules in sources:  # the operator's first: its entries win
            for code, cat, tags in rules.codes:
                if left_out(tags, out, strict=strict):
                    self.rules_left_out += 1
                else:
                    self.codes.setdefault(code, cat)
            for rule in rules.texts:
                if left_out(rule.tags, out, strict=strict):
                    self.rules_left_out += 1
                else:
                    self.texts.append(rule)
            for reply, cat, tags in rules.replies:
                if left_out(tags, out, strict=strict):
                    self.rules_left_out += 1
                else:
                    self.replies.setdefault(reply, cat)

    def rule_of_text(self, text: str, *, strong: bool | None = None) -> _TextRule | None:
        """The first rule matching ``text``: among strong rules only, weak ones only, or
        all (``strong=None``)."""
        for rule in self.texts:
            if strong is not None and rule.strong != strong:
                continue
            if rule.regex.search(text):
                return rule
        return None

    def classify(
        self,
        status: str | None = None,
        reply_code: int | None = None,
        text: str = "",
        *,
        permanent: bool | None = None,
        stage: str | None = None,
    ) -> Verdict:
        """Judge one failure. ``status`` and ``reply_code`` are found in ``text`` when
        not given; ``permanent`` says whether the failure was final when neither code
        tells (a bounce message that gave up); ``stage`` is the SMTP command answered
        (``mail``, ``rcpt``, ``data``, ``connect``), found in the text when not given.

        An answer about the address at MAIL FROM concerns the sender, and one at the
        end of DATA comes from a content filter: neither says the recipient's address
        is bad, so neither is hard."""
        if status is None:
            status = find_status(text)
        if reply_code is None:
            reply_code = find_reply_code(text)
        # Rules read the text with its line breaks as spaces: MTAs wrap anywhere.
        flat = _SPACES_RE.sub(" ", text)
        rule = self.rule_of_text(flat, strong=True) if text else None
        category = rule.category if rule else None
        basis = "text"
        if category is None and status:
            category, basis = self.codes.get(status), "code"
        if category is None and text:
            rule = self.rule_of_text(flat, strong=False)
            category, basis = (rule.category if rule else None), "text"
        if category is None and status:
            # RFC 3463: the subject digit alone says what kind of failure it is; a
            # security or policy status (X.7.x) or a content one (X.6.x) is never
            # about the address, whatever the basic reply code.
            category, basis = _SUBJECTS.get(status.split(".")[1]), "subject"
        if category is None and reply_code is not None:
            category, basis = self.replies.get(reply_code), "reply"
        if category is None:
            category, basis = "other", "none"
        if stage is None:
            stage = find_stage(text)
        any_stage = rule is not None and rule.any_stage and rule.category == category
        if any_stage:
            stage = None  # an answer that names the address, whatever the command
        if stage == "mail" and category in _ADDRESS_CATEGORIES | {"other"}:
            category = "policy_blocked"
        elif (
            stage == "data"
            and category in _ADDRESS_CATEGORIES
            and status not in _ADDRESS_CODES.get(category, ())
        ):
            # A content filter's answer, in the words of an address refusal.
            category = "filtered" if category == "user_unknown" else "policy_blocked"
        elif stage == "connect" and category in _ADDRESS_CATEGORIES | {"other"}:
            category = "policy_blocked"
        if status is not None:
            final = status[0] == "5"
        elif reply_code is not None:
            final = reply_code >= 500
        else:
            final = permanent if permanent is not None else True
        if not final and category in ("domain_not_found", "no_mx"):
            category = "network"
        if status is None:
            status = (
                f"{reply_code // 100}.0.0"
                if reply_code is not None
                else implied_status(category, final)
            )
        # A basic reply code alone is weak evidence (RFC 5321's 550 is also a refusal
        # "for policy reasons"): never a hard bounce.
        hard = category in HARD and final and basis not in ("reply", "none")
        return Verdict(category, hard, status, reply_code, any_stage, basis)


_SPACES_RE = re.compile(r"\s+")
_ADDRESS_CATEGORIES = frozenset({"user_unknown", "mailbox_disabled", "domain_not_found"})

# The code a failure stands for when its report gave none.
_IMPLIED = {
    "user_unknown": "1.1",
    "mailbox_full": "2.2",
    "mailbox_disabled": "2.1",
    "domain_not_found": "1.2",
    "no_mx": "1.2",
    "null_mx": "1.10",
    "message_too_big": "3.4",
    "relay_denied": "7.1",
    "authentication_failed": "7.26",
    "rate_limited": "7.28",
    "expired": "4.7",
    "network": "4.0",
    "timeout": "4.2",
    "policy_blocked": "7.1",
    "spam_content": "7.1",
}


def implied_status(category: str, final: bool) -> str:
    return f"{5 if final else 4}.{_IMPLIED.get(category, '0.0')}"


@functools.cache
def _shipped() -> Classifier:
    return Classifier(None)


def default_classifier(patterns_file: str = "") -> Classifier:
    """The shipped rules (built once), or with an operator's file read afresh, so that
    a reload picks up the file's new contents."""
    return Classifier(patterns_file) if patterns_file else _shipped()
