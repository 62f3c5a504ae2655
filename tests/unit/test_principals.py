"""Issue 10, item 2: a principal sees only its own allocations, nodes and domains (`ps_of`);
the operator sees all (`ps`), lists principals and removes one, with its allocations (nodes back
to the pool), private domains (bridges) and keys."""

from __future__ import annotations

import json

import pytest

from kh.admission import AuthError
from kh.allocation import Request
from kh.model import NodeState
from kh.service.core import NotFound, Service
from tests.unit.fake_khd import make_service, refill


def cred(user: str) -> str:
    return user + "-cred"


@pytest.fixture
def svc(tmp_path, monkeypatch):
    s = make_service(tmp_path, monkeypatch, nodes=6)
    s.stopped = []  # type: ignore[attr-defined]

    def stop(number: int) -> None:
        s.stopped.append(number)  # type: ignore[attr-defined]
        s.nodes.running.pop(number, None)

    monkeypatch.setattr(s.nodes, "stop", stop)
    for n, row in enumerate(s.store.nodes(), start=1):  # QEMU PIDs the operator may see
        s.store._update(row.number, pid=40000 + n)
    yield s
    s.store.close()


def khget(svc: Service, user: str, count: int = 1, **kw: object) -> int:
    return svc.khget(Request(user=user, count=count, **kw), cred(user)).id  # type: ignore


def test_a_principal_sees_only_its_own(svc):
    a1 = khget(svc, "alice", 2, new_private=1, public=True)
    b1 = khget(svc, "bob", 1, new_private=2)
    a2 = khget(svc, "alice", 1)
    mine = svc.ps_of("alice", cred("alice"))
    assert [a["id"] for a in mine["allocations"]] == [a1, a2]
    assert {a["principal"] for a in mine["allocations"]} == {"alice"}
    alice_nodes = sorted(n for a in mine["allocations"] for n in a["nodes"])
    assert [n["node"] for n in mine["nodes"]] == alice_nodes and len(alice_nodes) == 3
    assert all(n["state"] == "allocated" and n["pid"] is None for n in mine["nodes"])
    assert [(d["netid"], d["owner"]) for d in mine["domains"]] == \
        [(0, None), (1, None), (3, "alice")]
    assert mine["quota"] == {"nodes": [3, 16], "domains": [1, 16]}
    assert mine["repairs"] == [] and mine["pool"]["free"] == 2
    # nothing of bob's: no name, no allocation id, no node, no domain
    text = json.dumps(mine)
    assert "bob" not in text
    bob_nodes = {n for a in svc.ps()["allocations"] if a["id"] == b1 for n in a["nodes"]}
    assert not bob_nodes & {n["node"] for n in mine["nodes"]}
    assert b1 not in {a["id"] for a in mine["allocations"]}
    assert {4, 5} == {d["netid"] for d in svc.ps()["domains"]} - {d["netid"] for d in
                                                                   mine["domains"]} - {0, 1, 3}
    # the operator's view has everything, PIDs too
    everything = svc.ps()
    assert {a["principal"] for a in everything["allocations"]} == {"alice", "bob"}
    assert all(n["pid"] for n in everything["nodes"])


def test_ps_of_needs_the_principals_credential(svc):
    khget(svc, "alice")
    with pytest.raises(AuthError):
        svc.ps_of("alice", "wrong")
    with pytest.raises(AuthError):
        svc.ps_of("nobody", "whatever")  # registers no one
    assert svc.store.principal("nobody") is None


def test_the_operator_lists_principals(svc):
    khget(svc, "alice", 2, new_private=2)
    a = khget(svc, "alice", 1)
    khget(svc, "bob", 1)
    svc.release(a, "alice", cred("alice"))
    svc.store.add_key("alice", "ssh-ed25519 AAAA", "laptop", None)
    rows = svc.principals()
    assert [(r["name"], r["allocations"], r["nodes"], r["domains"], r["keys"]) for r in rows] \
        == [("alice", 1, 2, 2, 1), ("bob", 1, 1, 1, 0)]
    assert all(isinstance(r["created"], float) for r in rows)


def test_removing_a_principal_takes_everything_of_its_and_nothing_else(svc):
    a1 = khget(svc, "alice", 2, new_private=2)
    a2 = khget(svc, "alice", 1)
    old = khget(svc, "alice", 1, new_private=1)
    svc.release(old, "alice", cred("alice"))
    b = khget(svc, "bob", 1, public=True)
    svc.store.add_key("alice", "ssh-ed25519 AAAA", "laptop", None)
    svc.store.add_key("alice", "ssh-ed25519 BBBB", "party", a1)
    svc.store.add_key("bob", "ssh-ed25519 CCCC", "bob's", None)
    alice_nodes = sorted(r.number for a in (a1, a2) for r in svc.store.nodes_of(a))
    bob_before = svc.ps_of("bob", cred("bob"))
    svc.stopped.clear()

    done = svc.remove_principal("alice")

    assert done == {"removed": "alice", "allocations": [a1, a2], "nodes": alice_nodes,
                    "domains": [3, 4, 5], "keys": 2}
    assert sorted(svc.stopped) == alice_nodes  # their QEMUs stopped: fresh ones replace them
    assert svc.store.principal("alice") is None
    assert all(svc.store.node(n) is None for n in alice_nodes)
    assert [d.netid for d in svc.store.domains()] == [0, 1, 6]  # bob's first domain stays
    assert svc.fake_fabric.bridges == {6}
    assert [k[1] for k in svc.store.keys(None)] == ["bob"]
    assert svc.store.allocation(a1) is None and svc.store.allocation(old) is None
    bob_after = svc.ps_of("bob", cred("bob"))
    assert {**bob_after, "pool": None} == {**bob_before, "pool": None}  # the pool's counts move
    assert svc.store.allocation(b) is not None
    assert [r["name"] for r in svc.principals()] == ["bob"]
    with pytest.raises(NotFound):
        svc.remove_principal("alice")
    # the name is free again: its next use registers it afresh, with a new credential
    refill(svc)
    svc.khget(Request(user="alice", count=1), "a-new-secret")
    with pytest.raises(AuthError):
        svc.ps_of("alice", cred("alice"))


def test_removing_an_unknown_or_malformed_principal(svc):
    with pytest.raises(NotFound):
        svc.remove_principal("nobody")
    with pytest.raises(Exception) as e:
        svc.remove_principal("../alice")
    assert type(e.value).__name__ == "UsageError"


def test_a_failed_node_counts_for_nothing_and_is_removed_too(svc):
    a = khget(svc, "alice", 2)
    first, second = (r.number for r in svc.store.nodes_of(a))
    svc.store.node_failed(first, "QEMU was killed by SIGKILL")
    assert svc.store.held_nodes("alice") == 1
    done = svc.remove_principal("alice")
    assert done["nodes"] == [first, second]
    assert svc.store.node(first) is None and svc.store.nodes(NodeState.FAILED) == []
