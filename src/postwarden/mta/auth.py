"""SMTP AUTH credentials: scrypt hashes from config, verified off the event loop.

The control plane will own credentials later; until then ``[[smtp.users]]`` holds
``username`` and a ``password_hash`` made by ``postwarden hash-password``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import NamedTuple

from postwarden.config import SmtpUser

# RFC 7914 interactive-login parameters: 16 MiB and tens of milliseconds per check.
_N, _R, _P = 2**14, 8, 1


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64) for a password."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: bytes, encoded: str) -> bool:
    """True when ``password`` matches ``encoded``; malformed hashes never match."""
    try:
        scheme, n, r, p, salt_b64, hash_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(hash_b64)
        digest = hashlib.scrypt(
            password, salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected),
            maxmem=256 * 1024 * 1024,
        )  # fmt: skip
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


class PasswordStore:
    """Username → hash, with successful checks remembered (by keyed digest, not password).

    Applications reconnect with the same credentials all day; remembering a success
    keeps the slow hash to the first login. Failures are never cached.
    """

    def __init__(self, users: Iterable[SmtpUser] = ()) -> None:
        self._users: dict[bytes, str] = {}
        self._ok: set[bytes] = set()
        self._key = secrets.token_bytes(32)
        self.configure(users)

    def configure(self, users: Iterable[SmtpUser]) -> None:
        new = {u.username.encode(): u.password_hash for u in users}
        if new != self._users:
            self._users = new
            self._ok.clear()

    def _memo(self, login: bytes, password: bytes, encoded: str) -> bytes:
        return hmac.digest(self._key, login + b"\0" + password + b"\0" + encoded.encode(), "sha256")

    async def verify(self, login: bytes, password: bytes) -> bool:
        encoded = self._users.get(login)
        if encoded is None:
            # Spend the same time on unknown users as on known ones.
            await asyncio.to_thread(check_password, password, _dummy_hash())
            return False
        memo = self._memo(login, password, encoded)
        if memo in self._ok:
            return True
        ok = await asyncio.to_thread(check_password, password, encoded)
        if ok:
            self._ok.add(memo)
        return ok


@functools.cache
def _dummy_hash() -> str:
    """A hash of a random password, for the time an unknown user's check costs: made
    at the first unknown user (50 ms of scrypt), not when the module is imported."""
    return hash_password(secrets.token_hex(8))


class KeyLogin(NamedTuple):
    """An SMTP login with a tenant's API key: whose it is, and which key (its prefix,
    checked again at every MAIL against the keys revoked since)."""

    tenant_id: int
    key_prefix: str


class AuthUnavailable(Exception):
    """The credentials cannot be checked now (the control database is down): a
    temporary failure (``454 4.7.0``), not a wrong password."""
