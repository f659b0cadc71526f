"""List-Unsubscribe (RFC 2369, RFC 8058): the signed token of a campaign message's
unsubscribe links, and the header fields that carry them. Pure: the key is passed in.

A token names one recipient of one campaign: (tenant id, campaign id, contact id).
Format, version 1 (bytes, then base64url without padding)::

    version   1 byte, 0x01, in clear (a reader picks the format by it)
    tag       16 bytes: HMAC-SHA256(mac key, version || payload), first 128 bits
    sealed    payload XOR HMAC-SHA256(enc key, version || tag), as long as the payload
    payload   the three ids as unsigned LEB128 varints (1 to 9 bytes each)

The ids are sealed, not only signed: no id is readable in the link (deterministic
authenticated encryption in the SIV way — the tag is the IV of the keystream, so the
same recipient always gets the same token, and a change of any byte fails the tag).
The mac and enc keys are HMAC-SHA256(key, b"mac") and HMAC-SHA256(key, b"enc"): one
32-byte key in, two separate keys used. A token of small ids (tenant < 2**21,
campaign < 2**28, contact < 2**35) is 39 characters; the largest is 59.

:func:`read_token` gives back the ids of a token made under the same key, and None for
anything else: another key, a wrong version, a byte changed, cut or added, a
non-canonical base64url spelling (two spellings of one token are not both taken),
characters outside base64url. The tag is compared in constant time.

Growing (issue 22): a new format takes another version byte (a per-tenant key
generation could ride in it); version 1 stays readable while its mail is in inboxes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import NamedTuple

from postwarden.engagement import sealed

#: The version byte of the format above.
VERSION = 1
TAG_BYTES = sealed.TAG_BYTES
#: Domain separation: the token key is HMAC-SHA256(material, KEY_LABEL).
KEY_LABEL = b"postwarden list-unsubscribe v1"
MAX_ID = sealed.MAX_ID
_MAX_VARINT = sealed.MAX_VARINT
_MIN_RAW = 1 + TAG_BYTES + 3
_MAX_RAW = 1 + TAG_BYTES + 3 * _MAX_VARINT
#: Characters a URI in List-Unsubscribe may not hold (RFC 2369 encloses each in <>,
#: separated by commas; whitespace, quotes and controls are never part of a URI).
_NOT_IN_URI = re.compile(r'[\x00-\x20\x7f<>,"]')

HEADER = "List-Unsubscribe"
POST_HEADER = "List-Unsubscribe-Post"
#: RFC 8058's one value of List-Unsubscribe-Post, and the body of a one-click POST.
ONE_CLICK = "List-Unsubscribe=One-Click"


class Recipient(NamedTuple):
    """What a valid token names."""

    tenant_id: int
    campaign_id: int
    contact_id: int


def derive_key(material: bytes) -> bytes:
    """The token key made from a secret (the appliance's key material, never used as
    is): HMAC-SHA256(material, :data:`KEY_LABEL`)."""
    if not material:
        raise ValueError("list-unsubscribe key material is empty")
    return hmac.new(material, KEY_LABEL, hashlib.sha256).digest()


# The construction is shared with the engagement tokens (version 2).
_subkeys = sealed.subkeys
_varint = sealed.varint


def _read_varints(data: bytes) -> list[int] | None:
    """The ids of a payload; None unless it is exactly three canonical varints."""
    ids: list[int] = []
    at = 0
    while at < len(data):
        got = sealed.read_varint(data, at)
        if got is None:
            return None
        n, at = got
        ids.append(n)
    return ids if len(ids) == 3 else None


def make_token(key: bytes, tenant_id: int, campaign_id: int, contact_id: int) -> str:
    """The token of one recipient of one campaign under ``key`` (see the module's
    docstring). Raises ``ValueError`` for an empty key or an id outside 0 .. 2**63-1."""
    if not key:
        raise ValueError("list-unsubscribe token key is empty")
    ids = (tenant_id, campaign_id, contact_id)
    for name, value in zip(("tenant", "campaign", "contact"), ids, strict=True):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
            raise ValueError(f"{name} id out of range: {value!r}")
    payload = b"".join(_varint(i) for i in ids)
    return sealed.spell(sealed.seal(key, bytes([VERSION]), payload))


def read_token(key: bytes, token: str) -> Recipient | None:
    """The recipient a token of ``key`` names; None for anything else (forged,
    altered, malformed, another version or key)."""
    if not key:
        return None
    raw = sealed.unspell(token, _MIN_RAW, _MAX_RAW)
    if raw is None or raw[0] != VERSION:
        return None
    payload = sealed.unseal(key, raw[:1], raw[1:])
    if payload is None:
        return None
    ids = _read_varints(payload)
    if ids is None:  # never made by make_token: a key shared with something else
        return None
    return Recipient(*ids)


def _check_uri(uri: str, what: str) -> str:
    if not uri or _NOT_IN_URI.search(uri) or not uri.isascii():
        raise ValueError(f"{what}: not a URI that List-Unsubscribe can carry: {uri!r}")
    return uri


def headers(https_url: str, mailto_address: str | None = None) -> list[tuple[str, str]]:
    """The header fields of a message with these unsubscribe addresses, in this order
    (RFC 2369: the first is preferred; RFC 8058 needs the HTTPS one)::

        List-Unsubscribe: <https://…>, <mailto:…>
        List-Unsubscribe-Post: List-Unsubscribe=One-Click

    ``https_url`` must be ``https://`` (``http://`` is taken for labs on loopback;
    the campaign check refuses it elsewhere). Raises ``ValueError`` for a value the
    field cannot carry (whitespace, ``<>``, ``,``, quotes, controls, non-ASCII)."""
    _check_uri(https_url, "https_url")
    if not https_url.lower().startswith(("https://", "http://")):
        raise ValueError(f"https_url: expected an https:// URL, got {https_url!r}")
    uris = [f"<{https_url}>"]
    if mailto_address:
        _check_uri(mailto_address, "mailto_address")
        local, at, domain = mailto_address.rpartition("@")
        if not at or not local or not domain:
            raise ValueError(f"mailto_address: not an address: {mailto_address!r}")
        uris.append(f"<mailto:{mailto_address}>")
    return [(HEADER, ", ".join(uris)), (POST_HEADER, ONE_CLICK)]
