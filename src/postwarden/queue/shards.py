"""Spool shards: one per worker (docs/decisions/0004), found under the spool path,
and what they hold under an API Idempotency-Key, read across all of them."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

#: Seconds the spool keeps what it accepted under an API Idempotency-Key (longer than
#: any ``control.idempotency_ttl`` should be; a retry later than that is a new request).
IDEMPOTENCY_KEEP = 7 * 86400.0

SHARD_PREFIX = "shard-"


def shard_path(spool_path: str | os.PathLike[str], index: int) -> Path:
    """The spool directory of worker ``index``: the spool path itself for worker 0 (so a
    single-process appliance keeps the plain layout), ``<path>/shard-<k>`` otherwise."""
    root = Path(spool_path)
    return root if index == 0 else root / f"{SHARD_PREFIX}{index}"


def shard_paths(spool_path: str | os.PathLike[str]) -> list[Path]:
    """Every spool shard that exists under ``spool_path`` (worker 0's first)."""
    root = Path(spool_path)
    found = [root] if (root / "index.db").exists() else []
    extra = []
    if root.is_dir():
        for p in root.iterdir():
            suffix = p.name[len(SHARD_PREFIX) :]
            if p.name.startswith(SHARD_PREFIX) and suffix.isdigit() and (p / "index.db").exists():
                extra.append((int(suffix), p))
    return found + [p for _, p in sorted(extra)]


def shard_number(spool_path: str | os.PathLike[str], path: Path) -> int:
    """The worker number a shard directory from :func:`shard_paths` belongs to."""
    return 0 if path == Path(spool_path) else int(path.name[len(SHARD_PREFIX) :])


def stranded_shards(spool_path: str | os.PathLike[str], workers: int) -> list[tuple[Path, int]]:
    """Shards no worker would serve with ``workers`` workers, and the messages they hold.

    Shard k belongs to worker k; with fewer workers than before, the higher shards'
    mail would wait forever. Only shards that still hold messages are returned.
    """
    out = []
    for path in shard_paths(spool_path):
        if shard_number(spool_path, path) < workers:
            continue
        db = sqlite3.connect(f"file:{path / 'index.db'}?mode=ro", uri=True, timeout=30)
        try:
            count = int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        except sqlite3.Error:
            count = 0
        finally:
            db.close()
        if count:
            out.append((path, count))
    return out


def find_idempotent(spool_path: str | os.PathLike[str], tenant: str, key: str) -> list[Any]:
    """What every shard under ``spool_path`` accepted under ``key`` for ``tenant``:
    rows ``(part, request_hash, msg_id, [[rcpt, rcpt_id, drop reason or None], …])``,
    by part. Read-only, any thread; a shard that cannot be read is skipped (its
    worker has not started yet)."""
    out: list[Any] = []
    root = Path(spool_path)
    for shard in shard_paths(root) or [root]:
        db_file = shard / "index.db"
        if not db_file.exists():
            continue
        try:
            conn = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=5.0)
        except sqlite3.Error:
            continue
        try:
            rows = conn.execute(
                "SELECT part, request_hash, msg_id, answer FROM idempotency"
                " WHERE tenant = ? AND key = ? AND created_at > ?",
                (tenant, key, time.time() - IDEMPOTENCY_KEEP),
            ).fetchall()
        except sqlite3.OperationalError:
            rows = []  # a spool from before this table: nothing was kept there
        finally:
            conn.close()
        out += [(int(p), h, m, json.loads(a)) for p, h, m, a in rows]
    return sorted(out, key=lambda r: r[0])
