"""The campaign runner (issue 21; docs/campaigns.md "Launch and the feeder").

Every process that spools mail runs one; the database decides who does what, as for
imports. Each pass:

1. delivery's events onto the send records (``store.campaign_outcomes``);
2. scheduled campaigns whose time came are launched (``sending``, the feed split in
   one part per worker);
3. one batch of a launched campaign's records is written (a claim with a lease);
4. each feed part this runner holds gets one step: as many ``pending`` records as the
   campaign's feed window has room for (``campaigns.feed_window`` messages of the
   campaign in the spool and not yet delivered or failed) are rendered and handed to
   acceptance, the one way into the spool;
5. pending records of cancelled campaigns are marked, and campaigns whose records are
   all at an end are ``sent``.

A record gets its message id (committed) before its message is handed on, and the
message goes to the spool with the idempotency key ``campaign <id> <contact>``: after
a crash, a pending record with a message id is looked up in the spool, and marked
``queued`` if the spool has it, else sent again under the same id. Nobody is sent
twice and nobody is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from postwarden.campaigns.abtest import Split, Variant
from postwarden.campaigns.windows import SendWindow, WindowError, allowed, next_open, parse_window
from postwarden.content.links import rewrite_html
from postwarden.content.render import Parts, RenderError, render_message
from postwarden.content.variables import PLACEHOLDER_URLS, send_context
from postwarden.control.campaign_ab import look_at_tests
from postwarden.control.pool_cache import PoolNotAllowed
from postwarden.control.preferences import preferences_url
from postwarden.control.templates import parts_of, postal_address_of
from postwarden.control.tenant_keys import LinkKey
from postwarden.control.tracking import Tracker, tracking_base
from postwarden.control.unsubscribe import public_base_url, recipient_links
from postwarden.mail.build import BuildError, Draft, Mailbox, build_alternative, needs_smtputf8
from postwarden.mail.cleanup import Rejected
from postwarden.queue.admin import QueueAdmin
from postwarden.queue.shards import find_idempotent
from postwarden.queue.spool import new_message_id
from postwarden.store.availability import LogLimiter, is_unavailable
from postwarden.store.campaign_models import Campaign
from postwarden.store.campaign_outcomes import BATCH as OUTCOME_BATCH
from postwarden.store.campaign_outcomes import apply_outcomes, skip_to_now
from postwarden.store.campaigns import (
    cancelled_pending,
    claim_feeds,
    claim_launch,
    finish_sent,
    in_flight,
    in_spool_ids,
    launch_step,
    live_states,
    move,
    pending,
    release_feed,
    renew_feed,
    sent_today,
    set_message_ids,
    settle,
    start_due,
    wait_unzoned,
    wake_waiting,
)
from postwarden.store.contact_models import Contact
from postwarden.store.leases import forget_runner, runner_name
from postwarden.store.models import Tenant
from postwarden.store.template_models import TemplateVersion
from postwarden.values import LANE_BULK, Envelope, SpoolFull, StoredMessage

if TYPE_CHECKING:
    from postwarden.control.plane import ControlPlane

log = logging.getLogger("postwarden.control.campaigns")
_limited = LogLimiter(log)

#: Hands a message to acceptance: (envelope, message, message id) -> what was stored.
Submit = Callable[[Envelope, bytes, str], Awaitable[StoredMessage]]
#: The request hash the spool keeps with a campaign message's idempotency key.
SPOOL_HASH = "campaign"
#: What a pause and a cancel do to the campaign's messages already in the spool.
AFTER_STOP = {"paused": "hold", "cancelled": "delete"}
#: Seconds between looks for waiting records whose send window has opened.
WAKE_WAITING = 5.0
#: Seconds between reads of delivery's events while no campaign is sending or paused…
OUTCOMES_IDLE = 30.0
#: … unless events came in, or the runner was woken, less than this long ago.
FAST_AFTER = 60.0
#: Outcome steps per pass (each reads up to store.campaign_outcomes.BATCH events).
OUTCOME_STEPS = 20


#: A contact's frequency preference (the preference center): at most one bulk
#: message in this many days.
FREQUENCY_DAYS = {"weekly": 7, "monthly": 30}


def spool_key(campaign_id: int, contact_id: int) -> str:
    """A record's idempotency key in the spool. It holds spaces, which an API
    Idempotency-Key cannot (printable ASCII without space): the two never meet."""
    return f"campaign {campaign_id} {contact_id}"


@dataclasses.dataclass(frozen=True)
class Look:
    """What a message looks like: the campaign's, or one A/B variant's."""

    parts: Parts
    samples: dict[str, Any]
    from_email: str
    from_name: str


@dataclasses.dataclass(frozen=True)
class Job:
    """What every message of a campaign shares (read once per step)."""

    campaign: Campaign
    look: Look
    postal_address: str
    pool: str | None
    frequency_cap: int
    # Open and click tracking: off, anonymous or per_recipient (the campaign's, else
    # the tenant's setting).
    tracking: str = "anonymous"
    # Where tracked links point (control.tracking.tracking_base).
    tracking_base: str = ""
    # The A/B test: who gets which variant, each variant's look, the winner once known.
    split: Split | None = None
    variants: dict[str, Look] = dataclasses.field(default_factory=dict)
    winner: str | None = None

    def look_of(self, variant: str | None) -> Look:
        return self.variants.get(variant or "", self.look)


@dataclasses.dataclass
class Item:
    """One record on its way: what the feeder builds and hands on."""

    record_id: int
    contact_id: int
    email: str
    msg_id: str
    contact: dict[str, Any]
    variant: str | None = None
    data: bytes = b""
    subject: str = ""
    smtputf8: bool = False
    error: str = ""


class CampaignRunner:
    def __init__(
        self,
        plane: ControlPlane,
        submit: Submit,
        *,
        index: int = 0,
        count: int = 1,
    ) -> None:
        self.plane = plane
        self.sessions = plane.sessions
        self.submit = submit
        self.index, self.count = index, count
        self.name = runner_name()
        self._wakes: list[asyncio.Event] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._launching: int | None = None
        self._cursor_ready = False
        self._stopping = False
        self._woken = 0.0  # when waiting records were last looked at (monotonic)
        # What campaigns are doing (_live_now): the states that give the loops work.
        self._live: set[str] = set()
        self._looked = 0.0
        self._fresh = True
        self._live_lock = asyncio.Lock()  # one query for the loops that ask at once
        # Outcomes are read at once when a campaign is sending or paused; with none,
        # the first idle read is OUTCOMES_IDLE after the start, as after any other.
        self._outcomes_at = time.monotonic()
        self._fast_until = 0.0  # outcomes read every poll until then (monotonic)

    @property
    def cfg(self) -> Any:
        return self.plane.cfg

    def start(self) -> None:
        """Three loops, so that none waits for another: delivery's events onto the
        records, launches, and the feed."""
        if not self._tasks:
            for name, step in (
                ("outcomes", self.outcomes_pass),
                ("launches", self.launch_pass),
                ("feed", self.feed_pass),
            ):
                wake = asyncio.Event()
                self._wakes.append(wake)
                self._tasks.append(
                    asyncio.create_task(self._loop(name, step, wake), name=f"campaign-{name}")
                )

    def wake(self) -> None:
        """Look for work now (a campaign was just scheduled, paused or cancelled)."""
        self._fresh = True
        self._woken = 0.0  # and the every-5-s work too (a cancel's records)
        self._fast_until = time.monotonic() + FAST_AFTER  # and its events, every poll
        for wake in self._wakes:
            wake.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Let the steps under way finish (the feed hands on what it rendered) for up
        to ``grace`` seconds, then stop. Called before the spool closes."""
        self._stopping = True
        self.wake()
        if self._tasks:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(asyncio.gather(*self._tasks)), grace)
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._tasks.clear()
        forget_runner(self.name)

    async def _loop(
        self, name: str, step: Callable[[], Awaitable[bool]], wake: asyncio.Event
    ) -> None:
        # The first look one poll after the start, or at a wake (a campaign scheduled):
        # a start, or a restart after a crash, has better things to do first.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), self.cfg.campaigns.poll)
        wake.clear()
        while not self._stopping:
            busy = False
            try:
                busy = await step()
            except Exception as exc:
                level = logging.WARNING if is_unavailable(exc) else logging.ERROR
                _limited(level, f"campaign_{name}", f"event=campaign_{name}_failed", exc=exc)
            if busy:
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.cfg.campaigns.poll)
            wake.clear()

    async def run_once(self) -> bool:
        """One pass of each loop, in turn; whether any did anything."""
        done = [await self.outcomes_pass(), await self.launch_pass(), await self.feed_pass()]
        return any(done)

    async def _live_now(self) -> set[str]:
        """The states campaigns are in that give the loops work (``scheduled``,
        ``sending``, ``paused``): one indexed query per poll however many loops ask;
        everything is looked at again after :meth:`wake`."""
        async with self._live_lock:
            if self._fresh or time.monotonic() - self._looked >= self.cfg.campaigns.poll * 0.9:
                self._fresh = False
                self._looked = time.monotonic()
                self._live = await live_states(self.sessions)
        return self._live

    async def outcomes_pass(self) -> bool:
        """Delivery's events onto the records; campaigns at an end ``sent``. With no
        campaign sending or paused, every 30 s only (a complaint or a late bounce
        about one already sent still finds its record)."""
        if not self._cursor_ready:
            await skip_to_now(self.sessions)
            self._cursor_ready = True
        live = await self._live_now()
        now = time.monotonic()
        if not live & {"sending", "paused"} and now > self._fast_until:
            if now - self._outcomes_at < OUTCOMES_IDLE:
                return False
        self._outcomes_at = now
        busy = False
        for _ in range(OUTCOME_STEPS):
            read, ours = await apply_outcomes(self.sessions)
            if ours:
                busy = True
                # A campaign's events come in runs (a cancel's deletes, its last
                # deliveries): read them every poll for a while.
                self._fast_until = time.monotonic() + FAST_AFTER
            if read < OUTCOME_BATCH:
                break
        if "sending" in live:
            for cid in await finish_sent(self.sessions):
                log.info("event=campaign_sent campaign=%d", cid)
        return busy

    async def launch_pass(self) -> bool:
        """Launch what is due and write records (for up to a second); every 5 s mark
        the pending records of cancelled campaigns, make waiting records whose window
        opened pending, and look at A/B tests whose time came."""
        busy = False
        live = await self._live_now()
        if "scheduled" in live:
            for cid in await start_due(self.sessions, self.count):
                log.info("event=campaign_launched campaign=%d parts=%d", cid, self.count)
                busy = True
                self._fresh = True
        slow = time.monotonic() - self._woken > WAKE_WAITING
        if self._launching is None and (slow or live & {"sending", "paused"}):
            self._launching = await claim_launch(self.sessions, self.name)
        until = time.monotonic() + 1.0
        while self._launching is not None and time.monotonic() < until and not self._stopping:
            written = await launch_step(
                self.sessions, self._launching, self.name, self.cfg.campaigns.launch_batch
            )
            if written:
                busy = True
                continue
            if written == 0:
                log.info("event=campaign_records_written campaign=%d", self._launching)
            self._launching = None
        if slow:
            self._woken = time.monotonic()
            if await self._cancel_pending():
                busy = True
            if live and await wake_waiting(self.sessions):
                busy = True
            if "sending" in live:
                for cid, what in await look_at_tests(self.sessions):
                    log.info("event=campaign_ab campaign=%d what=%r", cid, what)
                    busy = True
        return busy

    async def feed_pass(self) -> bool:
        """One step of each feed part this runner holds."""
        if "sending" not in await self._live_now():
            return False
        busy = False
        for cid, part in await claim_feeds(self.sessions, self.name, self.index, self.count):
            if self._stopping:
                break
            if await self.feed(cid, part):
                busy = True
        return busy

    # ------------------------------------------------------------------ feeding

    async def feed(self, campaign_id: int, part: int) -> int:
        """One step of a part this runner holds: how many records it handed on."""
        cfg = self.cfg.campaigns
        async with self.sessions() as s:
            row = await s.get(Campaign, campaign_id)
            if row is None or row.state != "sending" or not row.parts:
                await s.rollback()
                await release_feed(self.sessions, campaign_id, part, self.name)
                return 0
            if not await renew_feed(s, campaign_id, part, self.name):
                await s.rollback()
                return 0
            await s.commit()
            send_window = _window(row)
            now = dt.datetime.now(dt.UTC)
            if send_window is not None and not allowed(send_window, now):
                # Closed in the campaign's zone: whoever has no zone of their own waits
                # (one statement); the others are looked at one by one below.
                await wait_unzoned(s, row, next_open(send_window, now))
                await s.commit()
            window = max(1, cfg.feed_window // row.parts)
            room = window - await in_flight(s, campaign_id, part, row.parts)
            if room <= 0:
                return 0
            records = await pending(s, campaign_id, part, row.parts, min(room, cfg.feed_batch))
            if not records:
                return 0
            job = await self._job(s, row)
            if job is None:
                return 0
            ended: dict[int, tuple[str, str]] = {}
            waiting: dict[int, dt.datetime | None] = {}
            contacts = await _contacts(s, row.tenant_id, [r.contact_id for r in records])
            capped = {}
            if job.frequency_cap:
                capped = await sent_today(s, row.tenant_id, row.id, [r.contact_id for r in records])
            # The contacts' own frequency (the preference center): one bulk message a
            # week or a month at most.
            recent: dict[int, int] = {}
            for freq, days in FREQUENCY_DAYS.items():
                ids = [r.contact_id for r in records
                       if (contacts.get(r.contact_id) or {}).get("frequency") == freq]  # fmt: skip
                if ids:
                    recent |= await sent_today(s, row.tenant_id, row.id, ids, days)
            items, recover, fresh = [], [], {}
            for r in records:
                person = contacts.get(r.contact_id)
                if person is None:
                    ended[r.id] = ("suppressed", "contact_deleted")
                    continue
                if person["status"] != "active":
                    ended[r.id] = ("suppressed", person["status"])
                    continue
                if job.frequency_cap and capped.get(r.contact_id, 0) >= job.frequency_cap:
                    ended[r.id] = ("suppressed", "frequency_cap")
                    continue
                if recent.get(r.contact_id, 0) >= 1:
                    ended[r.id] = ("suppressed", "frequency_preference")
                    continue
                if send_window is not None and not r.message_id:
                    zone = person["timezone"]
                    if not allowed(send_window, now, zone):
                        waiting[r.id] = next_open(send_window, now, zone)
                        continue
                variant = r.variant
                if job.split is not None and variant is None:
                    variant = job.split.assign(r.contact_id) or job.winner
                    if variant is None:  # outside the test portion: waits for the winner
                        waiting[r.id] = None
                        continue
                msg_id = r.message_id or new_message_id()
                item = Item(r.id, r.contact_id, r.email, msg_id, person, variant)
                if r.message_id:
                    recover.append(item)
                else:
                    fresh[r.id] = (msg_id, variant)
                items.append(item)
            await set_message_ids(s, fresh)
            await s.commit()
        queued: list[int] = []
        if recover:
            found = await asyncio.to_thread(self._in_spool, row, recover)
            for item in recover:
                stored = found.get(item.record_id)
                if stored is None:
                    continue  # never reached the spool: sent below, under its id
                queued_or_drop(item.record_id, stored, queued, ended)
                items.remove(item)
        # The tenant's links key (made on its first campaign): List-Unsubscribe's token,
        # and the tracked links'.
        signer = await self.plane.tenant_keys.signer(row.tenant_id) if items else None
        await asyncio.to_thread(self._render_all, job, items, signer)
        todo = []
        for item in items:
            if item.error:
                ended[item.record_id] = ("failed", item.error)
            else:
                todo.append(item)
        # All at once: the spool commits them together (one fsync for the lot).
        answers = await asyncio.gather(
            *(self.submit(self._envelope(job, i), i.data, i.msg_id) for i in todo),
            return_exceptions=True,
        )
        stop = None
        for item, answer in zip(todo, answers, strict=True):
            if isinstance(answer, StoredMessage):
                queued_or_drop(item.record_id, answer, queued, ended)
            elif isinstance(answer, Rejected) and answer.code >= 500:
                stop = f"acceptance refused its messages: {answer.code} {answer.text}"
            elif isinstance(answer, (Rejected, SpoolFull)) or is_unavailable(answer):
                pass  # temporary: it stays pending, and is looked for in the spool next
            elif isinstance(answer, BaseException):
                _limited(logging.ERROR, "campaign_submit", "event=campaign_submit_failed",
                         exc=answer)  # fmt: skip
        async with self.sessions() as s:
            await settle(s, queued=queued, ended=ended, waiting=waiting)
            if stop is not None:
                fresh_row = await s.get(Campaign, campaign_id)
                if fresh_row is not None and await move(s, fresh_row, "pause", stop):
                    log.warning("event=campaign_paused campaign=%d why=%r", campaign_id, stop)
            await s.commit()
            state = await s.scalar(select(Campaign.state).where(Campaign.id == campaign_id))
        if state in AFTER_STOP and queued:
            # Paused or cancelled while this step handed its messages on: the API's
            # hold (or delete) of what was in the spool did not see these yet.
            by_id = {i.record_id: i.msg_id for i in items}
            await self.spool_action(
                campaign_id, AFTER_STOP[state], [by_id[r] for r in queued if r in by_id]
            )
        return len(queued) + len(ended)

    async def _job(self, s: Any, row: Campaign) -> Job | None:
        tenant = await s.get(Tenant, row.tenant_id)
        why = None
        pool = None
        look = await _version_look(s, row.template_id, row.template_version, row.from_email,
                           row.from_name)  # fmt: skip
        variants: dict[str, Look] = {}
        split = None
        if look is None:
            why = f"template version {row.template_version} is gone"
        if row.ab and look is not None:
            split = Split(
                f"campaign:{row.id}/ab",
                tuple(Variant(v["name"], float(v["weight"])) for v in row.ab["variants"]),
                float(row.ab["portion"]),
            )
            for v in row.ab["variants"]:
                base = look
                if "template_id" in v:
                    found = await _version_look(s, v["template_id"], v.get("template_version"),
                                        row.from_email, row.from_name)  # fmt: skip
                    if found is None:
                        why = f"variant {v['name']}: its template version is gone"
                        break
                    base = found
                if "subject" in v:
                    base = dataclasses.replace(
                        base, parts=dataclasses.replace(base.parts, subject=v["subject"])
                    )
                if "from_email" in v:
                    base = dataclasses.replace(
                        base, from_email=v["from_email"], from_name=v.get("from_name", "")
                    )
                variants[v["name"]] = base
        if why is None:
            try:
                pool = self.plane.pool_cache.pool_for(row.tenant_id, row.pool)
            except PoolNotAllowed as exc:
                why = f"pool: {exc}"
        if why is not None or look is None:
            await s.rollback()
            if await move(s, row, "pause", why or "the template is gone"):
                await s.commit()
            return None
        settings = (tenant.settings if tenant else None) or {}
        return Job(
            campaign=row,
            look=look,
            postal_address=postal_address_of(tenant),
            pool=pool,
            frequency_cap=int(settings.get("frequency_cap") or 0),
            tracking=row.tracking or str(settings.get("tracking") or "anonymous"),
            tracking_base=await tracking_base(
                s, self.plane, row.tenant_id, row.from_email.rpartition("@")[2]
            ),
            split=split,
            variants=variants,
            winner=(row.ab or {}).get("winner"),
        )

    async def spool_action(
        self, campaign_id: int, action: str, ids: list[str] | None = None
    ) -> int:
        """``hold``, ``release`` or ``delete`` the campaign's messages in the spool
        (``ids``, else every one of its records there): a pause holds what was already
        handed on, a resume releases it, a cancel takes it out (``deleted`` events make
        the records ``cancelled``). A recipient in the middle of an attempt finishes it.
        Returns how many recipients changed."""
        root = self.plane.spool_root
        if root is None:
            return 0
        if ids is None:
            async with self.sessions() as s:
                ids = await in_spool_ids(s, campaign_id)
        if not ids:
            return 0

        def run() -> int:
            admin = QueueAdmin(root)
            try:
                return admin.act_on(action, ids)
            finally:
                admin.close()

        n = await asyncio.to_thread(run)
        log.info("event=campaign_spool campaign=%d action=%s recipients=%d", campaign_id, action, n)
        return n

    def _in_spool(self, row: Campaign, items: list[Item]) -> dict[int, StoredMessage]:
        """Which of ``items`` the spool has (a step cut off by a crash): record id ->
        what was stored."""
        root = self.plane.spool_root
        out = {}
        for item in items:
            key = spool_key(row.id, item.contact_id)
            found = find_idempotent(root, str(row.tenant_id), key) if root else []
            for _part, digest, msg_id, answer in found:
                if digest != SPOOL_HASH:
                    continue
                drops = {a: why for a, _rid, why in answer if why}
                out[item.record_id] = StoredMessage(msg_id, (), (), drops)
        return out

    def _render_all(self, job: Job, items: list[Item], signer: LinkKey | None) -> None:
        """Render and build each item's message (in a thread: templates are CPU)."""
        row = job.campaign
        host = self.cfg.server.hostname
        now = time.time()
        base = job.tracking_base or public_base_url(self.cfg)
        for item in items:
            person = item.contact
            look = job.look_of(item.variant)
            domain = look.from_email.rpartition("@")[2]
            links = dict(PLACEHOLDER_URLS)  # view online: not yet
            if signer is not None:
                links["preferences_url"] = preferences_url(self.plane, signer, row.id,
                                                           item.contact_id)  # fmt: skip
            url, headers = recipient_links(self.plane, row.tenant_id, row.id, item.contact_id,
                                           domain, signer)  # fmt: skip
            links["unsubscribe_url"] = url
            headers.append(("Feedback-ID", f"c{row.id}:t{row.tenant_id}:campaign:postwarden"))
            context = send_context(
                contact={
                    "email": item.email,
                    "name": person["name"],
                    "attributes": person["attributes"],
                },
                postal_address=job.postal_address,
                samples=look.samples,
                urls=links,
            )
            try:
                out = render_message(look.parts, context)
                html = out.html
                if html is not None and signer is not None and job.tracking != "off":
                    named = job.tracking == "per_recipient"
                    tracker = Tracker(
                        self.plane.tenant_keys, signer, base, row.id,
                        item.contact_id if named else 0, item.msg_id if named else "",
                    )  # fmt: skip
                    html = rewrite_html(
                        html, tracker.click, skip=list(links.values()), pixel_url=tracker.pixel
                    ).html
                draft = Draft(
                    sender=Mailbox(look.from_email, look.from_name or ""),
                    to=[Mailbox(item.email, person["name"] or "")],
                    reply_to=Mailbox(row.reply_to) if row.reply_to else None,
                    subject=out.subject,
                    text=out.text,
                    html=html,
                    headers=headers,
                )
                item.data = build_alternative(draft, message_id=f"<{item.msg_id}@{host}>", date=now)
            except (RenderError, BuildError) as exc:
                item.error = f"render: {exc}"[:200]
                continue
            item.subject = out.subject
            item.smtputf8 = needs_smtputf8(draft) or not item.email.isascii()

    def _envelope(self, job: Job, item: Item) -> Envelope:
        row = job.campaign
        meta = {**(row.meta or {}), "campaign_id": str(row.id), "contact_id": str(item.contact_id)}
        if item.variant is not None:
            meta["variant"] = item.variant
        return Envelope(
            mail_from=job.look_of(item.variant).from_email,
            rcpt_tos=[item.email],
            helo="campaign",
            tenant=str(row.tenant_id),
            smtputf8=item.smtputf8,
            body_8bit=not item.data.isascii(),
            meta={
                "source": "campaign",
                "subject": item.subject[:300],
                "tags": list(row.tags or []),
                "metadata": meta,
            },
            pool=job.pool,
            lane=LANE_BULK,
            idempotency=(spool_key(row.id, item.contact_id), SPOOL_HASH, 0),
        )

    async def _cancel_pending(self) -> int:
        """Pending records of cancelled campaigns: ``cancelled``, unless a step cut off
        by a crash had handed one to the spool (then ``queued``)."""
        rows = await cancelled_pending(self.sessions)
        if not rows:
            return 0
        queued: list[int] = []
        ended: dict[int, tuple[str, str]] = {}
        root = self.plane.spool_root
        for rid, cid, tenant_id, contact_id, msg_id in rows:
            found = []
            if msg_id and root:
                found = await asyncio.to_thread(
                    find_idempotent, root, str(tenant_id), spool_key(cid, contact_id)
                )
            if any(h == SPOOL_HASH for _p, h, _m, _a in found):
                queued.append(rid)
            else:
                ended[rid] = ("cancelled", "the campaign was cancelled")
        async with self.sessions() as s:
            await settle(s, queued=queued, ended=ended)
            await s.commit()
        return len(rows)


def queued_or_drop(
    rid: int, stored: StoredMessage, queued: list[int], ended: dict[int, tuple[str, str]]
) -> None:
    """The record's state from what the spool stored: dropped by the suppression
    check (``suppressed`` with its reason), else ``queued``."""
    if stored.drops:
        ended[rid] = ("suppressed", next(iter(stored.drops.values())))
    else:
        queued.append(rid)


def _window(row: Campaign) -> SendWindow | None:
    if not row.send_window:
        return None
    try:
        return parse_window(row.send_window)
    except WindowError:  # validated when stored: a zone this host no longer knows
        log.warning("event=campaign_window_unreadable campaign=%d", row.id)
        return None


async def _version_look(
    s: Any, template_id: int, version: int | None, from_email: str, from_name: str
) -> Look | None:
    """A template version (fixed at validation) and a From; None when it is gone."""
    found = (
        await s.execute(
            select(TemplateVersion).where(
                TemplateVersion.template_id == template_id, TemplateVersion.version == version
            )
        )
    ).scalar_one_or_none()
    if found is None:
        return None
    samples = {v["name"]: v.get("sample") for v in found.variables or []}
    return Look(parts_of(found), samples, from_email, from_name)


async def _contacts(s: Any, tenant_id: int, ids: list[int]) -> dict[int, dict[str, Any]]:
    rows = await s.execute(
        select(
            Contact.id,
            Contact.name,
            Contact.attributes,
            Contact.status,
            Contact.timezone,
            Contact.frequency,
        ).where(Contact.tenant_id == tenant_id, Contact.id.in_(ids))
    )
    return {
        int(cid): {
            "name": name or "",
            "attributes": dict(attrs or {}),
            "status": status,
            "timezone": zone or None,
            "frequency": frequency,
        }
        for cid, name, attrs, status, zone, frequency in rows.all()
    }
