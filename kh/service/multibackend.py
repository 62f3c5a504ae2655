"""khd's nodes on several hosts behind one kh.hw.backend.Backend (issue 16): each node number
goes to its host's backend, ``local`` (khd's own: the qemu or libvirt backend as configured)
or an added host's (kh.service.libvirt_nodes.LibvirtNodes, one per host, each with its own
connection, event loop thread and HOST_GRACE). Node numbers are the service's, global and
unique; the state says each node's host (kh.store_hosts), which ``host_of`` reads.

``running`` is a ChainMap of the backends' own ``running`` maps (the local one first): reads
see every host's nodes, and what tests put in it lands in the local backend's. Anything the
seam does not name is the local backend's (``__getattr__``). A host that dies fails only its
own nodes (its backend marks them gone; the pool reaps them with the reason).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

from kh.errors import KhError
from kh.hw.backend import Backend, Node, Ram
from kh.hw.cgroup import Usage
from kh.store_hosts import LOCAL

log = logging.getLogger("kh.hosts")


class MultiBackend:
    """Backends by host; the seam's calls routed by the node's host."""

    def __init__(self, local: Backend, host_of: Callable[[int], str]) -> None:
        self.local = local
        self.name = local.name
        self.fabric = local.fabric
        self.host_of = host_of
        self.remote: dict[str, Backend] = {}
        self.running: collections.ChainMap[int, Node] = collections.ChainMap(
            local.running)  # type: ignore[arg-type]
        self.stopped: list[Callable[[int], None]] = []  # told of every node stopped

    def __getattr__(self, name: str) -> Any:
        if name == "local":  # not set yet (a half-made object): no recursion
            raise AttributeError(name)
        return getattr(self.local, name)

    # -- hosts ----------------------------------------------------------------------------
    def add(self, host: str, backend: Backend) -> None:
        self.remote[host] = backend
        self._chain()

    def remove(self, host: str) -> Backend | None:
        """Host ``host``'s backend out of the routing (its nodes must be stopped first)."""
        b = self.remote.pop(host, None)
        self._chain()
        return b

    def _chain(self) -> None:
        self.running.maps = [self.local.running,  # type: ignore[list-item]
                             *(b.running for b in self.remote.values())]  # type: ignore[list-item]

    def backend(self, number: int) -> Backend:
        """The backend of node ``number``'s host; KhError when that host is not connected."""
        host = self.host_of(number)
        if host == LOCAL:
            return self.local
        b = self.remote.get(host)
        if b is None:
            raise KhError(f"node {number}: its host {host} is not connected",
                          "kh host list shows the hosts")
        return b

    # -- the seam -------------------------------------------------------------------------
    def start(self, number: int, timeout: float = 30.0,
              on_spawn: Callable[[int], None] = lambda pid: None) -> Node:
        return self.backend(number).start(number, timeout, on_spawn)

    def reattach(self, number: int, pid: int) -> Node | None:
        try:
            b = self.backend(number)
        except KhError:
            return None
        return b.reattach(number, pid)

    def kill_recorded(self, number: int, pid: int | None) -> bool:
        try:
            return self.backend(number).kill_recorded(number, pid)
        except KhError as e:  # its host does not answer: nothing to stop from here
            log.warning("node %d: cannot stop what its start left: %s", number, e)
            return False

    def pid_is_local(self, number: int) -> bool:
        """Whether node ``number``'s recorded ``pid`` is a process of this host (metering
        reads /proc for it): a node of the local ``qemu`` backend."""
        return self.local.name == "qemu" and number in self.local.running

    def stop_orphans(self) -> list[str]:
        done = self.local.stop_orphans()
        for host, b in self.remote.items():
            try:
                done += b.stop_orphans()
            except KhError as e:
                log.warning("host %s: cannot look for orphans: %s", host, e)
        return done

    def stop(self, number: int) -> None:
        owner = next((b for b in (self.local, *self.remote.values()) if number in b.running),
                     None)
        if owner is None:
            try:
                owner = self.backend(number)
            except KhError:  # its host is not connected: nothing of it runs here
                owner = None
        if owner is not None:
            owner.stop(number)
        for tell in self.stopped:
            try:
                tell(number)
            except Exception:
                log.exception("node %d: after its stop", number)

    def detach_all(self) -> None:
        for b in (self.local, *self.remote.values()):
            b.detach_all()

    def abort_starts(self, wait: float | None = None) -> None:
        for b in (self.local, *self.remote.values()):
            b.abort_starts(wait)

    def uboot(self, number: int, line: str, timeout: float = 10.0) -> str:
        return self.backend(number).uboot(number, line, timeout)

    def reset(self, number: int, timeout: float = 30.0) -> None:
        self.backend(number).reset(number, timeout)

    def set_links(self, number: int, used: int) -> None:
        self.backend(number).set_links(number, used)

    def set_link(self, number: int, slot: int, up: bool) -> None:
        self.backend(number).set_link(number, slot, up)

    def open_ram(self, number: int) -> Ram:
        return self.backend(number).open_ram(number)

    def usage(self, number: int) -> Usage | None:
        try:
            b = self.backend(number)
        except KhError:
            return None
        return b.usage(number)
