"""A recipient that traffic shaping puts off says why in `postwarden queue list`: a real
appliance, a warming source at its day's cap, the recording MX on loopback."""

from __future__ import annotations

import json
import time
from pathlib import Path

from postwarden.lab import Lab
from postwarden.queue.admin import QueueAdmin
from tests.conftest import ApplianceFactory, postwarden_cli
from tests.shaping import test_lab_shaping as lab_shaping
from tests.shaping.recsink import RecordingSink
from tests.shaping.test_lab_shaping import near_midnight, send, shaped, shaping_config
from tests.waiting import eventually

sink = lab_shaping.sink  # the recording MX's fixture


def waiting_for_shaping(spool_path: str) -> list[dict[str, object]]:
    admin = QueueAdmin(spool_path)
    try:
        return [r for r in admin.list() if r["wait_reason"]]
    finally:
        admin.close()


async def test_warming_cap_wait_is_listed_with_its_reason_and_until_when(
    tmp_path: Path,
    lab: Lab,
    sink: RecordingSink,
    appliance: ApplianceFactory,
) -> None:
    cfg = shaping_config(tmp_path, sink, "", members=(("a", 1),))  # overflow "wait"
    # Six hours before the warming day ends: the rest waits in the spool, not in memory.
    app, svc = await shaped(appliance, cfg, near_midnight(6 * 3600))
    svc.command(
        {"op": "warming_start", "target": "source", "name": "a",
         "plan": {"name": "tiny", "days": [2, 10]}}
    )  # fmt: skip
    started = time.time()
    await send(app.smtp_addresses[0][1], [f"w{i}@gm-one.test" for i in range(5)], sessions=1)
    await eventually(lambda: len(sink.rec.messages) >= 2, 10, "the day's cap")
    spool = app.cfg.spool.path
    await eventually(lambda: len(waiting_for_shaping(spool)) == 3, 10, "three put off")
    assert len(sink.rec.messages) == 2  # the cap held

    rc, out = await postwarden_cli(spool, "queue", "list")
    assert rc == 0, out
    lines = [line for line in out.splitlines() if " to=<w" in line]
    assert len(lines) == 3, out
    for line in lines:
        assert " queued " in line and "tries=0" in line, line
        assert "waiting for traffic shaping, warming cap: warming cap reached: a; next try " in line
    rc, out = await postwarden_cli(spool, "queue", "list", "--json")
    rows = json.loads(out)
    assert {r["wait_reason"] for r in rows} == {"warming_cap: warming cap reached: a"}
    # Until the source's next warming day: six hours on.
    for r in rows:
        assert started + 5 * 3600 < r["next_attempt"] < time.time() + 7 * 3600, r
        assert r["why"].endswith(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["next_attempt"]))
        )
