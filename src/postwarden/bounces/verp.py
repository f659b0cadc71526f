"""VERP return paths: a signed envelope sender per recipient (issue 8).

A tenant's message from one of its verified sending domains leaves with an envelope
sender (``MAIL FROM``) on that domain's return-path subdomain,
``<control.return_path_label>.<sending domain>`` — aligned with the sending domain for
SPF and DMARC, and an MX of ours — whose local part names the message and the
recipient. A bounce (or an ARF report) that comes back to that address says, without
parsing its body, whose mail it was; the signature says it is ours.

The format, version 1 (lowercase only, as some MTAs lowercase local parts)::

    b-<msg id>-<rcpt id>-<mac>@<label>.<sending domain>

    msg id    the spool's message id: lowercase hex (22 digits today; 1 to 32 accepted)
    rcpt id   the spool's recipient id (``Lease.rcpt_id``), base 36, no leading zeros
    mac       the first 50 bits of HMAC-SHA256(key, "b-<msg id>-<rcpt id>@<label>.<domain>")
              — the address itself without its mac — in base 32, lowercase (10 chars)

For example ``b-018f2a7c9e1b4d2a6f0c13-2s-k3v7q2mxa5@pwb.example.com``. The local part is
at most 2 + 32 + 1 + 13 + 1 + 10 = 59 characters (RFC 5321 allows 64). A future format
takes another first letter; ``b`` stays version 1.

The address is deterministic: every attempt of a recipient leaves with the same one, so
greylisting, which remembers (sender, recipient), lets the retry through.

Tokens are read back case-insensitively, with or without ``<>``. A token whose mac does
not match — forged, or altered in its message id, recipient id or domain — is
:attr:`Verdict.FORGED`; anything not shaped like a token of ours is
:attr:`Verdict.MALFORMED`. Callers count both and believe neither.

The key: ``bounces.token_key`` when set, else derived from the control plane's
encryption key (``control.encryption_key`` / ``control.encryption_key_file``), in both
cases as ``HMAC-SHA256(material, "postwarden return-path v1")``, so the token key is
never the encryption key itself. Changing either key (or ``return_path_label``)
invalidates the tokens of mail already sent: bounces for it then count as forged.

Policy only: no I/O here beyond reading the key once (:meth:`ReturnPaths.from_config`).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from postwarden.values import tenant_id

if TYPE_CHECKING:
    from postwarden.config import Config
    from postwarden.values import Lease

#: Domain separation: the HMAC key is HMAC-SHA256(material, KEY_LABEL).
KEY_LABEL = b"postwarden return-path v1"
#: The first letter of a version-1 token.
PREFIX = "b-"
#: Characters of the mac (5 bits each: 50 bits).
MAC_CHARS = 10
MAX_LOCAL_PART = 64
MAX_DOMAIN = 253

_DIGITS36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_TOKEN = re.compile(
    rf"b-(?P<msg>[0-9a-f]{{1,32}})-(?P<rcpt>[0-9a-z]{{1,13}})-(?P<mac>[a-z2-7]{{{MAC_CHARS}}})"
)
_MSG_ID = re.compile(r"[0-9a-f]{1,32}")


class Verdict(enum.Enum):
    """What :meth:`ReturnPaths.verify` made of an address (values fit a metric label)."""

    VALID = "valid"
    #: Not a return-path token of ours: another local part, another format, a domain
    #: outside ``<label>.``, an empty or unparsable address.
    MALFORMED = "malformed"
    #: Shaped like a token, but its mac does not match: forged, or altered.
    FORGED = "forged"


@dataclass(frozen=True, slots=True)
class Token:
    """What a valid return path names."""

    msg_id: str
    rcpt_id: int
    domain: str  # the sending domain (the return-path domain without its label)

    @property
    def recipient_id(self) -> str:
        """The control plane's name of the recipient (``control.events.recipient_id``)."""
        return f"{self.msg_id}.{self.rcpt_id}"


def derive_key(material: bytes) -> bytes:
    """The token HMAC key made from key material (a secret, never used as is)."""
    return hmac.new(material, KEY_LABEL, hashlib.sha256).digest()


def control_key_material(cfg: Config) -> bytes:
    """The raw bytes of the control encryption key (a Fernet key: 32 bytes, base64),
    read the way the control plane reads it; the key file is created if missing.

    Raises ``ValueError`` (not a Fernet key) or ``OSError`` (the file).
    """
    from postwarden.store.secrets import load_box

    c = cfg.control
    load_box(c.encryption_key, c.encryption_key_file)  # validates; creates the file
    text = (
        c.encryption_key.encode() if c.encryption_key else Path(c.encryption_key_file).read_bytes()
    )
    try:
        raw = base64.urlsafe_b64decode(text.strip())
    except (binascii.Error, ValueError) as exc:
        raise ValueError("control.encryption_key: not url-safe base64") from exc
    if len(raw) != 32:
        raise ValueError("control.encryption_key: expected 32 bytes")
    return raw


def _base36(n: int) -> str:
    if n == 0:
        return "0"
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append(_DIGITS36[r])
    return "".join(reversed(out))


