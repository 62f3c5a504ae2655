"""`kh domain join|leave NODE NETID` (issue 11, item 4): a running node's free interface is
plugged into one of its owner's domains, or unplugged, with no reboot, through the real
Service, store and API; the host parts (taps on bridges, NIC carriers) are recorded here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from kh import textobj
from kh.allocation import NIC_SLOTS
from kh.model import NodeState
from kh.service import membership
from kh.service.core import Service
from tests.unit.fake_khd import make_service, post, refill, serving, text_of


class Wiring:
    """Where each tap is (netid or None) and each NIC's carrier, as the host would have them,
    and the order of the steps with what the state said at each."""

    def __init__(self, svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
        self.svc = svc
        self.taps: dict[tuple[int, int], int | None] = {}
        self.carrier: dict[tuple[int, int], bool] = {}
        self.steps: list[tuple[str, int, int, object, object]] = []
        self.fail_attach = False
        monkeypatch.setattr(svc.fabric, "attach", self.attach)
        monkeypatch.setattr(membership, "set_carrier", self.set_carrier)
        monkeypatch.setattr(membership, "tap_master",
                            lambda s, n, slot: self.taps.get((n, slot)))

    def _state(self, number: int) -> object:
        return membership.own_map(self.svc.store, number)

    def attach(self, number: int, slot: int, netid: int | None) -> None:
        if self.fail_attach and netid is not None:
            raise OSError("the kernel said no")
        self.steps.append(("attach", number, slot, netid, self._state(number)))
        self.taps[(number, slot)] = netid

    def set_carrier(self, svc: Service, number: int, slot: int, up: bool) -> None:
        self.steps.append(("carrier", number, slot, up, self._state(number)))
        self.carrier[(number, slot)] = up


@pytest.fixture
def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    s = make_service(tmp_path, monkeypatch, nodes=6)
    yield s
    s.store.close()


@pytest.fixture
def wires(svc: Service, monkeypatch: pytest.MonkeyPatch) -> Wiring:
    return Wiring(svc, monkeypatch)


@pytest.fixture
def khd(svc: Service):
    with serving(svc, svc.cfg.socket) as sock:
        yield sock


def call(sock: Path, path: str, user: str, **kw: object) -> tuple[int, Any]:
    status, resp = post(sock, path + "?format=json", json.dumps(
        dict(user=user, credential=user + "-cred", **kw)).encode())
    return status, json.loads(text_of(resp))


def allocate(sock: Path, user: str, **kw: object) -> tuple[int, int, int]:
    """One node in a new private domain: (allocation, node, netid)."""
    status, a = call(sock, "/v1/allocations", user, p=1, **kw)
    assert status == 201, a
    netids = [n["netid"] for n in a["networks"] if n["kind"] == "private"]
    return a["id"], a["nodes"][0]["node"], netids[-1]


def ps_node(sock: Path, user: str, node: int) -> dict[str, Any]:
    status, data = call(sock, "/v1/ps", user)
    assert status == 200, data
    return next(n for n in data["nodes"] if n["node"] == node)


def test_join_then_leave_changes_the_wiring_ps_and_the_text_object(svc, wires, khd):
    a1, n1, d1 = allocate(khd, "alice")
    _a2, _n2, d2 = allocate(khd, "alice")

    status, j = call(khd, f"/v1/nodes/{n1}/join", "alice", netid=d2)
    assert status == 200, j
    assert j == {"node": n1, "netid": d2, "interface": "eth1", "joined": True,
                 "address": f"10.{d2}.0.{n1}/16", "netids": [d1, d2]}
    # the state first, then the tap onto the bridge, then the carrier
    assert wires.steps == [("attach", n1, 1, d2, (d1, d2)), ("carrier", n1, 1, True, (d1, d2))]
    assert ps_node(khd, "alice", n1)["netids"] == [d1, d2]
    obj = textobj.format(svc.info(a1))
    assert f"network {d1} : eth0\nnetwork {d2} : eth1\n" in obj
    status, resp = post(khd, f"/v1/nodes/{n1}/join", json.dumps(
        {"user": "alice", "credential": "alice-cred", "netid": d2}).encode())
    assert status == 409 and text_of(resp) == f"kh: node {n1} is already in domain {d2} (eth1)\n"

    # leaving eth0: off the bridge while the state still has it, then the carrier, then the
    # state; eth1 keeps its number, eth0 is free
    wires.steps.clear()
    status, j = call(khd, f"/v1/nodes/{n1}/leave", "alice", netid=d1)
    assert status == 200, j
    assert j["interface"] == "eth0" and j["netids"] == [None, d2]
    assert wires.steps == [("attach", n1, 0, None, (d1, d2)),
                           ("carrier", n1, 0, False, (d1, d2))]
    assert membership.own_map(svc.store, n1) == (None, d2)
    obj = textobj.format(svc.info(a1))
    assert f"network {d2} : eth1\n" in obj and "eth0" not in obj
    assert textobj.parse(obj).domains[1].netid == d2  # type: ignore[union-attr]
    assert ps_node(khd, "alice", n1)["netids"] == [None, d2]
    status, data = call(khd, "/v1/ps", "alice")
    assert [a["netids"] for a in data["allocations"] if a["id"] == a1] == [[None, d2]]
    status, resp = post(khd, f"/v1/nodes/{n1}/leave", json.dumps(
        {"user": "alice", "credential": "alice-cred", "netid": d1}).encode())
    assert status == 409 and text_of(resp) == f"kh: node {n1} is not in domain {d1}\n"

    # the freed interface is the next one taken
    status, j = call(khd, f"/v1/nodes/{n1}/join", "alice", netid=1)
    assert status == 200 and j["interface"] == "eth0" and j["address"] == f"10.1.0.{n1}/16"
    assert j["netids"] == [1, d2]


def test_no_free_interface_is_a_409_naming_the_limit(svc, wires, khd):
    _a, n, d = allocate(khd, "alice", i=True, x=True)  # eth0 external, eth1 public, eth2 d
    _a2, _n2, d2 = allocate(khd, "alice")
    _a3, _n3, d3 = allocate(khd, "alice")
    assert call(khd, f"/v1/nodes/{n}/join", "alice", netid=d2)[0] == 200
    assert ps_node(khd, "alice", n)["netids"] == [0, 1, d, d2]
    status, e = call(khd, f"/v1/nodes/{n}/join", "alice", netid=d3)
    assert status == 409 and f"all {NIC_SLOTS} (NIC_SLOTS)" in e["error"], e
    assert "\n" not in e["error"]
    assert membership.own_map(svc.store, n) == (0, 1, d, d2)


def test_anothers_node_or_domain_is_answered_as_none(svc, wires, khd):
    _a, n_alice, _d_alice = allocate(khd, "alice")
    _b, n_bob, d_bob = allocate(khd, "bob")
    free = max(r.number for r in svc.store.nodes()) + 1

    def same(theirs: tuple[int, Any], none: tuple[int, Any], their: int, no: int) -> None:
        assert theirs[0] == none[0] == 404, (theirs, none)
        assert re.sub(rf"\b{their}\b", "N", theirs[1]["error"]) == \
            re.sub(rf"\b{no}\b", "N", none[1]["error"])

    for verb in ("join", "leave"):
        # bob's join of alice's node is refused exactly as a node no one holds
        same(call(khd, f"/v1/nodes/{n_alice}/{verb}", "bob", netid=d_bob),
             call(khd, f"/v1/nodes/{free}/{verb}", "bob", netid=d_bob), n_alice, free)
        # alice's join of bob's domain is refused exactly as a domain that does not exist
        same(call(khd, f"/v1/nodes/{n_alice}/{verb}", "alice", netid=d_bob),
             call(khd, f"/v1/nodes/{n_alice}/{verb}", "alice", netid=200), d_bob, 200)
    # a wrong credential for the owner is refused too
    status, _resp = post(khd, f"/v1/nodes/{n_alice}/join", json.dumps(
        {"user": "alice", "credential": "wrong-cred", "netid": 1}).encode())
    assert status == 403
    assert wires.steps == [] and membership.own_map(svc.store, n_alice) is None
    assert ps_node(khd, "bob", n_bob)["netids"] == [d_bob]


def test_bad_bodies_are_400(svc, wires, khd):
    _a, n, _d = allocate(khd, "alice")
    assert call(khd, f"/v1/nodes/{n}/join", "alice")[0] == 400
    assert call(khd, f"/v1/nodes/{n}/join", "alice", netid="5")[0] == 400
    assert call(khd, f"/v1/nodes/{n}/join", "alice", netid=254)[0] == 400
    assert call(khd, "/v1/nodes/x/join", "alice", netid=1)[0] == 400


def test_a_failed_plug_leaves_the_old_membership(svc, wires, khd):
    _a, n, d = allocate(khd, "alice")
    wires.fail_attach = True
    status, _ = call(khd, f"/v1/nodes/{n}/join", "alice", netid=1)
    assert status == 500
    assert membership.node_map(svc.store, n, svc.store.allocation(_a)) == (d,)
    assert wires.taps.get((n, 1)) is None and wires.carrier.get((n, 1)) is False


def test_a_joined_domain_cannot_be_removed_and_release_forgets_the_map(svc, wires, khd):
    a1, n1, _d1 = allocate(khd, "alice")
    a2, _n2, d2 = allocate(khd, "alice")
    assert call(khd, f"/v1/allocations/{a2}/release", "alice")[0] == 200
    assert call(khd, f"/v1/nodes/{n1}/join", "alice", netid=d2)[0] == 200
    # no allocation has d2 any more, but node n1 is plugged into it
    status, e = call(khd, f"/v1/domains/{d2}/remove", "alice")
    assert status == 409, e
    assert call(khd, f"/v1/allocations/{a1}/release", "alice")[0] == 200
    refill(svc)
    assert membership.own_map(svc.store, n1) is None  # a fresh node has no one's wiring
    assert call(khd, f"/v1/domains/{d2}/remove", "alice")[0] == 200


def test_reset_closes_the_interfaces_up(svc, wires, khd, monkeypatch):
    a, n, d = allocate(khd, "alice")
    assert call(khd, f"/v1/nodes/{n}/join", "alice", netid=1)[0] == 200
    assert call(khd, f"/v1/nodes/{n}/leave", "alice", netid=d)[0] == 200
    configured: list[tuple[int, ...]] = []
    monkeypatch.setattr(svc.nodes, "reset", lambda number: None)
    monkeypatch.setattr(svc, "_configure",
                        lambda number, domains: configured.append(tuple(x.netid for x in domains)))
    assert call(khd, f"/v1/nodes/{n}/reset", "alice")[0] == 200
    assert configured == [(1,)]  # boots with the public domain on eth0
    assert membership.own_map(svc.store, n) == (1,)
    assert "network Internal : eth0\n" in textobj.format(svc.info(a))


def test_restart_puts_taps_where_the_state_says(svc, wires, khd):
    """khd died between a join's state and its attach (the tap is on no bridge), and between
    a leave's detach and its state (the state still has the domain): the next start finishes
    the first and undoes the second, and says so."""
    _a, n, d = allocate(khd, "alice")
    _a2, _n2, d2 = allocate(khd, "alice")
    wires.taps[(n, 0)] = None  # detached by a leave of d that never wrote its state
    membership.put_map(svc.store, n, (d, d2))  # a join's first step; its attach never ran
    with svc.lock:
        repairs = membership.reconcile(svc)
    assert wires.taps[(n, 0)] == d and wires.taps[(n, 1)] == d2
    assert wires.carrier[(n, 0)] and wires.carrier[(n, 1)]
    assert wires.carrier[(n, 2)] is False and wires.taps[(n, 3)] is None
    assert len(repairs) == 2 and all(f"node {n}: eth" in r for r in repairs), repairs
    with svc.lock:
        assert membership.reconcile(svc) == []  # nothing left to repair


def test_a_failed_node_cannot_join(svc, wires, khd):
    _a, n, _d = allocate(khd, "alice")
    svc.store.node_failed(n, "QEMU died")
    status, e = call(khd, f"/v1/nodes/{n}/join", "alice", netid=1)
    assert status == 404 and e["error"] == f"node {n} is not running (failed)"
    assert svc.store.node(n).state == NodeState.FAILED


def test_the_text_answer_says_what_to_run_on_the_node(svc, wires, khd):
    _a, n, _d = allocate(khd, "alice")
    status, resp = post(khd, f"/v1/nodes/{n}/join", json.dumps(
        {"user": "alice", "credential": "alice-cred", "netid": 0}).encode())
    assert status == 200
    assert text_of(resp) == (
        f"node {n} joined domain 0 on eth1: address 10.0.0.{n}/16 (gateway 10.0.255.254)\n"
        f"on the node: ip addr add 10.0.0.{n}/16 dev eth1 && ip link set eth1 up\n")
    status, resp = post(khd, f"/v1/nodes/{n}/leave", json.dumps(
        {"user": "alice", "credential": "alice-cred", "netid": 0}).encode())
    assert status == 200 and text_of(resp) == f"node {n} left domain 0: eth1 is unplugged\n"
