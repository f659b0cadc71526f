"""A campaign's A/B test through the API, and its decision (issue 21; docs/campaigns.md
"A/B tests").

The feeder sends each contact of the test portion its variant (``campaigns.abtest``
assigns it) and holds the rest (``waiting``, reason ``ab_winner``). The test is
decided once: ``wait_hours`` after the last record of the test portion reached its
end, on conversions (``POST /v1/campaigns/{id}/conversions``) or bot-filtered clicks.
A winner is declared only when the chi-squared test gives p < 0.05 with the minimum
sample per variant; with ``winner_by: auto`` the remainder then gets the winner at
once. Otherwise the verdict says why and the remainder waits for ``POST
/v1/campaigns/{id}/ab/winner``: without a variant it asks the test again and takes a
winner only if there is one; with a variant the key chooses, and the history says the
choice was not the test's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints, model_validator
from sqlalchemy import select, update

from postwarden.campaigns.abtest import ABTestError, Verdict, decide
from postwarden.control.api import api
from postwarden.control.campaigns import (
    CampaignOut,
    Reason,
    _key,
    _out,
    campaign_of,
)
from postwarden.control.errors import ApiError, invalid, not_found
from postwarden.control.routing import Call
from postwarden.control.schemas import MAX_ID, Strict
from postwarden.store.campaign_models import Campaign, CampaignTransition, SendRecord
from postwarden.store.campaigns import (
    ab_results,
    held_for_winner,
    release_remainder,
    test_unsettled,
)
from postwarden.store.models import utcnow


def verdict_of(ab: dict[str, Any], results: dict[str, tuple[int, int]]) -> Verdict:
    """What the test's results say now (every variant listed, those with no sends
    as 0 of 0)."""
    table = {v["name"]: results.get(v["name"], (0, 0)) for v in ab["variants"]}
    return decide(table, metric=ab["metric"], min_sample=int(ab["min_sample"]),
                  allow_opens=bool(ab.get("allow_opens")))  # fmt: skip


def _said(v: Verdict) -> str:
    rates = ", ".join(f"{k} {r:.2%}" if r is not None else f"{k} -" for k, r in v.rates.items())
    need = f"; about {v.needed_per_variant} sends per variant would tell" if (
        v.needed_per_variant and not v.winner) else ""  # fmt: skip
    return f"{v.reason}: p={v.p_value:.4g}, {v.metric} {rates}{need}"


async def declare(
    s: Any, row: Campaign, winner: str, why: str, key: str | None, verdict: Verdict | None
) -> int:
    """``winner`` for the rest of the audience: stored in the test's settings, the
    records that waited released with it, and a step in the history. The caller
    commits. Returns how many records were released."""
    ab = dict(row.ab or {})
    ab["winner"], ab["decided_by"] = winner, key or "test"
    if verdict is not None:
        ab["verdict"] = dataclasses.asdict(verdict)
    await s.execute(update(Campaign).where(Campaign.id == row.id).values(ab=ab))
    row.ab = ab
    n = await release_remainder(s, row.id, winner)
    s.add(CampaignTransition(
        tenant_id=row.tenant_id, campaign_id=row.id, action="ab_winner", before=row.state,
        after=row.state, key_prefix=key, reason=why,
    ))  # fmt: skip
    return n


async def look_at_tests(sessions: Any) -> list[tuple[int, str]]:
    """The runner's one look at each test whose time has come: the decision at
    ``decide_at`` (set when the test portion is done), the winner declared when the
    test has one and the campaign decides automatically. Returns (campaign, what
    happened) for each test looked at."""
    out = []
    now = utcnow()
    async with sessions() as s:
        rows = (
            (
                await s.execute(
                    select(Campaign).where(Campaign.state == "sending", Campaign.ab.is_not(None))
                )
            )
            .scalars()
            .all()
        )
        for row in rows:
            ab = dict(row.ab or {})
            if not ab or ab.get("winner") or ab.get("verdict"):
                continue
            if "decide_at" not in ab:
                if not row.records_done or await test_unsettled(s, row.id):
                    continue
                at = now + dt.timedelta(hours=float(ab.get("wait_hours", 0)))
                ab["decide_at"] = at.isoformat()
                await s.execute(update(Campaign).where(Campaign.id == row.id).values(ab=ab))
                await s.commit()
                out.append((row.id, f"test portion done; decided at {ab['decide_at']}"))
                if at > now:
                    continue
            if dt.datetime.fromisoformat(ab["decide_at"]) > now:
                continue
            try:
                verdict = verdict_of(ab, await ab_results(s, row.id, ab["metric"]))
            except ABTestError as exc:
                verdict = None
                ab["verdict"] = {"reason": str(exc)}
            if verdict is not None and verdict.winner and ab.get("winner_by") == "auto":
                await declare(s, row, verdict.winner, f"the test: {_said(verdict)}", None, verdict)
                out.append((row.id, f"winner {verdict.winner}"))
            else:
                if verdict is not None:
                    ab["verdict"] = dataclasses.asdict(verdict)
                await s.execute(update(Campaign).where(Campaign.id == row.id).values(ab=ab))
                out.append((row.id, "no winner declared: waits for POST .../ab/winner"))
            await s.commit()
    return out


# ---------------------------------------------------------------------- the API


class VariantResult(BaseModel):
    name: str
    sends: int = Field(description="messages of this variant that reached their recipient")
    successes: int = Field(description="of those, with a conversion (or a human click)")
    rate: float | None


class AbOut(BaseModel):
    campaign_id: int
    metric: str
    variants: list[VariantResult]
    winner: str | None = Field(description="the variant the rest of the audience gets")
    decided_by: str | None = Field(description="the key that chose it, or test")
    decide_at: str | None = Field(description="when the test is decided (once its portion is done)")
    waiting_for_winner: int = Field(description="records held for the winner")
    verdict: dict[str, Any] = Field(
        description="what the results say now: reason (winner, not significant, sample"
        " too small), p_value, rates, needed_per_variant, winner"
    )


class WinnerIn(Strict):
    variant: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,32}$")] | None = Field(
        None, description="omitted: the test's winner, if it has one (else 409)"
    )
    reason: Reason = ""


class ConversionIn(Strict):
    contact_id: Annotated[int, Field(ge=1, le=MAX_ID)] | None = None
    message_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{22}$")] | None = None

    @model_validator(mode="after")
    def _one(self) -> ConversionIn:
        if (self.contact_id is None) == (self.message_id is None):
            raise ValueError("give contact_id or message_id")
        return self


class ConversionOut(BaseModel):
    record_id: int
    contact_id: int
    variant: str | None
    converted_at: dt.datetime


def _test_of(row: Campaign) -> dict[str, Any]:
    if not row.ab:
        raise not_found("A/B test")
    return dict(row.ab)


@api.op(
    "GET",
    "/v1/campaigns/{campaign_id:int}/ab",
    summary="A campaign's A/B test: results per variant, the verdict, the winner",
    scope="read",
    response=AbOut,
    errors=(404,),
)
async def get_ab(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        row = await campaign_of(s, c)
        ab = _test_of(row)
        results = await ab_results(s, row.id, ab["metric"])
        held = await held_for_winner(s, row.id)
    verdict = verdict_of(ab, results)
    variants = []
    for v in ab["variants"]:
        n, ok = results.get(v["name"], (0, 0))
        variants.append(VariantResult(name=v["name"], sends=n, successes=ok,
                                      rate=ok / n if n else None))  # fmt: skip
    return AbOut(
        campaign_id=row.id, metric=ab["metric"], variants=variants, winner=ab.get("winner"),
        decided_by=ab.get("decided_by"), decide_at=ab.get("decide_at"),
        waiting_for_winner=held, verdict=dataclasses.asdict(verdict),
    )  # fmt: skip


@api.op(
    "POST",
    "/v1/campaigns/{campaign_id:int}/ab/winner",
    summary="Send the rest of the audience the test's winner, or a variant chosen",
    scope="approve",
    body=WinnerIn,
    response=CampaignOut,
    errors=(404, 409, 422),
    sync=False,
)
async def choose_winner(c: Call) -> Any:
    """Without ``variant``: the test is asked now, and a winner is taken only if it
    has one (p < 0.05 with the minimum sample); otherwise 409 with its verdict. With
    ``variant``: that variant, recorded in the history as the key's choice with what
    the test said."""
    b: WinnerIn = c.body
    async with c.ctx.sessions() as s:
        row = await campaign_of(s, c, lock=True)
        ab = _test_of(row)
        if ab.get("winner"):
            raise ApiError(409, "conflict", f"the test was decided: {ab['winner']}")
        if row.state not in ("sending", "paused"):
            raise ApiError(409, "conflict", f"the campaign is {row.state}: only a launched"
                           " campaign's test is decided")  # fmt: skip
        verdict = verdict_of(ab, await ab_results(s, row.id, ab["metric"]))
        names = [v["name"] for v in ab["variants"]]
        if b.variant is None:
            if verdict.winner is None:
                raise ApiError(409, "conflict", f"no winner: {_said(verdict)}")
            chosen, why = verdict.winner, f"the test: {_said(verdict)}"
        else:
            if b.variant not in names:
                raise invalid("variant", f"one of {', '.join(names)}")
            chosen = b.variant
            said = _said(verdict)
            why = f"chosen by the key ({b.reason or 'no reason given'}); the test said {said}"
        await declare(s, row, chosen, why, _key(c), verdict)
        await s.commit()
    runner = getattr(c.ctx, "campaigns", None)
    if runner is not None:
        runner.wake()
    return _out(row)


@api.op(
    "POST",
    "/v1/campaigns/{campaign_id:int}/conversions",
    summary="Report a conversion of a campaign's recipient (for its A/B test)",
    scope="send",
    body=ConversionIn,
    response=ConversionOut,
    errors=(404, 422),
    sync=False,
)
async def add_conversion(c: Call) -> Any:
    """The recipient by contact id or by the message id they were sent; the first
    conversion counts (a repeat answers the same)."""
    b: ConversionIn = c.body
    async with c.ctx.sessions() as s:
        row = await campaign_of(s, c)
        stmt = select(SendRecord).where(SendRecord.campaign_id == row.id)
        if b.contact_id is not None:
            stmt = stmt.where(SendRecord.contact_id == b.contact_id)
        else:
            stmt = stmt.where(SendRecord.message_id == b.message_id)
        rec = (await s.execute(stmt.with_for_update())).scalar_one_or_none()
        if rec is None or rec.sent_at is None:
            raise not_found("sent record")
        if rec.converted_at is None:
            rec.converted_at = utcnow()
            await s.commit()
        return ConversionOut(record_id=rec.id, contact_id=rec.contact_id, variant=rec.variant,
                             converted_at=rec.converted_at)  # fmt: skip
