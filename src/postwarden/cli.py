"""The ``postwarden`` command: the only entry point."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from postwarden.config import Config, ConfigError, load_config
from postwarden.control import ControlPlaneError

if TYPE_CHECKING:
    from postwarden.store.check import DbCheck

log = logging.getLogger("postwarden")


class _KeyValueFormatter(logging.Formatter):
    """One event per line: ``ts level logger message`` where message is key=value."""

    def __init__(self, tag: str = "") -> None:
        super().__init__()
        self.tag = f"{tag} " if tag else ""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        line = (
            f"{ts}.{int(record.msecs):03d} {record.levelname.lower()} {record.name} "
            f"{self.tag}{record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", tag: str = "") -> None:
    """Log lines to stderr; ``tag`` (``worker=1``) is put in front of each message."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter(tag))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO; that belongs at debug for an MTA.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop when it is installed (it is a dependency), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


def _load(args: argparse.Namespace, **overrides: Any) -> Config:
    path = args.config or os.environ.get("POSTWARDEN_CONFIG")
    return load_config(path, overrides=overrides or None)


# ---------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    from postwarden.supervisor import Supervisor, check_files, worker_count

    cfg = check_files(_load(args))
    setup_logging(cfg.server.log_level)
    path = args.config or os.environ.get("POSTWARDEN_CONFIG")
    if args.role == "control":
        # The control plane alone: one process, no spool (scale it by running more).
        from postwarden.appliance import serve

        run_async(serve(cfg, path, role="control"))
        return 0
    count = worker_count(cfg)
    from postwarden.queue.spool import stranded_shards

    stranded = stranded_shards(cfg.spool.path, count)
    if stranded:
        # Never leave accepted mail where no worker will deliver it.
        for shard, n in stranded:
            print(
                f"postwarden: spool shard {shard} holds {n} message(s) but only {count} "
                "worker(s) would run: set server.workers high enough to serve it, let it "
                "drain, then lower it",
                file=sys.stderr,
            )
        return 2
    if count == 1:
        from postwarden.appliance import serve

        run_async(serve(cfg, path, role=args.role))
        return 0
    return int(run_async(Supervisor(cfg, path, count, role=args.role).run()))


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker of ``serve`` (started by the supervisor, not by hand)."""
    import socket

    from postwarden.appliance import Appliance, WorkerRole
    from postwarden.supervisor import check_files, die_with_parent

    die_with_parent(args.parent)
    cfg = check_files(_load(args))
    setup_logging(cfg.server.log_level, tag=f"worker={args.index}")
    sockets = tuple(socket.socket(fileno=int(fd)) for fd in args.fds.split(",") if fd)
    control = socket.socket(fileno=args.control_fd) if args.control_fd is not None else None
    role = WorkerRole(args.index, args.count, sockets, control)

    async def run() -> None:
        app = Appliance(
            cfg,
            config_path=args.config or os.environ.get("POSTWARDEN_CONFIG"),
            worker=role,
            api=args.role != "mta",
        )
        await app.run()

    run_async(run())
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    if args.action == "inbox" or args.id or args.to or args.raw or args.json:
        return cmd_lab_inbox(args)
    from postwarden.lab.demo import parse_dns, run_lab

    try:
        parse_dns(args.dns)
    except ValueError as exc:
        print(f"postwarden: {exc}", file=sys.stderr)
        return 2
    setup_logging("info")
    # httpx logs every request at INFO: the demo's own API calls would interleave
    # with what it prints.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    run = run_lab(
        args.config, var_dir=args.var, demo=not args.no_demo, once=args.once, dns=args.dns
    )
    try:
        return int(run_async(run))
    except OSError as exc:
        if "lab DNS" not in str(exc):
            raise
        print(f"postwarden: {exc}; choose another with --dns HOST:PORT", file=sys.stderr)
        return 1


def cmd_lab_inbox(args: argparse.Namespace) -> int:
    """``postwarden lab inbox``: what the lab's MX hosts received (in ``--var``)."""
    from postwarden.lab import inbox_path
    from postwarden.lab.inbox import LabInbox

    if args.action != "inbox":
        print("error: ID, --to, --raw and --json go with `postwarden lab inbox`", file=sys.stderr)
        return 2
    if args.limit < 1:
        print("error: --limit must be at least 1", file=sys.stderr)
        return 2
    inbox = LabInbox(inbox_path(args.var))
    if args.id is None:
        if args.raw:
            print("error: --raw needs a message ID", file=sys.stderr)
            return 2
        found = inbox.list(args.to, args.limit) if inbox.exists else []
        if args.json:
            print(json.dumps([m.summary() for m in found], indent=2, ensure_ascii=False))
        elif not found:
            print(f"no messages in {inbox.path}" + (f" for {args.to}" if args.to else ""))
        for m in [] if args.json else found:
            dkim = ",".join(v.result for v in m.dkim) or "none"
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.received_at))
            print(
                f"{m.id}  {when}  {m.sink_name}  tls={'yes' if m.tls else 'no'}  dkim={dkim}  "
                f"<{m.mail_from}> -> {', '.join(m.rcpt_tos)}  {m.subject!r}"
            )
        return 0
    try:
        if args.raw:
            sys.stdout.buffer.write(inbox.raw(args.id))
            sys.stdout.flush()
        elif args.json:
            print(json.dumps(inbox.detail(args.id), indent=2, ensure_ascii=False))
        else:
            print(inbox.render(args.id), end="")
    except KeyError:
        print(f"error: no message {args.id} in {inbox.path}", file=sys.stderr)
        return 1
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """The config file, the files it names (bounce patterns, shaping rules, DKIM keys),
    and (unless ``--no-database``) the database: one line for what is wrong, exit 1; or
    ``config ok`` and the database's line."""
    from postwarden.appliance import build_signer
    from postwarden.supervisor import check_files

    cfg = check_files(_load(args))

    build_signer(cfg)
    if args.no_database:
        print(f"config ok: {cfg.source} (database not checked)")
        return 0
    from postwarden.store.check import check_database

    check = run_async(check_database(cfg.database.url))
    if check.kind in ("unmigrated", "behind") and cfg.database.auto_upgrade:
        # `serve` applies the migrations itself at start.
        from postwarden.store.check import redact
        from postwarden.store.db import head_revision

        print(f"config ok: {cfg.source}")
        print(
            f"database: {redact(cfg.database.url)} at revision {check.revision or 'none'}:"
            f" database.auto_upgrade upgrades it to {head_revision()} at start"
        )
        return 0
    if not check.ok:
        print(check.line, file=sys.stderr)
        return 1
    print(f"config ok: {cfg.source}")
    print(check.line)
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    from postwarden.mta.auth import hash_password

    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("passwords differ", file=sys.stderr)
            return 2
    if not password:
        print("empty password refused", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    from postwarden.queue.admin import QueueAdmin
    from postwarden.queue.spool import PENDING_STATES

    cfg = _load(args)
    admin = QueueAdmin(cfg.spool.path)
    try:
        if args.action == "list":
            rows = admin.list(args.state, args.limit, every=args.all)
            if args.json:
                print(json.dumps(rows, indent=1))
                return 0
            counts = admin.summary()
            messages, held = counts.pop("messages"), counts.pop("held")
            order = [*PENDING_STATES, *sorted(set(counts) - set(PENDING_STATES))]
            by_state = ", ".join(f"{st} {counts.get(st, 0)}" for st in order)
            print(f"{messages} message(s) in the queue; recipients: {by_state}, held {held}")
            for r in rows:
                print(
                    f"{r['msg_id']}  {r['state']:<9} to=<{r['rcpt']}> from=<{r['mail_from']}>"
                    f" tries={r['attempts']}  {r['why']}"
                )
            if len(rows) >= args.limit:
                print(f"(the first {args.limit}: --limit N for more)")
            elif not rows and not (args.all or args.state):
                print("nothing waiting (--all: the finished recipients still in the queue too)")
            return 0
        if args.action == "show":
            info = admin.show(args.id)
            if info is None:
                print(f"no such message: {args.id}", file=sys.stderr)
                return 1
            print(json.dumps(info, indent=1, default=str))
            return 0
        target = None if args.id in (None, "ALL") else args.id
        if args.action != "flush" and args.id is None:
            print("give a message id, or ALL", file=sys.stderr)
            return 2
        n = getattr(admin, args.action)(target)
        print(f"{args.action}: {n} recipient(s)")
        return 0
    finally:
        admin.close()


def cmd_events(args: argparse.Namespace) -> int:
    """Events as lines for people (or JSON lines): the newest, every one (``--all``),
    and with ``--tail`` the last few, then new ones as they come."""
    from postwarden.queue.admin import QueueAdmin
    from postwarden.queue.describe import event_json, event_line

    def show(ev: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event_json(ev), default=str), flush=True)
        else:
            print(event_line(ev), flush=True)

    cfg = _load(args)
    admin = QueueAdmin(cfg.spool.path)
    try:
        count = args.count if args.count is not None else (10 if args.tail else 100)
        if count < 0:
            print("postwarden: events: -n/--limit must be 0 or more", file=sys.stderr)
            return 2
        cursors: dict[int, int] | int
        if args.all:
            cursors = 0
        else:
            backlog, cursors = admin.recent(count, msg_id=args.msg)
            for ev in backlog:
                show(ev)
        if args.tail:
            try:
                for ev in admin.tail(after=cursors, msg_id=args.msg):
                    show(ev)
            except KeyboardInterrupt:
                return 0
        elif args.all:
            for ev in admin.history(msg_id=args.msg):
                show(ev)
        return 0
    except BrokenPipeError:  # `postwarden events | head`: quiet, as cat would be
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        admin.close()


