"""The keys that sign, from the control database: the signing generation of every
verified domain's DKIM keys (decrypted and parsed once each), and each tenant's
verified sending domains. Reloaded when the change feed names a domain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from postwarden.control.domains import signing_generation
from postwarden.mta.dkim import DkimKeyError, SigningKey, parse_key
from postwarden.store.models import DkimKey, Domain

log = logging.getLogger("postwarden.control")


class SigningKeyCache:
    def __init__(
        self,
        sessions: Any,
        box: Any,
        on_keys: Callable[[list[SigningKey]], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.box = box  # opens the stored private keys (store.secrets)
        self.keys: list[SigningKey] = []
        self.verified: dict[int, set[str]] = {}  # tenant id -> its verified sending domains
        # Called with the new key list whenever verified domains or their keys change
        # (the appliance's signer; the lab subscribes too).
        self.on_keys: list[Callable[[list[SigningKey]], None]] = [on_keys] if on_keys else []
        # DkimKey id -> its parsed key: a key row never changes, and parsing an RSA key
        # costs tens of milliseconds, so only keys not seen before are parsed.
        self._parsed_keys: dict[int, SigningKey] = {}

    async def load(self) -> list[SigningKey]:
        """The keys that sign: the signing generation of every verified domain."""
        async with self.sessions() as s:
            rows = (
                await s.execute(
                    select(Domain.id, Domain.name, Domain.tenant_id, DkimKey)
                    .join(DkimKey, DkimKey.domain_id == Domain.id)
                    .where(Domain.verified_at.is_not(None))
                )
            ).all()
        by_domain: dict[int, tuple[str, list[DkimKey]]] = {}
        verified: dict[int, set[str]] = {}
        for dom_id, name, tenant_id, key in rows:
            by_domain.setdefault(dom_id, (name, []))[1].append(key)
            verified.setdefault(tenant_id, set()).add(name)
        signing: list[tuple[str, DkimKey]] = []
        for name, keys in by_domain.values():
            gen = signing_generation(keys)
            signing += [(name, k) for k in keys if k.generation == gen]
        new = [(name, k) for name, k in signing if k.id not in self._parsed_keys]
        if new:
            # Off the event loop: a database of many domains must not stall SMTP
            # sessions and deliveries while its new keys are read.
            parsed = await asyncio.to_thread(lambda: [self._parse(n, k) for n, k in new])
            for (_, k), key in zip(new, parsed, strict=True):
                if key is not None:
                    self._parsed_keys[k.id] = key
        self._parsed_keys = {
            k.id: self._parsed_keys[k.id] for _, k in signing if k.id in self._parsed_keys
        }
        self.verified = verified
        return [self._parsed_keys[k.id] for _, k in signing if k.id in self._parsed_keys]

    def _parse(self, name: str, k: DkimKey) -> SigningKey | None:
        try:
            material = self.box.open(k.private_key)
            return parse_key(
                name,
                k.selector,
                material,
                k.algorithm,  # type: ignore[arg-type]
                f"{name}/{k.selector}",
            )
        except (ValueError, DkimKeyError) as exc:
            log.error(
                "event=dkim_key_unusable domain=%s selector=%s error=%r",
                name,
                k.selector,
                str(exc),
            )
            return None

    async def reload(self) -> None:
        self.keys = await self.load()
        for fn in self.on_keys:
            fn(self.keys)
