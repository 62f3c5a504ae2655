"""tests/unit/crash_khd.py's killable khd, for `kh domain join|leave`: the NICs' carriers are
files ``<host>/carrier/<pid>.<slot>`` (up/down) as QMP set_link would leave them, and a tap's
bridge is read back from crash_khd's wiring files.

Run as ``python -m tests.unit.crash_join HOST SCENARIO TARGET WHEN NTH`` (SCENARIO ``join``,
``leave`` or ``leave-own``: the node leaves its allocation's own domain; TARGET ``fabric.x``,
``store.x``, ``nodes.x`` or ``membership.set_carrier``).
Before its request it writes ``<host>/made.json``: {"node", "alloc", "mine", "other"} (the node
that joins or leaves, its allocation, its own domain, the domain it joins or leaves).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from kh.service import membership
from kh.service.core import Service
from tests.unit.crash_khd import CRASHED, CRED, Host, arm, khget, load_config, service


def fake_carriers(svc: Service, host: Host) -> None:
    """Carriers and tap masters of the stand-in host (monkeypatched module functions)."""
    (host.dir / "carrier").mkdir(exist_ok=True)

    def set_carrier(s: Service, number: int, slot: int, up: bool) -> None:
        pid = s.nodes.running[number].pid
        (host.dir / "carrier" / f"{pid}.{slot}").write_text("up" if up else "down")

    def tap_master(s: Service, number: int, slot: int) -> int | None:
        wire = host.dir / "wire" / f"{s.nodes.running[number].pid}.{slot}"
        return int(wire.read_text()) if wire.exists() else None

    membership.set_carrier = set_carrier  # type: ignore[assignment]
    membership.tap_master = tap_master  # type: ignore[assignment]


def carrier(host: Host, pid: int | None, slot: int) -> str | None:
    p = host.dir / "carrier" / f"{pid}.{slot}"
    return p.read_text() if p.exists() else None


def prepare(svc: Service, scenario: str) -> dict[str, int]:
    """Two allocations of alice's, one node each, each in a new private domain; for ``leave``
    the first node has joined the second's domain already."""
    a1 = khget(svc, "alice", count=1, new_private=1)
    a2 = khget(svc, "alice", count=1, new_private=1)
    node = svc.store.nodes_of(a1)[0].number
    mine = svc.store.allocation(a1).netids[0]  # type: ignore[union-attr]
    other = svc.store.allocation(a2).netids[0]  # type: ignore[union-attr]
    if scenario == "leave":
        svc.join(node, other, "alice", CRED["alice"])
    if scenario == "leave-own":
        other = mine
    return {"node": node, "alloc": a1, "mine": mine, "other": other}


def arm_carrier(when: str, nth: int) -> None:
    real = membership.set_carrier
    calls = [0]

    def crashing(*args: Any) -> None:
        calls[0] += 1
        if calls[0] == nth and when == "before":
            os._exit(CRASHED)
        real(*args)
        if calls[0] == nth and when == "after":
            os._exit(CRASHED)

    membership.set_carrier = crashing  # type: ignore[assignment]


def main(argv: list[str]) -> int:
    host_dir, scenario, target, when, nth = Path(argv[0]), argv[1], argv[2], argv[3], int(argv[4])
    svc, host = service(load_config(host_dir))
    fake_carriers(svc, host)
    host.fill()
    made = prepare(svc, scenario)
    (host_dir / "made.json").write_text(json.dumps(made))
    if target == "membership.set_carrier":
        arm_carrier(when, nth)
    else:
        arm(svc, target, when, nth)
    verb = svc.join if scenario == "join" else svc.leave
    verb(made["node"], made["other"], "alice", CRED["alice"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
