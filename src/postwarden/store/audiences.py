"""Audience rules as SQL, and what the API asks of them: the tenant's schema a rule is
bound to, counts, samples and snapshots (issue 20; docs/audiences.md).

:func:`condition` turns a bound rule (``audiences.plan``) into a SQLAlchemy Core
WHERE clause over ``contacts``, the same answer on SQLite and PostgreSQL:

* attributes: SQLite reads them with ``json_type``/``json_extract``; PostgreSQL keeps
  them as ``jsonb`` (migration 0008) and tests equality, list items and ``in`` by
  containment (``attributes @> '{"plan": "pro"}'``: exact in type and value), the rest
  through ``jsonb_typeof`` and ``->>``. Every test of a value is guarded by its JSON
  type in a ``CASE``, so that a value of another type is false (never a cast error, and
  never NULL: ``not`` of a false condition is true);
* text is compared by code point on both (``COLLATE "C"`` on PostgreSQL); substrings
  by an escaped ``LIKE`` on PostgreSQL (estimated from statistics) and by
  ``instr``/``substr`` on SQLite (whose ``LIKE`` ignores case);
* lists, topics and consent purposes are ``EXISTS`` / ``NOT EXISTS`` where they are
  terms of the rule's top-level ``and`` (semi- and anti-joins), else LEFT JOINs on
  their primary keys, once each however often the rule names them (see
  :class:`_Selection`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    and_,
    case,
    cast,
    exists,
    false,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB, JSONPATH
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from postwarden.audiences.plan import (
    NULLABLE,
    AllOf,
    AnyOf,
    AttrExists,
    AttrTest,
    ColumnTest,
    Cond,
    HasConsent,
    InList,
    Negation,
    OptedIn,
    Plan,
    Schema,
    TimeTest,
    compile_rule,
)
from postwarden.store.audience_models import AudienceSnapshot, SnapshotMember
from postwarden.store.contact_models import (
    CONTACT_STATUSES,
    Consent,
    Contact,
    ContactList,
    ListMember,
    Topic,
    TopicSubscription,
)
from postwarden.store.contacts import attribute_types
from postwarden.store.models import BigId, utcnow

Bool = ColumnElement[bool]
_LIKE_ESCAPE = re.compile(r"[\\%_]")

_ORDER: dict[str, Callable[[Any, Any], Bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _text(value: Any, op: str, arg: Any, pg: bool) -> Bool:
    """A text test of ``value`` (not NULL) as a string attribute's or a column's."""
    if op == "in":
        return value.in_(list(arg))
    if op in ("contains", "startswith", "endswith"):
        n = len(arg)
        if n == 0:
            return true()
        if pg:
            # LIKE (case-sensitive on PostgreSQL) rather than a function of the value:
            # the planner estimates a pattern from the column's statistics, while
            # ``right(email, 8) = …`` is a guess of 0.5 % that turned a count's
            # semi-joins into a million index probes (docs/performance.md).
            body = _LIKE_ESCAPE.sub(r"\\\g<0>", arg)
            pattern = {"contains": f"%{body}%", "startswith": f"{body}%"}.get(op, f"%{body}")
            return value.like(pattern, escape="\\")
        # SQLite's LIKE ignores case: compare the part itself.
        if op == "contains":
            return func.instr(value, arg) > 0
        part = func.substr(value, 1, n) if op == "startswith" else func.substr(value, -n)
        return part == arg
    if pg and op not in ("==", "!="):
        value = value.collate("C")
    return _ORDER[op](value, arg)


def _guarded(guard: Bool, test: Bool) -> Bool:
    """``test`` where ``guard`` holds, else false: never NULL, and ``test`` is only
    evaluated where it can be (a CASE, unlike AND, fixes the order)."""
    return case((guard, test), else_=false())


def _contains(doc: dict[str, Any]) -> Bool:
    return Contact.attributes.op("@>", is_comparison=True)(literal(doc, JSONB))


#: Comparisons a JSON path makes of a number or a string attribute.
_PATH_OPS = ("!=", "<", "<=", ">", ">=")


def _path_match(name: str, op: str, value: Any) -> Bool:
    """``attributes @@ 'strict $."name" op value'``: true where the attribute is of
    the value's type and compares so, false where it compares otherwise, and NULL
    where it is missing or of another type (a strict path compares numbers with
    numbers and strings with strings, by code point). One walk of the document
    rather than ``jsonb_typeof`` and ``->>`` in a CASE: 1.7 times faster, and the
    planner estimates ``@@`` from the column's statistics. NULL is false in a WHERE;
    :meth:`_Selection.condition` makes it false under ``not``."""
    path = f"strict $.{json.dumps(name)} {op} {json.dumps(value, ensure_ascii=False)}"
    return Contact.attributes.op("@@", is_comparison=True)(cast(literal(path), JSONPATH))


def _may_be_null(cond: Cond) -> bool:
    if isinstance(cond, AttrTest):
        return cond.type in ("number", "string") and cond.op in _PATH_OPS
    if isinstance(cond, AllOf | AnyOf):
        return any(_may_be_null(i) for i in cond.items)
    return False


def _attr_pg(c: AttrTest) -> Bool:
    a = Contact.attributes
    if c.op in ("==", "in") and c.type in ("string", "number", "boolean"):
        values = c.value if isinstance(c.value, tuple) else (c.value,)
        return or_(*(_contains({c.name: v}) for v in values))
    if c.type == "boolean":  # != true: a boolean that is false
        return _contains({c.name: not c.value})
    if c.type == "list":
        values = c.value if isinstance(c.value, tuple) else (c.value,)
        return or_(*(_contains({c.name: [v]}) for v in values))
    if c.type in ("number", "string") and c.op in _PATH_OPS:
        return _path_match(c.name, c.op, c.value)
    jtype = func.jsonb_typeof(a[c.name])
    text = a[c.name].as_string()
    if c.type == "date":
        key = func.substr(text.op("||")("T00:00:00"), 1, c.width).collate("C")
        return _guarded(jtype == "string", _ORDER[c.op](key, c.value))
    return _guarded(jtype == "string", _text(text, c.op, c.value, True))


def _attr_sqlite(c: AttrTest) -> Bool:
    path = f'$."{c.name}"'
    jtype = func.json_type(Contact.attributes, path)
    value = func.json_extract(Contact.attributes, path)
    if c.type == "boolean":
        want = c.value if c.op == "==" else not c.value
        return jtype == ("true" if want else "false")
    if c.type == "list":
        items = func.json_each(Contact.attributes, path).table_valued("value", "type")
        values = list(c.value) if isinstance(c.value, tuple) else [c.value]
        has = (
            select(literal(1))
            .select_from(items)
            .where(items.c.type == "text", items.c.value.in_(values))
            .exists()
        )
        return _guarded(jtype == "array", has)
    if c.type == "number":
        test = value.in_(list(c.value)) if c.op == "in" else _ORDER[c.op](value, c.value)  # type: ignore[arg-type]
        return _guarded(jtype.in_(("integer", "real")), test)
    if c.type == "date":
        key = func.substr(value.op("||")("T00:00:00"), 1, c.width)
        return _guarded(jtype == "text", _ORDER[c.op](key, c.value))
    return _guarded(jtype == "text", _text(value, c.op, c.value, False))


class _Selection:
    """The FROM and WHERE of one plan: ``contacts`` LEFT JOINed to each list, topic
    and consent purpose the rule names (once each, on their primary keys), and the
    condition over that row. Joins rather than ``EXISTS`` subqueries: PostgreSQL
    cannot run a subquery under ``OR`` or ``NOT`` in parallel (a SubPlan), and one
    membership test per contact of a million was 2-3 times slower than the parallel
    hash joins it picks for these (docs/performance.md)."""

    def __init__(self, dialect: str, tenant_id: int) -> None:
        self.pg = dialect == "postgresql"
        self.tenant_id = tenant_id
        self.joins: dict[tuple[str, object], tuple[Any, Bool]] = {}

    def _join(self, key: tuple[str, object], make: Callable[[], tuple[Any, Bool]]) -> Any:
        if key not in self.joins:
            self.joins[key] = make()
        return self.joins[key][0]

    def source(self) -> Any:
        frm: Any = Contact.__table__
        for target, on in self.joins.values():
            frm = frm.outerjoin(target, on)
        return frm

    def condition(self, cond: Cond) -> Bool:
        """True or false for every contact, or NULL where that means false (a WHERE
        drops the row): never NULL under ``not``."""
        if isinstance(cond, AllOf):
            return and_(*(self.condition(i) for i in cond.items))
        if isinstance(cond, AnyOf):
            return or_(*(self.condition(i) for i in cond.items))
        if isinstance(cond, Negation):
            inner = self.condition(cond.item)
            if self.pg and _may_be_null(cond.item):
                inner = func.coalesce(inner, false())
            return not_(inner)
        if isinstance(cond, AttrTest):
            return _attr_pg(cond) if self.pg else _attr_sqlite(cond)
        if isinstance(cond, AttrExists):
            if self.pg:
                return Contact.attributes.op("?", is_comparison=True)(cond.name)
            return func.json_type(Contact.attributes, f'$."{cond.name}"').is_not(None)
        if isinstance(cond, ColumnTest):
            col = getattr(Contact, cond.column)
            if cond.op == "exists":
                return col.is_not(None)
            test = _text(col, cond.op, cond.value, self.pg)
            return and_(col.is_not(None), test) if cond.column in NULLABLE else test
        if isinstance(cond, TimeTest):
            return _ORDER[cond.op](getattr(Contact, cond.column), cond.value)
        if isinstance(cond, InList):
            lid = cond.list_id

            def member() -> tuple[Any, Bool]:
                m = aliased(ListMember)
                return m, and_(m.list_id == lid, m.contact_id == Contact.id)

            return self._join(("list", lid), member).contact_id.is_not(None)
        if isinstance(cond, OptedIn):
            tid = cond.topic_id

            def choice() -> tuple[Any, Bool]:
                t = aliased(TopicSubscription)
                return t, and_(t.topic_id == tid, t.contact_id == Contact.id)

            t = self._join(("topic", tid), choice)
            if cond.default_opt_in:  # in unless a choice says out
                return or_(t.contact_id.is_(None), t.opted_in.is_(True))
            return and_(t.contact_id.is_not(None), t.opted_in.is_(True))
        assert isinstance(cond, HasConsent)
        purpose = cond.purpose

        def consent() -> tuple[Any, Bool]:
            sub = (
                select(Consent.contact_id)
                .where(Consent.tenant_id == self.tenant_id, Consent.purpose == purpose)
                .distinct()
                .subquery()
            )
            return sub, sub.c.contact_id == Contact.id

        return self._join(("consent", purpose), consent).c.contact_id.is_not(None)

    def conjunct(self, cond: Cond) -> Bool:
        """``cond`` as one of the rule's top-level ``and`` terms: a membership (or its
        ``not``) there is an ``EXISTS`` (``NOT EXISTS``), which PostgreSQL runs as a
        parallel semi-join (anti-join), the consents without a DISTINCT pass."""
        negated = isinstance(cond, Negation)
        inner = cond.item if isinstance(cond, Negation) else cond
        if isinstance(inner, InList):
            found = exists().where(
                ListMember.list_id == inner.list_id, ListMember.contact_id == Contact.id
            )
            positive = True
        elif isinstance(inner, OptedIn):
            # Opt-in by default: in unless a choice says out; else in only by a choice.
            found = exists().where(
                TopicSubscription.topic_id == inner.topic_id,
                TopicSubscription.contact_id == Contact.id,
                TopicSubscription.opted_in.is_(not inner.default_opt_in),
            )
            positive = not inner.default_opt_in
        elif isinstance(inner, HasConsent):
            found = exists().where(
                Consent.contact_id == Contact.id,
                Consent.tenant_id == self.tenant_id,
                Consent.purpose == inner.purpose,
            )
            positive = True
        else:
            return self.condition(cond)
        return found if positive != negated else not_(found)


def selection(
    plan: Plan, tenant_id: int, dialect: str, *, any_status: bool = False
) -> tuple[Any, Bool]:
    """The FROM and the WHERE of the tenant's contacts the plan selects: only
    ``active`` ones unless the rule names ``status`` itself (or ``any_status``: a
    campaign's snapshot, where the others get a ``suppressed`` record)."""
    sel = _Selection(dialect, tenant_id)
    parts = [Contact.tenant_id == tenant_id]
    if not plan.names_status and not any_status:
        parts.append(Contact.status == "active")
    top = plan.root.items if isinstance(plan.root, AllOf) else (plan.root,)
    parts += [sel.conjunct(c) for c in top]
    return sel.source(), and_(*parts)


def _dialect(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


async def tenant_schema(session: AsyncSession, tenant_id: int) -> Schema:
    """What a rule of the tenant may name: its attribute types, lists and topics."""
    lists = await session.execute(
        select(ContactList.name, ContactList.id).where(ContactList.tenant_id == tenant_id)
    )
    topics = await session.execute(
        select(Topic.name, Topic.id, Topic.default_opt_in).where(Topic.tenant_id == tenant_id)
    )
    return Schema(
        attributes=await attribute_types(session, tenant_id),
        lists={name: lid for name, lid in lists.all()},
        topics={name: (tid, bool(default)) for name, tid, default in topics.all()},
        statuses=CONTACT_STATUSES,
    )


async def plan_for(session: AsyncSession, tenant_id: int, rule: str) -> Plan:
    """``rule`` bound to the tenant's lists, topics and attributes as they are now
    (``audiences.RuleError`` with the position when it cannot be)."""
    return compile_rule(rule, await tenant_schema(session, tenant_id))


#: How PostgreSQL plans a statement over all of a tenant's contacts: hash joins, not
#: nested loops (a loop probes an index per contact, and the planner only chooses it
#: when it underestimates how many contacts pass the tests before the join: 1.8 s
#: instead of 0.6 s for a five-term rule over a million), and a plan for the values
#: of this rule rather than a generic one for its shape.
_WHOLE_TENANT = {"enable_nestloop": "off", "plan_cache_mode": "force_custom_plan"}


async def whole_tenant(session: AsyncSession, stmt: Any, time_limit: float | None = None) -> Any:
    """``stmt`` run under :data:`_WHOLE_TENANT` on PostgreSQL (and a
    ``statement_timeout`` of ``time_limit`` seconds: :class:`CountTooSlow` past it), the
    settings put back after it (``set_config(…, true)``: a rollback also puts them
    back). SQLite has no statement timeout: the count runs to its end."""
    if _dialect(session) != "postgresql":
        return await session.execute(stmt)
    settings = dict(_WHOLE_TENANT)
    if time_limit is not None:
        settings["statement_timeout"] = f"{max(1, int(time_limit * 1000))}ms"
    names = list(settings)
    before = (await session.execute(select(*(func.current_setting(n) for n in names)))).one()
    await session.execute(select(*(func.set_config(n, v, True) for n, v in settings.items())))
    restore = zip(names, before, strict=True)
    try:
        result = await session.execute(stmt)
        # The restore runs under the limit too: past it, the count took the time.
        await session.execute(select(*(func.set_config(n, v, True) for n, v in restore)))
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == "57014":  # query_canceled
            raise CountTooSlow(time_limit or 0.0) from None
        raise
    return result


class CountTooSlow(Exception):
    """A count stopped at its time limit (the session's transaction must roll back)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"counting took longer than {timeout:g} s")
        self.timeout = timeout


async def count(
    session: AsyncSession, tenant_id: int, plan: Plan, time_limit: float | None = None
) -> int:
    """How many contacts the plan selects; :class:`CountTooSlow` past ``time_limit``
    seconds on PostgreSQL."""
    frm, cond = selection(plan, tenant_id, _dialect(session))
    stmt = select(func.count()).select_from(frm).where(cond)
    return int((await whole_tenant(session, stmt, time_limit)).scalar_one())


async def sample(session: AsyncSession, tenant_id: int, plan: Plan, n: int) -> list[Contact]:
    """The first ``n`` contacts the plan selects, in id order."""
    frm, cond = selection(plan, tenant_id, _dialect(session))
    stmt = select(Contact).select_from(frm).where(cond).order_by(Contact.id).limit(n)
    return list((await session.execute(stmt)).scalars())


async def take_snapshot(
    session: AsyncSession,
    tenant_id: int,
    audience_id: int,
    rule: str,
    plan: Plan,
    *,
    any_status: bool = False,
) -> AudienceSnapshot:
    """Record who the plan selects now: one ``INSERT … SELECT`` (one statement, so one
    consistent view of the contacts on either database). The caller commits.
    ``any_status``: as :func:`selection`."""
    snap = AudienceSnapshot(
        tenant_id=tenant_id, audience_id=audience_id, rule=rule, count=0, taken_at=utcnow()
    )
    session.add(snap)
    await session.flush()
    frm, cond = selection(plan, tenant_id, _dialect(session), any_status=any_status)
    chosen = select(literal(snap.id, BigId), Contact.id).select_from(frm).where(cond)
    result = await whole_tenant(
        session, insert(SnapshotMember).from_select(["snapshot_id", "contact_id"], chosen)
    )
    snap.count = int(result.rowcount)
    await session.flush()
    return snap
