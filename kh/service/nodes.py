"""khd's nodes: QEMU processes in kh's fabric namespace, each with its console held by khd.

Nodes outlive khd: a khd that is stopped or killed finds its nodes again by PID and process tag
and reconnects to their consoles. Each node's console is read all the time, logged, and offered
on a per-node unix socket to whoever attaches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kh import boot, proc
from kh.allocation import NIC_SLOTS
from kh.cc.channel import NodeWriter
from kh.errors import BootError
from kh.hw import board, qemu
from kh.hw import netns as nsutil
from kh.hw.console import Console
from kh.hw.fabric import Fabric
from kh.service.config import ServiceConfig

log = logging.getLogger("kh.nodes")


def node_tag(cfg: ServiceConfig, number: int) -> str:
    return f"{cfg.prefix}-node{number}"


def mac(number: int, slot: int) -> str:
    return f"52:54:00:{number >> 8 & 0xff:02x}:{number & 0xff:02x}:{slot:02x}"


def node_spec(cfg: ServiceConfig, number: int) -> board.NodeSpec:
    d = cfg.node_dir(number)
    b = board.BOARDS["ppce500"]
    nics = tuple(board.Nic(f"d{s}", mac(number, s), tap=cfg.fabric.tap(number, s))
                 for s in range(NIC_SLOTS))
    return board.NodeSpec(
        name=node_tag(cfg, number), bios=cfg.images / "u-boot.elf", console=d / "qemu-con.sock",
        qmp=d / "qmp.sock", shared_ram=True, board=b, mem_mib=cfg.mem_mib,
        wait_for_console=False, nics=nics,
        loads=(board.Load(cfg.images / "uImage", b.loadaddr),
               board.Load(cfg.images / f"{cfg.appliance}.cpio.gz.uimg", b.ramfsaddr)))


def pid_is_node(pid: int | None, tag: str) -> bool:
    """True when ``pid`` is alive and is the QEMU carrying ``tag`` (not a reused PID)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{tag},process={tag}".encode() in cmdline


class Mux:
    """A node's console offered on a unix socket: every client sees the output, and what any
    client writes goes to the node."""

    def __init__(self, console: Console, path: Path) -> None:
        self.console = console
        self.path = path
        path.unlink(missing_ok=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        os.chmod(path, 0o600)
        self.server.listen(8)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name=f"mux-{path.name}").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        def out(data: bytes) -> None:
            try:
                client.sendall(data)
            except OSError:
                pass

        unsub = self.console.subscribe(out)
        try:
            while True:
                data = client.recv(4096)
                if not data:
                    break
                self.console.write(data)
        except (OSError, BootError):
            pass
        finally:
            unsub()
            client.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.server.close()
        self.path.unlink(missing_ok=True)


@dataclass
class RunningNode:
    number: int
    pid: int
    console: Console
    mux: Mux
    popen: subprocess.Popen[bytes] | None = None  # None when reattached after a khd restart
    lock: threading.Lock = field(default_factory=threading.Lock)
    writer: NodeWriter = field(init=False)

    def __post_init__(self) -> None:
        self.writer = NodeWriter(self.number, self.console)

    def alive(self, tag: str) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_is_node(self.pid, tag)

    def qmp(self, spec: board.NodeSpec, command: str, /, **args: object) -> object:
        assert spec.qmp is not None
        q = qemu.Qmp(spec.qmp)
        try:
            return q.command(command, **args)
        finally:
            q.close()


