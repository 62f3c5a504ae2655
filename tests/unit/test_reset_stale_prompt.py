"""A reset counts only what U-Boot prints after it (HARDEN 4, a node's console as khd reads it):
khd took the console's mark before pausing the node, so what the old run printed just before
(still in the console socket, not yet read) counted as U-Boot's prompt after the reset. Seen with
a real node: a principal's node printing `=> ` without end, then released: the release returned
in 0.4 s with the node free while U-Boot had not printed its banner yet (the pool's next
principal gets a node whose U-Boot is still starting, typed at). Now the node is paused and
reset, what the old run printed is read (Console.settle), and only then the mark is taken and
the node resumed. A fake QEMU on a socketpair; no wall-clock assertions."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from kh.errors import KhTimeout
from kh.hw import memload
from kh.hw.console import Console
from tests.unit.fake_khd import service_fixture

svc = service_fixture(nodes=1)
STALE = b"=> " * 60000  # 180 KB of the old run's prompts: more than a socket buffer holds


class FakeWriter:
    def flush(self) -> None:
        pass


class FakeQemu:
    """Node 1's QEMU: its console the far end of a socketpair; the old run's output is still
    on its way when khd pauses it; after ``cont`` U-Boot prints its prompt only if ``uboot``."""

    def __init__(self, uboot: bool) -> None:
        self.ours, self.node = socket.socketpair()
        self.console = Console(Path("/nonexistent/console.sock"), name="node1")
        self.console.adopt(self.ours)
        self.uboot = uboot
        self.lock = threading.Lock()
        self.writer = FakeWriter()
        self.pid = 1
        self.number = 1
        self.commands: list[str] = []
        self.answering = threading.Thread(target=self._answer, daemon=True)

    def qmp(self, spec: object, command: str, /, **args: object) -> None:
        self.commands.append(command)
        if command == "stop":  # what the old run printed until now is still in the socket
            self.node.sendall(STALE)
        if command == "cont" and self.uboot:
            self.answering.start()

    def _answer(self) -> None:
        self.node.sendall(b"\r\nU-Boot 2023.01\r\n=> ")
        while (got := self.node.recv(64)) and b"\x03" not in got:
            pass
        self.node.sendall(b"<INTERRUPT>\r\n=> ")

    def close(self) -> None:
        self.node.close()
        self.console.close()


@pytest.fixture
def qemu_node(svc, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(memload, "load_files", lambda pid, loads: None)
    made: list[FakeQemu] = []

    def make(uboot: bool) -> FakeQemu:
        q = FakeQemu(uboot)
        svc.nodes.local.running[1] = q
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()


def test_what_the_old_run_printed_is_not_the_prompt_after_the_reset(svc, qemu_node):
    q = qemu_node(uboot=False)  # U-Boot never comes back: the reset must not pass
    with pytest.raises(KhTimeout, match="no U-Boot prompt after reset within 1 s"):
        svc.nodes.local.reset(1, timeout=1.0)
    assert q.commands[:3] == ["stop", "system_reset", "cont"]


def test_a_reset_passes_on_the_prompt_u_boot_prints_after_it(svc, qemu_node):
    q = qemu_node(uboot=True)
    svc.nodes.local.reset(1, timeout=60.0)
    assert q.commands == ["stop", "system_reset", "cont"]
    assert q.console.text().endswith(b"U-Boot 2023.01\r\n=> <INTERRUPT>\r\n=> ")

