"""The construction of every signed link Postwarden makes (List-Unsubscribe version 1,
engagement tokens version 2): deterministic authenticated encryption in the SIV way.
Pure.

For a key, two subkeys: ``mac = HMAC-SHA256(key, "mac")``, ``enc = HMAC-SHA256(key,
"enc")``. For a header (in clear, authenticated) and a payload::

    tag     HMAC-SHA256(mac, header || payload), first 16 bytes
    sealed  payload XOR keystream(enc, header || tag)

The tag is the IV of the keystream: the same payload always gives the same token, any
changed byte fails the tag, and nothing of the payload is readable. Tokens are spelled
in base64url without padding, and only that spelling reads (two spellings of one token
are not both taken).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re

#: Bytes of the truncated HMAC-SHA256 tag (128 bits).
TAG_BYTES = 16
#: Ids are 64-bit signed in every database: 0 .. 2**63 - 1.
MAX_ID = 2**63 - 1
#: Varint bytes of one id at most (63 bits, 7 a byte).
MAX_VARINT = 9
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_BLOCK = hashlib.sha256().digest_size


@functools.lru_cache(maxsize=64)
def subkeys(key: bytes) -> tuple[bytes, bytes]:
    """(mac key, enc key) of ``key``."""
    return (
        hmac.new(key, b"mac", hashlib.sha256).digest(),
        hmac.new(key, b"enc", hashlib.sha256).digest(),
    )


def varint(n: int) -> bytes:
    """``n`` (0 .. 2**63-1) as an unsigned LEB128 varint, its shortest spelling."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes, at: int) -> tuple[int, int] | None:
    """The varint at ``data[at:]`` and the offset after it; None unless it is a
    canonical spelling (no padding byte) of a number up to :data:`MAX_ID`."""
    n = shift = 0
    for size in range(1, MAX_VARINT + 1):
        if at >= len(data):
            return None
        byte = data[at]
        at += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if byte & 0x80:
            continue
        if size > 1 and byte == 0:  # a zero last byte: not the shortest spelling
            return None
        return (n, at) if n <= MAX_ID else None
    return None


def keystream(enc_key: bytes, seed: bytes, n: int) -> bytes:
    """``n`` bytes: HMAC-SHA256(enc, seed) for up to 32 bytes (version 1's whole
    stream), then HMAC-SHA256(enc, seed || counter) blocks, counter from 1."""
    first = hmac.new(enc_key, seed, hashlib.sha256).digest()
    if n <= _BLOCK:
        return first[:n]
    blocks = [first]
    for i in range(1, -(-n // _BLOCK)):
        blocks.append(hmac.new(enc_key, seed + i.to_bytes(4, "big"), hashlib.sha256).digest())
    return b"".join(blocks)[:n]


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def seal(key: bytes, header: bytes, payload: bytes) -> bytes:
    """``header || tag || sealed payload``."""
    mac_key, enc_key = subkeys(key)
    tag = hmac.new(mac_key, header + payload, hashlib.sha256).digest()[:TAG_BYTES]
    return header + tag + _xor(payload, keystream(enc_key, header + tag, len(payload)))


def unseal(key: bytes, header: bytes, rest: bytes) -> bytes | None:
    """The payload of ``rest`` (tag and sealed payload, after ``header``); None when
    the tag does not match (another key, a changed byte). Constant-time comparison."""
    if len(rest) < TAG_BYTES:
        return None
    mac_key, enc_key = subkeys(key)
    tag, sealed = rest[:TAG_BYTES], rest[TAG_BYTES:]
    payload = _xor(sealed, keystream(enc_key, header + tag, len(sealed)))
    want = hmac.new(mac_key, header + payload, hashlib.sha256).digest()[:TAG_BYTES]
    return payload if hmac.compare_digest(want, tag) else None


def spell(raw: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unspell(token: object, min_raw: int, max_raw: int) -> bytes | None:
    """The bytes of a token spelled by :func:`spell`, of ``min_raw`` to ``max_raw``
    bytes; None for anything else (other characters, a non-canonical spelling, a
    length out of range)."""
    if not isinstance(token, str):
        return None
    if not 4 * min_raw // 3 <= len(token) <= -(-4 * max_raw // 3):
        return None
    if not _B64URL.fullmatch(token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    # One spelling per token: the unused low bits of the last character must be zero.
    if spell(raw) != token or not min_raw <= len(raw) <= max_raw:
        return None
    return raw
