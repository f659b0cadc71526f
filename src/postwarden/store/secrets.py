"""Secrets the control plane keeps: API keys (hashed) and DKIM private keys (encrypted).

API keys are ``pw_<prefix>_<secret>``: a 12-character prefix that is shown in lists
and logs and finds the key's row, then 43 characters (256 bits) of secret. Only the
SHA-256 of the whole key is stored: the secret is random and long, so a slow password
hash would add nothing but latency to every request (GitHub and Stripe keys are kept
the same way); a database leak does not give usable keys.

DKIM private keys are Fernet tokens (AES-128-CBC + HMAC-SHA256, from ``cryptography``)
under the appliance's encryption key (``control.encryption_key`` or the file named by
``control.encryption_key_file``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

KEY_PREFIX = "pw_"
PREFIX_LEN = 12


@dataclass(frozen=True)
class NewKey:
    prefix: str
    secret_hash: str
    plaintext: str  # shown once, never stored


def new_api_key() -> NewKey:
    prefix = secrets.token_hex(PREFIX_LEN // 2)
    plaintext = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    return NewKey(prefix, hash_key(plaintext), plaintext)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8", "surrogateescape")).hexdigest()


def key_prefix(plaintext: str) -> str | None:
    """The prefix of something shaped like an API key, else None."""
    if (
        len(plaintext) > len(KEY_PREFIX) + PREFIX_LEN + 1
        and plaintext.startswith(KEY_PREFIX)
        and plaintext[len(KEY_PREFIX) + PREFIX_LEN] == "_"
    ):
        return plaintext[len(KEY_PREFIX) : len(KEY_PREFIX) + PREFIX_LEN]
    return None


def key_matches(plaintext: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_key(plaintext), secret_hash)


class SecretBox:
    """Encrypts and decrypts private keys at rest."""

    def __init__(self, key: str | bytes) -> None:
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                "control.encryption_key: expected 32 url-safe base64-encoded bytes"
                " (`postwarden genkey`-style: Fernet.generate_key())"
            ) from exc

    def seal(self, data: bytes) -> bytes:
        return self._fernet.encrypt(data)

    def open(self, token: bytes) -> bytes:
        try:
            return self._fernet.decrypt(token)
        except InvalidToken as exc:
            raise ValueError("a private key does not decrypt with the configured key") from exc


def load_box(key: str, key_file: str) -> SecretBox:
    """The configured key, else the key file, created (mode 0600) on first use."""
    if key:
        return SecretBox(key.encode())
    path = Path(key_file)
    if not path.exists():
        # Written aside, then linked into place: two processes starting together
        # end up with the same key, never a half-written file.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    return SecretBox(path.read_bytes().strip())
