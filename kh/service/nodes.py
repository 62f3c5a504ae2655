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
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kh import proc
from kh.allocation import NIC_SLOTS
from kh.cc.channel import NodeWriter
from kh.errors import BootError, KhError, KhTimeout
from kh.hw import board, qemu, uboot
from kh.hw import netns as nsutil
from kh.hw.console import Console
from kh.hw.fabric import Fabric
from kh.hw.qemu import died_reason as died_reason  # khd's pool reads it here
from kh.hw.qemu import last_words
from kh.service.config import ServiceConfig
from kh.service.mux import Mux

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
        wait_for_console=False, nics=nics, qemu=cfg.qemu,
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


class StartFailed(BootError):
    """A node did not come to the U-Boot prompt; ``reason`` says why in one line."""

    def __init__(self, number: int, reason: str) -> None:
        super().__init__(f"node {number} failed to start: {reason}")
        self.number = number
        self.reason = reason


class StartAborted(BootError):
    """khd is going away: the node's start was stopped, its QEMU ended."""


def start_reason(error: KhError, exit_code: int | None, qemu_output: str, *names: str) -> str:
    """Why a start failed, in one line: what QEMU said when it exited on its own, or else the
    stage that did not come (the error's own message, without the node's ``names``: its tag,
    its console's name)."""
    if exit_code is not None:
        said = last_words(qemu_output)
        if said:
            return said
        return f"QEMU exited at start with status {exit_code} and said nothing"
    message = error.message
    for name in names:
        message = message.removeprefix(f"{name}: ")
    return message


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


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

    def exit_code(self) -> int | None:
        """QEMU's exit status, when it was our child and has exited."""
        return self.popen.poll() if self.popen is not None else None

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
        self._lock = threading.Lock()
        self._closing = False
        self._starting: dict[int, subprocess.Popen[bytes]] = {}

    def _attach_console(self, number: int, timeout: float = 10.0,
                        alive: Callable[[], bool] = lambda: True) -> tuple[Console, Mux]:
        spec = node_spec(self.cfg, number)
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        con = Console(spec.console, self.cfg.console_log(number), name=f"node{number}")
        try:
            con.connect(timeout, alive=alive)
            mux = Mux(con, self.cfg.node_dir(number) / "console.sock")
        except BaseException:
            con.close()
            raise
        return con, mux

    def start(self, number: int, timeout: float = 30.0,
              on_spawn: Callable[[int], None] = lambda pid: None) -> RunningNode:
        """Start node ``number`` paused, connect its console, run it to the U-Boot prompt.

        ``on_spawn`` learns the QEMU's PID as soon as it runs. Raises StartFailed with the
        reason, or StartAborted once ``abort_starts`` was called; either way nothing of the
        attempt is left running.
        """
        spec = node_spec(self.cfg, number)
        tag = node_tag(self.cfg, number)
        d = self.cfg.node_dir(number)
        d.mkdir(parents=True, exist_ok=True)
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        try:
            for slot in range(NIC_SLOTS):
                self.fabric.ensure_tap(number, slot)
                self.fabric.attach(number, slot, None)
        except KhError as e:
            raise StartFailed(number, str(e)) from e
        argv = nsutil.enter_argv(self.cfg.fabric.netns) + board.qemu_argv(spec) + ["-S"]
        qemu_log = self.cfg.qemu_log(number)
        with self._lock:
            if self._closing:
                raise StartAborted(f"node {number}: khd is stopping")
            with open(qemu_log, "wb") as err:
                popen = proc.start(argv, stdout=err, stderr=err)
            self._starting[number] = popen
        log.debug("node %d: pid %d", number, popen.pid)
        con: Console | None = None
        mux: Mux | None = None
        try:
            on_spawn(popen.pid)
            con, mux = self._attach_console(number, alive=lambda: popen.poll() is None)
            node = RunningNode(number, popen.pid, con, mux, popen)
            self._wait_qmp(spec, popen)
            for slot in range(NIC_SLOTS):
                node.qmp(spec, "set_link", name=f"d{slot}", up=False)
            start = con.mark()
            node.qmp(spec, "cont")
            con.expect(uboot.UBOOT_PROMPT, timeout, stage="U-Boot prompt", start=start)
        except BaseException as e:
            if popen.poll() is None and isinstance(e, BootError) and \
                    not isinstance(e, KhTimeout):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(1.0)  # the console or QMP went away: QEMU is on its way out
            exit_code = popen.poll()
            proc.reap(popen)
            if mux is not None:
                mux.close()
            if con is not None:
                con.close()
            self._remove_sockets(number)
            with self._lock:
                closing = self._closing
            if closing:
                raise StartAborted(f"node {number}: khd is stopping") from e
            if isinstance(e, KhError):
                raise StartFailed(number, start_reason(e, exit_code, read_log(qemu_log), tag,
                                                       f"node{number}")) from e
            raise
        finally:
            with self._lock:
                self._starting.pop(number, None)
        self.running[number] = node
        return node

    def abort_starts(self) -> None:
        """khd is stopping: end the QEMUs of starts under way and refuse new ones."""
        with self._lock:
            self._closing = True
            starting = list(self._starting.values())
        for popen in starting:
            proc.terminate(popen)

    @staticmethod
    def _wait_qmp(spec: board.NodeSpec, popen: subprocess.Popen[bytes]) -> None:
        assert spec.qmp is not None
        deadline = time.monotonic() + 10
        while not spec.qmp.exists():
            if popen.poll() is not None:
                raise BootError(f"{spec.name}: QEMU exited before its QMP socket appeared")
            if time.monotonic() > deadline:
                raise KhTimeout(f"{spec.name}: no QMP socket within 10 s")
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
        self._remove_sockets(number)

    def _remove_sockets(self, number: int) -> None:
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
            return uboot.uboot_command(node.console, line, timeout)

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
            node.console.expect(uboot.UBOOT_PROMPT, timeout, stage="U-Boot prompt after reset",
                                start=start)
            # What QEMU already held may still have reached the prompt: clear the line.
            node.console.wait_sent(10)
            start = node.console.mark()
            node.console.write(b"\x03")
            node.console.expect(uboot.UBOOT_PROMPT, 5, stage="U-Boot prompt after Ctrl-C",
                                start=start)


def _gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie waiting for its new parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _kill(pid: int, sig: int) -> None:
    """Signal ``pid`` and, when it leads its own process group (kh starts every node QEMU in a
    new session), the whole group: nothing it started is left behind."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
            return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def kill_pids(pids: list[int], grace: float = 5.0) -> None:
    """Stop nodes that are not our children (found again after a khd restart): SIGTERM all,
    wait, SIGKILL what is left."""
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.02)
    for pid in pids:
        if not _gone(pid):
            _kill(pid, signal.SIGKILL)


def kill_pid(pid: int, grace: float = 5.0) -> None:
    kill_pids([pid], grace)
