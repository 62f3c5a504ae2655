"""The ``libvirt`` node backend (kh.hw.backend.Backend): each node a transient libvirt domain.

khd talks to one libvirt host (``qemu+unix://`` to kh's own daemon in the fabric namespace,
kh.hw.libvirtd; or any ``qemu:///system``/``qemu+ssh://`` URI) through libvirt-python:

- start: the domain is created paused from its XML (kh.hw.domainxml; every NIC's carrier down),
  its console stream opened (kh.hw.virtstream.ConsolePump into a kh.hw.console.Console), the
  default kernel and appliance uploaded into its RAM, then resumed; the U-Boot prompt ends it.
- lifecycle events (a thread runs libvirt's default event loop) mark a node whose domain
  stopped or crashed as gone; a lost connection is made again (HOST_GRACE s), else every node
  of the host is gone with the reason; the pool fails or restarts them as dead QEMUs.
- RAM: file-backed guest RAM in the host's ``memory_backing_dir``; a transient ``dir`` pool
  over the domain's RAM directory makes it a volume, written with volume upload at an offset.
- links: ``virDomainUpdateDeviceFlags`` with the interface's ``<link state>`` (domif-setlink).
- usage: libvirt's CPU time of the domain and its RSS (memoryStats).

The state records each node's libvirt domain ID where the qemu backend records a PID; a khd
that restarts finds the domain by name and reattaches when the ID still matches.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

from kh.allocation import NIC_SLOTS
from kh.errors import KhError
from kh.hw import domainxml, libvirtd, uboot
from kh.hw.backend import StartAborted, StartFailed, fresh_taps, reset_to_prompt
from kh.hw.board import BOARDS
from kh.hw.cgroup import Usage
from kh.hw.console import Console
from kh.hw.fabric import Fabric
from kh.hw.memload import LoadError
from kh.hw.virtstream import (
    ConsolePump,
    VolumeRam,
    drop_pool,
    error_text,
    ram_volume,
)
from kh.service.config import ServiceConfig
from kh.service.libvirt_host import LibvirtHost, LibvirtNode
from kh.service.mux import Mux
from kh.service.qemunode import default_loads, mac, node_tag

log = logging.getLogger("kh.libvirt")
EMULATOR = "/usr/bin/qemu-system-ppc"  # on the libvirt host (Debian's qemu-system-ppc)


def domain_spec(cfg: ServiceConfig, number: int) -> domainxml.DomainSpec:
    b = BOARDS["ppce500"]
    nics = tuple(domainxml.DomainNic(mac(number, s), cfg.fabric.tap(number, s),
                                     b.nic_pci_slots[s]) for s in range(NIC_SLOTS))
    return domainxml.DomainSpec(name=node_tag(cfg, number), prefix=cfg.prefix, number=number,
                                loader=cfg.images / "u-boot.elf", emulator=cfg.qemu or EMULATOR,
                                mem_mib=cfg.mem_mib, nics=nics, board=b)


class LibvirtNodes:
    """The ``libvirt`` backend for one libvirt host."""

    name = "libvirt"

    def __init__(self, cfg: ServiceConfig, fabric: Fabric, uri: str | None = None,
                 host: str = "local", taps: Callable[[int], object] | None = None) -> None:
        """``taps(number)``: makes the node's taps, unplugged, where its host's QEMUs find
        them (default: in ``fabric``; another host's through `kh fabric wire` there,
        kh.service.hosts); a KhError from it fails the start."""
        self.cfg = cfg
        self.fabric = fabric
        self.host = host
        self.taps = taps or (lambda n: fresh_taps(fabric, n))
        daemon = None
        if uri is None:  # kh's own daemon, in the fabric namespace (started on first use)
            # QEMUs as root (sandboxed, in kh's namespace): libvirt 9.0 makes each guest's
            # RAM directory root's 0700 and, without its DAC driver (which would chown the
            # shared U-Boot image), never hands it to another user (docs/libvirt.md)
            daemon = libvirtd.Libvirtd(cfg.libvirt_dir, cfg.fabric.netns, None)
            uri = daemon.uri
        self.running: dict[int, LibvirtNode] = {}
        self.link = LibvirtHost(host, uri, daemon, cfg.logs, lambda: list(self.running.values()))
        self._lock = threading.Lock()
        self._closing = False
        self._starting: set[int] = set()

    @property
    def conn(self) -> libvirt.virConnect:
        return self.link.conn

    # -- life cycle -----------------------------------------------------------------------
    def _domain(self, number: int) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(node_tag(self.cfg, number))
        except libvirt.libvirtError:
            return None

    def _attach(self, number: int, dom: libvirt.virDomain, gap: str | None) -> LibvirtNode:
        name = f"node{number}"
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        self.cfg.node_dir(number).mkdir(parents=True, exist_ok=True)
        pump = ConsolePump(name)
        try:
            pump.attach(self.conn, dom)
        except BaseException:
            pump.close()
            raise
        con = Console(Path(f"libvirt:{dom.name()}"), self.cfg.console_log(number), name=name,
                      gap=gap)
        try:
            con.adopt(pump.console_end)
            mux = Mux(con, self.cfg.node_dir(number) / "console.sock")
        except BaseException:
            con.close()
            pump.close()
            raise
        return LibvirtNode(number, dom, dom.ID(), con, pump, mux)

    def start(self, number: int, timeout: float = 30.0,
              on_spawn: Callable[[int], None] = lambda pid: None) -> LibvirtNode:
        spec = domain_spec(self.cfg, number)
        try:
            self.taps(number)
        except KhError as e:
            raise StartFailed(number, str(e)) from e
        with self._lock:
            if self._closing:
                raise StartAborted(f"node {number}: khd is stopping")
            self._starting.add(number)
        old = self._domain(number)
        if old is not None:  # a leftover of a start khd did not finish
            with contextlib.suppress(libvirt.libvirtError):
                old.destroy()
        dom: libvirt.virDomain | None = None
        node: LibvirtNode | None = None
        try:
            try:
                dom = self.conn.createXML(domainxml.render(spec),
                                          libvirt.VIR_DOMAIN_START_PAUSED)
            except libvirt.libvirtError as e:
                raise StartFailed(number, f"libvirt host {self.host}: {error_text(e)}") \
                    from None
            on_spawn(dom.ID())
            node = self._attach(number, dom, None)
            ram = self.open_ram_of(dom)
            for ld in default_loads(self.cfg):
                ram.write(ld.addr, ld.file.read_bytes())
            start = node.console.mark()
            dom.resume()
            node.console.expect(uboot.UBOOT_PROMPT, timeout, stage="U-Boot prompt",
                                start=start)
            with self._lock:
                if self._closing:
                    raise StartAborted(f"node {number}: khd is stopping")
                self.running[number] = node
            return node
        except BaseException as e:
            if node is not None:
                node.close()
            if dom is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
            self._drop_pool(number)
            if isinstance(e, StartFailed | StartAborted):
                raise
            if isinstance(e, KhError | libvirt.libvirtError | OSError):
                why = error_text(e) if isinstance(e, libvirt.libvirtError) else str(e)
                raise StartFailed(number, why) from e
            raise
        finally:
            with self._lock:
                self._starting.discard(number)

    def reattach(self, number: int, pid: int) -> LibvirtNode | None:
        dom = self._domain(number)
        if dom is None or not dom.isActive() or dom.ID() != pid:
            return None
        node = self._attach(number, dom, "khd was not running")
        self.running[number] = node
        return node

    def kill_recorded(self, number: int, pid: int | None) -> bool:
        dom = self._domain(number)
        if dom is None or not dom.isActive() or dom.ID() != pid:
            return False
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        self._drop_pool(number)
        return True

    def stop_orphans(self) -> list[str]:
        done = []
        mine = f"{self.cfg.prefix}-node"
        known = {node_tag(self.cfg, n) for n in self.running}
        for dom in self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            name = dom.name()
            if name.startswith(mine) and name[len(mine):].isdigit() and name not in known:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                self._drop_pool(int(name[len(mine):]))
                done.append(f"destroyed libvirt domain {name} on {self.host}: the state did "
                            "not know it")
        return done

    def stop(self, number: int) -> None:
        node = self.running.pop(number, None)
        if node is not None:
            node.close()
            with contextlib.suppress(libvirt.libvirtError):
                node.dom.destroy()
        self._drop_pool(number)
        (self.cfg.node_dir(number) / "console.sock").unlink(missing_ok=True)

    def detach_all(self) -> None:
        self._closing = True
        self.link.close()
        for node in self.running.values():
            node.close()
        self.running.clear()

    def abort_starts(self, wait: float | None = None) -> None:
        """Refuse new starts; a start under way ends at its next step (its domain destroyed
        by the start itself, which raises StartAborted). With ``wait``, until those starts
        have ended (at most ``wait`` s)."""
        with self._lock:
            self._closing = True
        deadline = time.monotonic() + (wait or 0.0)
        while self._starting and time.monotonic() < deadline:
            time.sleep(0.1)

    # -- the running node -----------------------------------------------------------------
    def uboot(self, number: int, line: str, timeout: float = 10.0) -> str:
        node = self.running[number]
        with node.lock:
            return uboot.uboot_command(node.console, line, timeout)

    def reset(self, number: int, timeout: float = 30.0) -> None:
        node = self.running[number]
        def paused_reset() -> None:
            try:
                node.dom.suspend()
                node.dom.reset(0)
                ram = self.open_ram_of(node.dom)
                for ld in default_loads(self.cfg):
                    ram.write(ld.addr, ld.file.read_bytes())
            except libvirt.libvirtError as e:
                raise KhError(f"node {number}: reset failed ({error_text(e)})") from None

        def resume() -> None:
            try:
                node.dom.resume()
            except libvirt.libvirtError as e:
                raise KhError(f"node {number}: reset failed ({error_text(e)})") from None

        with node.lock:
            node.writer.flush()
            reset_to_prompt(node.console, paused_reset, resume, timeout)

    def set_link(self, number: int, slot: int, up: bool) -> None:
        node = self.running[number]
        nic = domain_spec(self.cfg, number).nics[slot]
        try:
            node.dom.updateDeviceFlags(domainxml.nic_xml(nic, up),
                                       libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as e:
            raise KhError(f"node {number}: cannot set the link of interface {slot} "
                          f"({error_text(e)})") from None

    def set_links(self, number: int, used: int) -> None:
        for slot in range(NIC_SLOTS):
            self.set_link(number, slot, slot < used)

    def open_ram(self, number: int) -> VolumeRam:
        node = self.running.get(number)
        if node is None:
            raise LoadError("the node is not running")
        return self.open_ram_of(node.dom)

    def usage(self, number: int) -> Usage | None:
        node = self.running.get(number)
        if node is None:
            return None
        try:
            cpu_ns = int(node.dom.info()[4])
            rss_kib = int(node.dom.memoryStats().get("rss", 0))
        except libvirt.libvirtError:
            return None
        return Usage(cpu_ns=cpu_ns, mem_bytes=rss_kib * 1024)

    # -- RAM as a storage volume ----------------------------------------------------------
    def _pool_name(self, number: int) -> str:
        return f"{node_tag(self.cfg, number)}-ram"

    def open_ram_of(self, dom: libvirt.virDomain) -> VolumeRam:
        number = int(dom.name().rsplit("node", 1)[1])
        return ram_volume(self.conn, dom, self._pool_name(number), self.host)

    def _drop_pool(self, number: int) -> None:
        drop_pool(self.conn, self._pool_name(number))
