"""`kh domain join|leave` and a crash (issue 11, item 4): a khd (tests/unit/crash_join.py, a
real Service over stand-in host parts) is killed at each step of a join and of a leave, with no
clean-up of any kind; a new khd starts on the same state and must find the node's membership as
before the request or as after it, with its taps and carriers matching the state: never a tap
on a bridge the state does not give it, never one missing from a domain the state says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kh.allocation import NIC_SLOTS
from kh.service import membership
from kh.service.config import ServiceConfig
from tests.unit.crash_join import carrier, fake_carriers
from tests.unit.crash_khd import CRASHED, kill_all, save_config, service

REPO = Path(__file__).resolve().parents[2]
OLD, NEW = "old", "new"
CASES = [
    # (request, the step it dies at, the outcome, whether the tap was off the state)
    # join: the domain's bridge, the state, the tap onto it, the carrier up
    ("join", "fabric.ensure_domain", "after", 1, OLD, False),
    ("join", "fabric.attach", "before", 1, NEW, True),
    ("join", "fabric.attach", "after", 1, NEW, False),
    ("join", "membership.set_carrier", "before", 1, NEW, False),
    ("join", "membership.set_carrier", "after", 1, NEW, False),
    # leave (of the domain joined before): the tap off the bridge, the carrier down, the state
    ("leave", "fabric.attach", "before", 1, OLD, False),
    ("leave", "fabric.attach", "after", 1, OLD, True),
    ("leave", "membership.set_carrier", "after", 1, OLD, True),
    # leave of the node's own allocation's domain, by a node that never joined: its own map
    # is written before the unplug, so the restart still knows where the tap belongs
    ("leave-own", "fabric.attach", "after", 1, OLD, True),
]


@pytest.fixture
def cfg(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path, nodes=3,
                      prefix=f"kz{os.getpid() % 10000}")  # stand-ins killed by prefix
    save_config(c)
    yield c
    kill_all(c)


@pytest.mark.parametrize("scenario,target,when,nth,outcome,repaired", CASES)
def test_a_khd_killed_mid_join_or_leave_leaves_the_old_membership_or_the_new(
        cfg: ServiceConfig, scenario: str, target: str, when: str, nth: int, outcome: str,
        repaired: bool) -> None:
    r = subprocess.run([sys.executable, "-m", "tests.unit.crash_join", str(cfg.state_dir.parent),
                        scenario, target, when, str(nth)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == CRASHED, f"the khd did not die at {target}: {r.stderr[-2000:]}"
    made = json.loads((cfg.state_dir.parent / "made.json").read_text())
    node, mine, other = made["node"], made["mine"], made["other"]

    svc, host = service(cfg)
    fake_carriers(svc, host)
    svc.start()
    try:
        alloc = svc.store.allocation(made["alloc"])
        assert alloc is not None
        got = membership.node_map(svc.store, node, alloc)
        if scenario == "join":
            want = (mine, other) if outcome == NEW else (mine,)
        elif scenario == "leave":
            want = (mine,) if outcome == NEW else (mine, other)
        else:
            want = () if outcome == NEW else (mine,)
        assert got == want, (got, want)
        pid = svc.store.node(node).pid  # type: ignore[union-attr]
        # the taps are where the state says, and so are the carriers
        wired = {int(p.name.split(".")[1]): int(p.read_text())
                 for p in (host.dir / "wire").glob(f"{pid}.*")}
        assert wired == {s: n for s, n in enumerate(want) if n is not None}
        for slot in range(NIC_SLOTS):
            plugged = slot < len(want) and want[slot] is not None
            assert carrier(host, pid, slot) in ((None, "up") if plugged else (None, "down")), \
                (slot, carrier(host, pid, slot))
        # a cut that left a tap off the state is named among the repairs
        assert any(x.startswith(f"node {node}: eth") for x in svc.repairs) == repaired, \
            svc.repairs
    finally:
        svc.store.close()
