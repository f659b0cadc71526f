"""Operator routes for traffic shaping and warming (docs/api.md, docs/shaping.md).

They speak to the shaping broker (the supervisor's, or this process's own) through
the worker's :class:`~postwarden.shaping.shaper.Shaper`; the broker keeps the state.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from postwarden.control.api import api
from postwarden.control.errors import ApiError, invalid
from postwarden.control.routing import Call


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class CustomPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("custom", max_length=64)
    days: dict[int, int] | list[int] = Field(
        description="{day: volume} anchors or every day's volume"
    )
    site_fractions: dict[str, float] = Field(default_factory=dict)


class WarmingStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan: Literal["conservative", "moderate", "aggressive"] | CustomPlan = "moderate"
    day: int = Field(1, ge=1, le=366)


class PauseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("paused by an operator", max_length=200)


async def _command(c: Call, **args: Any) -> dict[str, Any]:
    command = c.ctx.shaping_command
    if command is None:
        raise ApiError(
            503, "unavailable", "traffic shaping runs with the MTA (serve --role all|mta)"
        )
    try:
        answer: dict[str, Any] = await command(**args)
    except ValueError as exc:
        msg = str(exc)
        path, _, rest = msg.partition(": ")
        if path in ("name", "plan", "target", "day") and rest:
            raise invalid(path, rest) from None
        raise ApiError(409, "conflict", msg) from None
    except (ConnectionError, TimeoutError) as exc:
        raise ApiError(503, "unavailable", f"the shaping broker did not answer: {exc!r}") from None
    answer.pop("id", None)
    answer.pop("ok", None)
    return answer


@api.op(
    "GET",
    "/v1/shaping",
    summary="Shaping status: pairs, actions, sources, warming",
    scope="admin",
    response=_Open,
)
async def shaping_status(c: Call) -> Any:
    """Every (source, site) pair with its rate and connection limit in force, its
    suspension and recent changes with their reasons; the response-rule actions taken;
    each source's state and health; every warming plan's progress."""
    return await _command(c, op="status")


@api.op(
    "POST",
    "/v1/shaping/reload",
    summary="Reload the shaping rules file",
    scope="admin",
    response=_Open,
    errors=(409,),
)
async def shaping_reload(c: Call) -> Any:
    """Re-read ``shaping.rules_file``; a bad file is refused (409, with the line and the
    key) and the rules in force stay."""
    return await _command(c, op="reload")


@api.op(
    "GET",
    "/v1/warming",
    summary="Every warming plan and paused sender",
    scope="admin",
    response=_Open,
)
async def warming_list(c: Call) -> Any:
    return await _command(c, op="warming_list")


_TARGET = "/v1/warming/{target:str}/{name:str}"


def _target(c: Call) -> dict[str, Any]:
    target = c.path["target"]
    if target not in ("source", "domain"):
        raise invalid("target", "must be source or domain")
    return {"target": target, "name": c.path["name"]}


@api.op(
    "GET",
    _TARGET,
    summary="Warming progress and health of a source or sending domain",
    scope="admin",
    response=_Open,
    errors=(404,),
)
async def warming_progress(c: Call) -> Any:
    """Plan, day, today's cap, sent today (and per site), history, health score and tier."""
    return await _command(c, op="progress", **_target(c))


@api.op(
    "POST",
    _TARGET + "/start",
    summary="Start a warming plan",
    scope="admin",
    body=WarmingStart,
    response=_Open,
)
async def warming_start(c: Call) -> Any:
    """A built-in plan by name, or a custom one (``days``: ``{day: volume}`` anchors or
    every day's volume; optional ``site_fractions``)."""
    body: WarmingStart = c.body
    plan = body.plan if isinstance(body.plan, str) else body.plan.model_dump()
    return await _command(c, op="warming_start", plan=plan, day=body.day, **_target(c))


@api.op(
    "POST",
    _TARGET + "/stop",
    summary="End a warming plan (the sender is warm)",
    scope="admin",
    response=_Open,
    errors=(409,),
)
async def warming_stop(c: Call) -> Any:
    return await _command(c, op="warming_stop", **_target(c))


@api.op(
    "POST",
    _TARGET + "/pause",
    summary="Pause a source or sending domain",
    scope="admin",
    body=PauseBody,
    response=_Open,
)
async def warming_pause(c: Call) -> Any:
    """Its mail waits (never bounced) until resumed."""
    return await _command(c, op="pause", reason=c.body.reason, **_target(c))


@api.op(
    "POST",
    _TARGET + "/resume",
    summary="Resume a paused source or sending domain",
    scope="admin",
    response=_Open,
    errors=(409,),
)
async def warming_resume(c: Call) -> Any:
    """Ends a pause, an operator's or an automatic one (a pause is sticky until this)."""
    return await _command(c, op="resume", **_target(c))
