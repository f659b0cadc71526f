"""Engines and schema upgrades for the control-plane database."""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

MIGRATIONS = Path(__file__).with_name("migrations")
#: Seconds to open a connection to PostgreSQL, or to wait for one from the pool.
CONNECT_TIMEOUT = 5.0


def _sqlite_file(url: str) -> Path | None:
    u = make_url(url)
    if not u.get_backend_name() == "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine; SQLite gets WAL, a busy timeout and enforced foreign keys,
    so that several worker processes can share the file."""
    path = _sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if make_url(url).get_backend_name() == "postgresql":
        # A pooled connection is checked before use (a database restarted since
        # leaves closed ones behind), and a database that does not answer is given
        # up on within seconds, not the driver's minute.
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("connect_args", {}).setdefault("timeout", CONNECT_TIMEOUT)
        kwargs.setdefault("pool_timeout", CONNECT_TIMEOUT)
    engine = create_async_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    return engine


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = url
    return cfg


def _in_thread(name: str, fn: Any) -> None:
    """Run ``fn`` in a thread of its own and re-raise what it raised. The migration
    environment runs its own event loop (asyncio.run): this works whether or not the
    caller is inside a loop."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    t = threading.Thread(target=run, name=name)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def upgrade_sync(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations up to ``revision`` (blocking)."""
    from alembic import command

    path = _sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    _in_thread("db-upgrade", lambda: command.upgrade(alembic_config(url), revision))


def downgrade_sync(url: str, revision: str) -> None:
    """Undo the migrations above ``revision`` (an id, ``-1``, ``base``; blocking)."""
    from alembic import command

    _in_thread("db-downgrade", lambda: command.downgrade(alembic_config(url), revision))


async def upgrade(url: str, revision: str = "head") -> None:
    # Alembic's env runs its own event loop for the async driver: keep it off ours.
    await asyncio.to_thread(upgrade_sync, url, revision)


@functools.cache
def script_directory() -> Any:
    """The migrations this version ships (alembic's ScriptDirectory), read once per
    process: they are the package's."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def head_revision() -> str | None:
    """The newest migration this version ships."""
    head: str | None = script_directory().get_current_head()
    return head


async def current_revision(url: str) -> str | None:
    """The revision the database is at (None when never upgraded)."""
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            rev: str | None = await conn.run_sync(
                lambda c: MigrationContext.configure(c).get_current_revision()
            )
            return rev
    finally:
        await engine.dispose()
