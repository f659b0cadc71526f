"""How fast a contact import runs, and that its memory stays flat (not a test).

One run, for each database (SQLite in a scratch directory; a private PostgreSQL from
tests/pg.py's ``start_cluster``: Debian's binaries, 127.0.0.1, fsync off) and for each
file size (``--small``, 100 000 rows, and ``--rows``, 1 000 000):

* a CSV file written to a scratch directory, never held in memory: ``email,name,plan,
  age,vip,signup`` (plan a string attribute, age a declared number, vip a declared
  boolean, signup a declared date), one row in a thousand with a bad email, one in a
  thousand repeating an earlier email;
* a child process (so that its peak RSS is the import's own) stores the file as the API
  does (``store.imports.BodyWriter``, 1 MiB at a time), claims the import and runs it
  (``store.imports.run_import``: the scan, then batches of ``--batch`` rows through
  ``store.contacts.upsert_contacts``), then reports the run's wall time and
  ``ru_maxrss``, and its RSS before the run (interpreter and modules loaded).

It prints one line per case ``import_contacts: db=… rows=… seconds=… rows_per_s=…
peak_rss_mb=… rss_before_mb=… imported=… rejected=…`` and, per database, the peak RSS
of the large file over the small one (flat memory: close to 1).

    python bench/import_contacts.py [--rows 1000000] [--small 100000] [--batch 1000]
        [--db sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# tests/pg.py starts the server: the repository's root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PLANS = ("free", "pro", "team", "enterprise")


def write_csv(path: Path, rows: int) -> None:
    """The bench file (a block of lines at a time)."""
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write("email,name,plan,age,vip,signup\r\n")
        block: list[str] = []
        for i in range(rows):
            if i % 1000 == 999:
                email = f"broken-{i}"
            elif i % 1000 == 500:
                email = f"user{i - 1}@example{(i - 1) % 50}.com"  # the row before's again
            else:
                email = f"user{i}@example{i % 50}.com"
            block.append(
                f"{email},User {i},{PLANS[i % 4]},{18 + i % 60},{'yes' if i % 7 else 'no'},"
                f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}\r\n"
            )
            if len(block) == 10_000:
                f.write("".join(block))
                block.clear()
        f.write("".join(block))


def start_postgres() -> Any:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        raise SystemExit("bench: PostgreSQL not found: apt-get install postgresql")
    from tests.pg import start_cluster

    return start_cluster(prefix="pw-importbench-")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def child(url: str, csv_path: str, batch: int) -> dict[str, Any]:
    from postwarden.store.contact_models import AttributeDef
    from postwarden.store.db import create_engine, sessionmaker
    from postwarden.store.import_models import Import
    from postwarden.store.imports import CHUNK, BodyWriter, claim, run_import, runner_name
    from postwarden.store.models import Tenant

    engine = create_engine(url)
    sessions = sessionmaker(engine)
    async with sessions() as s:
        tenant = Tenant(name="bench")
        s.add(tenant)
        await s.flush()
        for name, type_ in (("age", "number"), ("vip", "boolean"), ("signup", "date")):
            s.add(AttributeDef(tenant_id=tenant.id, name=name, type=type_))
        await s.commit()
        tid = tenant.id
    writer = await BodyWriter.create(sessions, tid, {"on_conflict": "update"})
    with open(csv_path, "rb") as f:
        while piece := f.read(CHUNK):
            await writer.write(piece)
    await writer.finish()
    me = runner_name()
    iid = await claim(sessions, me)
    assert iid is not None
    before = rss_mb()
    t0 = time.perf_counter()
    outcome = await run_import(sessions, iid, me, batch)
    seconds = time.perf_counter() - t0
    async with sessions() as s:
        imp = await s.get(Import, iid)
        assert imp is not None
        counts = {"imported": imp.rows_imported, "rejected": imp.rows_rejected}
    await engine.dispose()
    return {
        "outcome": outcome,
        "seconds": seconds,
        "rss_before_mb": before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **counts,
    }


def run_child(url: str, csv_path: Path, batch: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", url, str(csv_path), "--batch", str(batch)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--db", default="sqlite,postgresql")
    ap.add_argument("--child", nargs=2, metavar=("URL", "CSV"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.child[0], args.child[1], args.batch))))
        return

    from postwarden.store.db import upgrade_sync

    scratch = Path(tempfile.mkdtemp(prefix="pw-importbench-"))
    files = {}
    for n in (args.small, args.rows):
        files[n] = scratch / f"contacts-{n}.csv"
        write_csv(files[n], n)
    server = None
    try:
        for db in args.db.split(","):
            peaks = {}
            for n, path in files.items():
                if db == "sqlite":
                    url = f"sqlite+aiosqlite:///{scratch / f'control-{n}.db'}"
                else:
                    if server is None:
                        server = start_postgres()
                    name = f"imports_{n}"
                    server._sql(f'CREATE DATABASE "{name}"')
                    url = server.url(name)
                upgrade_sync(url)
                r = run_child(url, path, args.batch)
                peaks[n] = r["peak_rss_mb"]
                print(
                    f"import_contacts: db={db} rows={n} seconds={r['seconds']:.1f}"
                    f" rows_per_s={n / r['seconds']:.0f} peak_rss_mb={r['peak_rss_mb']:.0f}"
                    f" rss_before_mb={r['rss_before_mb']:.0f} imported={r['imported']}"
                    f" rejected={r['rejected']} outcome={r['outcome']}",
                    flush=True,
                )
            if len(peaks) == 2:
                print(
                    f"import_contacts: db={db} peak_rss_ratio_{args.rows}_over_{args.small}="
                    f"{peaks[args.rows] / peaks[args.small]:.2f}",
                    flush=True,
                )
    finally:
        if server is not None:
            from tests.pg import stop_server

            stop_server(server)
        for p in scratch.iterdir():
            p.unlink()
        os.rmdir(scratch)


if __name__ == "__main__":
    main()
