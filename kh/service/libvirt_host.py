"""One libvirt host as khd holds it: the connection (made on first use; kh's own daemon started
first when the host is kh's), lifecycle events, and the connection made again when it closes.

A ``STOPPED`` or ``CRASHED`` event marks the node gone (``LibvirtNode.gone``; the pool then does
what it does with a QEMU that exited). A closed connection (the daemon restarted, a remote
host cut off) is made again every 0.5 s for HOST_GRACE s, each node's domain looked up by name
(same ID: the same domain) and its console stream opened again into the same ConsolePump, so
its Console and every reader never see a gap; if the host does not come back, its nodes are
gone with ``lost libvirt host NAME``.
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

import libvirt

from kh.cc.channel import NodeWriter
from kh.errors import KhError
from kh.hw import libvirtd
from kh.hw.console import Console
from kh.hw.virtstream import ConsolePump, check_ppc, connect, error_text
from kh.service.mux import Mux

log = logging.getLogger("kh.libvirt")
# Seconds a libvirt host may be unreachable (its daemon restarting) before its nodes fail.
HOST_GRACE = 30.0


@dataclass
class LibvirtNode:
    """A running node of the libvirt backend (kh.hw.backend.Node)."""

    number: int
    dom: libvirt.virDomain
    domain_id: int
    console: Console
    pump: ConsolePump
    mux: Mux
    lock: threading.Lock = field(default_factory=threading.Lock)
    gone: str | None = None  # set by a lifecycle event or a lost connection
    writer: NodeWriter = field(init=False)

    def __post_init__(self) -> None:
        self.writer = NodeWriter(self.number, self.console)

    @property
    def pid(self) -> int:
        return self.domain_id

    def alive(self) -> bool:
        return self.gone is None

    def death_reason(self) -> str:
        return self.gone or "its libvirt domain is gone"

    def close(self) -> None:
        self.writer.stop()
        self.mux.close()
        self.console.close()
        self.pump.close()


EVENT_WORDS = {libvirt.VIR_DOMAIN_EVENT_STOPPED: "its libvirt domain stopped",
               libvirt.VIR_DOMAIN_EVENT_CRASHED: "its libvirt domain crashed"}


class LibvirtHost:
    """The connection to one libvirt host; ``nodes`` gives the nodes running there."""

    def __init__(self, name: str, uri: str, daemon: libvirtd.Libvirtd | None, logs: Path,
                 nodes: Callable[[], list[LibvirtNode]], machine: str | None = "ppce500") -> None:
        """``machine``: the guest machine the host must offer (checked when it is first
        reached; None: not checked, for libvirt's test driver)."""
        self.name = name
        self.machine = machine
        self.uri = uri
        self.daemon = daemon
        self.logs = logs
        self.nodes = nodes
        self.closing = False
        self._conn: libvirt.virConnect | None = None
        self._daemon_proc: subprocess.Popen[bytes] | None = None
        self._conn_lock = threading.Lock()

    def _start_daemon(self) -> None:
        assert self.daemon is not None
        if self._daemon_proc is not None:
            self._daemon_proc.poll()  # reaped if it died: no zombie holds its PID
        self.logs.mkdir(parents=True, exist_ok=True)
        started = libvirtd.start(self.daemon, self.logs / "libvirtd.log")
        if started is not None:
            self._daemon_proc = started

    @property
    def conn(self) -> libvirt.virConnect:
        """The connection, made on first use: by then khd has made the fabric namespace kh's
        own daemon runs in (the daemon is started then, unless one answers already)."""
        with self._conn_lock:
            if self._conn is None:
                if self.daemon is not None:
                    self._start_daemon()
                conn = connect(self.uri, self.name)
                try:
                    if self.machine is not None:  # one clear error, before any node
                        check_ppc(conn, self.name, self.machine)
                except KhError:
                    conn.close()
                    raise
                self._conn = conn
                self._watch(conn)
            return self._conn

    # -- events ---------------------------------------------------------------------------
    def _on_lifecycle(self, conn: object, dom: libvirt.virDomain, event: int, detail: int,
                      opaque: object) -> None:
        words = EVENT_WORDS.get(event)
        if words is None:
            return
        for node in self.nodes():
            if node.dom.name() == dom.name() and node.gone is None:
                node.gone = f"{words} (event detail {detail})"
                log.warning("node %d: %s", node.number, node.gone)

    def _on_close(self, conn: object, reason: int, opaque: object) -> None:
        """The connection went (the daemon restarted, the host died or is cut off): try to
        connect again for HOST_GRACE s, in a thread (not libvirt's event loop)."""
        if self.closing:
            return
        log.warning("libvirt host %s: connection closed (reason %d); reconnecting", self.name,
                    reason)
        threading.Thread(target=self._reconnect, daemon=True, name="libvirt-reconnect").start()

    def _reconnect(self) -> None:
        deadline = time.monotonic() + HOST_GRACE
        why = "no answer"
        while time.monotonic() < deadline and not self.closing:
            try:
                if self.daemon is not None:  # kh's own: started again if it is gone
                    self._start_daemon()
                conn = libvirt.open(self.uri)
            except (libvirt.libvirtError, KhError) as e:
                why = error_text(e) if isinstance(e, libvirt.libvirtError) else str(e)
                time.sleep(0.5)
                continue
            self._conn = conn
            self._watch(conn)
            for node in self.nodes():
                try:
                    dom = conn.lookupByName(node.dom.name())
                    if not dom.isActive() or dom.ID() != node.domain_id:
                        raise KhError("its domain is not the one khd started")
                    node.pump.attach(conn, dom)
                    node.dom = dom
                except (libvirt.libvirtError, KhError) as e:
                    node.gone = f"libvirt host {self.name} came back without it ({e})"
            log.warning("libvirt host %s: reconnected", self.name)
            return
        for node in self.nodes():
            if node.gone is None:
                node.gone = (f"lost libvirt host {self.name}: no connection for "
                             f"{HOST_GRACE:.0f} s ({why})")
        log.error("libvirt host %s: gone (%s); its nodes are marked failed", self.name, why)

    def _watch(self, conn: libvirt.virConnect) -> None:
        """Lifecycle events and the connection's end, on ``conn``."""
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                    self._on_lifecycle, None)
        conn.registerCloseCallback(self._on_close, None)
        with contextlib.suppress(libvirt.libvirtError):
            conn.setKeepAlive(5, 3)  # a dead remote host is noticed in ~20 s

    def close(self) -> None:
        """khd is going away: no reconnecting; the domains run on."""
        self.closing = True
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.unregisterCloseCallback()
                self._conn.close()
