"""Requests per second of the tracking endpoints against a static 204 (issue 22).

Not a test. One run, per database (``--db``: SQLite, PostgreSQL or both):

* the appliance in a process of its own, as ``postwarden serve`` with
  ``server.workers = 1`` runs it (one process, uvloop, the same uvicorn and Starlette
  app), with one more route in the same app: ``GET /bench/204``, an empty ``204``
  (the baseline: the same middleware, server and process as the tracking routes,
  nothing behind it);
* its control database on SQLite (WAL, ``synchronous=NORMAL``, as the appliance sets
  it) or on a private PostgreSQL (tests/pg.py's cluster, but with ``fsync``,
  ``synchronous_commit`` and ``full_page_writes`` on: a hit answered is on disk);
* one tenant and ``--tokens`` distinct tokens of each kind: per recipient (a contact
  and a message id each), the clicks with a destination each;
* the load: ``wrk`` (Debian's; installed with apt-get when missing), one thread,
  ``--connections`` keep-alive connections, no pipelining, each request the next
  path of a list (a Lua script), so every pixel and click has its own token; the
  baseline's list is ``/bench/204?t=<token>``, requests of the same length;
* per repetition, the three in turn for ``--seconds`` each (after one untimed warm-up
  of each): requests per second as wrk counts answers, CPU seconds of the server's
  process tree and of the client (wrk), and the ``tracking_hits`` rows the run
  added: every answered pixel or click must be a stored row (the bench fails
  otherwise), and no more rows than answers plus the requests in flight when wrk
  stopped (``--connections``).

It prints each run, the medians, then per database one line ``bench-tracking:
base_rps=… pixel_rps=… click_rps=… pixel_ratio=… click_ratio=… pixel_cpu_ratio=…
click_cpu_ratio=… db=…``; the CPU ratios are the baseline's server CPU per request
over the endpoint's (with PostgreSQL's), the rate ratio a server alone on its core
would reach: on a shared machine, steadier than the rates. The aim (issue 22) is a
ratio of at least 0.5 on 2 cores: the server and the client get one each.
``--py-spy S`` then profiles the server for S seconds under each load (py-spy from
the venv or PATH).

    python bench/tracking.py [--db sqlite|postgresql|both] [--tokens 20000]
        [--seconds 5] [--reps 3] [--connections 64] [--batch N] [--py-spy SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/pg.py starts the private PostgreSQL
sys.path.insert(0, str(ROOT / "bench"))

from procstat import tree_sample  # noqa: E402
from run import free_port  # noqa: E402

TARGETS = ("base", "pixel", "click")
# wrk's request hook: the next path of the list named by the script's argument.
LUA = """\
local paths = {}
local i = 0
init = function(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  i = math.random(#paths)
end
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
"""
# PostgreSQL as a production server runs it: a commit is on disk when it returns.
DURABLE_PG = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


# ---------------------------------------------------------------------- the server


def serve(spec_file: str) -> None:
    """The server process: the appliance with ``/bench/204`` in its app, a tenant and
    its tokens written as path lists; a JSON line on stdout once it serves; stops on
    SIGTERM."""
    from postwarden.commands.common import run_async

    run_async(_serve(json.loads(Path(spec_file).read_text())))


async def _serve(spec: dict[str, Any]) -> None:
    import httpx
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from postwarden.appliance import Appliance
    from postwarden.config import load_config
    from postwarden.engagement.tokens import Kind, Link
    from postwarden.store.models import ApiKey
    from postwarden.store.secrets import new_api_key

    async def no_content(request: Request) -> Response:
        return Response(status_code=204)

    cfg = load_config(None, environ={}, overrides=spec["config"])
    app = Appliance(cfg, extra_routes=[Route("/bench/204", no_content, methods=["GET"])])
    await app.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        assert app.control_address is not None
        host, port = app.control_address
        admin = new_api_key()
        async with app.control.sessions() as s:
            s.add(ApiKey(tenant_id=None, prefix=admin.prefix, secret_hash=admin.secret_hash,
                         name="bench operator", scopes="admin"))  # fmt: skip
            await s.commit()
        async with httpx.AsyncClient(
            base_url=f"http://{host}:{port}",
            headers={"Authorization": f"Bearer {admin.plaintext}"},
            timeout=30,
        ) as c:
            r = await c.post("/v1/tenants", json={"name": "brand"})
            r.raise_for_status()
            tid = int(r.json()["id"])
        keys = app.control.tenant_keys
        signer = await keys.signer(tid)
        lists: dict[str, list[str]] = {t: [] for t in TARGETS}
        for i in range(spec["tokens"]):
            contact, message = 1000 + i, f"{i:08x}.{i % 7}"
            opened = keys.make(signer, Link(Kind.OPEN, 1, contact, 0, message))
            url = f"https://shop.example.com/p/{i}?utm_source=mail&utm_campaign=spring"
            clicked = keys.make(signer, Link(Kind.CLICK, 1, contact, i % 9, message, url))
            lists["pixel"].append(f"/t/o/{opened}")
            lists["click"].append(f"/t/c/{clicked}")
            lists["base"].append(f"/bench/204?t={opened}")
        scratch = Path(spec["scratch"])
        for target, paths in lists.items():
            (scratch / f"{target}.paths").write_text("\n".join(paths) + "\n")
        print(json.dumps({"port": port, "tenant": tid}), flush=True)
        await stop.wait()
    finally:
        await app.stop()


# ---------------------------------------------------------------------- the driver


@dataclass
class Run:
    target: str
    rps: float
    answered: int
    errors: int
    server_cpu: float  # CPU seconds of the server's process tree
    db_cpu: float  # of the PostgreSQL cluster (0 on SQLite)
    client_cpu: float  # of wrk
    seconds: float
    rows: int  # tracking_hits rows the run added

    @property
    def cpu_per_request(self) -> float:
        """Server CPU seconds (with PostgreSQL's) per answer: what the throughput
        would be bound by on an otherwise idle core, contention aside."""
        return (self.server_cpu + self.db_cpu) / max(1, self.answered)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print("bench-tracking: installing Debian's wrk (the HTTP load generator)")
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=False)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "wrk"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        stdout=subprocess.DEVNULL,
    )
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("bench-tracking: wrk not found after apt-get install wrk")
    return found


def parse_wrk(out: str) -> tuple[int, float, int]:
    """(answers, requests per second, errors: non-2xx/3xx answers and socket errors)."""
    done = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not done or not rps:
        raise RuntimeError(f"wrk said: {out}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket:
        errors += sum(int(g) for g in socket.groups())
    return int(done.group(1)), float(rps.group(1)), errors


class Database:
    """The control database's URL, a row count of ``tracking_hits``, the server's
    process (PostgreSQL) for its CPU."""

    def __init__(self, kind: str, scratch: Path) -> None:
        from postwarden.store.db import upgrade_sync

        self.kind = kind
        self.pg: Any = None
        if kind == "postgresql":
            from tests.pg import start_cluster

            self.pg = start_cluster(DURABLE_PG, prefix="pw-trackbench-")
            try:
                self.pg._sql("CREATE DATABASE bench")
                upgrade_sync(self.pg.url("bench"))
            except BaseException:
                self.stop()
                raise
            self.url = self.pg.url("bench")
        else:
            self.url = f"sqlite+aiosqlite:///{scratch / 'control.db'}"
            upgrade_sync(self.url)

    @property
    def pid(self) -> int | None:
        return self.pg.proc.pid if self.pg is not None else None

    async def hits(self) -> int:
        from sqlalchemy import func, select

        from postwarden.store.db import create_engine
        from postwarden.store.engagement_models import TrackingHit

        engine = create_engine(self.url)
        try:
            async with engine.connect() as conn:
                return int((await conn.execute(select(func.count(TrackingHit.id)))).scalar_one())
        finally:
            await engine.dispose()

    async def settled_hits(self) -> int:
        """The count once the writer has committed what it holds (two equal looks)."""
        last = await self.hits()
        while True:
            await asyncio.sleep(0.2)
            now = await self.hits()
            if now == last:
                return now
            last = now

    def stop(self) -> None:
        if self.pg is not None:
            from tests.pg import stop_server

            stop_server(self.pg)


def config(scratch: Path, url: str, batch: int | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "server": {"hostname": "postwarden.bench.test", "log_level": "warning"},
        "smtp": {"listen": [f"127.0.0.1:{free_port()}"]},
        "control": {
            "listen": f"127.0.0.1:{free_port()}",
            "encryption_key_file": str(scratch / "control.key"),
        },
        "database": {"url": url},
        "spool": {"path": str(scratch / "spool")},
        "dns": {"nameservers": ["127.0.0.1:9"]},  # never asked: nothing is sent
    }
    if batch:
        cfg["tracking"] = {"hit_batch": batch}
    return cfg


def cpu_of(pid: int | None) -> float:
    return tree_sample(pid).cpu_s if pid is not None else 0.0


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


async def measure(
    wrk: str, port: int, scratch: Path, target: str, seconds: int, args: argparse.Namespace,
    server: int, db: Database,
) -> Run:  # fmt: skip
    before_rows = await db.settled_hits() if target != "base" else 0
    s0, d0, c0 = cpu_of(server), cpu_of(db.pid), children_cpu()
    t0 = time.monotonic()
    argv = [wrk, "-t1", f"-c{args.connections}", f"-d{seconds}s", "--timeout", "10s",
            "-s", str(scratch / "paths.lua"), f"http://127.0.0.1:{port}",
            "--", str(scratch / f"{target}.paths")]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    elapsed = time.monotonic() - t0
    s1, d1, c1 = cpu_of(server), cpu_of(db.pid), children_cpu()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {text}")
    answered, rps, errors = parse_wrk(text)
    rows = (await db.settled_hits()) - before_rows if target != "base" else 0
    run = Run(target, rps, answered, errors, s1 - s0, d1 - d0, c1 - c0, elapsed, rows)
    if errors:
        raise AssertionError(f"{target}: {errors} failed requests\n{text}")
    if target != "base":
        # A hit answered is a hit stored; at most the requests in flight at wrk's stop
        # were stored without their answer being counted.
        if not answered <= rows <= answered + args.connections:
            raise AssertionError(
                f"{target}: {answered} answered but {rows} tracking_hits rows stored"
            )
    return run


def show(run: Run) -> None:
    print(
        f"  {run.target:<5}  {run.rps:9.0f} req/s  answered={run.answered:<7} rows={run.rows:<7} "
        f"server_cpu={run.server_cpu / run.seconds:4.0%} "
        + (f"db_cpu={run.db_cpu / run.seconds:4.0%} " if run.db_cpu else "")
        + f"client_cpu={run.client_cpu / run.seconds:4.0%} "
        f"server_us_per_req={run.cpu_per_request * 1e6:.0f}",
        flush=True,
    )


async def bench_one(kind: str, wrk: str, args: argparse.Namespace) -> dict[str, float]:
    scratch = Path(tempfile.mkdtemp(prefix="pw-trackbench-"))
    db = Database(kind, scratch)
    proc: asyncio.subprocess.Process | None = None
    try:
        (scratch / "paths.lua").write_text(LUA)
        spec = {"config": config(scratch, db.url, args.batch), "tokens": args.tokens,
                "scratch": str(scratch)}  # fmt: skip
        (scratch / "spec.json").write_text(json.dumps(spec))
        log = (scratch / "serve.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", str(scratch / "spec.json"),
            stdout=asyncio.subprocess.PIPE, stderr=log,
            env={**os.environ, "POSTWARDEN_SERVER__LOG_LEVEL": "warning"},
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 300)
        if not line:
            raise RuntimeError(f"server exited: {(scratch / 'serve.log').read_text()[-3000:]}")
        port = int(json.loads(line)["port"])
        print(f"bench-tracking: db={kind} server pid {proc.pid}, {args.tokens} tokens a kind,"
              f" wrk -t1 -c{args.connections}, {args.seconds}s a run", flush=True)  # fmt: skip
        for target in TARGETS:  # warm-up, untimed
            await measure(wrk, port, scratch, target, 1, args, proc.pid, db)
        runs: list[Run] = []
        for rep in range(args.reps):
            print(f" rep {rep + 1}", flush=True)
            for target in TARGETS:
                run = await measure(wrk, port, scratch, target, args.seconds, args, proc.pid, db)
                show(run)
                runs.append(run)
        med = {t: statistics.median(r.rps for r in runs if r.target == t) for t in TARGETS}
        for t in TARGETS:
            med[f"{t}_us"] = 1e6 * statistics.median(
                r.cpu_per_request for r in runs if r.target == t
            )
        total = await db.settled_hits()
        print(f" median req/s: base {med['base']:.0f}, pixel {med['pixel']:.0f},"
              f" click {med['click']:.0f}; server CPU per request: base {med['base_us']:.0f} us,"
              f" pixel {med['pixel_us']:.0f} us, click {med['click_us']:.0f} us;"
              f" tracking_hits rows in all: {total}")  # fmt: skip
        if args.py_spy:  # after the timed runs: the profiler slows what it samples
            for target in TARGETS:
                out = scratch / f"py-spy-{target}.txt"
                spy = start_spy(proc.pid, out, args.py_spy)
                if spy is None:
                    break
                run = await measure(wrk, port, scratch, target, args.py_spy, args, proc.pid, db)
                spy.wait()
                print(f" profile of {target} (py-spy, {run.rps:.0f} req/s while sampled):")
                print("   ", "\n    ".join(top_frames(out)), flush=True)
        return med
    finally:
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        db.stop()
        if args.keep:
            print(f"bench-tracking: kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------- profile


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def start_spy(pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes] | None:
    binary = py_spy()
    if binary is None:
        print("bench-tracking: py-spy not found (pip install py-spy): no profile")
        return None
    return subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--nonblocking", "--rate", "50",
         "--duration", str(seconds), "--format", "raw",
         "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def top_frames(path: Path, top: int = 12) -> list[str]:
    """Where the server's time went, from py-spy's collapsed stacks (all threads;
    aiosqlite's thread waiting on its queue counts too): the share of samples per
    leaf function (self), and under each function of
    postwarden, SQLAlchemy, the drivers and the HTTP stack (inclusive)."""
    if not path.exists():
        return ["(no profile)"]
    total = 0
    leaf: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        total += count
        # "function (file:line)" to "function (file)": a function's lines together.
        code = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")
                if not f.startswith(("process ", "thread "))]  # fmt: skip
        if code:
            leaf[code[-1]] = leaf.get(code[-1], 0) + count
        for frame in set(code):
            if any(k in frame for k in ("postwarden/", "sqlalchemy/", "aiosqlite/",
                                        "asyncpg/", "starlette/", "uvicorn/")):  # fmt: skip
                inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return ["(empty)"]

    def ranked(d: dict[str, int], k: int) -> list[str]:
        best = sorted(d.items(), key=lambda kv: -kv[1])[:k]
        return [f"{n / total:5.1%}  {name}" for name, n in best]

    return ["self:", *ranked(leaf, top), "inclusive:", *ranked(inclusive, 2 * top)]


# ---------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="sqlite")
    p.add_argument("--tokens", type=int, default=20_000, help="distinct tokens of each kind")
    p.add_argument("--seconds", type=int, default=5, help="length of one timed run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--connections", type=int, default=64, help="wrk's keep-alive connections")
    p.add_argument("--batch", type=int, default=0, help="tracking.hit_batch (0: the default)")
    p.add_argument("--py-spy", type=int, default=0, metavar="SECONDS",
                   help="then profile the server under each load for SECONDS")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    wrk = ensure_wrk()
    kinds = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    lines = []
    for kind in kinds:
        med = asyncio.run(bench_one(kind, wrk, args))
        lines.append(
            f"bench-tracking: base_rps={med['base']:.0f} pixel_rps={med['pixel']:.0f} "
            f"click_rps={med['click']:.0f} pixel_ratio={med['pixel'] / med['base']:.2f} "
            f"click_ratio={med['click'] / med['base']:.2f} "
            f"pixel_cpu_ratio={med['base_us'] / med['pixel_us']:.2f} "
            f"click_cpu_ratio={med['base_us'] / med['click_us']:.2f} db={kind}"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