class NodeManager:
    def __init__(self, cfg: ServiceConfig, fabric: Fabric) -> None:
        self.cfg = cfg
        self.fabric = fabric
        self.running: dict[int, RunningNode] = {}

    def _attach_console(self, number: int, timeout: float = 10.0,
                        alive: object = None) -> tuple[Console, Mux]:
        spec = node_spec(self.cfg, number)
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        con = Console(spec.console, self.cfg.logs / f"node{number}.log", name=f"node{number}")
        con.connect(timeout, alive=alive if callable(alive) else (lambda: True))
        mux = Mux(con, self.cfg.node_dir(number) / "console.sock")
        return con, mux

    def start(self, number: int, timeout: float = 30.0) -> RunningNode:
        """Start node ``number`` paused, connect its console, run it to the U-Boot prompt."""
        spec = node_spec(self.cfg, number)
        d = self.cfg.node_dir(number)
        d.mkdir(parents=True, exist_ok=True)
        for slot in range(NIC_SLOTS):
            self.fabric.ensure_tap(number, slot)
            self.fabric.attach(number, slot, None)
        argv = nsutil.enter_argv(self.cfg.fabric.netns) + board.qemu_argv(spec) + ["-S"]
        err = open(d / "qemu.log", "wb")
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                     start_new_session=True)
        finally:
            err.close()
        log.debug("node %d: pid %d: %s", number, popen.pid, " ".join(argv))
        try:
            con, mux = self._attach_console(number, alive=lambda: popen.poll() is None)
            node = RunningNode(number, popen.pid, con, mux, popen)
            self._wait_qmp(spec, popen)
            for slot in range(NIC_SLOTS):
                node.qmp(spec, "set_link", name=f"d{slot}", up=False)
            start = con.mark()
            node.qmp(spec, "cont")
            con.expect(boot.UBOOT_PROMPT, timeout, stage="U-Boot prompt", start=start)
        except BaseException:
            proc.reap(popen)
            raise
        self.running[number] = node
        return node

    @staticmethod
    def _wait_qmp(spec: board.NodeSpec, popen: subprocess.Popen[bytes]) -> None:
        assert spec.qmp is not None
        deadline = time.monotonic() + 10
        while not spec.qmp.exists():
            if popen.poll() is not None or time.monotonic() > deadline:
                raise BootError(f"{spec.name}: QMP socket never appeared")
            time.sleep(0.01)

    def reattach(self, number: int, pid: int) -> RunningNode | None:
        """After a khd restart: reconnect to a node that kept running, if it did."""
        if not pid_is_node(pid, node_tag(self.cfg, number)):
            return None
        con, mux = self._attach_console(number, timeout=5)
        node = RunningNode(number, pid, con, mux, None)
        self.running[number] = node
        return node

    def stop(self, number: int) -> None:
        node = self.running.pop(number, None)
        if node is not None:
            node.writer.stop()
            node.mux.close()
            node.console.close()
            if node.popen is not None:
                proc.reap(node.popen)
            else:
                kill_pid(node.pid)
        d = self.cfg.node_dir(number)
        for f in ("qemu-con.sock", "qmp.sock", "console.sock"):
            (d / f).unlink(missing_ok=True)

    def detach_all(self) -> None:
        """khd is going away; nodes keep running."""
        for node in self.running.values():
            node.writer.stop()
            node.mux.close()
            node.console.close()
        self.running.clear()

    def uboot(self, number: int, line: str, timeout: float = 10.0) -> str:
        node = self.running[number]
        with node.lock:
            return boot.uboot_command(node.console, line, timeout)

    def set_links(self, number: int, used: int) -> None:
        node = self.running[number]
        spec = node_spec(self.cfg, number)
        for slot in range(NIC_SLOTS):
            node.qmp(spec, "set_link", name=f"d{slot}", up=slot < used)

    def reset(self, number: int, timeout: float = 30.0) -> None:
        node = self.running[number]
        spec = node_spec(self.cfg, number)
        with node.lock:
            node.writer.flush()  # input still queued for the old run must not reach the new
            start = node.console.mark()
            node.qmp(spec, "system_reset")
            node.console.expect(boot.UBOOT_PROMPT, timeout, stage="U-Boot prompt after reset",
                                start=start)
            # What QEMU already held may still have reached the prompt: clear the line.
            node.console.wait_sent(10)
            start = node.console.mark()
            node.console.write(b"\x03")
            node.console.expect(boot.UBOOT_PROMPT, 5, stage="U-Boot prompt after Ctrl-C",
                                start=start)


def _gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie waiting for its new parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def kill_pids(pids: list[int], grace: float = 5.0) -> None:
    """Stop nodes that are not our children (found again after a khd restart): SIGTERM all,
    wait, SIGKILL what is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.02)
    for pid in pids:
        if not _gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def kill_pid(pid: int, grace: float = 5.0) -> None:
    kill_pids([pid], grace)
