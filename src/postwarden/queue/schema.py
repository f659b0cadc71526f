"""The spool index's schema (SQLite): the tables, and the upgrade of an index of an
older schema to this one (docs/decisions/0001, 0007)."""

from __future__ import annotations

import logging
import re
import sqlite3

log = logging.getLogger("postwarden.spool")

SCHEMA_VERSION = 4

_SCHEMA_TEMPLATE = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY,
    live INTEGER NOT NULL DEFAULT 0,
    sealed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    segment INTEGER NOT NULL,
    body_offset INTEGER NOT NULL,
    body_length INTEGER NOT NULL,
    mail_from TEXT NOT NULL,
    client_ip TEXT NOT NULL DEFAULT '',
    helo TEXT NOT NULL DEFAULT '',
    auth TEXT,
    tenant TEXT,
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    body_8bit INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    remaining INTEGER NOT NULL,
    pool TEXT,
    lane INTEGER NOT NULL DEFAULT 0
);
{recipients}CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    type TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    rcpt_id INTEGER,
    rcpt TEXT,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_msg ON events(msg_id);
CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    part INTEGER NOT NULL,
    request_hash TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    answer TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, key, part)
);
"""


# The recipients table of schema 2 (the target of the 1 → 2 upgrade), frozen.
_RECIPIENTS_V2_TABLE = """
CREATE TABLE recipients (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id TEXT NOT NULL,
    rcpt TEXT NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL,
    held INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_response TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)"""
_RECIPIENTS_V2_COLUMNS = (
    "id, msg_id, rcpt, domain, state, held, attempts, next_attempt, last_response,"
    " created_at, updated_at"
)

# Schema 3 adds lane and tenant ('' for none) at the end, copied from the message so
# that leasing is index-driven. One partial index per lane, so that a recipient costs
# one "due" index entry as before: ``recipients_due_high`` serves the high lane in
# next_attempt order, ``recipients_due_bulk`` the bulk lane tenant by tenant. SQLite
# uses a partial index only for a query whose WHERE contains the index's condition
# word for word, lane included as a literal (``lane = ?`` would not do): the lease
# queries below spell them out.
_RECIPIENTS_INDEXES = """
CREATE INDEX IF NOT EXISTS recipients_msg ON recipients(msg_id);
CREATE INDEX IF NOT EXISTS recipients_state ON recipients(state);
CREATE INDEX IF NOT EXISTS recipients_due_high ON recipients(next_attempt)
    WHERE state IN ('queued', 'deferred') AND held = 0 AND lane = 0;
CREATE INDEX IF NOT EXISTS recipients_due_bulk ON recipients(tenant, next_attempt)
    WHERE state IN ('queued', 'deferred') AND held = 0 AND lane = 1;
"""
# Indexes of older schemas that nothing uses any more (dropped by the upgrade).
_OBSOLETE_INDEXES = ("recipients_due",)
# The columns schema 3 added (the upgrade from 2 adds them, in this order).
_V3_COLUMNS = (
    ("messages", "pool", "TEXT"),
    ("messages", "lane", "INTEGER NOT NULL DEFAULT 0"),
    ("recipients", "lane", "INTEGER NOT NULL DEFAULT 0"),
    ("recipients", "tenant", "TEXT NOT NULL DEFAULT ''"),
)

# The columns schema 4 added: why a recipient waits for traffic shaping (its last
# attempt was put off by the shaping broker: ``"<kind>: <reason>"``, kind one of
# postwarden.values.REFUSALS), NULL otherwise. Set with the outcome that puts
# it back to the queue, cleared by the next outcome or operator action.
_V4_COLUMNS = (("recipients", "wait_reason", "TEXT"),)
# Every column added since schema 2, in the order the upgrades add them.
_ADDED_COLUMNS = _V3_COLUMNS + _V4_COLUMNS

# The current table: schema 2's with the columns added since.
_RECIPIENTS_DDL = (
    _RECIPIENTS_V2_TABLE.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS").removesuffix("\n)")
    + "".join(
        f",\n    {col} {decl}" for table, col, decl in _ADDED_COLUMNS if table == "recipients"
    )
    + "\n);"
    + _RECIPIENTS_INDEXES
)
SCHEMA = _SCHEMA_TEMPLATE.replace("{recipients}", _RECIPIENTS_DDL)


def table_columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


def upgrade(db: sqlite3.Connection) -> None:
    """Bring a spool of an older schema to the current one, in one transaction
    (SQLite DDL is transactional: a crash leaves the old schema whole).

    1 → 2: recipient ids become AUTOINCREMENT — never reused after their message
    left the spool, so an event's rcpt_id names one recipient for good — numbered
    past every id an event has ever named.

    2 → 3: messages get ``pool`` (NULL: the default pool) and ``lane`` (0: high);
    recipients get ``lane`` and ``tenant`` copied from their message ('' for none)
    for index-driven fair leasing.

    3 → 4: recipients get ``wait_reason`` (NULL: not waiting for traffic shaping).
    """
    row = db.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'recipients'"
    ).fetchone()
    if row is None:
        return  # a new spool
    v1 = not re.search(r"PRIMARY\s+KEY\s+AUTOINCREMENT", row[0], re.IGNORECASE)
    columns = {t: table_columns(db, t) for t in ("messages", "recipients")}
    missing = [
        (table, column, ddl)
        for table, column, ddl in _ADDED_COLUMNS
        # 1 → 2 rebuilds recipients with the columns of schema 2
        if column not in columns[table] or (v1 and table == "recipients")
    ]
    if not v1 and not missing:
        return
    found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    log.warning("event=spool_upgrade from=%s to=%d", found[0] if found else "?", SCHEMA_VERSION)
    db.execute("BEGIN IMMEDIATE")
    try:
        if v1:
            db.execute("ALTER TABLE recipients RENAME TO recipients_v1")
            db.execute(_RECIPIENTS_V2_TABLE)
            db.execute(
                f"INSERT INTO recipients({_RECIPIENTS_V2_COLUMNS})"  # noqa: S608
                f" SELECT {_RECIPIENTS_V2_COLUMNS} FROM recipients_v1"
            )
            db.execute("DROP TABLE recipients_v1")  # and its indexes
            high = db.execute(
                "SELECT MAX(x) FROM (SELECT MAX(id) AS x FROM recipients"
                " UNION ALL SELECT MAX(rcpt_id) FROM events)"
            ).fetchone()[0]
            db.execute("DELETE FROM sqlite_sequence WHERE name = 'recipients'")
            db.execute(
                "INSERT INTO sqlite_sequence(name, seq) VALUES ('recipients', ?)", (high or 0,)
            )
        for table, column, ddl in missing:
            # A constant default: SQLite adds the column without rewriting rows.
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
        if any(m[:2] == ("recipients", "tenant") for m in missing):
            db.execute(
                "UPDATE recipients SET tenant = (SELECT m.tenant FROM messages m"
                " WHERE m.id = recipients.msg_id) WHERE msg_id IN (SELECT id FROM messages"
                " WHERE tenant IS NOT NULL AND tenant != '')"
            )
        for index in _OBSOLETE_INDEXES:
            db.execute(f"DROP INDEX IF EXISTS {index}")
        for statement in _RECIPIENTS_INDEXES.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(
            "INSERT INTO meta(key, value) VALUES ('schema_version', ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
