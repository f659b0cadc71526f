"""``postwarden db``: the control database's revision, its upgrade, downgrade and history
(store.db, store.check)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from postwarden.commands.common import load, run_async
from postwarden.config import ConfigError

if TYPE_CHECKING:
    from postwarden.store.check import DbCheck

log = logging.getLogger("postwarden")


def _db_exit(check: DbCheck) -> int:
    """0: ok; 2: the database is down (it may come back: a start need not stop);
    1: anything else (a setting or the schema needs a person)."""
    from postwarden.store.check import TRANSIENT

    return 0 if check.ok else 2 if check.kind in TRANSIENT else 1


def _db_say(check: DbCheck) -> int:
    print(check.line, file=sys.stdout if check.ok else sys.stderr)
    return _db_exit(check)


def cmd_db(args: argparse.Namespace) -> int:
    """``db current|upgrade|downgrade REVISION|history``: each ends with one line that
    says where the database is (or why it cannot be used), never a traceback."""
    from postwarden.store.check import check_database, one_line, redact, shipped_revisions

    try:
        cfg = load(args)
    except ConfigError as exc:
        # Exit 2 means "the database is down" here (the supervisor starts anyway).
        print(f"postwarden: config error: {exc}", file=sys.stderr)
        return 1
    url = cfg.database.url
    if args.action in ("current", "history") and args.revision is not None:
        print(f"postwarden: db {args.action} takes no REVISION", file=sys.stderr)
        return 1
    if args.action == "downgrade" and args.revision is None:
        print(
            "postwarden: db downgrade needs a REVISION: an id (see `postwarden db history`)"
            " or -1 for one step",
            file=sys.stderr,
        )
        return 1
    before = run_async(check_database(url))
    if args.action == "current":
        return _db_say(before)
    revisions = shipped_revisions()
    known = [rev for rev, _doc in revisions]
    if args.action == "history":
        print("revisions this version ships, oldest first (* the database's):")
        for rev, doc in revisions:
            mark = "*" if rev == before.revision else " "
            head = " (newest)" if rev == known[-1] else ""
            print(f"{mark} {rev}  {doc}{head}")
        if before.kind in ("ok", "unmigrated", "behind", "ahead"):
            print(before.line)
            return 0
        return _db_say(before)
    password = _url_password(url)
    if args.action == "upgrade":
        if not (before.ok or before.kind in ("unmigrated", "behind")):
            return _db_say(before)
        target = known[-1] if args.revision in (None, "head") else args.revision
        if target not in known:
            print(
                f"postwarden: db upgrade: no revision {target!r} in this version"
                f" ({', '.join(known)})",
                file=sys.stderr,
            )
            return 1
        if known.index(target) <= (known.index(before.revision) if before.revision else -1):
            if before.ok:
                return _db_say(before)
            print(f"database at {before.revision}, at or above {target}: nothing to upgrade")
            return 0
        from postwarden.store.db import upgrade_sync

        try:
            upgrade_sync(url, target)
        except Exception as exc:
            print(
                f"database.url: upgrade from {before.revision or 'none'} to {target} failed:"
                f" {one_line(exc, password)}",
                file=sys.stderr,
            )
            return 1
        after = run_async(check_database(url))
        print(f"database upgraded: {before.revision or 'none'} -> {after.revision or 'none'}")
        if target != known[-1] and after.kind == "behind":
            return 0  # as asked: an older revision than this version's newest
        return _db_say(after)
    # downgrade
    if before.kind == "unmigrated":
        print(
            f"database.url: {redact(url)} has no Postwarden tables: nothing to downgrade",
            file=sys.stderr,
        )
        return 1
    if not (before.ok or before.kind == "behind"):
        return _db_say(before)
    assert before.revision is not None
    at = known.index(before.revision)
    rev = args.revision
    if rev == "base":
        to = -1
    elif rev.startswith("-") and rev[1:].isdigit():
        to = at - int(rev[1:])
    elif rev in known:
        to = known.index(rev)
    else:
        print(
            f"postwarden: db downgrade: no revision {rev!r} in this version"
            f" ({', '.join(known)}; or -N for N steps down)",
            file=sys.stderr,
        )
        return 1
    if to < -1:
        print(
            f"postwarden: db downgrade {rev}: {before.revision} is only {at + 1} step(s)"
            " above no schema at all (and that last step needs --drop-all)",
            file=sys.stderr,
        )
        return 1
    if to == at:
        print(f"database already at {before.revision}: nothing to downgrade")
        return 0
    if to > at:
        print(
            f"postwarden: db downgrade: {rev} is above the database's revision"
            f" {before.revision}: use `postwarden db upgrade {rev}`",
            file=sys.stderr,
        )
        return 1
    if to < 0 and not args.drop_all:
        print(
            f"postwarden: db downgrade {rev} would go below the first revision and drop"
            " every table with all their data: add --drop-all if that is what you want",
            file=sys.stderr,
        )
        return 1
    target = known[to] if to >= 0 else "base"
    from postwarden.store.db import downgrade_sync

    try:
        downgrade_sync(url, target)
    except Exception as exc:
        print(
            f"database.url: downgrade from {before.revision} to {target} failed:"
            f" {one_line(exc, password)}",
            file=sys.stderr,
        )
        return 1
    after = run_async(check_database(url))
    print(
        f"database downgraded: {before.revision} -> {after.revision or 'none'}"
        f" (this version needs {known[-1]}: `postwarden db upgrade` goes back up)"
    )
    return 0


def _url_password(url: str) -> str | None:
    """The password in a database URL (to keep it out of messages), if any."""
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:  # not a URL: check_database has said so already
        return None
    return password if isinstance(password, str) else None
