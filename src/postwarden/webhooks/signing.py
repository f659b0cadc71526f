"""Standard Webhooks signatures (https://www.standardwebhooks.com): what a delivery's
``webhook-signature`` header carries, the secrets and keys behind it.

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}`` (the body's bytes as
sent). ``v1,<base64>``: HMAC-SHA256 under a secret (``whsec_`` and the secret's bytes
in base64); ``v1a,<base64>``: Ed25519 under the endpoint's key, whose public half is
``whpk_`` and its 32 bytes in base64, and a JWK (RFC 8037) in the endpoint's JWKS. A
header may hold several, space-separated: every secret still valid during a rotation,
and the Ed25519 one; a verifier accepts the delivery when one of them matches.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
PUBLIC_PREFIX = "whpk_"
#: Bytes of a new HMAC secret (Standard Webhooks asks for 24 to 64).
SECRET_BYTES = 32


def new_secret() -> bytes:
    return os.urandom(SECRET_BYTES)


def secret_text(secret: bytes) -> str:
    """The secret as shown once to the operator (``whsec_…``)."""
    return SECRET_PREFIX + base64.b64encode(secret).decode("ascii")


def new_signing_key() -> bytes:
    """A new Ed25519 private key, its 32 raw bytes."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_key(private: bytes) -> bytes:
    return (
        Ed25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def public_text(private: bytes) -> str:
    """The public key as Standard Webhooks writes it (``whpk_…``)."""
    return PUBLIC_PREFIX + base64.b64encode(public_key(private)).decode("ascii")


def jwk(private: bytes, kid: str) -> dict[str, str]:
    """The public key as a JWK (RFC 8037: OKP, Ed25519)."""
    x = base64.urlsafe_b64encode(public_key(private)).rstrip(b"=").decode("ascii")
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": "EdDSA"}


def _content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    if any(c in msg_id for c in ". \r\n"):
        raise ValueError("webhook-id: no dots, spaces or line ends")
    return f"{msg_id}.{timestamp}.".encode() + body


def signature(
    msg_id: str,
    timestamp: int,
    body: bytes,
    secrets: Sequence[bytes],
    signing_key: bytes | None = None,
) -> str:
    """The ``webhook-signature`` value: ``v1,`` for each secret, then ``v1a,``."""
    content = _content(msg_id, timestamp, body)
    out = [
        "v1," + base64.b64encode(hmac.new(s, content, hashlib.sha256).digest()).decode("ascii")
        for s in secrets
    ]
    if signing_key is not None:
        sig = Ed25519PrivateKey.from_private_bytes(signing_key).sign(content)
        out.append("v1a," + base64.b64encode(sig).decode("ascii"))
    if not out:
        raise ValueError("nothing to sign with")
    return " ".join(out)
