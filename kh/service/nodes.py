"""khd's nodes: QEMU processes in kh's fabric namespace, each with its console held by khd.

Nodes outlive khd: a khd that is stopped or killed finds its nodes again by their identity (PID,
start time and process tag, kh.service.procid) and reconnects to their consoles; a QEMU carrying
kh's tag that the state does not know is stopped. Each node's console is read all the time,
logged, and offered on a per-node unix socket to whoever attaches. What each node's QEMU is
(its spec, tag, loads, identity record, failure reasons) is kh.service.qemunode's.

Least privilege: each QEMU runs sandboxed (seccomp), as the user NODE_USER when the host has it
(QEMU opens its taps, sockets and files as root first), in a cgroup of its own with CPU and
memory limits (kh.hw.cgroup).
"""

from __future__ import annotations

import contextlib
import logging
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
from kh.hw import board, cgroup, memload, qemu, uboot
from kh.hw import netns as nsutil
from kh.hw.backend import StartAborted as StartAborted
from kh.hw.backend import StartFailed as StartFailed
from kh.hw.backend import fresh_taps, reset_to_prompt
from kh.hw.console import Console
from kh.hw.fabric import Fabric
from kh.service import procid
from kh.service.config import ServiceConfig
from kh.service.mux import Mux
from kh.service.procid import ProcId
from kh.service.qemunode import (
    CODE_CACHE_MIB,
    IDENT_FILE,
    NODE_USER,
    death_reason,
    default_loads,
    kill_recorded,
    node_spec,
    node_tag,
    node_user,
    read_log,
    recorded,
    start_reason,
)

log = logging.getLogger("kh.nodes")

# Seconds khd's shutdown waits for starts it aborted to end before it kills their QEMUs itself
# (an aborted start ends in ~1 s; `kh service stop` SIGKILLs a khd after 30 s).
ABORT_WAIT = 15.0


@dataclass
class RunningNode:
    number: int
    ident: ProcId
    console: Console
    mux: Mux
    popen: subprocess.Popen[bytes] | None = None  # None when reattached after a khd restart
    cgroup: cgroup.NodeCgroup | None = None
    qemu_log: Path | None = None  # QEMU's stderr: why it died
    lock: threading.Lock = field(default_factory=threading.Lock)
    writer: NodeWriter = field(init=False)

    def __post_init__(self) -> None:
        self.writer = NodeWriter(self.number, self.console)

    @property
    def pid(self) -> int:
        return self.ident.pid

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return procid.is_alive(self.ident)

    def exit_code(self) -> int | None:
        """QEMU's exit status, when it was our child and has exited."""
        return self.popen.poll() if self.popen is not None else None

    def death_reason(self) -> str:
        return death_reason(self.exit_code(), read_log(self.qemu_log) if self.qemu_log else "")

    def qmp(self, spec: board.NodeSpec, command: str, /, **args: object) -> object:
        assert spec.qmp is not None
        q = qemu.Qmp(spec.qmp)
        try:
            return q.command(command, **args)
        finally:
            q.close()


