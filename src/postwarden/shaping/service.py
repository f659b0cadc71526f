"""The shaping service: the broker with its rules, sources and warming book, saved to
``shaping.state_file`` and served on ``shaping.socket`` (docs/decisions/0006).

The supervisor runs one for all its workers; a single-process appliance runs its
own. Operator ops (status, reload, warming start/stop/pause/resume/progress) and the
change log's reader (changes) arrive as ``command`` requests — from the API in any
worker or from the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from postwarden.config import Config
from postwarden.files import replace_file
from postwarden.metrics import ShapingMetrics, tenant_key
from postwarden.shaping.broker import CHANGE_LOG_SIZE, Broker
from postwarden.shaping.channel import MAX_LINE, BrokerServer
from postwarden.shaping.pair_state import restore as restore_pairs
from postwarden.shaping.pair_state import snapshot as snapshot_pairs
from postwarden.shaping.rules import RulesError, load_rules
from postwarden.warming.book import WarmingBook, plan_from
from postwarden.warming.health import Thresholds
from postwarden.warming.plans import PlanError

log = logging.getLogger("postwarden.shaping")
SAVE_EVERY = 2.0  # seconds between saves of a changed warming book or pair state
CHANGES_PAGE = 500  # changes per "changes" answer unless the reader asks otherwise
# An answer crosses the broker's channel as one line: a page stops short of its limit.
CHANGES_BYTES = MAX_LINE - 4096


def thresholds_of(cfg: Config) -> Thresholds:
    sh = cfg.shaping
    return Thresholds(
        pause_bounce_rate=sh.pause_bounce_rate,
        pause_complaint_rate=sh.pause_complaint_rate,
        pause_delivery_rate=sh.pause_delivery_rate,
        min_volume=sh.pause_min_volume,
        window=sh.health_window,
    )


class CommandError(ValueError):
    """An operator op that cannot be done; the message says why."""


class ShapingService:
    def __init__(
        self,
        cfg: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        metrics: ShapingMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.book = WarmingBook(cfg.shaping.timezone, thresholds_of(cfg), wall=wall)
        self.book.load(cfg.shaping_state_file)
        self.broker = Broker(
            load_rules(cfg.shaping.rules_file),
            clock=clock,
            sources=cfg.source_map(),
            book=self.book,
        )
        self.broker.pause_recheck = cfg.shaping.pause_recheck
        self._restore_pairs()
        self._saved_pairs = self._pairs_now()
        self._autostart()
        self.server: BrokerServer | None = None
        self._saver: asyncio.Task[None] | None = None
        self.metrics = metrics  # updated as the broker acts (None: no metrics)
        self._actions_seen = 0

    def _autostart(self) -> None:
        """Sources configured as "warming" start their plan unless they have one, had
        one that finished, or one was stopped by an operator."""
        for src in self.cfg.source_map().values():
            key = f"source:{src.name}"
            if (
                src.state == "warming"
                and key not in self.book.trackers
                and key not in self.book.done
            ):
                self.book.start(key, plan_from(src.warming_plan))

    async def start(self, serve: bool = True) -> None:
        if serve:
            self.server = BrokerServer(self.broker, self.cfg.shaping_socket, self.command)
            await self.server.start()
        self._saver = asyncio.create_task(self._save_loop())

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        if self._saver is not None:
            self._saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._saver
        self.save()

    def _restore_pairs(self) -> None:
        """Suspensions, bounce rules and lowered rates saved before a restart (decision
        0006): in force again before the first connection is chosen. A state file
        written before they were saved has none: nothing to restore."""
        path = Path(self.cfg.shaping_state_file)
        if not path.exists():
            return
        try:
            n = restore_pairs(self.broker, json.loads(path.read_text(encoding="utf-8")))
        except ValueError as exc:
            # As for the warming book: never send to a suspended pair because the
            # state is unreadable; refuse to start instead.
            raise PlanError(f"{path}: unreadable shaping state: {exc}") from exc
        # What was restored was in force before: not a change of this broker's.
        self.broker.settle_rates()
        if n:
            log.info("event=shaping_restored pairs=%d path=%s", n, path)

    def _pairs_now(self) -> list[dict[str, Any]]:
        """The pairs' state as saved (whole seconds, so clock drift is no change)."""
        pairs: list[dict[str, Any]] = snapshot_pairs(self.broker)["pairs"]
        return [
            {k: round(v) if k.endswith("_until") else v for k, v in item.items()} for item in pairs
        ]

    def save(self) -> None:
        """The warming book and the pairs' state, in one file."""
        self._write(self._state())

    def _state(self) -> dict[str, Any]:
        # Taken in the event loop (the broker's and the book's thread).
        data = {**self.book.to_json(), **snapshot_pairs(self.broker)}
        self.book.dirty = False
        return data

    def _write(self, data: dict[str, Any]) -> None:
        """Atomically: write, fsync, rename."""
        path = Path(self.cfg.shaping_state_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(path, json.dumps(data), durable=True)
        except OSError:
            self.book.dirty = True  # try again at the next turn
            log.exception("event=warming_save_failed path=%s", path)

    async def _save_loop(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY)
            pairs = self._pairs_now()
            if self.book.dirty or pairs != self._saved_pairs:
                self._saved_pairs = pairs
                await asyncio.to_thread(self._write, self._state())
            if self.metrics is not None:
                try:
                    self.update_metrics(self.metrics)
                except Exception:
                    log.exception("event=shaping_metrics_failed")

    def update_metrics(self, m: ShapingMetrics) -> None:
        named = set(self.broker.rules.sites)
        for p in self.broker.status():
            site = p["site"] if p["site"].split("/")[0] in named else "other"
            m.rate.labels(p["source"], site).set(p["rate_per_min"])
            m.conns.labels(p["source"], site).set(p["connections"])
            m.conn_limit.labels(p["source"], site).set(p["connection_limit"])
            m.suspended.labels(p["source"], site).set(1 if p["suspended_for"] > 0 else 0)
        new = min(self.broker.action_count - self._actions_seen, len(self.broker.actions))
        for a in self.broker.actions[len(self.broker.actions) - new :]:
            site = a["site"] if a["site"].split("/")[0] in named else "other"
            m.actions.labels(a["source"], site, a["rule"], a["action"]).inc()
        self._actions_seen = self.broker.action_count
        for key in self.book.keys():
            if tenant_key(key, self.cfg.metrics.tenant_labels) is None:
                continue  # a sending domain: a tenant's name (metrics.tenant_labels)
            pr = self.book.progress(key)
            m.health.labels(key).set(pr["health"]["score"])
            m.paused.labels(key).set(1 if pr["paused"] else 0)
            if pr["warming"]:
                m.day.labels(key).set(pr["day"])
                m.cap.labels(key).set(pr["cap"] or 0)
                m.sent.labels(key).set(pr["sent_today"])

    def reload(self, cfg: Config) -> str | None:
        """New configuration: rules and sources; a bad rules file is refused (the
        message says where) and the rules in force stay."""
        try:
            rules = load_rules(cfg.shaping.rules_file)
        except RulesError as exc:
            log.error("event=shaping_reload_refused error=%r", str(exc))
            return str(exc)
        self.cfg = cfg
        self.broker.reconfigure(rules, sources=cfg.source_map())
        self.broker.pause_recheck = cfg.shaping.pause_recheck
        self._autostart()
        log.info("event=shaping_reloaded rules=%s", cfg.shaping.rules_file or "<shipped>")
        return None

    # ------------------------------------------------------------------ operator ops

    def _key(self, args: dict[str, Any]) -> str:
        target, name = args.get("target", "source"), str(args.get("name", "")).strip().lower()
        if target == "source":
            names = {n.lower(): n for n in self.cfg.source_map()}
            if name not in names:
                raise CommandError(
                    f"name: no source named {name!r} (sources: {', '.join(sorted(names.values()))})"
                )
            return f"source:{names[name]}"
        if target == "domain":
            if not name or "." not in name:
                raise CommandError(f"name: not a domain name: {name!r}")
            return f"domain:{name.rstrip('.')}"
        raise CommandError(f"target: must be source or domain, got {target!r}")

    def status(self) -> dict[str, Any]:
        now = self.broker.clock()
        sources = []
        for src in self.cfg.source_map().values():
            key = f"source:{src.name}"
            score, tier = self.book.health(key)
            sources.append(
                {
                    "name": src.name,
                    "address": src.address,
                    "ehlo": src.ehlo,
                    "state": src.state,
                    "paused": self.book.is_paused(key),
                    "warming": key in self.book.trackers,
                    "health": {"score": score, "tier": tier},
                }
            )
        actions = [{**a, "ago": round(now - a["at"], 1)} for a in self.broker.actions[-50:]]
        for a in actions:
            a.pop("at", None)
        return {
            "pairs": self.broker.status(),
            "actions": actions,
            "sources": sources,
            "warming": [self.book.progress(k) for k in self.book.keys()],
        }

    def changes(self, args: dict[str, Any]) -> dict[str, Any]:
        """The broker's change log after ``after`` (op "changes"), oldest first.

        ``epoch``: the epoch the reader's ``after`` belongs to. When it is another
        (the broker restarted), or ``after`` lies beyond the log's last ``seq``,
        ``after`` means nothing here: the answer starts at this epoch's beginning,
        with ``gap`` true. ``gap`` is also true when changes after ``after`` were
        already dropped from the log (it keeps the last 2000). ``limit`` (1-2000,
        500) bounds the page; a page also stops short of the channel's line limit.
        ``last_seq`` is the newest change's ``seq``: the reader pages on with the
        last ``seq`` it got as ``after`` while that is below ``last_seq``."""
        after = _whole(args, "after", 0, 0, None)
        limit = _whole(args, "limit", CHANGES_PAGE, 1, CHANGE_LOG_SIZE)
        epoch = args.get("epoch")
        if epoch is not None and not isinstance(epoch, str):
            raise CommandError(f"epoch: must be a string or null, got {epoch!r}")
        b = self.broker
        other = (epoch is not None and epoch != b.epoch) or after > b.seq
        page, dropped = b.changes_after(0 if other else after, limit)
        size, n = 0, 0
        for c in page:
            size += len(json.dumps(c)) + 2
            if size > CHANGES_BYTES and n:
                break
            n += 1
        return {"epoch": b.epoch, "changes": page[:n], "last_seq": b.seq, "gap": other or dropped}

    def command(self, args: dict[str, Any]) -> dict[str, Any]:
        """One operator op; raises ValueError (CommandError, PlanError) when refused."""
        op = args.get("op")
        if op == "status":
            return self.status()
        if op == "changes":
            return self.changes(args)
        if op == "reload":
            from postwarden.config import load_config

            cfg = self.cfg
            if args.get("config_path"):
                cfg = load_config(args["config_path"])
            err = self.reload(cfg)
            if err is not None:
                raise CommandError(err)
            return {"reloaded": True}
        if op == "feedback":
            # Bounces and complaints that came back after delivery (bounces.processor):
            # counted for the health of the source and sending domain that sent it.
            counts = {k: int(args.get(k) or 0) for k in ("bounced", "complained") if args.get(k)}
            keys = []
            if args.get("source"):
                keys.append(f"source:{args['source']}")
            if args.get("sending_domain"):
                keys.append(f"domain:{str(args['sending_domain']).lower()}")
            for key in keys:
                if counts:
                    self.book.outcomes(key, counts)
            return {"counted": bool(keys and counts)}
        if op == "warming_list":
            return {"warming": [self.book.progress(k) for k in self.book.keys()]}
        key = self._key(args)
        if op == "warming_start":
            try:
                plan = plan_from(args.get("plan") or "moderate")
            except (PlanError, ValueError, TypeError) as exc:
                raise CommandError(f"plan: {exc}") from exc
            self.book.start(key, plan, int(args.get("day") or 1))
        elif op == "warming_stop":
            if not self.book.stop(key):
                raise CommandError(f"{key} has no warming plan")
        elif op == "pause":
            self.book.pause(key, str(args.get("reason") or "paused by an operator"))
        elif op == "resume":
            if not self.book.resume(key):
                raise CommandError(f"{key} is not paused")
        elif op != "progress":
            raise CommandError(f"op: unknown {op!r}")
        self.save()
        return {"progress": self.book.progress(key)}


def _whole(args: dict[str, Any], name: str, default: int, low: int, high: int | None) -> int:
    """``args[name]``, a whole number from ``low`` to ``high`` (``default`` when absent
    or null); refused naming the field otherwise."""
    v = args.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise CommandError(f"{name}: must be a whole number {span}, got {v!r}")
    return v