class ReturnPaths:
    """Makes and checks VERP return paths under one key and return-path label."""

    __slots__ = ("_key", "enabled", "label")

    def __init__(self, key: bytes, label: str = "pwb", enabled: bool = True) -> None:
        """``key``: the HMAC key itself (see :func:`derive_key`); ``label``: the
        return-path subdomain label; ``enabled``: whether :meth:`for_lease` rewrites."""
        if not key:
            raise ValueError("return-path token key is empty")
        self._key = key
        self.label = label.lower()
        self.enabled = enabled

    def __repr__(self) -> str:
        return f"ReturnPaths(label={self.label!r}, enabled={self.enabled})"

    @classmethod
    def from_config(cls, cfg: Config) -> ReturnPaths:
        """``bounces.token_key`` when set, else the control encryption key; both through
        :func:`derive_key`. Raises ``ValueError``/``OSError`` when the key cannot be read."""
        material = (
            cfg.bounces.token_key.encode() if cfg.bounces.token_key else control_key_material(cfg)
        )
        return cls(derive_key(material), cfg.control.return_path_label, cfg.bounces.verp)

    # ------------------------------------------------------------------ tokens

    def _mac(self, unsigned: str) -> str:
        digest = hmac.new(self._key, unsigned.encode("ascii"), hashlib.sha256).digest()
        return base64.b32encode(digest[:10]).decode("ascii")[:MAC_CHARS].lower()

    def return_path_domain(self, sending_domain: str) -> str:
        return f"{self.label}.{sending_domain.lower().rstrip('.')}"

    def encode(self, msg_id: str, rcpt_id: int, sending_domain: str) -> str:
        """The return path of one recipient of one message sent from ``sending_domain``.

        Raises ``ValueError`` for an id out of the format or a domain too long (or not
        ASCII) to take the label.
        """
        msg_id = msg_id.lower()
        if not _MSG_ID.fullmatch(msg_id):
            raise ValueError(f"message id not 1-32 hex digits: {msg_id!r}")
        if not 0 <= rcpt_id < 36**13:
            raise ValueError(f"recipient id out of range: {rcpt_id}")
        domain = self.return_path_domain(sending_domain)
        if len(domain) > MAX_DOMAIN or not domain.isascii() or ".." in domain:
            raise ValueError(f"no return path on {sending_domain!r}")
        local = f"{PREFIX}{msg_id}-{_base36(rcpt_id)}"
        mac = self._mac(f"{local}@{domain}")
        return f"{local}-{mac}@{domain}"

    def verify(self, address: str) -> tuple[Verdict, Token | None]:
        """The verdict on an address (a token of ours, any case, ``<>`` allowed) and,
        when :attr:`Verdict.VALID`, what it names."""
        addr = address.strip()
        if addr.startswith("<") and addr.endswith(">"):
            addr = addr[1:-1].strip()
        if not addr.isascii():
            return Verdict.MALFORMED, None
        local, at, domain = addr.lower().rpartition("@")
        domain = domain.rstrip(".")
        m = _TOKEN.fullmatch(local)
        prefix = f"{self.label}."
        if (
            not at
            or m is None
            or not domain.startswith(prefix)
            or len(domain) <= len(prefix)
            or len(domain) > MAX_DOMAIN
        ):
            return Verdict.MALFORMED, None
        rcpt = m["rcpt"]
        if rcpt != "0" and rcpt.startswith("0"):
            return Verdict.MALFORMED, None  # not the canonical form we write
        unsigned = f"{PREFIX}{m['msg']}-{rcpt}@{domain}"
        if not hmac.compare_digest(self._mac(unsigned), m["mac"]):
            return Verdict.FORGED, None
        return Verdict.VALID, Token(m["msg"], int(rcpt, 36), domain[len(prefix) :])

    def decode(self, address: str) -> Token | None:
        """What a valid token names; None for anything else (see :meth:`verify`)."""
        return self.verify(address)[1]

    # ------------------------------------------------------------------ which mail

    def should_verp(self, lease: Lease, verified: Mapping[int, Collection[str]]) -> str | None:
        """The sending domain whose return path ``lease`` leaves with, or None to keep
        the message's own sender: VERP applies when enabled, to a tenant's mail (never
        to the null sender) from one of the tenant's ``verified`` sending domains
        (tenant id -> domains, as ``ControlPlane.verified``)."""
        if not self.enabled or not lease.tenant:
            return None
        sender = lease.mail_from
        if not sender or sender == "<>":
            return None
        tenant = tenant_id(lease.tenant)
        if tenant is None:
            return None
        domain = sender.rpartition("@")[2].lower().rstrip(".")
        return domain if domain in verified.get(tenant, ()) else None

    def for_lease(self, lease: Lease, verified: Mapping[int, Collection[str]]) -> str | None:
        """The envelope sender ``lease`` goes out with when VERP applies (see
        :meth:`should_verp`), else None. The scheduler's ``return_path`` hook."""
        domain = self.should_verp(lease, verified)
        if domain is None:
            return None
        try:
            return self.encode(lease.msg_id, lease.rcpt_id, domain)
        except ValueError:
            return None
