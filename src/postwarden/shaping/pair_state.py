"""What the broker's pairs keep across a restart (docs/decisions/0006): suspensions,
bounce rules, lowered rates and connections, backoffs — saved in the shaping state
file next to the warming book, as wall-clock times (the broker's clock is
monotonic), and put back before the first connection is chosen."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from postwarden.shaping.broker import Broker


def snapshot(broker: Broker, wall_now: float | None = None) -> dict[str, Any]:
    """What the answers did to each pair and still holds — suspensions, bounce
    rules, lowered rates and connections — for the state file: ``{"pairs":
    [...]}``, times as wall-clock seconds (the broker's clock is monotonic).
    Pairs with nothing in force are left out."""
    now = broker.clock()
    wall = broker.wall() if wall_now is None else wall_now

    def at(t: float) -> float | None:
        return round(wall + (t - now), 3) if t > now else None

    out = []
    for (source, site, domain), p in broker.pairs.items():
        st = p.state
        item: dict[str, Any] = {"source": source, "site": site, "domain": domain}
        if at(st.suspended_until) is not None:
            item["suspended_until"] = at(st.suspended_until)
        if at(st.lowered_until) is not None:
            item["lowered_until"] = at(st.lowered_until)
            if st.connections < st.limit_connections:
                item["connections"] = st.connections
        if st.rate < st.limit_rate:
            item["rate"] = st.rate
        if st.backoff_since:  # past times, on the wall clock too
            item["backoff_since"] = round(wall + (st.backoff_since - now), 3)
            item["pushback_at"] = round(wall + (st.pushback_at - now), 3)
        if at(p.bounce_until) is not None:
            item["bounce_until"] = at(p.bounce_until)
            item["bounce_reason"] = p.bounce_reason
        if len(item) > 3:
            item["reason"] = st.reason
            out.append(item)
    return {"pairs": out}


def restore(broker: Broker, data: Mapping[str, Any], wall_now: float | None = None) -> int:
    """Put back what :func:`snapshot` saved (the whole state file may be passed:
    only ``"pairs"`` is read; a file without it restores nothing). What has
    expired meanwhile is dropped; rates and connections stay within the rules in
    force now. Returns how many pairs got something back; raises ValueError
    naming the entry and field of a bad one."""
    now = broker.clock()
    wall = broker.wall() if wall_now is None else wall_now
    items = data.get("pairs", [])
    if not isinstance(items, list):
        raise ValueError("pairs: must be a list")
    restored = 0
    for i, item in enumerate(items):
        where = f"pairs[{i}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: must be a table")

        def num(name: str, item: Mapping[str, Any] = item, where: str = where) -> float:
            v = item.get(name)
            if v is None:
                return 0.0
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ValueError(f"{where}.{name}: must be a non-negative number, got {v!r}")
            return float(v)

        def clock_at(name: str) -> float:
            t = num(name)
            return now + (t - wall) if t > wall else 0.0  # passed: expired

        for name in ("source", "site"):
            if not isinstance(item.get(name), str) or not item[name]:
                raise ValueError(f"{where}.{name}: must be a non-empty string")
        domain = item.get("domain")
        if domain is not None and not isinstance(domain, str):
            raise ValueError(f"{where}.domain: must be a string or null")
        suspended, lowered, bounce = (
            clock_at("suspended_until"),
            clock_at("lowered_until"),
            clock_at("bounce_until"),
        )
        rate, conns = num("rate"), int(num("connections"))
        backoff, pushback = num("backoff_since"), num("pushback_at")
        p = broker.pair(item["source"], item["site"], domain)
        st = p.state
        rate = min(rate, st.limit_rate) if rate > 0 else st.limit_rate
        if backoff and pushback + broker.aimd_of(p).to_normal_after > wall:
            # Still in backoff: it ends when it would have, had nobody restarted.
            st.backoff_since = now + (backoff - wall)
            st.pushback_at = max(st.pushback_at, now + (pushback - wall))
        elif backoff and not lowered:
            rate = st.limit_rate  # the backoff ran out while the broker was down
        if not (suspended or lowered or bounce or rate < st.limit_rate):
            continue  # all of it ran its time while the broker was down
        st.suspended_until = max(st.suspended_until, suspended)
        st.lowered_until = max(st.lowered_until, lowered)
        st.rate = min(st.rate, rate)
        if lowered and conns > 0:
            st.connections = min(st.connections, conns, st.limit_connections)
        if bounce:
            p.bounce_until = max(p.bounce_until, bounce)
            p.bounce_reason = str(item.get("bounce_reason") or "")[:200]
        st.reason = str(item.get("reason") or "")[:200]
        st.changes.append((now, "restored", f"after a restart: {st.reason}"))
        restored += 1
    return restored
