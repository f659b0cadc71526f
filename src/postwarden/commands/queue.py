"""``postwarden queue`` and ``postwarden events``: the spool's recipients and events,
read from every shard (queue.admin, queue.describe)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from postwarden.commands.common import load

if TYPE_CHECKING:
    pass

log = logging.getLogger("postwarden")


def cmd_queue(args: argparse.Namespace) -> int:
    from postwarden.queue.admin import QueueAdmin
    from postwarden.values import PENDING_STATES

    cfg = load(args)
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

    cfg = load(args)
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
