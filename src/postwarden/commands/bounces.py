"""``postwarden bounces``: the inbox of reports the inbound MX received, what the
parser made of them, and sending an unparsed one through again."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from postwarden.commands.common import load

if TYPE_CHECKING:
    pass

log = logging.getLogger("postwarden")


def cmd_bounces(args: argparse.Namespace) -> int:
    from postwarden.bounces.classify import PatternsError, default_classifier
    from postwarden.bounces.parse import Parser

    cfg = load(args)
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
