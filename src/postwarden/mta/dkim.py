"""DKIM signing at acceptance: rsa-sha256 and ed25519-sha256 (RFC 6376, RFC 8463).

dkimpy does the parts where correctness is subtle and already verified by its
users — header parsing, relaxed header canonicalization, header selection, the
header hash input and folding. The body is canonicalized here with whole-body byte
operations (dkimpy works line by line; a test checks both agree), and OpenSSL
(through ``cryptography``) does the private-key operation with the parsed key
cached: dkimpy's pure-Python RSA costs about 6 ms a signature on these machines,
OpenSSL well under 1 ms, and it releases the GIL, so :meth:`DkimSigner.sign_async`
runs it in a thread beside the event loop. PKCS#1 v1.5 is deterministic, so a test
compares our RSA signature byte for byte with dkimpy's own.

A message is signed once, by every key configured for its signing domain (RSA and
Ed25519 together when both exist), relaxed/relaxed, over the headers in
:data:`SIGNED_HEADERS` that the message has. The signing domain is not read here: the
cleanup stage (``mail/cleanup.py``) parses From once and decides it, and hands the
signer the parsed header fields with it. The fields in :data:`OVERSIGNED` are signed
once more than they occur, so that none can be added without breaking the signature.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

log = logging.getLogger("postwarden.dkim")

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

#: Header fields signed when present (lower case). From is oversigned.
SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "sender",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "to",
    "cc",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-language",
    "in-reply-to",
    "references",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
)
#: Signed once more than they occur (RFC 6376 8.15): what a reader sees and replies to.
OVERSIGNED: frozenset[str] = frozenset(
    {
        "from",
        "subject",
        "to",
        "cc",
        "date",
        "reply-to",
        "message-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
    }
)
_SIGNED = [h.encode() for h in SIGNED_HEADERS]
_OVERSIGNED = frozenset(h.encode() for h in OVERSIGNED)

_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


class DkimKeyError(ValueError):
    """A key file that cannot be used for the given algorithm."""


def generate_key(algorithm: Algorithm = "rsa-sha256", bits: int = 2048) -> bytes:
    """A new private key as unencrypted PKCS#8 PEM (keep the file mode 0600)."""
    if algorithm == "rsa-sha256":
        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = rsa.generate_private_key(
            public_exponent=65537, key_size=bits
        )
    elif algorithm == "ed25519-sha256":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise DkimKeyError(f"unknown algorithm {algorithm!r}")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class SigningKey:
    """A parsed private key, ready to sign, and the DNS record that publishes it."""

    domain: str
    selector: str
    algorithm: Algorithm
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = field(repr=False)

    def public_txt(self) -> str:
        """The TXT record value for ``<selector>._domainkey.<domain>``."""
        pub = self.private.public_key()
        if isinstance(pub, rsa.RSAPublicKey):
            der = pub.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"

    def sign_digest(self, digest: bytes) -> bytes:
        """The signature over a SHA-256 header hash (RFC 6376 3.7, RFC 8463 3)."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        return self.private.sign(digest)


def load_key(
    domain: str, selector: str, path: str | os.PathLike[str], algorithm: Algorithm
) -> SigningKey:
    """Read a private key and check it suits ``algorithm``.

    PEM (PKCS#8, or PKCS#1 for RSA); for Ed25519 also the base64 32-byte seed that
    dkimpy and OpenDKIM use.

    RSA keys must be at least 1024 bits (RFC 8301); 2048 is what ``generate_key``
    makes and what receivers expect today.
    """
    return parse_key(domain, selector, Path(path).read_bytes(), algorithm, str(path))


def parse_key(
    domain: str, selector: str, data: bytes, algorithm: Algorithm, where: str = "key"
) -> SigningKey:
    """:func:`load_key` for key bytes already read (a file, the control database)."""
    path = where
    key: object
    if algorithm == "ed25519-sha256" and not data.lstrip().startswith(b"-----"):
        # dkimpy's and OpenDKIM's Ed25519 format: the 32-byte seed in base64.
        try:
            seed = base64.b64decode(data.strip(), validate=True)
            key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        except (ValueError, binascii.Error) as exc:
            raise DkimKeyError(f"{path}: neither PEM nor a base64 Ed25519 seed") from exc
    else:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise DkimKeyError(f"{path}: not a readable unencrypted PEM private key") from exc
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimKeyError(f"{path}: rsa-sha256 needs an RSA key")
        if key.key_size < 1024:
            raise DkimKeyError(f"{path}: RSA key of {key.key_size} bits is too short")
    elif algorithm == "ed25519-sha256":
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise DkimKeyError(f"{path}: ed25519-sha256 needs an Ed25519 key")
    else:
        raise DkimKeyError(f"unknown algorithm {algorithm!r}")
    return SigningKey(domain.lower().rstrip("."), selector, algorithm, key)


_WSP_RUN = re.compile(rb"[ \t]+")
_WSP_EOL = re.compile(rb"[ \t]+\r\n")


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4 relaxed body canonicalization, exactly as dkimpy computes it.

    dkimpy runs three regular expressions and a loop over the body; here each step is
    skipped when a substring test shows it cannot change anything (the common case
    for generated mail), and trailing empty lines go with one ``rstrip``.
    """
    if b" \r\n" in body or b"\t\r\n" in body:
        body = _WSP_EOL.sub(b"\r\n", body)
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", body)
    if not body.endswith(b"\r\n"):
        return body + b"\r\n" if body else b""
    stripped = body.rstrip(b"\r\n")
    tail = len(body) - len(stripped)
    if tail % 2 or body[len(stripped) :] != b"\r\n" * (tail // 2):
        # A bare CR or LF in the tail (never in mail we accepted): dkimpy's own way.
        return bytes(_RELAXED.canonicalize_body(body))
    return stripped + b"\r\n" if stripped else b""


def split_message(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """(header fields as dkimpy parses them, body) without splitting the body into lines."""
    end = message.find(b"\r\n\r\n")
    if message.startswith(b"\r\n"):
        return [], message[2:]
    if end < 0:
        head, body = message, b""
    else:
        head, body = message[: end + 2], message[end + 4 :]
    headers, _ = dkim.rfc822_parse(head + b"\r\n")
    return headers, body


def _prepare(
    headers: list[list[bytes]], body_hash: bytes, key: SigningKey, now: int
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The header hash to sign and the signature's tags (``b=`` still empty).

    ``body_hash`` is the base64 SHA-256 of the relaxed body, the same for every key.
    """
    count: dict[bytes, int] = {}
    for name, _ in headers:
        lower = name.lower()
        count[lower] = count.get(lower, 0) + 1
    # A field present is signed (its last instance); an oversigned one once per instance
    # and once more, which also signs its absence.
    include = [
        h
        for h in _SIGNED
        for _ in range(count.get(h, 0) if h in _OVERSIGNED else min(count.get(h, 0), 1))
    ] + [h for h in _SIGNED if h in _OVERSIGNED]
    domain = key.domain.encode("idna") if not key.domain.isascii() else key.domain.encode()
    fields = [
        (b"v", b"1"),
        (b"a", key.algorithm.encode()),
        (b"c", b"relaxed/relaxed"),
        (b"d", domain),
        (b"s", key.selector.encode()),
        (b"t", str(now).encode()),
        # " : " gives the folding room to break between names, never inside one (a
        # name split by a fold is another name to the verifier: RFC 6376 3.5 allows
        # FWS only around the colons).
        (b"h", b" : ".join(include)),
        (b"bh", body_hash),
        (b"b", b""),
    ]
    unsigned = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len("DKIM-Signature"))
    sig_header = (b"DKIM-Signature", b" " + unsigned)
    hasher = hashlib.sha256()
    # Only the fields that are signed need canonicalizing (select_headers picks from
    # these exactly as from the whole header).
    canonical = _RELAXED.canonicalize_headers([h for h in headers if h[0].lower() in _SIGNED])
    dkim.hash_headers(hasher, _RELAXED, canonical, include, sig_header, dict(fields))
    return hasher.digest(), fields


def _finish(fields: list[tuple[bytes, bytes]], signature: bytes) -> bytes:
    fields = [*fields[:-1], (b"b", base64.b64encode(signature))]
    value = dkim.fold(
        b"; ".join(b"=".join(f) for f in fields) + b"\r\n", namelen=len("DKIM-Signature")
    )
    return b"DKIM-Signature: " + value


_rsa_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for the RSA private-key operation: OpenSSL releases the GIL there, so
    signing runs beside the event loop instead of inside it."""
    global _rsa_pool
    if _rsa_pool is None:
        _rsa_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="dkim-rsa")
    return _rsa_pool


class DkimSigner:
    """Signs messages with every key configured for their From domain."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self._by_domain: dict[str, list[SigningKey]] = {}
        for key in keys:
            self._by_domain.setdefault(key.domain, []).append(key)

    def domains(self) -> set[str]:
        return set(self._by_domain)

    def _plan(
        self, headers: list[list[bytes]], body: bytes, domain: str | None, now: int | None
    ) -> list[tuple[SigningKey, bytes, list[tuple[bytes, bytes]]]]:  # fmt: skip
        keys = self._by_domain.get(domain) if domain else None
        if not keys:
            return []
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        now = int(time.time()) if now is None else now
        return [(k, *_prepare(headers, body_hash, k, now)) for k in keys]

    def sign_fields(
        self, headers: list[list[bytes]], body: bytes, domain: str | None, now: int | None = None
    ) -> bytes:
        """The DKIM-Signature fields to prepend to a message of these header fields and
        body, by the keys of ``domain`` (empty when it has none)."""
        plan = self._plan(headers, body, domain, now)
        return b"".join(_finish(f, k.sign_digest(d)) for k, d, f in plan)

    async def sign_fields_async(
        self, headers: list[list[bytes]], body: bytes, domain: str | None, now: int | None = None
    ) -> bytes:
        """:meth:`sign_fields` with the RSA operations in a thread beside the event loop."""
        plan = self._plan(headers, body, domain, now)
        if not plan:
            return b""
        loop = asyncio.get_running_loop()
        out = []
        for key, digest, fields in plan:
            if key.algorithm == "rsa-sha256":
                signature = await loop.run_in_executor(_pool(), key.sign_digest, digest)
            else:  # Ed25519 takes microseconds: not worth a thread hop
                signature = key.sign_digest(digest)
            out.append(_finish(fields, signature))
        return b"".join(out)

    def sign(self, message: bytes, domain: str | None, now: int | None = None) -> bytes:
        """:meth:`sign_fields` for a whole message (tools and tests; the appliance signs
        what cleanup parsed). A header that cannot be parsed gives no signature."""
        try:
            headers, body = split_message(message)
        except dkim.DKIMException as exc:
            log.warning("event=dkim_unparsable error=%r", str(exc))
            return b""
        return self.sign_fields(headers, body, domain, now)

    async def sign_async(self, message: bytes, domain: str | None, now: int | None = None) -> bytes:
        """:meth:`sign` with the RSA operations in a thread beside the event loop."""
        try:
            headers, body = split_message(message)
        except dkim.DKIMException as exc:
            log.warning("event=dkim_unparsable error=%r", str(exc))
            return b""
        return await self.sign_fields_async(headers, body, domain, now)
