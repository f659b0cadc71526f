"""A campaign's launch in the database (issue 21; docs/campaigns.md): who it goes to
is fixed by a snapshot of its audience, and each of them gets one send record, written
by the database in batches (``INSERT … SELECT``), ``pending`` or ``suppressed`` with
the reason. The feeder sends from these records only.

A batch starts after the highest contact id already written for the campaign and
inserts with ``ON CONFLICT DO NOTHING`` on (campaign, contact): a launch interrupted
anywhere resumes where it stopped, and a batch written twice changes nothing.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Table, and_, bindparam, case, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from postwarden.campaigns.lifecycle import TransitionError, transition
from postwarden.store.audience_models import Audience, SnapshotMember
from postwarden.store.audiences import plan_for, take_snapshot
from postwarden.store.campaign_models import (
    Campaign,
    CampaignFeed,
    CampaignTransition,
    SendRecord,
)
from postwarden.store.contact_models import Contact
from postwarden.store.engagement_models import TrackingHit
from postwarden.store.leases import is_dead
from postwarden.store.models import BigId, Suppression, utcnow
from postwarden.store.rollups import Key, add_counts, hour_of

RECORDS: Table = SendRecord.__table__  # type: ignore[assignment]
#: Makes a session of the control database.
Sessions = Callable[[], Any]
#: Records one launch batch writes (one statement, one commit).
LAUNCH_BATCH = 5000


async def snapshot_audience(session: AsyncSession, campaign: Campaign) -> int:
    """Take the snapshot the campaign sends to (once: a campaign that has one keeps
    it) and return its id. The caller commits."""
    if campaign.snapshot_id is not None:
        return campaign.snapshot_id
    audience = await session.get(Audience, campaign.audience_id)
    if audience is None or audience.tenant_id != campaign.tenant_id:
        raise LookupError(f"audience {campaign.audience_id} is gone")
    plan = await plan_for(session, campaign.tenant_id, audience.rule)
    # Every contact the rule matches, whatever its status: those not active get a
    # ``suppressed`` record saying why, not silence.
    snap = await take_snapshot(
        session, campaign.tenant_id, audience.id, audience.rule, plan, any_status=True
    )
    campaign.snapshot_id = snap.id
    return snap.id


def _insert(dialect: str) -> Any:
    return (postgresql if dialect == "postgresql" else sqlite).insert(SendRecord)


async def write_records(
    session: AsyncSession, campaign: Campaign, batch: int = LAUNCH_BATCH
) -> int:
    """Write the next ``batch`` send records of the campaign's snapshot, in contact id
    order; return how many were written (0: every member has one). The caller commits.

    A member whose contact is not ``active``, or whose address has a suppression in
    force, is ``suppressed`` with the reason (the suppression's, else the contact's
    status); the rest are ``pending``. A member deleted as a contact since the snapshot
    gets no record."""
    if campaign.snapshot_id is None:
        raise ValueError("the campaign has no snapshot: snapshot_audience first")
    after = await session.scalar(
        select(func.coalesce(func.max(SendRecord.contact_id), 0)).where(
            SendRecord.campaign_id == campaign.id
        )
    )
    now = utcnow()
    sup = and_(
        Suppression.tenant_id == campaign.tenant_id,
        Suppression.address == Contact.email,
        or_(Suppression.expires_at.is_(None), Suppression.expires_at > now),
    )
    inactive = Contact.status != "active"
    chosen = (
        select(
            literal(campaign.tenant_id, BigId),
            literal(campaign.id, BigId),
            SnapshotMember.contact_id,
            Contact.email,
            case(
                (Suppression.id.is_not(None), "suppressed"),
                (inactive, "suppressed"),
                else_="pending",
            ),
            case(
                (Suppression.id.is_not(None), Suppression.reason),
                (inactive, Contact.status),
                else_="",
            ),
            literal(now),
        )
        .select_from(
            SnapshotMember.__table__.join(
                Contact.__table__, Contact.id == SnapshotMember.contact_id
            ).outerjoin(Suppression.__table__, sup)
        )
        .where(
            SnapshotMember.snapshot_id == campaign.snapshot_id,
            SnapshotMember.contact_id > after,
            Contact.tenant_id == campaign.tenant_id,
        )
        .order_by(SnapshotMember.contact_id)
        .limit(batch)
    )
    columns = ["tenant_id", "campaign_id", "contact_id", "email", "state", "reason",
               "updated_at"]  # fmt: skip
    stmt = (
        _insert(session.get_bind().dialect.name)
        .from_select(columns, chosen)
        .on_conflict_do_nothing(index_elements=["campaign_id", "contact_id"])
    )
    result = await session.execute(stmt)
    written = int(result.rowcount)  # type: ignore[attr-defined]
    if written:
        await _count_recipients(session, campaign, int(after or 0), now)
    return written


async def _count_recipients(
    session: AsyncSession, campaign: Campaign, after: int, now: dt.datetime
) -> None:
    """The batch's records into the campaign's rollups (``recipients``, and
    ``skipped``: suppressed at launch), in the batch's transaction: they are this
    transaction's (the contact ids after ``after``; one launcher at a time)."""
    states = await session.execute(
        select(SendRecord.state, func.count())
        .where(SendRecord.campaign_id == campaign.id, SendRecord.contact_id > after)
        .group_by(SendRecord.state)
    )
    counts: Counter[Key] = Counter()
    hour = hour_of(now)
    for state, n in states.all():
        counts[(campaign.tenant_id, "campaign", str(campaign.id), "", "", hour, "recipients")] += n
        if state == "suppressed":
            counts[(campaign.tenant_id, "campaign", str(campaign.id), "", "", hour, "skipped")] += n
    await add_counts(session, counts)


