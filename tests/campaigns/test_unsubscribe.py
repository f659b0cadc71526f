"""List-Unsubscribe tokens and fields: a token reads back under its key only; every
change of a character, a cut, an addition, another key or version reads as None; no
id shows in the token; the fields have RFC 2369 / RFC 8058's shape and refuse what
they cannot carry."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.campaigns.unsubscribe import (
    KEY_LABEL,
    MAX_ID,
    ONE_CLICK,
    Recipient,
    derive_key,
    headers,
    make_token,
    read_token,
)

KEY = derive_key(b"k" * 32)
OTHER = derive_key(b"j" * 32)
B64URL = re.compile(r"[A-Za-z0-9_-]+")
ids = st.integers(min_value=0, max_value=MAX_ID)


def _raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def _spell(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_derive_key_is_a_labelled_hmac_not_the_material() -> None:
    material = b"m" * 32
    assert derive_key(material) == hmac.new(material, KEY_LABEL, hashlib.sha256).digest()
    assert derive_key(material) != material
    with pytest.raises(ValueError):
        derive_key(b"")


@settings(max_examples=300, deadline=None)
@given(ids, ids, ids)
def test_round_trip_url_safe_and_compact(tenant: int, campaign: int, contact: int) -> None:
    token = make_token(KEY, tenant, campaign, contact)
    assert B64URL.fullmatch(token)
    assert len(token) <= 59
    assert read_token(KEY, token) == Recipient(tenant, campaign, contact)
    assert read_token(OTHER, token) is None
    # The same recipient always gets the same token (the link in every copy is one).
    assert make_token(KEY, tenant, campaign, contact) == token


def test_small_ids_make_a_short_token() -> None:
    assert len(make_token(KEY, 2**21 - 1, 2**28 - 1, 2**35 - 1)) == 39
    assert len(make_token(KEY, 1, 1, 1)) == 27


def test_no_id_is_readable_in_the_token() -> None:
    """The ids are sealed: two tokens that differ in one id share no payload byte
    pattern, and the varints of the ids are not in the decoded bytes."""
    from postwarden.campaigns import unsubscribe as u

    tenant, campaign, contact = 77, 424242, 98765432
    raw = _raw(make_token(KEY, tenant, campaign, contact))
    for n in (campaign, contact):
        assert u._varint(n) not in raw
    for n in (tenant, campaign, contact):
        assert str(n).encode() not in raw
        assert str(n) not in make_token(KEY, tenant, campaign, contact)
    # Only the version byte is in clear.
    assert raw[0] == 1
    other = _raw(make_token(KEY, tenant, campaign, contact + 1))
    assert raw[17:] != other[17:] and raw[1:17] != other[1:17]


def test_every_character_changed_reads_as_none() -> None:
    token = make_token(KEY, 3, 1_000_000, 123_456_789)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    tried = 0
    for i, ch in enumerate(token):
        for other in alphabet:
            if other == ch:
                continue
            altered = token[:i] + other + token[i + 1 :]
            assert read_token(KEY, altered) is None, (i, other)
            tried += 1
    assert tried == len(token) * 63


def test_every_bit_of_every_byte_flipped_reads_as_none() -> None:
    raw = _raw(make_token(KEY, 9, 8, 7))
    for i in range(len(raw)):
        for bit in range(8):
            altered = bytearray(raw)
            altered[i] ^= 1 << bit
            assert read_token(KEY, _spell(bytes(altered))) is None, (i, bit)


def test_cut_extended_or_spliced_tokens_read_as_none() -> None:
    token = make_token(KEY, 1, 2, 3)
    raw = _raw(token)
    for n in range(len(token)):
        assert read_token(KEY, token[:n]) is None
    for extra in ("A", "AA", "AAAA", "-", "=", "==", " ", "\n", "%3D"):
        assert read_token(KEY, token + extra) is None
        assert read_token(KEY, extra + token) is None
    assert read_token(KEY, _spell(raw + b"\x00")) is None
    assert read_token(KEY, _spell(raw[:-1])) is None
    # The tag of one token with the sealed ids of another.
    other = _raw(make_token(KEY, 1, 2, 4))
    assert read_token(KEY, _spell(raw[:17] + other[17:])) is None
    assert read_token(KEY, _spell(other[:17] + raw[17:])) is None


def test_a_second_spelling_of_the_same_bytes_is_refused() -> None:
    """The last character of a token whose length is not a multiple of 4 has unused
    low bits: base64 decoders take any value there, the reader does not."""
    token = make_token(KEY, 1, 2, 3)
    unused = len(token) * 6 % 8  # 27 characters, 20 bytes: 2 unused bits
    assert unused
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    same = [c for c in alphabet if alphabet.index(c) >> unused == last >> unused and c != token[-1]]
    assert same  # spellings that decode to the same bytes
    for c in same:
        assert _raw(token[:-1] + c) == _raw(token)
        assert read_token(KEY, token[:-1] + c) is None


def test_wrong_version_reads_as_none_even_with_a_valid_tag() -> None:
    """A token of another version, its tag computed right for the other version
    byte, is still refused: the version is checked, not only the tag."""
    from postwarden.campaigns import unsubscribe as u

    raw = _raw(make_token(KEY, 1, 2, 3))
    mac_key, enc_key = u._subkeys(KEY)
    payload = bytes([1, 2, 3])
    for version in (0, 2, 255):
        header = bytes([version])
        tag = hmac.new(mac_key, header + payload, hashlib.sha256).digest()[:16]
        stream = hmac.new(enc_key, header + tag, hashlib.sha256).digest()[:3]
        sealed = bytes(a ^ b for a, b in zip(payload, stream, strict=True))
        assert read_token(KEY, _spell(header + tag + sealed)) is None
        assert read_token(KEY, _spell(header + raw[1:])) is None


def test_a_valid_tag_over_a_non_canonical_payload_is_refused() -> None:
    """What make_token never writes (a padded varint, two or four ids) does not read,
    even signed with the right key."""
    from postwarden.campaigns import unsubscribe as u

    mac_key, enc_key = u._subkeys(KEY)
    header = b"\x01"
    for payload in (
        b"\x81\x00\x02\x03",
        b"\x01\x02",
        b"\x01\x02\x03\x04",
        b"\xff" * 9 + b"\x01\x01",
    ):
        tag = hmac.new(mac_key, header + payload, hashlib.sha256).digest()[:16]
        stream = hmac.new(enc_key, header + tag, hashlib.sha256).digest()[: len(payload)]
        sealed = bytes(a ^ b for a, b in zip(payload, stream, strict=True))
        assert read_token(KEY, _spell(header + tag + sealed)) is None, payload


@pytest.mark.parametrize(
    "junk",
    ["", "A", "!" * 30, "é" * 30, "A" * 27 + "\x00", "A" * 100, "AAAA" * 7, "/u/" + "A" * 30],
)
def test_junk_reads_as_none(junk: str) -> None:
    assert read_token(KEY, junk) is None


def test_empty_key_and_bad_ids_are_refused() -> None:
    token = make_token(KEY, 1, 2, 3)
    assert read_token(b"", token) is None
    with pytest.raises(ValueError):
        make_token(b"", 1, 2, 3)
    for bad in (-1, MAX_ID + 1, True, 1.0, "1"):
        with pytest.raises(ValueError):
            make_token(KEY, 1, bad, 3)  # type: ignore[arg-type]


def test_headers_shape() -> None:
    url = "https://mail.example.com/u/AbC-_1"
    fields = headers(url, "unsubscribe+AbC-_1@pwb.example.com")
    assert fields == [
        (
            "List-Unsubscribe",
            "<https://mail.example.com/u/AbC-_1>, <mailto:unsubscribe+AbC-_1@pwb.example.com>",
        ),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ]
    assert ONE_CLICK == "List-Unsubscribe=One-Click"
    assert headers(url) == [
        ("List-Unsubscribe", f"<{url}>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ]


@pytest.mark.parametrize(
    ("url", "mailto"),
    [
        ("ftp://x/u/a", None),
        ("mailto:a@b", None),
        ("https://x/u/a b", None),
        ("https://x/u/a>", None),
        ("https://x/u/a,b", None),
        ("https://x/u/a\r\nBcc: x@y", None),
        ("https://x/u/é", None),
        ("", None),
        ("https://x/u/a", "no-at-sign"),
        ("https://x/u/a", "a@b>, <https://evil"),
        ("https://x/u/a", "a@b\nX: y"),
        ("https://x/u/a", "@b"),
    ],
)
def test_headers_refuse_what_the_field_cannot_carry(url: str, mailto: str | None) -> None:
    with pytest.raises(ValueError):
        headers(url, mailto)
