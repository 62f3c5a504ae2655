"""Issue 10, item 5: khget, release, reset and a principal's removal are atomic with respect to a
crash. A khd (a real Service over stand-in host parts, tests/unit/crash_khd.py) is killed at
each step of each request, with no clean-up of any kind; a new khd starts on the same state and
must find either the state before the request or the state after it, never half: no half
allocation, no principal registered by a khget that did not finish, no bridge without its
domain, and no node in the pool whose QEMU holds a principal's boot keys or wiring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kh.model import NodeState
from kh.service.config import ServiceConfig
from kh.service.core import Service
from tests.unit.crash_khd import (
    CRASHED,
    CRED,
    Host,
    is_node,
    khget,
    kill_all,
    save_config,
    service,
    tagged,
)

REPO = Path(__file__).resolve().parents[2]
OLD, NEW = "old", "new"
CASES = [
    # khget alice 2 -p 1: a new principal, a new domain, two nodes
    ("khget", "store.nodes_configuring", "after", 1, OLD),
    ("khget", "fabric.ensure_domain", "after", 1, OLD),
    ("khget", "fabric.attach", "after", 1, OLD),
    ("khget", "fabric.attach", "after", 6, OLD),
    ("khget", "nodes.uboot", "after", 1, OLD),
    ("khget", "nodes.uboot", "after", 2, OLD),
    ("khget", "store.commit_allocation", "before", 1, OLD),
    ("khget", "store.commit_allocation", "after", 1, NEW),
    # release of that allocation
    ("release", "store.nodes_releasing", "before", 1, OLD),
    ("release", "store.nodes_releasing", "after", 1, NEW),
    ("release", "nodes.stop", "after", 1, NEW),
    ("release", "store.drop_nodes", "before", 1, NEW),
    ("release", "store.drop_nodes", "after", 1, NEW),
    # reset of a node of alice's
    ("reset", "store.node_resetting", "before", 1, OLD),
    ("reset", "store.node_resetting", "after", 1, NEW),
    ("reset", "nodes.reset", "after", 1, NEW),
    ("reset", "nodes.uboot", "after", 1, NEW),
    # the operator removes alice (two domains, one allocation); bob stays as he is
    ("remove", "store.principal_removing", "before", 1, OLD),
    ("remove", "store.principal_removing", "after", 1, NEW),
    ("remove", "nodes.stop", "after", 1, NEW),
    ("remove", "store.forget_principal", "before", 1, NEW),
    ("remove", "store.forget_principal", "after", 1, NEW),
    ("remove", "fabric.remove_domain", "after", 1, NEW),
]


@pytest.fixture
def cfg(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path, nodes=3,
                      prefix=f"kx{os.getpid() % 10000}")  # stand-ins killed by prefix
    save_config(c)
    yield c
    kill_all(c)


def crash(cfg: ServiceConfig, scenario: str, target: str, when: str, nth: int) -> dict:
    """Run the scenario in a khd of its own that dies at the step; the state before it."""
    r = subprocess.run([sys.executable, "-m", "tests.unit.crash_khd", str(cfg.state_dir.parent),
                        scenario, target, when, str(nth)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == CRASHED, f"the khd did not die at {target}: {r.stderr[-2000:]}"
    return json.loads((cfg.state_dir.parent / "before.json").read_text())


def restart(cfg: ServiceConfig) -> tuple[Service, Host]:
    svc, host = service(cfg)
    svc.start()
    deadline = time.monotonic() + 30
    while True:  # a reset cut short is done again in the background
        with svc.lock:
            if not svc._resetting:
                break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return svc, host


def live_qemus(cfg: ServiceConfig) -> dict[int, int]:
    """node number -> PID of every stand-in QEMU still running."""
    out = {}
    for pid, tag in tagged(cfg):
        number = int(tag.rsplit("node", 1)[1])
        if is_node(cfg, number, pid):
            out[number] = pid
    return out


def check_invariants(svc: Service, host: Host) -> None:
    st = svc.store
    rows = st.nodes()
    assert not [r for r in rows if r.state in (NodeState.CONFIGURING, NodeState.RELEASING)
                or r.resetting]
    # every QEMU that runs is a node of the state, and no pool node holds anything of anyone
    assert live_qemus(svc.cfg) == {r.number: r.pid for r in rows}
    for r in rows:
        if r.state == NodeState.FREE:
            assert host.env(r.pid) is None and host.wired(r.pid) == [], r
    live = {a.id: a for a in st.allocations()}
    for r in rows:
        if r.alloc is not None:
            assert r.alloc in live and r.state == NodeState.ALLOCATED, r
            assert f"kh.node={r.number} " in (host.env(r.pid) or ""), r
            assert len(host.wired(r.pid)) == len(live[r.alloc].netids)
    known = {d.netid for d in st.domains()}
    for a in live.values():
        assert st.principal(a.principal) is not None
        assert set(a.netids) <= known and st.nodes_of(a.id)
    assert set(host.bridges()) == known
    owners = {d.owner for d in st.domains() if d.owner}
    assert all(st.principal(o) is not None for o in owners)


def holdings(svc: Service, user: str) -> tuple[bool, list[int], list[int]]:
    """(registered, live allocations' nodes, private domains)."""
    st = svc.store
    nodes = sorted(r.number for a in st.allocations() if a.principal == user
                   for r in st.nodes_of(a.id))
    return st.principal(user) is not None, nodes, sorted(
        d.netid for d in st.domains() if d.owner == user)


def before_holdings(before: dict, user: str) -> tuple[list[int], list[int]]:
    nodes = sorted(n for a in before["allocations"] if a["principal"] == user
                   for n in a["nodes"])
    return nodes, sorted(d["netid"] for d in before["domains"] if d["owner"] == user)


@pytest.mark.parametrize("scenario,target,when,nth,outcome", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}{c[3]}" for c in CASES])
def test_a_khd_killed_mid_request_leaves_the_old_state_or_the_new(
        cfg, scenario, target, when, nth, outcome):
    before = crash(cfg, scenario, target, when, nth)
    svc, host = restart(cfg)
    try:
        check_invariants(svc, host)
        registered, nodes, domains = holdings(svc, "alice")
        old_nodes, old_domains = before_holdings(before, "alice")
        if scenario == "khget":
            assert (registered, nodes, domains) == \
                ((False, [], []) if outcome == OLD else (True, [1, 2], [3]))
        elif scenario == "release":
            assert (registered, domains) == (True, old_domains)
            assert nodes == (old_nodes if outcome == OLD else [])
        elif scenario == "reset":
            (node,) = old_nodes
            assert (registered, nodes) == (True, old_nodes)
            old_pid = next(n["pid"] for n in before["nodes"] if n["node"] == node)
            assert svc.store.node(node).pid == old_pid  # type: ignore[union-attr]
            if outcome == NEW:
                assert "resetting it again" in " ".join(svc.repairs)
        else:
            assert (registered, nodes, domains) == \
                ((True, old_nodes, old_domains) if outcome == OLD else (False, [], []))
            assert holdings(svc, "bob")[1:] == before_holdings(before, "bob")
        # and the machine goes on: the pool's fresh nodes can be had by anyone
        host.fill()
        free = len(svc.store.nodes(NodeState.FREE))
        if free:
            khget(svc, "bob", count=free)
        check_invariants(svc, host)
    finally:
        svc.store.close()


def test_every_step_is_reached(cfg):
    """Each crash point above is a step its request really takes (else a case tests nothing):
    the same requests, run to the end, pass through every one of them."""
    svc, host = service(cfg)
    host.fill()
    seen: set[str] = set()
    for owner_name, owner in (("store", svc.store), ("fabric", svc.fabric),
                              ("nodes", svc.nodes)):
        for attr in {c[1].split(".")[1] for c in CASES if c[1].startswith(owner_name + ".")}:
            real = getattr(owner, attr)

            def spy(*a, _real=real, _name=f"{owner_name}.{attr}", **k):  # type: ignore
                seen.add(_name)
                return _real(*a, **k)

            setattr(owner, attr, spy)
    a = khget(svc, "alice", new_private=1)
    svc.reset(svc.store.nodes_of(a)[0].number, "alice", CRED["alice"])
    svc.release(a, "alice", CRED["alice"])
    host.fill()
    khget(svc, "alice", new_private=1)
    svc.remove_principal("alice")
    assert seen == {c[1] for c in CASES}
    svc.store.close()
