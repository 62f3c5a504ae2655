"""Issue 10: `reset` holds the same (per-node) lock as `release`. A reset racing a release of
the same node never leaves a configured node behind a release (the pool's fresh QEMU under the
same number would get the principal's khargs), and never fails with anything but a 4xx."""

from __future__ import annotations

import threading

import pytest

from kh.allocation import AllocationError, Request
from kh.service.core import NotFound
from tests.unit.fake_khd import make_service

CRED = "alice-cred"


@pytest.fixture
def svc(tmp_path, monkeypatch):
    s = make_service(tmp_path, monkeypatch, nodes=2)
    events: list[tuple[str, int]] = []
    s.events = events  # type: ignore[attr-defined]
    s.gates = {"reset": threading.Event(), "stop": threading.Event()}  # type: ignore
    s.entered = {"reset": threading.Event(), "stop": threading.Event()}  # type: ignore
    for g in s.gates.values():  # type: ignore[attr-defined]
        g.set()

    def step(what: str, number: int) -> None:
        events.append((what, number))
        s.entered[what].set()  # type: ignore[attr-defined]
        assert s.gates[what].wait(30)  # type: ignore[attr-defined]

    def stop(number: int) -> None:
        step("stop", number)
        s.nodes.running.pop(number, None)

    monkeypatch.setattr(s.nodes, "reset", lambda number, timeout=30.0: step("reset", number))
    monkeypatch.setattr(s.nodes, "stop", stop)
    monkeypatch.setattr(s, "_configure", lambda number, domains: events.append(("configure",
                                                                                  number)))
    yield s
    s.store.close()


def run(fn, *args) -> tuple[threading.Thread, list[BaseException | None]]:  # type: ignore
    out: list[BaseException | None] = []

    def body() -> None:
        try:
            fn(*args)
            out.append(None)
        except BaseException as e:  # the test looks at what it was
            out.append(e)

    t = threading.Thread(target=body)
    t.start()
    return t, out


def allocate(svc) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    a = svc.khget(Request(user="alice", count=1), CRED)
    svc.events.clear()
    return a.id, a.nodes[0].number


def configured_after_stop(events: list[tuple[str, int]], number: int) -> bool:
    stops = [i for i, e in enumerate(events) if e == ("stop", number)]
    return bool(stops) and ("configure", number) in events[stops[0]:]


def test_a_release_waits_for_a_reset_under_way(svc):
    alloc, node = allocate(svc)
    svc.gates["reset"].clear()
    reset, reset_out = run(svc.reset, node, "alice", CRED)
    assert svc.entered["reset"].wait(30)  # the node is being reset now
    release, release_out = run(svc.release, alloc, "alice", CRED)
    release.join(0.5)
    assert release.is_alive() and ("stop", node) not in svc.events  # waiting for the reset
    assert svc.ps()["nodes"]  # and khd still answers others meanwhile
    svc.gates["reset"].set()
    reset.join(30)
    release.join(30)
    assert reset_out == [None] and release_out == [None]
    assert svc.events == [("reset", node), ("configure", node), ("stop", node)]
    assert svc.store.node(node) is None and svc.store.allocation(alloc).released  # type: ignore


def test_a_reset_after_a_release_is_refused_and_touches_nothing(svc):
    alloc, node = allocate(svc)
    svc.gates["stop"].clear()
    release, release_out = run(svc.release, alloc, "alice", CRED)
    assert svc.entered["stop"].wait(30)  # the release is stopping the node's QEMU
    reset, reset_out = run(svc.reset, node, "alice", CRED)
    svc.gates["stop"].set()
    release.join(30)
    reset.join(30)
    assert release_out == [None]
    assert len(reset_out) == 1 and isinstance(reset_out[0], NotFound)  # a 404, not a 500
    assert not configured_after_stop(svc.events, node)
    assert ("reset", node) not in svc.events


def test_two_resets_of_one_node_take_turns(svc):
    _, node = allocate(svc)
    svc.gates["reset"].clear()
    first, first_out = run(svc.reset, node, "alice", CRED)
    assert svc.entered["reset"].wait(30)
    second, second_out = run(svc.reset, node, "alice", CRED)
    second.join(0.5)
    assert svc.events == [("reset", node)]
    svc.gates["reset"].set()
    first.join(30)
    second.join(30)
    assert first_out == second_out == [None]
    assert svc.events == [("reset", node), ("configure", node)] * 2
    assert svc.store.node(node).resetting is False  # type: ignore[union-attr]


def test_a_failed_reset_leaves_the_node_failed_with_the_reason(svc, monkeypatch):
    alloc, node = allocate(svc)

    def broken(number: int, timeout: float = 30.0) -> None:
        raise AllocationError("no U-Boot prompt after reset within 30 s")

    monkeypatch.setattr(svc.nodes, "reset", broken)
    with pytest.raises(AllocationError) as e:
        svc.reset(node, "alice", CRED)
    assert "did not come back from its reset" in str(e.value)
    row = svc.store.node(node)
    assert row.state.value == "failed" and "no U-Boot prompt" in row.reason  # type: ignore
    assert ("stop", node) in svc.events and not svc._resetting
    svc.release(alloc, "alice", CRED)  # and it can be given back
    assert svc.store.node(node) is None