def cmd_bounces(args: argparse.Namespace) -> int:
    from postwarden.bounces.classify import PatternsError, default_classifier
    from postwarden.bounces.parse import Parser

    cfg = _load(args)
    if args.action == "parse":
        try:
            parser = Parser(default_classifier(cfg.bounces.patterns_file))
        except PatternsError as exc:
            print(f"postwarden: bounces.patterns_file: {exc}", file=sys.stderr)
            return 2
        if not args.files:
            print(
                "postwarden: bounces parse: give one or more files (- for stdin)", file=sys.stderr
            )
            return 2
        rc = 0
        for name in args.files:
            try:
                if name == "-":
                    data = sys.stdin.buffer.read()
                else:
                    with open(name, "rb") as fp:
                        data = fp.read()
                findings = parser.parse_file(data)
            except (OSError, RecursionError) as exc:
                # Unreadable, or nested too deep to read (the processor keeps such a
                # report as unparsed).
                print(f"postwarden: bounces parse: {name}: {exc}", file=sys.stderr)
                rc = 1
                continue
            for finding in findings:
                out = finding.as_json()
                if len(args.files) > 1:
                    out["file"] = name
                print(json.dumps(out, ensure_ascii=False))
        return rc
    from postwarden.bounces.inbox import Inbox

    if not os.path.isdir(cfg.inbound_path):
        print(f"postwarden: no inbox at {cfg.inbound_path} (inbound.listen off?)", file=sys.stderr)
        return 1
    inbox = Inbox(cfg.inbound_path, create=False)
    if args.action == "unparsed":
        items = inbox.list_unparsed()
        if args.json:
            print(json.dumps([dataclasses.asdict(i) for i in items], indent=2))
            return 0
        for i in items:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.received_at))
            to = ",".join(i.rcpt_tos)[:60]
            print(f"{i.id}  {when}  from=<{i.mail_from}> to={to} size={i.size}  {i.reason}")
        print(f"{len(items)} unparsed report(s) in {cfg.inbound_path}")
        return 0
    if not args.files:
        print(
            f"postwarden: bounces {args.action}: give report ids (or 'all' to retry)",
            file=sys.stderr,
        )
        return 2
    if args.action == "show":
        for rid in args.files:
            item = inbox.read(rid)
            if item is None:
                print(f"postwarden: no report {rid}", file=sys.stderr)
                return 1
            sys.stdout.buffer.write(item.data)
        return 0
    # retry: back to the queue of reports to process
    ids = [i.id for i in inbox.list_unparsed()] if args.files == ["all"] else args.files
    missing = [rid for rid in ids if not inbox.requeue(rid)]
    print(f"{len(ids) - len(missing)} report(s) queued again")
    for rid in missing:
        print(f"postwarden: no unparsed report {rid}", file=sys.stderr)
    return 1 if missing else 0