async def record_counts(session: AsyncSession, campaign_id: int) -> dict[str, int]:
    """The campaign's records by state (states with none are left out)."""
    rows = await session.execute(
        select(SendRecord.state, func.count())
        .where(SendRecord.campaign_id == campaign_id)
        .group_by(SendRecord.state)
    )
    return {state: int(n) for state, n in rows.all()}


async def tracking_counts(session: AsyncSession, campaign_id: int) -> dict[str, int]:
    """The campaign's opens and clicks (docs/tracking.md): ``opened``/``clicked``,
    recipients with a human one (per-recipient tracking); ``opens``/``clicks``, human
    hits; ``machine_opens``/``machine_clicks``, hits judged a machine's. Hits not yet
    judged are in none."""
    firsts = (
        await session.execute(
            select(func.count(SendRecord.opened_at), func.count(SendRecord.clicked_at)).where(
                SendRecord.campaign_id == campaign_id
            )
        )
    ).one()
    out = {"opened": int(firsts[0]), "clicked": int(firsts[1]), "opens": 0, "clicks": 0,
           "machine_opens": 0, "machine_clicks": 0}  # fmt: skip
    rows = await session.execute(
        select(TrackingHit.kind, TrackingHit.machine, func.count())
        .where(TrackingHit.campaign_id == campaign_id, TrackingHit.machine.is_not(None))
        .group_by(TrackingHit.kind, TrackingHit.machine)
    )
    for kind, machine, n in rows.all():
        name = ("machine_" if machine else "") + ("opens" if kind == "open" else "clicks")
        out[name] = int(n)
    return out


# ---------------------------------------------------------------------- the runner

#: Seconds a runner's claim on a launch or a feed part lasts without renewal.
LEASE = 60.0
#: A free part is left to the worker it falls to (part modulo workers) for this long
#: after the launch or its last lease; then any runner takes it.
GRACE = 10.0
#: Records that are in the spool, or on their way there: the feed window counts them.
IN_FLIGHT = ("queued", "deferred")
#: Records not yet at an end: a campaign with none of these (and all its records
#: written) is sent.
OPEN = ("pending", "waiting", "queued", "deferred")


def _lease(now: dt.datetime) -> dt.datetime:
    return now + dt.timedelta(seconds=LEASE)


def _free(runner: str | None, lease: dt.datetime | None, me: str, now: dt.datetime) -> bool:
    """Whether a claim may be taken by ``me``: nobody holds it, its lease passed, its
    runner's process ended, or it is ``me``'s already."""
    return runner is None or runner == me or lease is None or lease < now or is_dead(runner)


def _same_claim(column_runner: Any, column_lease: Any, runner: str | None,
                lease: dt.datetime | None) -> Any:  # fmt: skip
    """The compare of a compare-and-set on a claim (runner and lease as read)."""
    return and_(
        column_runner == runner if runner else column_runner.is_(None),
        column_lease == lease if lease else column_lease.is_(None),
    )


