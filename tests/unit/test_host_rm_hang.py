"""`kh host rm` and a far host that hangs instead of refusing (HARDEN 2): the remote work (the
starts ended, a destroy and an unwire per node, the domains left there) is done outside khd's
lock, the host marked ``removing`` meanwhile (none of its nodes allocated, none started there),
and each step bounded (kh.service.hostrm). A fake far host whose destroy hangs until the test
lets it go; no wall-clock assertions (the waits below are deadlines for a broken khd)."""

from __future__ import annotations

import threading
import time

import pytest

from kh.allocation import Request
from kh.errors import KhError
from kh.model import NodeState
from kh.service import hostrm
from kh.service.hostfabric import Far
from kh.service.hosts import HostRefused
from kh.store import NodeRow
from tests.unit.fake_khd import service_fixture
from tests.unit.test_hosts import FakeBackend, FakeSide, FarFabric, row

DEADLINE = 60.0  # s a broken khd gets before the test says so


svc = service_fixture(nodes=3)


class HangingHost(FakeBackend):
    """Host b's libvirt: a destroy there hangs until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()
        self.log: list[tuple] = []

    def abort_starts(self, wait: float | None = None) -> None:
        self.log.append(("abort",))

    def stop(self, number: int) -> None:
        self.log.append(("stop", number))
        self.entered.set()
        self.release.wait(DEADLINE)
        self.running.pop(number, None)

    def stop_orphans(self) -> list[str]:
        self.log.append(("orphans",))
        return []

    def detach_all(self) -> None:
        self.log.append(("detach",))


class Taps(FarFabric):
    def __init__(self, log: list[tuple]) -> None:
        super().__init__()
        self.log = log

    def unwire(self, node: int, slots: int) -> None:
        self.log.append(("unwire", node))


def with_host_b(svc) -> HangingHost:  # type: ignore[no-untyped-def]
    svc.store.add_host(row("b"))
    far = HangingHost()
    for n in (9, 10):
        svc.store.put_node(NodeRow(n, svc.store.new_uid(), NodeState.FREE, 1, None, "/w",
                                   time.time(), None, host="b"))
        far.running[n] = None
    svc.nodes.add("b", far)
    svc.fabric.add_host("b", Far(Taps(far.log), FakeSide("b", "192.0.2.2").side,  # type: ignore
                                 1500))
    return far


def removing(svc, result: dict) -> threading.Thread:  # type: ignore[no-untyped-def]
    def run() -> None:
        try:
            result.update(svc.hosts.remove("b"))
        except KhError as e:
            result["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_hanging_far_host_holds_up_no_other_principals_request(svc):
    far = with_host_b(svc)
    result: dict = {}
    t = removing(svc, result)
    try:
        assert far.entered.wait(DEADLINE), "kh host rm never reached host b"
        # b's destroy hangs: khd's lock is free all the same (before: held throughout)
        assert svc.lock.acquire(blocking=False), "khd's lock is held while host b hangs"
        svc.lock.release()
        # another principal is answered meanwhile, and gets none of b's free nodes
        with pytest.raises(KhError, match=r"^4 nodes asked for, 3 free "):
            svc.khget(Request(user="alice", count=4), "alice-secret")
        a = svc.khget(Request(user="alice", count=3), "alice-secret")
        assert [n.host for n in a.nodes] == ["local"] * 3
        assert "b" not in svc.hosts.sizes()  # the pool starts nothing there
        assert {h["name"]: h["state"] for h in svc.hosts.list()}["b"] == "removing"
        with pytest.raises(HostRefused, match=r"^host b is being removed already"):
            svc.hosts.remove("b")
    finally:
        far.release.set()
        t.join(DEADLINE)
    assert result == {"removed": "b", "nodes": [9, 10]}
    assert far.log == [("abort",), ("stop", 9), ("unwire", 9), ("stop", 10), ("unwire", 10),
                       ("orphans",), ("detach",)]
    assert svc.store.host("b") is None and "b" not in svc.fabric.far
    assert [h["name"] for h in svc.hosts.list()] == ["local"]


def test_a_step_that_does_not_answer_is_left_and_the_host_still_goes(svc, monkeypatch):
    monkeypatch.setattr(hostrm, "REMOTE_STEP", 0.01)
    monkeypatch.setattr(hostrm, "REMOVE_WAIT", 0.0)
    far = with_host_b(svc)
    result: dict = {}
    t = removing(svc, result)
    try:
        t.join(DEADLINE)
        assert not t.is_alive(), "kh host rm waits for a far host that hangs"
    finally:
        far.release.set()
    assert result == {"removed": "b", "nodes": [9, 10]}
    # the destroy that hung was left, and so was the rest there; the connection is closed
    assert far.log == [("abort",), ("stop", 9), ("detach",)]
    assert svc.store.host("b") is None and svc.store.node(10) is None
