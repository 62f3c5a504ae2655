"""A node that cannot start says why, everywhere: from NodeManager.start (a real child process
whose "QEMU" exits at once) through the store and khd's API to `kh ps --json`, `kh service
status` and khget's one-line refusal; and failing nodes are retried with backoff, boundedly."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kh.allocation import AllocationError
from kh.cli.common import report
from kh.client import Client
from kh.model import NodeState
from kh.service import api, nodes, pool
from kh.service.config import ServiceConfig
from kh.service.core import Service
from kh.service.nodes import StartFailed

ROM = ('qemu-system-ppc: -device virtio-net-pci,netdev=d0,mac=52:54:00:00:01:00: '
       'failed to find romfile "efi-virtio.rom"')


@pytest.fixture
def failing_qemu(tmp_path: Path) -> Path:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!/bin/sh\necho 'qemu-system-ppc: warning: a warning first' >&2\n"
                      f"echo '{ROM}' >&2\nexit 1\n")
    script.chmod(0o755)
    return script


@pytest.fixture
def service(tmp_path: Path, failing_qemu: Path, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[Service]:
    """A Service whose nodes run ``failing_qemu`` directly (no fabric namespace, no taps:
    no root needed); everything from NodeManager.start on is the real thing."""
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path, nodes=3, prefix="ku",
                        qemu=str(failing_qemu))
    monkeypatch.setattr(nodes.nsutil, "enter_argv", lambda name: [])
    svc = Service(cfg)
    monkeypatch.setattr(svc.fabric, "ensure_tap", lambda node, slot: "tap")
    monkeypatch.setattr(svc.fabric, "attach", lambda node, slot, netid: None)
    yield svc
    svc.store.close()


@pytest.fixture
def khd_api(service: Service, tmp_path: Path) -> Iterator[Client]:
    sock = tmp_path / "khd.sock"
    server = api.UnixServer(str(sock), api.handler_for(service))
    api.serve(server)
    yield Client(sock, timeout=10)
    server.shutdown()
    server.server_close()


def test_the_reason_travels_from_the_start_to_ps_status_and_khget(service, khd_api, capsys):
    service.pool._fill()  # one round of starts, as khd's pool thread does
    ps = json.loads(khd_api.call("GET", "/v1/ps", as_json=True))
    assert [n["state"] for n in ps["nodes"]] == ["failed"] * 3
    for n in ps["nodes"]:
        assert n["reason"] == ROM  # QEMU's last meaningful line, not its warning
        assert n["attempts"] == 1 and n["retry_at"] is not None
        assert n["note"].startswith("start 1 of 5 failed, next in ")
    assert ps["pool"]["retrying"] == 3 and not ps["pool"]["ready"]
    assert "start 1 of 5 failed" in khd_api.call("GET", "/v1/ps")  # the table too

    status = json.loads(khd_api.call("GET", "/v1/status", as_json=True))
    assert [f["reason"] for f in status["failures"]] == [ROM] * 3
    text = khd_api.call("GET", "/v1/status")
    assert text.splitlines()[0] == ("khd running: 3 nodes, 0 free, 0 allocated, "
                                    "3 to start again after failing (the pool is still starting)")
    assert text.splitlines()[1].startswith("node 1: start 1 of 5 failed") and ROM in text

    with pytest.raises(AllocationError) as refused:
        khd_api.call("POST", "/v1/allocations", {"user": "alice", "credential": "a", "count": 2})
    capsys.readouterr()
    assert report(refused.value, debug=False) == 1  # what khget prints, and its exit status
    assert capsys.readouterr().err == (f"kh: 2 nodes asked for, 0 free: 3 nodes failed to start "
                              f"(node 1: {ROM}) (kh ps shows them)\n")
    assert service.store.principal("alice") is None  # a refusal changes nothing


def test_qemu_log_holds_the_latest_start(service):
    service.pool._fill()
    log = service.cfg.qemu_log(1).read_text()
    assert ROM in log and log.count(ROM) == 1
    assert not list(service.cfg.run.glob("node*/*.sock"))  # no socket of a failed start left


class FailingNodes:
    """A NodeManager whose every start fails; it remembers when each was asked for."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.starts: list[tuple[float, int]] = []
        self.running: dict[int, object] = {}

    def start(self, number: int, on_spawn: object = None) -> None:
        self.starts.append((self.clock[0], number))
        raise StartFailed(number, ROM)

    def abort_starts(self) -> None:
        pass


def test_failing_nodes_back_off_and_stop_after_five_starts(tmp_path, monkeypatch):
    from kh.store import Store
    clock = [1000.0]
    monkeypatch.setattr(pool.time, "time", lambda: clock[0])
    cfg = ServiceConfig(state_dir=tmp_path, images=tmp_path, nodes=2, prefix="ku")
    store = Store(cfg.db)
    fake = FailingNodes(clock)
    p = pool.Pool(cfg, store, fake, threading.RLock())  # type: ignore[arg-type]
    for _ in range(2 * 3600):  # an hour in half seconds
        p._fill()
        clock[0] += 0.5
    node1 = [t - 1000.0 for t, n in fake.starts if n == 1]
    assert node1 == [0.0, 1.0, 3.0, 7.0, 15.0]  # waits of 1, 2, 4, 8 s; then no more
    assert len(fake.starts) == 2 * pool.START_ATTEMPTS
    rows = store.nodes()
    assert [(r.state, r.attempts, r.retry_at, r.reason) for r in rows] == \
        [(NodeState.FAILED, 5, None, ROM)] * 2
    assert pool.summarize(rows, 2).dead
    store.close()
