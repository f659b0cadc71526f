"""The lab publishes the DNS records of the control plane's sending domains.

Under ``postwarden lab`` the lab's DNS server is the only DNS the appliance asks, so a
domain made through the API (``POST /v1/domains``) could never verify unless someone
put its records there. :class:`DomainPublisher` does: it follows the control plane's
change feed (``changes`` rows of kind ``domain``) and keeps in the lab DNS, for every
registered sending domain, exactly the records ``GET /v1/domains/{id}`` lists (DKIM
keys, SPF, DMARC, the return path's MX and SPF, the tracking CNAME), and an MX (and A)
so that mail to the domain lands in the lab as it does for ``demo.lab.test``. It says
so on one line each time a domain's records change. The lab DNS also asks it to
re-read the database before answering a name it does not hold, so a ``/verify`` right
after ``POST /v1/domains`` finds the records. ``/verify`` really queries the lab DNS,
and ``control.require_verified_domains`` stays on. Only the lab publishes DNS; a
production appliance never does (docs/decisions/0010).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from postwarden.config import Config
from postwarden.control import domains as dom
from postwarden.dns.records import Record
from postwarden.lab import Lab
from postwarden.store.models import Change, DkimKey, Domain

log = logging.getLogger("postwarden.lab.publish")

RecordKey = tuple[str, str, str]  # (type, name, value)


@dataclass
class Published:
    """What the lab publishes for one domain."""

    domain_id: int
    records: set[RecordKey] = field(default_factory=set)
    #: Records the lab adds of its own accord (MX and A of the domain itself).
    extra: set[RecordKey] = field(default_factory=set)


def describe(records: list[Record]) -> str:
    """``DKIM s=pw1-ab12-rsa, s=pw1-ab12-ed; SPF; DMARC; ...`` for the lab's line."""
    sels = [r.name.split("._domainkey.")[0] for r in records if r.purpose == "dkim"]
    purposes = {r.purpose for r in records}
    parts = [f"DKIM {', '.join(f's={s}' for s in sels)}"] if sels else []
    parts += [label for p, label in (("spf", "SPF"), ("dmarc", "DMARC")) if p in purposes]
    rp = next((r.name for r in records if r.purpose == "return_path_mx"), None)
    if rp is not None:
        parts.append(f"return path {rp} MX+SPF")
    if "tracking" in purposes:
        parts.append("tracking CNAME")
    return "; ".join(parts)


class DomainPublisher:
    """Keeps the lab DNS in step with the sending domains in the control database.

    :meth:`start` publishes every domain already registered (the database outlives a
    lab run), then follows the change feed: every ``interval`` seconds, or at once
    after :meth:`wake`.
    """

    def __init__(
        self,
        lab: Lab,
        cfg: Config,
        sessions: Any,
        *,
        say: Callable[[str], None] = print,
        interval: float = 0.25,
    ) -> None:
        self.lab = lab
        self.cfg = cfg
        self.sessions = sessions
        self.say = say
        self.interval = interval
        #: Domain name → what is published for it.
        self.published: dict[str, Published] = {}
        self._last_change = 0
        self._wake = asyncio.Event()
        self._synced = asyncio.Condition()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async with self.sessions() as s:
            self._last_change = (await s.execute(select(func.max(Change.id)))).scalar() or 0
        await self.sync()
        self.lab.dns.refresh = self.sync
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self.lab.dns.refresh = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self, *_args: object) -> None:
        """Read the change feed now (a domain may have changed)."""
        self._wake.set()

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float = 10,  # noqa: ASYNC109
    ) -> None:
        """Return once ``predicate()`` holds, checked after each sync."""
        async with asyncio.timeout(timeout), self._synced:
            await self._synced.wait_for(predicate)

    async def wait_published(self, name: str, timeout: float = 10) -> Published:  # noqa: ASYNC109
        """The records published for domain ``name``, once they are."""
        await self.wait_until(lambda: name in self.published, timeout)
        return self.published[name]

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                async with self.sessions() as s:
                    newest = (
                        await s.execute(
                            select(func.max(Change.id)).where(
                                Change.id > self._last_change, Change.kind == "domain"
                            )
                        )
                    ).scalar()
                if newest is not None:
                    await self.sync()
                    self._last_change = newest
            except Exception:
                log.warning("event=lab_publish_failed", exc_info=True)

    async def sync(self) -> None:
        """Publish what changed since the last sync; unpublish removed domains."""
        async with self._lock:
            await self._sync()

    async def _sync(self) -> None:
        async with self.sessions() as s:
            domains = list((await s.execute(select(Domain).order_by(Domain.id))).scalars())
            keys: dict[int, list[DkimKey]] = {}
            for k in (await s.execute(select(DkimKey).order_by(DkimKey.id))).scalars():
                keys.setdefault(k.domain_id, []).append(k)
        seen: set[str] = set()
        for d in domains:
            seen.add(d.name)
            recs = dom.records(self.cfg, d, keys.get(d.id, []))
            want = {(r.type, r.name, r.value) for r in recs}
            have = self.published.get(d.name)
            if have is not None and have.records == want:
                continue
            first = have is None
            if have is None:
                have = self.published[d.name] = Published(d.id, extra=self._mail_records(d.name))
            for rec in have.records - want:
                self.lab.dns.discard(rec[1], rec[0], rec[2])
            failed = []
            for rtype, name, value in sorted(want - have.records):
                try:
                    self.lab.dns.add(name, rtype, value, ttl=300)
                except Exception as exc:  # a value the lab cannot parse: say which
                    failed.append(f"{rtype} {name} {value!r}: {exc}")
            have.records = want
            verb = "published" if first else "updated"
            self.say(
                f"lab: {verb} DNS for {d.name} ({describe(recs)}) "
                f"- verify with POST /v1/domains/{d.id}/verify"
            )
            for line in failed:
                self.say(f"lab: could not publish {line}")
        for name in [n for n in self.published if n not in seen]:
            gone = self.published.pop(name)
            for rtype, rname, value in gone.records | gone.extra:
                self.lab.dns.discard(rname, rtype, value)
            self.say(f"lab: removed DNS for {name}")
        async with self._synced:
            self._synced.notify_all()

    def _mail_records(self, name: str) -> set[RecordKey]:
        """An MX to the first sink (and an A) for a domain that has none in the lab, so
        that mail to it (a reply, a DSN to a From address) lands in the lab."""
        extra: set[RecordKey] = set()
        if not self.lab.dns.records(name, "MX"):
            extra.add(("MX", name, f"10 {self.lab.sinks[0].name}."))
        if not self.lab.dns.records(name, "A"):
            extra.add(("A", name, "127.0.0.1"))
        for rtype, rname, value in extra:
            self.lab.dns.add(rname, rtype, value)
        return extra
