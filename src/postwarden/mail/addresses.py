"""Strict parsing of email addresses given to the API.

email-validator does the RFC 5321/5322 syntax (dot-atom or quoted local part,
internationalized addresses, length limits); it is never asked to look anything up in
DNS. Domains under ``.test`` (RFC 2606) are allowed, for labs; other special-use names
(``.invalid``, ``localhost``, ``.local``…) are refused.
"""

from __future__ import annotations

import re

from email_validator import EmailNotValidError, validate_email


class AddressError(ValueError):
    """Not an address we would send to."""


def normalize_address(value: str) -> str:
    """The address with its domain in lower case (the local part is kept as given)."""
    if any(c in value for c in "\r\n\0"):
        raise AddressError("an address cannot contain CR, LF or NUL")
    try:
        result = validate_email(
            value,
            check_deliverability=False,
            allow_quoted_local=True,
            allow_domain_literal=False,
            test_environment=True,
        )
    except EmailNotValidError as exc:
        raise AddressError(str(exc)) from None
    return f"{result.local_part}@{result.domain.lower()}"


_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def suppression_key(address: str) -> str:
    """How suppressions compare addresses: one spelling for every way of writing the
    same mailbox, so that what was suppressed through the API is found whatever form
    an SMTP client uses. The whole address in lower case (mailbox providers treat local
    parts case-insensitively; so do ESP suppression lists), a quoted local part that
    needs no quotes without them (``"bob"@x`` is ``bob@x``), and the domain in Unicode
    (``xn--bcher-kva.example`` is ``bücher.example``)."""
    local, sep, domain = address.strip().rpartition("@")
    if not sep:
        return address.strip().lower()
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"' and _ATOMS.fullmatch(local[1:-1]):
        local = local[1:-1]
    domain = domain.rstrip(".").lower()
    if "xn--" in domain:
        try:
            domain = domain.encode("ascii").decode("idna")
        except UnicodeError:
            pass
    return f"{local}@{domain}".lower()
