"""Each process's copy of the tenants' engagement keys (docs/decisions/0011): which
key signs a tenant's new links, which tenant and key a token's kid names, and each
tenant's tombstone key. Read at start and again whenever the change feed names a
``tenant_key``; a kid not here answers 404 without asking the database (a forged
token must cost nothing but a dictionary lookup).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from postwarden.engagement import tokens, tombstones
from postwarden.store import tenant_keys as store
from postwarden.store.engagement_models import LINKS, TOMBSTONE

TOMBSTONE_LABEL = b"postwarden tombstone v1"


@dataclass(frozen=True, slots=True)
class LinkKey:
    tenant_id: int
    kid: bytes
    key: bytes  # tokens.derive_key of the secret


class TenantKeyCache:
    def __init__(self, sessions: Any, box: Any) -> None:
        self.sessions = sessions
        self.box = box
        self.by_kid: dict[bytes, LinkKey] = {}
        self.signing: dict[int, LinkKey] = {}  # tenant id -> its newest links key
        self.tombstones: dict[int, bytes] = {}  # tenant id -> its tombstone key
        self._opened: dict[int, bytes] = {}  # row id -> its secret (rows never change)

    async def reload(self) -> None:
        async with self.sessions() as s:
            rows = await store.live_keys(s)
        by_kid: dict[bytes, LinkKey] = {}
        newest: dict[int, tuple[int, LinkKey]] = {}
        tombstones: dict[int, bytes] = {}
        opened: dict[int, bytes] = {}
        for row in rows:
            secret = self._opened.get(row.id)
            if secret is None:
                secret = self.box.open(row.secret)
            opened[row.id] = secret
            if row.purpose == LINKS:
                link = LinkKey(row.tenant_id, bytes.fromhex(row.kid), tokens.derive_key(secret))
                by_kid[link.kid] = link
                if row.generation > newest.get(row.tenant_id, (0, link))[0]:
                    newest[row.tenant_id] = (row.generation, link)
            elif row.purpose == TOMBSTONE:
                tombstones[row.tenant_id] = hmac.new(secret, TOMBSTONE_LABEL, sha256).digest()
        self.by_kid = by_kid
        self.signing = {tid: link for tid, (_gen, link) in newest.items()}
        self.tombstones = tombstones
        self._opened = opened

    async def signer(self, tenant_id: int) -> LinkKey:
        """The key that signs the tenant's new links, made on first use."""
        found = self.signing.get(tenant_id)
        if found is None:
            await store.ensure(self.sessions, self.box, tenant_id)
            await self.reload()
            found = self.signing[tenant_id]
        return found

    def tombstone(self, tenant_id: int, address_key: str) -> str | None:
        """The tombstone of an address for the tenant (None: it has no tombstone key
        yet, so nothing of it was erased)."""
        key = self.tombstones.get(tenant_id)
        return None if key is None else tombstones.tombstone(key, address_key)

    def key_for(self, kid: bytes) -> bytes | None:
        """For ``tokens.read``: the key of a kid, None when unknown or retired."""
        found = self.by_kid.get(kid)
        return None if found is None else found.key

    def read(self, token: str) -> tuple[int, tokens.Link] | None:
        """The tenant and link of a token, or None (forged, altered, retired key)."""
        found: list[LinkKey] = []

        def key_for(kid: bytes) -> bytes | None:  # the token is decoded once
            key = self.by_kid.get(kid)
            if key is None:
                return None
            found.append(key)
            return key.key

        link = tokens.read(token, key_for)
        return None if link is None or not found else (found[0].tenant_id, link)

    def make(self, signer: LinkKey, link: tokens.Link) -> str:
        return tokens.make(signer.kid, signer.key, link)
