"""Engagement tokens, version 2 (docs/decisions/0011): the signed, sealed part of every
public link of a message — open pixel, click redirect, List-Unsubscribe, preference
center — under a tenant's link key. Pure: keys are passed in.

Format (bytes, then base64url without padding; :mod:`postwarden.engagement.sealed`)::

    version   1 byte, 0x02, in clear
    kid       4 bytes, in clear: which key (random and unique; names no tenant)
    tag       16 bytes
    sealed    the payload, sealed under the key (version and kid authenticated)
    payload   kind (1 byte), then varints: campaign id (0: none), contact id
              (0: anonymous), link index, length of the message id; the message id
              (ASCII); for a click, the destination URL (UTF-8, the rest)

A click's destination comes from the sealed payload and nowhere else. :func:`read`
gives back the link of a token made under the key its kid names, and None for anything
else: an unknown kid, another key, a changed, cut or added byte, another version, a
non-canonical spelling, a payload :func:`make` would not write.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from postwarden.engagement import sealed

VERSION = 2
KID_BYTES = 4
#: Domain separation: a link key is HMAC-SHA256(the tenant's secret, KEY_LABEL).
KEY_LABEL = b"postwarden engagement v2"
#: Longest destination URL a click token carries (bytes of UTF-8).
MAX_URL = 2048
#: Longest message id (RFC 5322 ids are ASCII; ours are 22 characters).
MAX_MESSAGE_ID = 255
_HEADER = 1 + KID_BYTES
_MIN_RAW = _HEADER + sealed.TAG_BYTES + 1 + 4
_MAX_RAW = _HEADER + sealed.TAG_BYTES + 1 + 3 * sealed.MAX_VARINT + 2 + MAX_MESSAGE_ID + MAX_URL


class Kind(enum.IntEnum):
    OPEN = 1
    CLICK = 2
    UNSUBSCRIBE = 3
    PREFERENCES = 4


@dataclass(frozen=True, slots=True)
class Link:
    """What a token names. ``contact_id`` 0 is an anonymous link (counts only);
    ``url`` is a click's destination and empty for every other kind."""

    kind: Kind
    campaign_id: int = 0
    contact_id: int = 0
    index: int = 0
    message_id: str = ""
    url: str = ""


def derive_key(secret: bytes) -> bytes:
    """The link key of a tenant key's secret (never used as is)."""
    if not secret:
        raise ValueError("engagement key secret is empty")
    return hmac.new(secret, KEY_LABEL, hashlib.sha256).digest()


def _check(link: Link) -> bytes:
    """The payload of ``link``; ValueError for what a token cannot carry."""
    if not isinstance(link.kind, Kind):
        raise ValueError(f"kind: expected a Kind, got {link.kind!r}")
    for name in ("campaign_id", "contact_id", "index"):
        value = getattr(link, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        if not 0 <= value <= sealed.MAX_ID:
            raise ValueError(f"{name} out of range: {value!r}")
    mid = link.message_id
    if not mid.isascii() or len(mid) > MAX_MESSAGE_ID:
        raise ValueError(f"message_id: ASCII of at most {MAX_MESSAGE_ID} characters")
    url = link.url.encode("utf-8")
    if link.kind is Kind.CLICK:
        if not link.url.lower().startswith(("https://", "http://")):
            raise ValueError(f"url: a click goes to an http(s) URL, got {link.url!r}")
        if len(url) > MAX_URL:
            raise ValueError(f"url: longer than {MAX_URL} bytes")
    elif url:
        raise ValueError(f"url: only a click carries one ({link.kind.name.lower()})")
    return b"".join(
        (
            bytes([link.kind]),
            sealed.varint(link.campaign_id),
            sealed.varint(link.contact_id),
            sealed.varint(link.index),
            sealed.varint(len(mid)),
            mid.encode("ascii"),
            url,
        )
    )


def make(kid: bytes, key: bytes, link: Link) -> str:
    """The token of ``link`` under ``key``, whose id is ``kid``."""
    if len(kid) != KID_BYTES:
        raise ValueError(f"kid: {KID_BYTES} bytes expected")
    if not key:
        raise ValueError("engagement key is empty")
    return sealed.spell(sealed.seal(key, bytes([VERSION]) + kid, _check(link)))


def kid_of(token: object) -> bytes | None:
    """The key id of a version 2 token (to look its key up), without checking it."""
    raw = sealed.unspell(token, _MIN_RAW, _MAX_RAW)
    if raw is None or raw[0] != VERSION:
        return None
    return raw[1:_HEADER]


def _parse(payload: bytes) -> Link | None:
    if not payload or payload[0] not in Kind._value2member_map_:
        return None
    kind = Kind(payload[0])
    at = 1
    numbers: list[int] = []
    for _ in range(4):
        got = sealed.read_varint(payload, at)
        if got is None:
            return None
        n, at = got
        numbers.append(n)
    campaign, contact, index, mid_len = numbers
    if mid_len > MAX_MESSAGE_ID or at + mid_len > len(payload):
        return None
    mid_bytes, url_bytes = payload[at : at + mid_len], payload[at + mid_len :]
    try:
        mid, url = mid_bytes.decode("ascii"), url_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return None
    link = Link(kind, campaign, contact, index, mid, url)
    try:  # only what make() writes reads back
        if _check(link) != payload:
            return None
    except ValueError:
        return None
    return link


def read(token: object, key_for: Callable[[bytes], bytes | None]) -> Link | None:
    """The link of a token; ``key_for(kid)`` gives the key of a kid (None: unknown)."""
    raw = sealed.unspell(token, _MIN_RAW, _MAX_RAW)
    if raw is None or raw[0] != VERSION:
        return None
    key = key_for(raw[1:_HEADER])
    if not key:
        return None
    payload = sealed.unseal(key, raw[:_HEADER], raw[_HEADER:])
    return None if payload is None else _parse(payload)