def cmd_dkim_genkey(args: argparse.Namespace) -> int:
    from postwarden.mta.dkim import generate_key, load_key

    pem = generate_key(args.algorithm)
    with open(args.out, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(pem)
    key = load_key(args.domain, args.selector, args.out, args.algorithm)
    print(f'{args.selector}._domainkey.{args.domain} IN TXT "{key.public_txt()}"')
    return 0


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
        cfg = _load(args)
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


def cmd_admin(args: argparse.Namespace) -> int:
    """Operator keys (scope ``admin``: tenants and their keys): ``create-key`` prints a
    new one once; ``list-keys`` lists them (never a secret); ``revoke-key ID`` revokes
    one (not the last one not revoked)."""
    from sqlalchemy import select

    from postwarden.store.db import create_engine, current_revision, head_revision, sessionmaker
    from postwarden.store.feed import record_change
    from postwarden.store.keys import LastOperatorKey, revoke_operator_key
    from postwarden.store.models import ApiKey
    from postwarden.store.secrets import new_api_key

    cfg = _load(args)
    if args.action == "revoke-key" and args.id is None:
        print(
            "postwarden: admin revoke-key needs the key's id (see `admin list-keys`)",
            file=sys.stderr,
        )
        return 2
    if args.action != "revoke-key" and args.id is not None:
        print(f"postwarden: admin {args.action} takes no id", file=sys.stderr)
        return 2

    async def create(s: Any) -> int:
        new = new_api_key()
        s.add(
            ApiKey(
                tenant_id=None,
                prefix=new.prefix,
                secret_hash=new.secret_hash,
                name=args.name,
                scopes="admin",
            )
        )
        await record_change(s, "api_key", None, new.prefix)
        await s.commit()
        print(new.plaintext)
        print("(shown once; only its hash is stored)", file=sys.stderr)
        return 0

    async def list_keys(s: Any) -> int:
        stmt = select(ApiKey).where(ApiKey.tenant_id.is_(None)).order_by(ApiKey.id)
        rows = [
            {
                "id": k.id,
                "prefix": k.prefix,
                "name": k.name,
                "created_at": k.created_at.isoformat(),
                "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None,
                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
            }
            for k in (await s.execute(stmt)).scalars()
        ]
        if args.json:
            for row in rows:
                print(json.dumps(row))
            return 0
        if not rows:
            print("no operator keys: make one with `postwarden admin create-key`")
            return 0
        print(
            f"{'ID':>6}  {'PREFIX':<12}  {'CREATED':<19}  {'LAST USED':<19}  {'REVOKED':<19}  NAME"
        )
        for row in rows:
            times = [
                (row[c] or "-")[:19].replace("T", " ")
                for c in ("created_at", "last_used_at", "revoked_at")
            ]
            print(
                f"{row['id']:>6}  {row['prefix']:<12}  {times[0]:<19}  {times[1]:<19}"
                f"  {times[2]:<19}  {row['name']}"
            )
        return 0

    async def revoke_key(s: Any) -> int:
        try:
            key = await revoke_operator_key(s, args.id)
        except LastOperatorKey as exc:
            print(f"postwarden: refused: {exc}", file=sys.stderr)
            return 1
        if key is None:
            print(f"postwarden: no operator key with id {args.id}", file=sys.stderr)
            return 1
        await s.commit()
        assert key.revoked_at is not None
        print(f"revoked operator key {key.id} ({key.prefix}) at {key.revoked_at.isoformat()}")
        return 0

    async def run() -> int:
        if await current_revision(cfg.database.url) != head_revision():
            raise ConfigError("database.url: not migrated: run `postwarden db upgrade` first")
        engine = create_engine(cfg.database.url)
        actions = {"create-key": create, "list-keys": list_keys, "revoke-key": revoke_key}
        try:
            async with sessionmaker(engine)() as s:
                return await actions[args.action](s)
        finally:
            await engine.dispose()

    return int(run_async(run()))


def cmd_sources(args: argparse.Namespace) -> int:
    """``sources check``: each source's forward-confirmed reverse DNS and EHLO name."""
    from postwarden.dns.resolver import Resolver
    from postwarden.dns.sources import check_source

    cfg = _load(args)
    if not cfg.sources:
        print("no [[sources]] configured: mail leaves from delivery.source_address or the default")
        return 0
    resolver = Resolver(cfg.dns.nameservers, timeout=cfg.dns.timeout, cache_size=0)

    async def run() -> list[Any]:
        return [await check_source(resolver, src, cfg) for src in cfg.sources]

    results = run_async(run())
    for r in results:
        verdict = "ok" if r.ok else f"PROBLEM: {r.problem}"
        print(
            f"{r.source:<16} {r.address:<40} ptr={','.join(r.ptr) or '-'} ehlo={r.ehlo} {verdict}"
        )
    return 0 if all(r.ok for r in results) else 1


def _broker_command(args: argparse.Namespace, **req: Any) -> dict[str, Any] | None:
    """One operator op on the running appliance's shaping broker (``shaping.socket``);
    prints why and returns None when it cannot be done."""
    from postwarden.shaping.channel import BrokerClient

    cfg = _load(args)

    async def call() -> dict[str, Any]:
        client = BrokerClient(cfg.shaping_socket, timeout=10)
        await client.connect()
        try:
            return await client.command(**req)
        finally:
            await client.close()

    try:
        return dict(run_async(call()))
    except (OSError, ConnectionError) as exc:
        print(
            f"postwarden: the appliance is not running here ({cfg.shaping_socket}): {exc}",
            file=sys.stderr,
        )
    except ValueError as exc:
        print(f"postwarden: {exc}", file=sys.stderr)
    return None


def _print_progress(p: dict[str, Any]) -> None:
    h = p["health"]
    line = f"{p['key']:<32} health {h['score']:>5} {h['tier']:<9}"
    if p.get("warming"):
        line += (
            f" plan {p['plan']} day {p['day']}/{p['days']} cap {p['cap']}"
            f" sent today {p['sent_today']}"
        )
        for site, v in p.get("sites", {}).items():
            line += f" [{site}: {v['sent']}/{v['cap'] if v['cap'] is not None else '-'}]"
    if p.get("paused"):
        line += f" PAUSED ({p['paused']})"
    print(line)


def cmd_shaping(args: argparse.Namespace) -> int:
    """``shaping status``: pairs, actions, sources; ``shaping reload``: the rules file."""
    if args.action == "reload":
        out = _broker_command(args, op="reload", config_path=args.config)
        if out is None:
            return 1
        print("rules reloaded")
        return 0
    out = _broker_command(args, op="status")
    if out is None:
        return 1
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print("sources:")
    for src in out["sources"]:
        state = "PAUSED " + src["paused"] if src["paused"] else src["state"]
        print(
            f"  {src['name']:<16} {src['address'] or '-':<20} {state:<10}"
            f" health {src['health']['score']} {src['health']['tier']}"
        )
    print("pairs (source, site):")
    for p in out["pairs"]:
        extra = f" SUSPENDED {p['suspended_for']:.0f}s" if p["suspended_for"] else ""
        rate = (
            f"rate {p['rate_per_min']}/min (limit {p['limit_per_min']})"
            if p["rate_limited"]
            else "no rate limit"
        )
        print(
            f"  {p['source']:<16} {p['site']:<28} conns {p['connections']}/"
            f"{p['connection_limit']} {rate}{extra} {p['reason']}"
        )
    if out["actions"]:
        print("recent actions:")
        for a in out["actions"]:
            print(
                f"  {a['ago']:>8.0f}s ago {a['source']} {a['site']} {a['rule']}: {a['action']}"
                f" for {a['duration']:.0f}s ({a['answer']})"
            )
    if out["warming"]:
        print("warming and health:")
        for w in out["warming"]:
            _print_progress(w)
    return 0


def cmd_warming(args: argparse.Namespace) -> int:
    """``warming simulate``: a plan day by day, and when a daily volume becomes sendable;
    ``warming start|stop|pause|resume|progress|list``: on the running appliance."""
    from postwarden.warming.plans import BUILTIN, simulate

    if args.action != "simulate":
        if args.action == "list":
            out = _broker_command(args, op="warming_list")
            if out is not None:
                for w in out["warming"]:
                    _print_progress(w)
            return 0 if out is not None else 1
        if not args.name:
            print("postwarden: give --source NAME or --domain NAME", file=sys.stderr)
            return 2
        op = {"start": "warming_start", "stop": "warming_stop"}.get(args.action, args.action)
        out = _broker_command(
            args,
            op=op,
            target=args.target,
            name=args.name,
            plan=args.plan,
            day=args.day,
            reason=args.reason,
        )
        if out is None:
            return 1
        _print_progress(out["progress"])
        return 0
    if args.volume is None:
        print("postwarden: warming simulate needs --volume", file=sys.stderr)
        return 2

    plan = BUILTIN[args.plan]
    days, first = simulate(plan, args.volume)
    print(f"plan {plan.name}: {plan.days} days, then warm (no cap from the plan)")
    print(f"{'day':>4} {'cap':>9}  sendable ({args.volume}/day)")
    for d in days:
        print(f"{d.day:>4} {d.cap if d.cap is not None else '-':>9}  {'yes' if d.sendable else ''}")
    if first <= plan.days:
        print(f"{args.volume} messages a day fit from day {first}, if every day before is healthy")
    else:
        print(
            f"{args.volume} messages a day exceed every plan day: sendable from day {first},"
            " once warm, if every day before is healthy"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="postwarden", description="Postwarden email appliance")
    p.add_argument("--config", "-c", help="TOML config file (default: embedded defaults)")
    # `--config` is accepted after the subcommand too (`postwarden serve --config F`);
    # SUPPRESS keeps a value given before the subcommand from being reset.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        default=argparse.SUPPRESS,
        help="TOML config file (default: embedded defaults)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    _add = sub.add_parser
    hidden: set[str] = set()

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        # help=SUPPRESS: a command that works but is not listed (`worker`, which the
        # supervisor runs). argparse would list it as "==SUPPRESS==", so it is given
        # no help entry, and the {a,b,...} list names only the others.
        if kw.get("help") is argparse.SUPPRESS:
            del kw["help"]
            hidden.add(name)
        parser = _add(name, parents=[common], **kw)
        sub.metavar = "{" + ",".join(n for n in sub.choices if n not in hidden) + "}"
        return parser

    sub.add_parser = add_parser  # type: ignore[method-assign]

    s = sub.add_parser("serve", help="run the appliance")
    s.add_argument(
        "--role",
        choices=["all", "mta", "control"],
        default="all",
        help="all (default): MTA and API together; mta: no API (health and metrics only);"
        " control: the API alone, relaying messages to an MTA (control.submit_to)",
    )
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("worker", help=argparse.SUPPRESS)
    s.add_argument("--index", type=int, required=True)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--fds", required=True, help="listening socket file descriptors")
    s.add_argument("--control-fd", type=int, help="the control plane's listening socket")
    s.add_argument("--role", choices=["all", "mta"], default="all")
    s.add_argument("--parent", type=int, required=True, help="the supervisor's pid")
    s.set_defaults(fn=cmd_worker)

    s = sub.add_parser(
        "lab",
        help="run the appliance against the built-in simulated internet; "
        "`lab inbox [ID]` shows what its MX hosts received",
    )
    s.add_argument(
        "action",
        nargs="?",
        choices=["run", "inbox"],
        default="run",
        help="run (default): the lab and the appliance; inbox: list the messages the "
        "lab received, or show one",
    )
    s.add_argument("id", nargs="?", help="with inbox: the message to show")
    s.add_argument(
        "--var", default="./var/lab", help="state directory for the lab run (and its inbox)"
    )
    s.add_argument("--to", help="with inbox: only messages for this address (or domain)")
    s.add_argument("--limit", type=int, default=50, help="with inbox: list at most this many")
    s.add_argument("--raw", action="store_true", help="with inbox ID: the message as received")
    s.add_argument("--json", action="store_true", help="with inbox: JSON")
    s.add_argument("--no-demo", action="store_true", help="do not send the demo messages")
    s.add_argument("--once", action="store_true", help="exit after the demo")
    s.add_argument(
        "--dns",
        default="127.0.0.1:10053",
        metavar="HOST:PORT",
        help="where the lab DNS listens (UDP and TCP; default 127.0.0.1:10053)",
    )
    s.set_defaults(fn=cmd_lab)

    s = sub.add_parser("check-config", help="validate the configuration, the keys and the database")
    s.add_argument(
        "--no-database",
        action="store_true",
        help="skip the database check (URL, driver, connection, schema revision)",
    )
    s.set_defaults(fn=cmd_check_config)

    s = sub.add_parser("hash-password", help="hash an SMTP AUTH password for [[smtp.users]]")
    s.add_argument("--stdin", action="store_true", help="read the password from stdin")
    s.set_defaults(fn=cmd_hash_password)

    s = sub.add_parser("queue", help="what is waiting, and why; act on the queue")
    s.add_argument("action", choices=["list", "show", "flush", "hold", "release", "delete"])
    s.add_argument("id", nargs="?", help="message id (or ALL for hold/release/delete)")
    s.add_argument(
        "--state",
        help="list only this state (queued, deferred, active, held, or a finished one:"
        " delivered, bounced, expired, dropped, deleted)",
    )
    s.add_argument(
        "--all",
        action="store_true",
        help="list: the finished recipients still in the queue too (delivered, bounced...)",
    )
    s.add_argument("--limit", type=int, default=100, help="list: at most this many (100)")
    s.add_argument("--json", action="store_true", help="list: JSON, each row with its `why`")
    s.set_defaults(fn=cmd_queue)

    s = sub.add_parser("events", help="recipient events: recent ones, or follow them")
    s.add_argument(
        "--tail", action="store_true", help="print the last few events, then follow new ones"
    )
    s.add_argument(
        "-n",
        "--lines",
        "--limit",
        dest="count",
        type=int,
        metavar="N",
        help="how many recent events (default 100; with --tail, 10)",
    )
    s.add_argument("--all", action="store_true", help="from the first event (ignores -n)")
    s.add_argument("--msg", metavar="ID", help="only this message's events")
    s.add_argument(
        "--json", action="store_true", help="one JSON object a line (ISO 8601 `time` added)"
    )
    s.set_defaults(fn=cmd_events)

    s = sub.add_parser(
        "db",
        help="the control-plane database: current (check it), upgrade, downgrade, history",
        description="current: check database.url and its schema revision (exit 0 ok, 2 the"
        " database is unreachable, 1 anything else); upgrade [REVISION]: apply the"
        " migrations (to the newest by default); downgrade REVISION: undo them down to"
        " REVISION (an id, or -N for N steps); history: the revisions this version ships",
    )
    s.add_argument("action", choices=["current", "upgrade", "downgrade", "history"])
    s.add_argument("revision", nargs="?", help="upgrade, downgrade: an id (0002) or -N")
    s.add_argument(
        "--drop-all",
        action="store_true",
        help="downgrade: allow going below the first revision (drops every table)",
    )
    s.set_defaults(fn=cmd_db)

    s = sub.add_parser("admin", help="operator keys for the API: create, list, revoke")
    s.add_argument("action", choices=["create-key", "list-keys", "revoke-key"])
    s.add_argument("id", nargs="?", type=int, help="revoke-key: the key's id (from list-keys)")
    s.add_argument("--name", default="operator", help="create-key: a label for the key")
    s.add_argument("--json", action="store_true", help="list-keys: one JSON object a line")
    s.set_defaults(fn=cmd_admin)

    s = sub.add_parser("sources", help="source IP addresses")
    s.add_argument("action", choices=["check"])
    s.set_defaults(fn=cmd_sources)

    s = sub.add_parser("warming", help="warming plans")
    s.add_argument(
        "action", choices=["simulate", "start", "stop", "pause", "resume", "progress", "list"]
    )
    s.add_argument("--plan", choices=["conservative", "moderate", "aggressive"], default="moderate")
    s.add_argument("--volume", type=int, help="simulate: messages a day to reach")
    who = s.add_mutually_exclusive_group()
    who.add_argument("--source", dest="source_name", help="a source's name")
    who.add_argument("--domain", dest="domain_name", help="a sending domain")
    s.add_argument("--day", type=int, default=1, help="start: the plan day to start on")
    s.add_argument("--reason", default="paused by an operator", help="pause: why")
    s.set_defaults(fn=cmd_warming)

    s = sub.add_parser("shaping", help="traffic shaping: status, rules reload")
    s.add_argument("action", choices=["status", "reload"])
    s.add_argument("--json", action="store_true", help="status: the whole answer as JSON")
    s.set_defaults(fn=cmd_shaping)

    s = sub.add_parser("bounces", help="bounce and complaint reports: parse, unparsed")
    s.add_argument("action", choices=["parse", "unparsed", "show", "retry"])
    s.add_argument(
        "files", nargs="*", help="parse: message files (- for stdin); show, retry: report ids"
    )
    s.add_argument("--json", action="store_true", help="unparsed: the list as JSON")
    s.set_defaults(fn=cmd_bounces)

    s = sub.add_parser("dkim-genkey", help="generate a DKIM private key and print its TXT")
    s.add_argument("--domain", required=True)
    s.add_argument("--selector", required=True)
    s.add_argument("--algorithm", choices=["rsa-sha256", "ed25519-sha256"], default="rsa-sha256")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_dkim_genkey)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fn is cmd_warming:
        args.target = "domain" if args.domain_name else "source"
        args.name = args.domain_name or args.source_name
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        print(f"postwarden: config error: {exc}", file=sys.stderr)
        return 2
    except ControlPlaneError as exc:
        print(f"postwarden: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"postwarden: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
