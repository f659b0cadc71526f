"""/v1/topics: a tenant's subscription categories (a newsletter, offers, product
news), and a contact's choice for each at /v1/contacts/{id}/topics/{topic_id}."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from postwarden.control.api import api, one_or_404, page, page_of
from postwarden.control.contacts import TopicChoiceOut
from postwarden.control.errors import not_found
from postwarden.control.lists import Description, ObjectName, patch, save_named
from postwarden.control.routing import Call
from postwarden.control.schemas import Deleted, Page, Strict
from postwarden.store import memberships
from postwarden.store.contact_models import Topic
from postwarden.store.contacts import contact_of

_DEFAULT = "whether a contact that made no choice counts as opted in"


class TopicCreate(Strict):
    name: ObjectName = Field(description="unique among the tenant's topics")
    description: Description = ""
    default_opt_in: bool = Field(False, description=_DEFAULT)


class TopicUpdate(Strict):
    name: ObjectName | None = None
    description: Description | None = None
    default_opt_in: bool | None = Field(None, description=_DEFAULT)


class TopicOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    description: str
    default_opt_in: bool
    created_at: dt.datetime
    updated_at: dt.datetime


class TopicList(BaseModel):
    data: list[TopicOut]
    next_cursor: str | None


class ChoiceIn(Strict):
    opted_in: bool


async def _topic(s: Any, c: Call) -> Topic:
    stmt = select(Topic).where(Topic.tenant_id == c.tenant_id, Topic.id == c.path["topic_id"])
    row: Topic = await one_or_404(s, stmt, "topic")
    return row


@api.op(
    "POST",
    "/v1/topics",
    summary="Create a topic",
    scope="manage",
    body=TopicCreate,
    response=TopicOut,
    status=201,
    errors=(409,),
    sync=False,
)
async def create_topic(c: Call) -> Any:
    b: TopicCreate = c.body
    row = Topic(tenant_id=c.tenant_id, **b.model_dump())
    async with c.ctx.sessions() as s:
        await save_named(s, row, "topic")
    return TopicOut.model_validate(row)


@api.op("GET", "/v1/topics", summary="List topics", scope="read", query=Page, response=TopicList)
async def list_topics(c: Call) -> Any:
    q: Page = c.query
    async with c.ctx.sessions() as s:
        stmt = select(Topic).where(Topic.tenant_id == c.tenant_id)
        rows = await page(s, stmt, Topic, q.cursor, q.limit)
    return TopicList(
        data=[TopicOut.model_validate(r) for r in rows], next_cursor=page_of(rows, q.limit)
    )


@api.op(
    "GET",
    "/v1/topics/{topic_id:int}",
    summary="Show a topic",
    scope="read",
    response=TopicOut,
    errors=(404,),
)
async def get_topic(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        return TopicOut.model_validate(await _topic(s, c))


@api.op(
    "PATCH",
    "/v1/topics/{topic_id:int}",
    summary="Change a topic",
    scope="manage",
    body=TopicUpdate,
    response=TopicOut,
    errors=(404, 409),
    sync=False,
)
async def update_topic(c: Call) -> Any:
    """A new ``default_opt_in`` applies to every contact that made no choice."""
    b: TopicUpdate = c.body
    async with c.ctx.sessions() as s:
        row = await _topic(s, c)
        patch(row, b)
        await save_named(s, row, "topic")
        return TopicOut.model_validate(row)


@api.op(
    "DELETE",
    "/v1/topics/{topic_id:int}",
    summary="Delete a topic (and every choice made for it)",
    scope="manage",
    response=Deleted,
    errors=(404,),
    sync=False,
)
async def delete_topic(c: Call) -> Any:
    async with c.ctx.sessions() as s:
        await s.delete(await _topic(s, c))
        await s.commit()
    return Deleted(deleted=True)


# ---------------------------------------------------------------- a contact's choices

_CHOICE = "/v1/contacts/{contact_id:int}/topics/{topic_id:int}"


async def _contact_and_topic(s: Any, c: Call) -> Topic:
    if await contact_of(s, c.tenant_id, c.path["contact_id"]) is None:
        raise not_found("contact")
    return await _topic(s, c)


@api.op(
    "PUT",
    _CHOICE,
    summary="Opt a contact in to or out of a topic",
    scope="manage",
    body=ChoiceIn,
    response=TopicChoiceOut,
    errors=(404,),
    sync=False,
)
async def choose_topic(c: Call) -> Any:
    """Records the contact's choice (replacing an earlier one); it outweighs the
    topic's ``default_opt_in``."""
    async with c.ctx.sessions() as s:
        topic = await _contact_and_topic(s, c)
        got = await memberships.choose(
            s, c.tenant_id, topic.id, c.path["contact_id"], c.body.opted_in
        )
        await s.commit()
    return TopicChoiceOut(topic_id=got.topic_id, opted_in=got.opted_in, chosen_at=got.chosen_at)


@api.op(
    "DELETE",
    _CHOICE,
    summary="Forget a contact's choice for a topic (its default applies again)",
    scope="manage",
    response=TopicChoiceOut,
    errors=(404,),
    sync=False,
)
async def unchoose_topic(c: Call) -> Any:
    """Answers the contact's standing now: the topic's default. 404 when there was no
    choice to forget."""
    async with c.ctx.sessions() as s:
        topic = await _contact_and_topic(s, c)
        if not await memberships.unchoose(s, c.tenant_id, topic.id, c.path["contact_id"]):
            raise not_found("choice")
        await s.commit()
    return TopicChoiceOut(topic_id=topic.id, opted_in=topic.default_opt_in, chosen_at=None)