class NodeManager:
    """The ``qemu`` backend (kh.hw.backend.Backend): khd runs each node's QEMU itself."""

    name = "qemu"

    def __init__(self, cfg: ServiceConfig, fabric: Fabric) -> None:
        self.cfg = cfg
        self.fabric = fabric
        self.running: dict[int, RunningNode] = {}
        self._lock = threading.Lock()
        self._closing = False
        self._starting: dict[int, subprocess.Popen[bytes]] = {}
        self._started = threading.Condition(self._lock)  # notified as each start ends
        if node_user() is None:
            log.warning("node QEMUs run as root: the host has no user %s (tools/setup-apt "
                        "creates it)", NODE_USER)
        self.cgroups = cgroup.detect()  # kh's cgroups are made when nodes start
        self._cgroups_ready = False
        self._cgroup_lock = threading.Lock()  # a node's cgroup made while another's goes
        if self.cgroups is None:
            log.warning("node QEMUs run without CPU and memory limits: this host offers no "
                        "cgroup with %s", ", ".join(cgroup.V1_CONTROLLERS))

    def _attach_console(self, number: int, timeout: float = 10.0,
                        alive: Callable[[], bool] = lambda: True,
                        gap: str | None = None) -> tuple[Console, Mux]:
        spec = node_spec(self.cfg, number)
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        con = Console(spec.console, self.cfg.console_log(number), name=f"node{number}",
                      gap=gap)
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
        fresh_taps(self.fabric, number)
        argv = nsutil.enter_argv(self.cfg.fabric.netns) + board.qemu_argv(spec) + ["-S"]
        qemu_log = self.cfg.qemu_log(number)
        cg = self._cgroup(number)
        with self._lock:
            if self._closing:
                self._drop_cgroup(cg)
                raise StartAborted(f"node {number}: khd is stopping")
            try:
                with open(qemu_log, "wb") as err:
                    popen = proc.start(argv, stdout=err, stderr=err,
                                       cgroups=cg.procs if cg else ())
            except KhError as e:
                self._drop_cgroup(cg)
                raise StartFailed(number, str(e)) from e
            self._starting[number] = popen
        # Our child, not yet reaped: its stat is there, and its PID cannot change hands.
        started = procid.stat(popen.pid)
        ident = ProcId(popen.pid, started[1] if started else 0, tag)
        procid.save(d / IDENT_FILE, ident)
        log.debug("node %d: %s", number, ident)
        con: Console | None = None
        mux: Mux | None = None
        made: RunningNode | None = None
        try:
            on_spawn(popen.pid)
            con, mux = self._attach_console(number, alive=lambda: popen.poll() is None)
            node = made = RunningNode(number, ident, con, mux, popen, cg, qemu_log)
            self._wait_qmp(spec, popen)
            for slot in range(NIC_SLOTS):
                node.qmp(spec, "set_link", name=f"d{slot}", up=False)
            memload.load_files(popen.pid, default_loads(self.cfg))
            start = con.mark()
            node.qmp(spec, "cont")
            con.expect(uboot.UBOOT_PROMPT, timeout, stage="U-Boot prompt", start=start)
            with self._lock:  # a node now, or aborted: never a QEMU khd stops knowing about
                if self._closing:
                    raise StartAborted(f"node {number}: khd is stopping")
                self._starting.pop(number, None)
                self.running[number] = node
        except BaseException as e:
            if popen.poll() is None and isinstance(e, BootError) and \
                    not isinstance(e, KhTimeout):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(1.0)  # the console or QMP went away: QEMU is on its way out
            exit_code = popen.poll()
            proc.reap(popen)
            self._drop_cgroup(cg)
            if made is not None:
                made.writer.stop()  # its thread would wait for input forever
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
                self._started.notify_all()
        return node

    def _cgroup(self, number: int) -> cgroup.NodeCgroup | None:
        """Node ``number``'s cgroup, made afresh with its limits (None: none on this host)."""
        with self._cgroup_lock:
            if self.cgroups is None:
                return None
            try:
                cgroup.prepare(self.cgroups, self.cfg.prefix)
            except cgroup.CgroupError as e:
                if self._cgroups_ready:
                    raise StartFailed(number, str(e)) from e
                log.warning("node QEMUs run without CPU and memory limits: %s", e)
                self.cgroups = None  # this host does not let kh make them at all
                return None
            self._cgroups_ready = True
            limit = cgroup.memory_limit(self.cfg.mem_mib, CODE_CACHE_MIB)
            try:
                return cgroup.create(self.cgroups, self.cfg.prefix, number, limit)
            except cgroup.CgroupError as e:
                raise StartFailed(number, str(e)) from e

    def _drop_cgroup(self, cg: cgroup.NodeCgroup | None) -> None:
        if cg is not None:
            with self._cgroup_lock:
                cgroup.remove(cg)

    def usage(self, number: int) -> cgroup.Usage | None:
        """What node ``number``'s QEMU used (CPU ns, memory bytes; for metering), or None
        when it runs without a cgroup or is not running. Raises CgroupError if unreadable."""
        node = self.running.get(number)
        if node is None or node.cgroup is None:
            return None
        return cgroup.usage(node.cgroup)

    def abort_starts(self, wait: float | None = None) -> None:
        """khd is stopping: refuse new starts, end the QEMUs of starts under way (SIGTERM)
        and wait up to ``wait`` s for those starts to end; a QEMU whose start still has not
        ended then is killed and reaped here. On return no QEMU of a start runs, and none
        will: a start that had come to the U-Boot prompt is a node (``running``) by then.
        ``wait`` defaults to ABORT_WAIT."""
        wait = ABORT_WAIT if wait is None else wait
        with self._lock:
            self._closing = True
            starting = list(self._starting.values())
        for popen in starting:
            proc.terminate(popen)
        with self._lock:
            self._started.wait_for(lambda: not self._starting, wait)
            stuck = list(self._starting.values())
        for popen in stuck:  # its start is held up elsewhere; its QEMU goes all the same
            log.warning("a node start did not end within %.0f s of khd stopping; killing "
                        "its QEMU %d", wait, popen.pid)
            proc.reap(popen, grace=0.0)

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
        """After a khd restart: reconnect to a node that kept running, if it did (``pid`` is
        still its QEMU: ``recorded``)."""
        ident = recorded(self.cfg, number, pid)
        if ident is None:
            return None
        # The node ran on while no khd read its console: its log says so (issue 10).
        con, mux = self._attach_console(number, timeout=5, gap="khd was not running")
        node = RunningNode(number, ident, con, mux, None,
                           cgroup.of_pid(pid, self.cfg.prefix, number), self.cfg.qemu_log(number))
        self.running[number] = node
        return node

    def kill_recorded(self, number: int, pid: int | None) -> bool:
        """Stop node ``number``'s QEMU, only if ``pid`` is still it; True if so."""
        return kill_recorded(self.cfg, number, pid)

    def stop_orphans(self) -> list[str]:
        """After ``reattach``: stop every QEMU carrying this khd's tag that is no running node
        (one a khd started and died before recording it), and remove the cgroups of nodes
        that no longer run; return what was done, in words."""
        known = {node.pid for node in self.running.values()}  # each verified by reattach
        orphans = [i for i in procid.tagged(self.cfg.prefix) if i.pid not in known]
        done = [f"stopped QEMU {i}: the state did not know it"
                for i in procid.stop(orphans)]
        if self.cgroups is not None:
            with self._cgroup_lock:
                gone = cgroup.prune(self.cgroups, self.cfg.prefix, set(self.running))
            done += [f"removed cgroup {d}: no node of it runs" for d in gone]
        return done

    def stop(self, number: int) -> None:
        node = self.running.pop(number, None)
        if node is not None:
            node.writer.stop()
            node.mux.close()
            node.console.close()
            if node.popen is not None:
                proc.reap(node.popen)
            else:
                procid.stop([node.ident])
            self._drop_cgroup(node.cgroup)
        self._remove_sockets(number)

    def _remove_sockets(self, number: int) -> None:
        d = self.cfg.node_dir(number)
        for f in ("qemu-con.sock", "qmp.sock", "console.sock", IDENT_FILE):
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

    def set_link(self, number: int, slot: int, up: bool) -> None:
        """The carrier of the node's NIC ``slot`` (QMP set_link on its netdev's device)."""
        self.running[number].qmp(node_spec(self.cfg, number), "set_link", name=f"d{slot}",
                                 up=up)

    def open_ram(self, number: int) -> memload.RamFile:
        """The node's RAM: its QEMU's memfd, opened (the open file stays bound to that QEMU).
        LoadError when the node is not running or its RAM cannot be opened."""
        node = self.running.get(number)
        if node is None:
            raise memload.LoadError("the node is not running")
        return memload.RamFile(memload.ram_file(node.pid))

    def reset(self, number: int, timeout: float = 30.0) -> None:
        node = self.running[number]
        spec = node_spec(self.cfg, number)
        def paused_reset() -> None:
            # Paused, so that U-Boot starts again only with the default images in place
            # (QEMU's reset brings back U-Boot itself, not what khd loaded).
            node.qmp(spec, "stop")
            node.qmp(spec, "system_reset")
            memload.load_files(node.pid, default_loads(self.cfg))

        with node.lock:
            node.writer.flush()  # input still queued for the old run must not reach the new
            reset_to_prompt(node.console, paused_reset, lambda: node.qmp(spec, "cont"), timeout)

