"""The ``postwarden`` command: the only entry point."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from postwarden.commands.admin import cmd_admin
from postwarden.commands.bounces import cmd_bounces
from postwarden.commands.common import load, run_async
from postwarden.commands.db import cmd_db
from postwarden.commands.dkim import cmd_dkim_genkey
from postwarden.commands.install import add_parsers as add_install_parsers
from postwarden.commands.queue import cmd_events, cmd_queue
from postwarden.commands.shaping import cmd_shaping, cmd_sources, cmd_warming
from postwarden.config import ConfigError
from postwarden.control import ControlPlaneError

if TYPE_CHECKING:
    pass

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


def cmd_serve(args: argparse.Namespace) -> int:
    from postwarden.supervisor import Supervisor, check_files, worker_count

    cfg = check_files(load(args))
    setup_logging(cfg.server.log_level)
    path = args.config or os.environ.get("POSTWARDEN_CONFIG")
    if args.role == "control":
        # The control plane alone: one process, no spool (scale it by running more).
        from postwarden.appliance import serve

        run_async(serve(cfg, path, role="control"))
        return 0
    count = worker_count(cfg)
    from postwarden.queue.shards import stranded_shards

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
    cfg = check_files(load(args))
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


def cmd_forkserver(args: argparse.Namespace) -> int:
    """The supervisor's fork server (forkserver.py; started by it, not by hand)."""
    from postwarden.forkserver import serve

    def early() -> None:  # what `db` imports
        import postwarden.store.check
        import postwarden.store.db  # noqa: F401

    def rest() -> None:  # what `worker` imports, and the loop it runs on
        import postwarden.appliance
        import postwarden.control.plane  # noqa: F401

        with contextlib.suppress(ImportError):
            import uvloop  # noqa: F401

    return serve(args.requests, args.answers, args.parent, preload=(early, rest), main=main)


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

    cfg = check_files(load(args))

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

    s = sub.add_parser("forkserver", help=argparse.SUPPRESS)
    s.add_argument("--requests", type=int, required=True, help="the pipe requests come on")
    s.add_argument("--answers", type=int, required=True, help="the pipe answers go to")
    s.add_argument("--parent", type=int, required=True, help="the supervisor's pid")
    s.set_defaults(fn=cmd_forkserver)

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

    add_install_parsers(sub)
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
