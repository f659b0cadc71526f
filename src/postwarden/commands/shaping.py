"""``postwarden sources``, ``shaping`` and ``warming``: the sources' DNS, and the shaping
broker's state and commands over its socket."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from postwarden.commands.common import load, run_async

if TYPE_CHECKING:
    pass

log = logging.getLogger("postwarden")


def cmd_sources(args: argparse.Namespace) -> int:
    """``sources check``: each source's forward-confirmed reverse DNS and EHLO name."""
    from postwarden.dns.resolver import Resolver
    from postwarden.dns.sources import check_source

    cfg = load(args)
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

    cfg = load(args)

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