def _step(row: Campaign, action: str, after: str, why: str) -> CampaignTransition:
    return CampaignTransition(
        tenant_id=row.tenant_id, campaign_id=row.id, action=action, before=row.state,
        after=after, key_prefix=None, reason=why,
    )  # fmt: skip


async def move(session: AsyncSession, row: Campaign, action: str, why: str) -> bool:
    """The runner's own transition of ``row`` (``launch``, ``finish``, ``pause``), as a
    compare-and-set on its state, with the step in its history; False when the state
    changed meanwhile (a key paused or cancelled it). The caller commits."""
    try:
        after = transition(action, row.state, launched=row.launched_at is not None).after
    except TransitionError:
        return False
    now = utcnow()
    values: dict[str, Any] = {"state": after, "updated_at": now}
    if action == "finish":
        values["finished_at"] = now
    result = await session.execute(
        update(Campaign).where(Campaign.id == row.id, Campaign.state == row.state).values(**values)
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    session.add(_step(row, action, after, why))
    return True


#: The states of campaigns that give the runner work.
LIVE = ("scheduled", "sending", "paused")


async def live_states(sessions: Sessions) -> set[str]:
    """Which of :data:`LIVE` some campaign is in (one indexed query)."""
    async with sessions() as s:
        rows = await s.execute(select(Campaign.state).where(Campaign.state.in_(LIVE)).distinct())
        return {str(st) for (st,) in rows.all()}


async def start_due(sessions: Sessions, parts: int) -> list[int]:
    """Launch every scheduled campaign whose time has come: ``sending``, with its feed
    split in ``parts`` parts (one per worker). Two runners never launch one twice."""
    now = utcnow()
    started = []
    async with sessions() as s:
        due = (
            (
                await s.execute(
                    select(Campaign)
                    .where(
                        Campaign.state == "scheduled",
                        or_(Campaign.scheduled_at.is_(None), Campaign.scheduled_at <= now),
                    )
                    .order_by(Campaign.id)
                    .limit(20)
                )
            )
            .scalars()
            .all()
        )
        for row in due:
            if not await move(s, row, "launch", "its scheduled time came"):
                await s.rollback()
                continue
            await s.execute(
                update(Campaign)
                .where(Campaign.id == row.id)
                .values(launched_at=now, parts=parts, records_done=False)
            )
            s.add_all(CampaignFeed(campaign_id=row.id, part=p) for p in range(parts))
            await s.commit()
            started.append(row.id)
    return started


async def claim_launch(sessions: Sessions, me: str) -> int | None:
    """A launched campaign whose records are still being written and that no live
    runner writes: claimed by ``me`` (compare-and-set on runner and lease)."""
    now = utcnow()
    async with sessions() as s:
        rows = (
            await s.execute(
                select(Campaign.id, Campaign.runner, Campaign.lease_until)
                .where(
                    Campaign.state.in_(("sending", "paused", "cancelled")),
                    Campaign.records_done.is_(False),
                    Campaign.launched_at.is_not(None),
                )
                .order_by(Campaign.id)
                .limit(20)
            )
        ).all()
        for cid, runner, lease in rows:
            if not _free(runner, lease, me, now):
                continue
            result = await s.execute(
                update(Campaign)
                .where(
                    Campaign.id == cid,
                    _same_claim(Campaign.runner, Campaign.lease_until, runner, lease),
                )
                .values(runner=me, lease_until=_lease(now))
            )
            await s.commit()
            if getattr(result, "rowcount", 0) == 1:
                return int(cid)
    return None


async def launch_step(sessions: Sessions, campaign_id: int, me: str, batch: int) -> int | None:
    """One step of writing a claimed campaign's records (the snapshot first): how many
    were written, 0 when all are (the claim is then let go), None when the claim was
    lost. A cancelled campaign stops here; one whose audience is gone is cancelled."""
    async with sessions() as s:
        row = await s.get(Campaign, campaign_id)
        if row is None or row.runner != me:
            return None
        now = utcnow()
        if row.state == "cancelled":
            n = 0
        elif row.snapshot_id is None:
            try:
                await snapshot_audience(s, row)
            except LookupError as exc:
                await move(s, row, "cancel", f"the launch stopped: {exc}")
                n = 0
            else:
                n = -1  # the snapshot is a step of its own
        else:
            n = await write_records(s, row, batch)
        if n == 0:
            row.records_done, row.runner, row.lease_until = True, None, None
        else:
            row.lease_until = _lease(now)
        await s.commit()
        return max(n, 1) if n else 0


async def claim_feeds(sessions: Sessions, me: str, index: int, count: int) -> list[tuple[int, int]]:
    """Take the feed parts of sending campaigns that nobody live holds: the parts that
    fall to this worker (``part % count == index``) at once, others once they have been
    free for :data:`GRACE`. Returns every part ``me`` holds."""
    now = utcnow()
    held = []
    async with sessions() as s:
        rows = (
            await s.execute(
                select(
                    CampaignFeed.campaign_id,
                    CampaignFeed.part,
                    CampaignFeed.runner,
                    CampaignFeed.lease_until,
                    Campaign.launched_at,
                )
                .join(Campaign, Campaign.id == CampaignFeed.campaign_id)
                .where(Campaign.state == "sending")
                .order_by(CampaignFeed.campaign_id, CampaignFeed.part)
                .limit(500)
            )
        ).all()
        for cid, part, runner, lease, launched in rows:
            if runner == me:
                held.append((int(cid), int(part)))
                continue
            if not _free(runner, lease, me, now):
                continue
            # Another worker's part: only once it has been free for GRACE (after its
            # lease, or after the launch), so that its own worker takes it first.
            since = lease or launched
            if (
                part % count != index
                and since is not None
                and since > now - dt.timedelta(seconds=GRACE)
            ):
                continue
            result = await s.execute(
                update(CampaignFeed)
                .where(
                    CampaignFeed.campaign_id == cid,
                    CampaignFeed.part == part,
                    _same_claim(CampaignFeed.runner, CampaignFeed.lease_until, runner, lease),
                )
                .values(runner=me, lease_until=_lease(now))
            )
            await s.commit()
            if getattr(result, "rowcount", 0) == 1:
                held.append((int(cid), int(part)))
    return held


async def renew_feed(session: AsyncSession, campaign_id: int, part: int, me: str) -> bool:
    """Keep the claim on a part (in the caller's transaction); False when it was lost."""
    result = await session.execute(
        update(CampaignFeed)
        .where(
            CampaignFeed.campaign_id == campaign_id,
            CampaignFeed.part == part,
            CampaignFeed.runner == me,
        )
        .values(lease_until=_lease(utcnow()))
    )
    return getattr(result, "rowcount", 0) == 1


async def release_feed(sessions: Sessions, campaign_id: int, part: int, me: str) -> None:
    async with sessions() as s:
        await s.execute(
            update(CampaignFeed)
            .where(
                CampaignFeed.campaign_id == campaign_id,
                CampaignFeed.part == part,
                CampaignFeed.runner == me,
            )
            .values(runner=None, lease_until=None)
        )
        await s.commit()


def _of_part(campaign_id: int, part: int, parts: int) -> Any:
    cond = SendRecord.campaign_id == campaign_id
    return and_(cond, SendRecord.id % parts == part) if parts > 1 else cond


async def in_flight(session: AsyncSession, campaign_id: int, part: int, parts: int) -> int:
    """The part's records in the spool and not yet delivered or failed."""
    n = await session.scalar(
        select(func.count())
        .select_from(SendRecord)
        .where(_of_part(campaign_id, part, parts), SendRecord.state.in_(IN_FLIGHT))
    )
    return int(n or 0)


async def pending(
    session: AsyncSession, campaign_id: int, part: int, parts: int, limit: int
) -> list[Any]:
    """The part's next ``pending`` records in id order: (id, contact id, address,
    message id — set when a step handed it on and may not have finished —, variant)."""
    rows = await session.execute(
        select(
            SendRecord.id,
            SendRecord.contact_id,
            SendRecord.email,
            SendRecord.message_id,
            SendRecord.variant,
        )
        .where(_of_part(campaign_id, part, parts), SendRecord.state == "pending")
        .order_by(SendRecord.id)
        .limit(limit)
    )
    return list(rows.all())


async def set_message_ids(session: AsyncSession, ids: Mapping[int, tuple[str, str | None]]) -> None:
    """Give pending records the message ids they will be spooled under, and their A/B
    variant (the caller commits before handing them on: delivery's events then always
    find them, and a record keeps its variant)."""
    if ids:
        await session.execute(
            update(RECORDS)
            .where(RECORDS.c.id == bindparam("rid"))
            .values(message_id=bindparam("mid"), variant=bindparam("var")),
            [{"rid": rid, "mid": mid, "var": var} for rid, (mid, var) in ids.items()],
        )


async def settle(
    session: AsyncSession,
    *,
    queued: Sequence[int] = (),
    ended: Mapping[int, tuple[str, str]] | None = None,
    waiting: Mapping[int, dt.datetime | None] | None = None,
) -> None:
    """Records handed to the spool (``queued`` and sent now), records that will not
    be sent (id -> (state, reason)), and records that wait (id -> when their send
    window opens, or None: outside an A/B test's portion, until its winner). Only
    records still ``pending`` change (an event may have moved one already)."""
    now = utcnow()
    table = RECORDS
    if queued:
        await session.execute(
            update(SendRecord)
            .where(SendRecord.id.in_(list(queued)), SendRecord.state == "pending")
            .values(state="queued", sent_at=now, updated_at=now)
        )
    if ended:
        await session.execute(
            update(table)
            .where(
                table.c.id == bindparam("rid"),
                or_(table.c.state == "pending", table.c.state == "waiting"),
            )
            .values(state=bindparam("st"), reason=bindparam("why"), updated_at=now),
            [{"rid": rid, "st": st, "why": why[:200]} for rid, (st, why) in ended.items()],
        )
    if waiting:
        await session.execute(
            update(table)
            .where(table.c.id == bindparam("rid"), table.c.state == "pending")
            .values(
                state="waiting",
                not_before=bindparam("at"),
                reason=bindparam("why"),
                updated_at=now,
            ),
            [
                {"rid": rid, "at": at, "why": "send_window" if at else "ab_winner"}
                for rid, at in waiting.items()
            ],
        )


async def wait_unzoned(session: AsyncSession, campaign: Campaign, until: dt.datetime) -> int:
    """The campaign's window is closed in its own zone until ``until``: its pending
    records of contacts with no time zone of their own wait until then (one statement,
    however many they are). Records already handed on (with a message id) stay."""
    unzoned = select(Contact.id).where(
        Contact.tenant_id == campaign.tenant_id,
        or_(Contact.timezone.is_(None), Contact.timezone == ""),
    )
    result = await session.execute(
        update(SendRecord)
        .where(
            SendRecord.campaign_id == campaign.id,
            SendRecord.state == "pending",
            SendRecord.message_id.is_(None),
            SendRecord.contact_id.in_(unzoned),
        )
        .values(state="waiting", not_before=until, reason="send_window", updated_at=utcnow())
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def wake_waiting(sessions: Sessions) -> int:
    """Waiting records whose window has opened: ``pending`` again."""
    now = utcnow()
    n = 0
    async with sessions() as s:
        ids = (
            (await s.execute(select(Campaign.id).where(Campaign.state.in_(("sending", "paused")))))
            .scalars()
            .all()
        )
        for cid in ids:
            result = await s.execute(
                update(SendRecord)
                .where(
                    SendRecord.campaign_id == cid,
                    SendRecord.state == "waiting",
                    SendRecord.not_before <= now,
                )
                .values(state="pending", not_before=None, reason="", updated_at=now)
            )
            n += int(getattr(result, "rowcount", 0) or 0)
        await s.commit()
    return n


async def sent_today(
    session: AsyncSession,
    tenant_id: int,
    campaign_id: int,
    contact_ids: Sequence[int],
    days: int = 1,
) -> dict[int, int]:
    """How many bulk messages of the tenant's other campaigns each contact was sent in
    the last 24 hours (the frequency cap), or the last ``days`` days (a contact's
    frequency preference)."""
    if not contact_ids:
        return {}
    since = utcnow() - dt.timedelta(days=days)
    rows = await session.execute(
        select(SendRecord.contact_id, func.count())
        .where(
            SendRecord.contact_id.in_(list(contact_ids)),
            SendRecord.sent_at > since,
            SendRecord.tenant_id == tenant_id,
            SendRecord.campaign_id != campaign_id,
        )
        .group_by(SendRecord.contact_id)
    )
    return {int(c): int(n) for c, n in rows.all()}


async def finish_sent(sessions: Sessions) -> list[int]:
    """Sending campaigns whose records are all written and at an end: ``sent``."""
    done = []
    async with sessions() as s:
        rows = (
            (
                await s.execute(
                    select(Campaign).where(
                        Campaign.state == "sending", Campaign.records_done.is_(True)
                    )
                )
            )
            .scalars()
            .all()
        )
        for row in rows:
            still = await s.scalar(
                select(SendRecord.id)
                .where(SendRecord.campaign_id == row.id, SendRecord.state.in_(OPEN))
                .limit(1)
            )
            if still is None and await move(s, row, "finish", "every recipient has an outcome"):
                await s.commit()
                done.append(row.id)
    return done


async def cancelled_pending(sessions: Sessions, limit: int = LAUNCH_BATCH) -> list[Any]:
    """Pending records of cancelled campaigns (at most ``limit``): (id, campaign id,
    tenant id, contact id, message id)."""
    async with sessions() as s:
        rows = await s.execute(
            select(
                SendRecord.id,
                SendRecord.campaign_id,
                SendRecord.tenant_id,
                SendRecord.contact_id,
                SendRecord.message_id,
            )
            .join(Campaign, Campaign.id == SendRecord.campaign_id)
            .where(Campaign.state == "cancelled", SendRecord.state.in_(("pending", "waiting")))
            .limit(limit)
        )
        return list(rows.all())


# ---------------------------------------------------------------------- A/B tests

#: What an A/B test's stored settings gain as it runs (a clone starts without them).
AB_RUNTIME = ("winner", "verdict", "decide_at", "decided_by")
#: A record that reached its recipient: counted as a send of its variant.
REACHED = ("delivered", "complained")
#: The column that marks a success, by metric.
SUCCESS = {"conversions": "converted_at", "clicks": "clicked_at"}


async def ab_results(
    session: AsyncSession, campaign_id: int, metric: str
) -> dict[str, tuple[int, int]]:
    """Per variant: (sends that reached their recipient, those with a success)."""
    column = getattr(SendRecord, SUCCESS.get(metric, "converted_at"))
    rows = await session.execute(
        select(SendRecord.variant, func.count(), func.count(column))
        .where(
            SendRecord.campaign_id == campaign_id,
            SendRecord.variant.is_not(None),
            SendRecord.state.in_(REACHED),
        )
        .group_by(SendRecord.variant)
    )
    return {str(v): (int(n), int(ok)) for v, n, ok in rows.all()}


async def test_unsettled(session: AsyncSession, campaign_id: int) -> bool:
    """Whether a record is not yet at an end, but those held for the test's winner:
    while there is one, the test portion is not done (a record outside its send window
    has no variant yet, and may be in the portion)."""
    found = await session.scalar(
        select(SendRecord.id)
        .where(
            SendRecord.campaign_id == campaign_id,
            SendRecord.state.in_(OPEN),
            or_(SendRecord.state != "waiting", SendRecord.not_before.is_not(None)),
        )
        .limit(1)
    )
    return found is not None


async def held_for_winner(session: AsyncSession, campaign_id: int) -> int:
    n = await session.scalar(
        select(func.count())
        .select_from(SendRecord)
        .where(
            SendRecord.campaign_id == campaign_id,
            SendRecord.state == "waiting",
            SendRecord.not_before.is_(None),
        )
    )
    return int(n or 0)


async def release_remainder(session: AsyncSession, campaign_id: int, winner: str) -> int:
    """The records that waited for the test's winner: pending, with the winner."""
    result = await session.execute(
        update(SendRecord)
        .where(
            SendRecord.campaign_id == campaign_id,
            SendRecord.state == "waiting",
            SendRecord.not_before.is_(None),
        )
        .values(state="pending", variant=winner, reason="", updated_at=utcnow())
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def in_spool_ids(session: AsyncSession, campaign_id: int) -> list[str]:
    """The message ids of the campaign's records in the spool (queued, deferred)."""
    rows = await session.execute(
        select(SendRecord.message_id).where(
            SendRecord.campaign_id == campaign_id,
            SendRecord.state.in_(IN_FLIGHT),
            SendRecord.message_id.is_not(None),
        )
    )
    return [str(m) for (m,) in rows.all()]
