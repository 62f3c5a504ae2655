"""A node of a host that is down when khd starts fails with that reason (TRIAL16, issue 16): it
was marked failed "QEMU exited while khd was away", which its principal reads as the node's own
end, while its QEMU may well run on; the host did not answer."""

from __future__ import annotations

import time

import pytest

from kh import admission
from kh.model import NodeState
from kh.store import NodeRow
from kh.store_hosts import HostRow
from tests.unit.fake_khd import make_service


@pytest.fixture
def svc(tmp_path, monkeypatch):
    s = make_service(tmp_path, monkeypatch, nodes=1)
    yield s
    s.store.close()


def test_an_allocated_node_of_a_host_down_at_khds_start_fails_naming_the_host(svc,
                                                                             monkeypatch):
    pytest.importorskip("libvirt")
    svc.store.add_host(HostRow("b", "qemu+unix:///system?socket=/nonexistent/kh-test-sock", 2,
                               "192.0.2.2", "kbul0", 1500, "kb", "kh", ()))
    svc.store.add_principal("alice", *admission.hash_credential("apw"))
    alloc = svc.store.add_allocation("alice", ())
    svc.store.put_node(NodeRow(9, svc.store.new_uid(), NodeState.ALLOCATED, 4242, alloc,
                               "/w", time.time(), None, host="b"))
    monkeypatch.setattr(svc.nodes, "stop_orphans", lambda: [])  # the fake's QEMUs: none
    svc.hosts.connect_all()
    svc.pool.adopt()
    row = svc.store.node(9)
    assert row is not None and row.state == NodeState.FAILED
    assert row.reason is not None and row.reason.startswith("host b is down: "), row.reason


def test_a_down_hosts_state_names_it_once(svc):
    pytest.importorskip("libvirt")
    svc.store.add_host(HostRow("b", "qemu+unix:///system?socket=/nonexistent/kh-test-sock", 2,
                               "192.0.2.2", "kbul0", 1500, "kb", "kh", ()))
    svc.hosts.connect_all()
    state = {h["name"]: h["state"] for h in svc.hosts.list()}["b"]
    assert state.startswith("down: ") and "host b" not in state, state
