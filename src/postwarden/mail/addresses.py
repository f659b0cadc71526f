"""Strict parsing of email addresses given to the API.

email-validator does the RFC 5321/5322 syntax (dot-atom or quoted local part,
internationalized addresses, length limits); it is never asked to look anything up in
DNS. Domains under ``.test`` (RFC 2606) are allowed, for labs; other special-use names
(``.invalid``, ``localhost``, ``.local``…) are refused.
"""

from __future__ import annotations

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


def suppression_key(address: str) -> str:
    """How suppressions compare addresses: the whole address in lower case (mailbox
    providers treat local parts case-insensitively; so do ESP suppression lists)."""
    return address.strip().lower()


def is_ascii(address: str) -> bool:
    return address.isascii()
