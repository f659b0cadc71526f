"""Engagement tokens, version 2 (docs/decisions/0011): round trips, nothing readable,
and every forgery — a changed, cut or added byte, another key or kid, another
version, a payload make() never writes — reads as nothing."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.campaigns import unsubscribe as v1
from postwarden.engagement import sealed
from postwarden.engagement.tokens import (
    KID_BYTES,
    MAX_URL,
    VERSION,
    Kind,
    Link,
    derive_key,
    kid_of,
    make,
    read,
)

KID, OTHER_KID = b"\x01\x02\x03\x04", b"\x09\x09\x09\x09"
KEY, OTHER_KEY = derive_key(b"a" * 32), derive_key(b"b" * 32)
URL = "https://shop.example/sale?utm_source=mail&id=42#top"


def keys(kid: bytes) -> bytes | None:
    return {KID: KEY, OTHER_KID: OTHER_KEY}.get(kid)


def raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


LINKS = [
    Link(Kind.OPEN, 7, 99, 0, "01a24dce8e326f1756a203"),
    Link(Kind.CLICK, 7, 99, 3, "01a24dce8e326f1756a203", URL),
    Link(Kind.CLICK, 7, 0, 1, "", "http://lab.test/ünïcode?q=1"),  # anonymous
    Link(Kind.UNSUBSCRIBE, 7, 99),
    Link(Kind.PREFERENCES, 0, 2**63 - 1),
]


@pytest.mark.parametrize("link", LINKS, ids=lambda link: link.kind.name)
def test_a_token_reads_back_as_its_link(link: Link) -> None:
    token = make(KID, KEY, link)
    assert read(token, keys) == link
    assert kid_of(token) == KID
    assert make(KID, KEY, link) == token  # deterministic: one token per link


def test_nothing_but_the_version_and_kid_is_readable() -> None:
    token = make(KID, KEY, LINKS[1])
    data = raw(token)
    assert data[0] == VERSION and data[1 : 1 + KID_BYTES] == KID
    for clear in (b"shop.example", b"utm_source", b"01a24dce", sealed.varint(99)):
        assert clear not in data[1 + KID_BYTES :]
    assert "shop" not in token and "utm" not in token


def test_the_key_of_the_kid_is_the_one_that_reads() -> None:
    token = make(KID, KEY, LINKS[1])
    assert read(token, lambda kid: OTHER_KEY) is None  # another key
    assert read(token, lambda kid: None) is None  # an unknown kid
    moved = sealed.spell(raw(token)[:1] + OTHER_KID + raw(token)[1 + KID_BYTES :])
    assert read(moved, keys) is None  # the kid is authenticated


def test_a_version_1_token_is_not_a_version_2_token() -> None:
    old = v1.make_token(KEY, 1, 7, 99)
    assert read(old, keys) is None and kid_of(old) is None
    assert v1.read_token(KEY, make(KID, KEY, LINKS[3])) is None


@pytest.mark.parametrize(
    "link",
    [
        Link(Kind.CLICK, 1, 1, 0, "", "javascript:alert(1)"),
        Link(Kind.CLICK, 1, 1, 0, "", "//evil.example/"),
        Link(Kind.CLICK, 1, 1, 0, "", "https://a.example/" + "x" * MAX_URL),
        Link(Kind.OPEN, 1, 1, 0, "", URL),  # only a click carries a URL
        Link(Kind.OPEN, -1),
        Link(Kind.OPEN, 2**63),
        Link(Kind.OPEN, True),  # type: ignore[arg-type]
        Link(Kind.OPEN, 1, 1, 0, "é"),
        Link(5, 1),  # type: ignore[arg-type]
    ],
)
def test_what_a_token_cannot_carry_is_refused(link: Link) -> None:
    with pytest.raises(ValueError):
        make(KID, KEY, link)


def test_a_bad_kid_or_key_is_refused() -> None:
    with pytest.raises(ValueError):
        make(b"\x01", KEY, LINKS[0])
    with pytest.raises(ValueError):
        make(KID, b"", LINKS[0])
    with pytest.raises(ValueError):
        derive_key(b"")


def test_a_valid_tag_over_a_payload_make_never_writes_is_refused() -> None:
    """Signed with the right key but not what make() writes: a padded varint, a URL
    on an open, an unknown kind, a message id running past the end, bytes after."""
    header = bytes([VERSION]) + KID
    for payload in (
        b"\x01\x87\x00\x63\x00\x00",  # padded varint
        b"\x01\x07\x63\x00\x00https://x.example/",  # an open with a URL
        b"\x09\x07\x63\x00\x00",  # unknown kind
        b"\x01\x07\x63\x00\x05ab",  # message id longer than what follows
        b"\x02\x07\x63\x00\x00ftp://x.example/",  # a click elsewhere than http(s)
        b"\x02\x07\x63\x00\x00\xff\xfe",  # not UTF-8
    ):
        token = sealed.spell(sealed.seal(KEY, header, payload))
        assert read(token, keys) is None, payload


@pytest.mark.parametrize(
    "junk", ["", "A", "!" * 40, "é" * 40, "A" * 40 + "\x00", "A" * 4000, None, 42]
)
def test_junk_reads_as_none(junk: object) -> None:
    assert read(junk, keys) is None
    assert kid_of(junk) is None


@settings(max_examples=150, deadline=None)
@given(
    link=st.sampled_from(LINKS),
    edit=st.sampled_from(["flip", "cut", "add"]),
    at=st.integers(min_value=0),
    byte=st.integers(min_value=1, max_value=255),
)
def test_any_changed_cut_or_added_byte_reads_as_nothing(
    link: Link, edit: str, at: int, byte: int
) -> None:
    data = bytearray(raw(make(KID, KEY, link)))
    i = at % len(data)
    if edit == "flip":
        data[i] ^= byte
    elif edit == "cut":
        del data[i]
    else:
        data.insert(i, byte)
    assert read(sealed.spell(bytes(data)), keys) is None


def test_one_spelling_per_token() -> None:
    """The unused low bits of the last base64url character must be zero."""
    token = make(KID, KEY, LINKS[0])
    spellings = [token[:-1] + c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"]
    readable = [t for t in spellings if read(t, keys) is not None]
    assert readable == [token]


def test_a_long_url_round_trips_through_the_counter_keystream() -> None:
    url = "https://shop.example/" + "p" * (MAX_URL - len("https://shop.example/"))
    link = Link(Kind.CLICK, 1, 2, 3, "m", url)
    assert read(make(KID, KEY, link), keys) == link
    stream = sealed.keystream(b"k" * 32, b"seed", 100)
    assert len(stream) == 100 and stream[:32] == sealed.keystream(b"k" * 32, b"seed", 32)
    assert stream[32:64] != stream[:32]
