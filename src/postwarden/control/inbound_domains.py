"""The domains the inbound MX takes mail for: <control.return_path_label>.<d> for every
registered sending domain d (any tenant, verified or not), and ``inbound.domains``.
Reloaded when the change feed names a domain."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from postwarden.config import Config
from postwarden.store.models import Domain


def _domain_key(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


class InboundDomains:
    def __init__(self, sessions: Any, cfg: Config) -> None:
        self.sessions = sessions
        self.sending_domains: frozenset[str] = frozenset()
        self.return_path_domains: frozenset[str] = frozenset()
        self.inbound_domains: frozenset[str] = frozenset()
        self.return_path_label = ""
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """Take ``inbound.domains`` and the return-path label of a (re)loaded configuration."""
        self.return_path_label = cfg.control.return_path_label.lower()
        self.inbound_domains = frozenset(_domain_key(d) for d in cfg.inbound.domains)
        self.return_path_domains = frozenset(
            f"{self.return_path_label}.{d}" for d in self.sending_domains
        )

    async def reload(self) -> None:
        """Read every registered sending domain (the inbound MX's return paths)."""
        async with self.sessions() as s:
            names = (await s.execute(select(Domain.name))).scalars().all()
        self.sending_domains = frozenset(_domain_key(n) for n in names)
        self.return_path_domains = frozenset(
            f"{self.return_path_label}.{d}" for d in self.sending_domains
        )

    def accepts(self, domain: str) -> bool:
        """Whether the inbound MX takes mail for ``domain``: a registered sending domain's
        return-path domain, or one of ``inbound.domains`` (case and a final dot ignored)."""
        d = _domain_key(domain)
        return d in self.return_path_domains or d in self.inbound_domains
