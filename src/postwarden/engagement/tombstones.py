"""Tombstones of erased addresses (docs/decisions/0011, "Erasure"): what stays of an
address after its contact is erased is a keyed hash, so that the one suppression
check still finds it while nothing readable of it is left.

``h1:`` and the hex of HMAC-SHA256(the tenant's tombstone key, the address's
suppression key). The key never rotates: a tombstone must match the same address
for ever.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "h1:"


def tombstone(key: bytes, address_key: str) -> str:
    """The tombstone of a suppression key (``mail.addresses.suppression_key``)."""
    if not key:
        raise ValueError("tombstone key is empty")
    digest = hmac.new(key, address_key.encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest


def is_tombstone(address: str) -> bool:
    return address.startswith(PREFIX)
