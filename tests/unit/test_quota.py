"""Issue 10, item 3: a principal holds at most --node-quota nodes at once (KH_NODE_QUOTA); the
refusal is an AllocationError (HTTP 409) that names the quota and how to get more, and changes
nothing."""

from __future__ import annotations

import pytest

from kh.allocation import AllocationError, Request, check_node_quota
from kh.errors import UsageError
from kh.service import config
from tests.unit.fake_khd import refill, service_fixture

svc = service_fixture(nodes=6, node_quota=3)


def khget(svc, user: str, count: int, **kw: object):  # type: ignore[no-untyped-def]
    return svc.khget(Request(user=user, count=count, **kw), user + "-cred")  # type: ignore


def test_the_node_quota_is_per_principal_and_counts_what_it_holds(svc):
    a = khget(svc, "alice", 2)
    with pytest.raises(AllocationError) as e:
        khget(svc, "alice", 2)
    assert str(e.value) == ("principal alice holds 2 nodes and asks for 2 more: over its node "
                            "quota of 3 (release some with `kh release`, or ask the operator "
                            "to raise --node-quota)")
    assert svc.store.held_nodes("alice") == 2 and len(svc.store.allocations()) == 1
    assert len(khget(svc, "alice", 1).nodes) == 1  # up to the quota
    assert len(khget(svc, "bob", 3).nodes) == 3  # bob has a quota of his own
    svc.release(a.id, "alice", "alice-cred")
    refill(svc)
    assert len(khget(svc, "alice", 2).nodes) == 2  # released nodes count no more


def test_a_refused_first_khget_registers_no_one(svc):
    with pytest.raises(AllocationError, match="node quota of 3"):
        khget(svc, "carol", 4)
    assert svc.store.principal("carol") is None and svc.store.private_owners() == {}


def test_a_failed_node_does_not_count(svc):
    a = khget(svc, "alice", 3)
    svc.store.node_failed(a.nodes[0].number, "QEMU was killed by SIGKILL")
    assert len(khget(svc, "alice", 1).nodes) == 1


def test_check_node_quota():
    check_node_quota("a", 0, 16, 16)
    with pytest.raises(AllocationError, match="holds 1 node and asks for 16 more"):
        check_node_quota("a", 1, 16, 16)


def test_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("KH_NODE_QUOTA", "4")
    assert config.from_env(state_dir=tmp_path, images=tmp_path).node_quota == 4
    assert config.from_env(state_dir=tmp_path, images=tmp_path, node_quota=7).node_quota == 7
    monkeypatch.setenv("KH_NODE_QUOTA", "0")
    with pytest.raises(UsageError, match="KH_NODE_QUOTA must be 1 to 1024, not 0"):
        config.from_env(state_dir=tmp_path, images=tmp_path)
    monkeypatch.delenv("KH_NODE_QUOTA")
    assert config.from_env(state_dir=tmp_path, images=tmp_path).node_quota == 16
    assert "KH_NODE_QUOTA" in config.env_help()
