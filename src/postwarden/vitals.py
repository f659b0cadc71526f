"""Readings off the message path, and the spool's run marker.

:func:`keep_vitals` runs in every process of the appliance: every few seconds it reads
the process's memory, CPU and descriptors; in the process that speaks for the whole
appliance (the supervisor, or the process alone) the spool's file system too; and in a
process that handles mail (a worker, or the process alone) it measures how late its
event loop fires a 0.5 s timer.

The run marker (:data:`MARKER` in ``spool.path``) says whether the previous run on the
spool stopped cleanly: ``running`` is written at start, ``stopped`` at the end of a
clean stop; a start that finds ``running`` follows a crash, a ``kill -9``, the OOM
killer or systemd's watchdog.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from prometheus_client import Histogram

from postwarden.files import replace_file
from postwarden.metrics import ApplianceMetrics, ProcessMetrics

log = logging.getLogger("postwarden")

#: Seconds between two readings of the process and the file system.
READ_EVERY = 5.0
#: The timer whose lateness is the event loop's lag.
LAG_TICK = 0.5
#: The run marker's file name, in ``spool.path``.
MARKER = "run-state"
RUNNING, STOPPED = "running", "stopped"


def read_once(
    process: ProcessMetrics, appliance: ApplianceMetrics | None, spool_dir: str | None
) -> None:
    process.update()
    if appliance is not None and spool_dir:
        st = os.statvfs(spool_dir)
        appliance.disk_free.set(st.f_bavail * st.f_frsize)
        appliance.disk_size.set(st.f_blocks * st.f_frsize)


async def keep_vitals(
    process: ProcessMetrics,
    *,
    lag: Histogram | None = None,
    appliance: ApplianceMetrics | None = None,
    spool_dir: str | None = None,
) -> None:
    """Read every :data:`READ_EVERY` seconds (the file system when ``appliance`` and
    ``spool_dir`` are given) and, with ``lag``, observe how late each
    :data:`LAG_TICK` timer fired, until cancelled."""
    loop = asyncio.get_running_loop()
    due = 0.0
    while True:
        if loop.time() >= due:
            due = loop.time() + READ_EVERY
            try:
                read_once(process, appliance, spool_dir)
            except Exception:
                log.exception("event=vitals_read_failed")
        start = loop.time()
        await asyncio.sleep(LAG_TICK)
        if lag is not None:
            lag.observe(max(0.0, loop.time() - start - LAG_TICK))


def mark_running(spool_path: str | os.PathLike[str]) -> bool:
    """At start: whether the previous run on this spool stopped cleanly (a spool
    without a marker: a first start, True), then the marker says ``running``.
    OSError when the spool directory cannot be written."""
    path = Path(spool_path) / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        clean = path.read_text(encoding="ascii", errors="replace").strip() == STOPPED
    except FileNotFoundError:
        clean = True
    replace_file(path, RUNNING + "\n", durable=True)
    return clean


def mark_stopped(spool_path: str | os.PathLike[str]) -> None:
    """At the end of a clean stop: the marker says ``stopped`` (logged if it cannot)."""
    try:
        replace_file(Path(spool_path) / MARKER, STOPPED + "\n", durable=True)
    except OSError:
        log.exception("event=run_marker_write_failed")
