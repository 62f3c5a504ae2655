"""A khd started after `kh service stop` with another KH_QEMU adopted the free nodes the
earlier khd had left running: they kept the other QEMU while khd (and `kh hw`) said this one
(TRIAL13, issue 13). Now a free node whose QEMU is not the one this khd starts is stopped at
adopt and started afresh; one that matches is kept."""

from __future__ import annotations

import threading
import types
from pathlib import Path

from kh.hw import board
from kh.model import NodeState
from kh.service import pool, qemunode
from kh.service.config import ServiceConfig
from kh.store import NodeRow, Store


class Nodes:
    """The backend as adopt uses it: every recorded node is still running."""

    def __init__(self) -> None:
        self.stopped: list[int] = []

    def reattach(self, number: int, pid: int) -> object:
        return types.SimpleNamespace(pid=pid)

    def stop(self, number: int) -> None:
        self.stopped.append(number)

    def kill_recorded(self, number: int, pid: int | None) -> bool:
        return False

    def stop_orphans(self) -> list[str]:
        return []


def adopt(tmp_path: Path, cfg: ServiceConfig, argvs: dict[int, list[str]], monkeypatch
          ) -> tuple[list[str], Nodes, list[int]]:
    pids = {100 + n: argv for n, argv in argvs.items()}
    monkeypatch.setattr(qemunode, "cmdline", lambda pid: pids.get(pid))
    store = Store(cfg.db)
    try:
        for n in argvs:
            store.put_node(NodeRow(n, 1000 + n, NodeState.FREE, 100 + n, None, "", 0.0, None))
        nodes = Nodes()
        repairs = pool.Pool(cfg, store, nodes, threading.RLock()).adopt()  # type: ignore[arg-type]
        return repairs, nodes, [r.number for r in store.nodes()]
    finally:
        store.close()


def argv(cfg: ServiceConfig, number: int) -> list[str]:
    return [*board.qemu_argv(qemunode.node_spec(cfg, number)), "-S"]


def test_free_nodes_of_another_qemu_are_started_again(tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir()
    before = ServiceConfig(state_dir=state, images=tmp_path, prefix="kt")  # kh's own QEMU
    now = ServiceConfig(state_dir=state, images=tmp_path, prefix="kt", qemu="qemu-system-ppc")
    repairs, nodes, left = adopt(tmp_path, now, {1: argv(before, 1), 2: argv(now, 2)},
                                 monkeypatch)
    assert nodes.stopped == [1] and left == [2]
    assert repairs == [f"node 1: it runs QEMU {tmp_path}/qemu-system-ppc, this khd's is "
                       "qemu-system-ppc; starting it again"]


def test_other_settings_in_the_command_line_count_too(tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir()
    cfg = ServiceConfig(state_dir=state, images=tmp_path, prefix="kt")
    other = ServiceConfig(state_dir=state, images=tmp_path, prefix="kt", mem_mib=512)
    repairs, nodes, left = adopt(tmp_path, cfg, {1: argv(other, 1), 2: argv(cfg, 2)},
                                 monkeypatch)
    assert nodes.stopped == [1] and left == [2]
    assert repairs == ["node 1: its QEMU was started with other settings than this khd's; "
                       "starting it again"]


def test_the_libvirt_backend_is_left_alone(tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir()
    cfg = ServiceConfig(state_dir=state, images=tmp_path, prefix="kt", backend="libvirt")
    repairs, nodes, left = adopt(tmp_path, cfg, {1: ["something", "else"]}, monkeypatch)
    assert nodes.stopped == [] and left == [1] and repairs == []
