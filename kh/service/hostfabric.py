"""kh's fabric when khd has nodes on several hosts (issue 16, item 4): khd's own Fabric, whose
``attach`` also reaches a node on another host (its taps there, through `kh fabric wire`,
kh.hw.span.RemoteFabric), and which stretches each communication domain over exactly the
hosts that have a node in it (kh.hw.span.span: all or nothing) and takes the stretch away when
the domain is back on one host (span.unspan).

It keeps where each node's interfaces are plugged (node -> slot -> netid) as it plugs them; at
khd's start ``load`` reads that back from the state (the allocated nodes' slot maps) and makes
every stretch the state needs. A stopped node (released, scrapped, dead) is forgotten
(``forget``), which may end a stretch. Nodes of a stretched domain boot with ``mtu``: the
smallest underlay MTU of its hosts less VXLAN's 50 bytes (kh.hw.stretch.guest_mtu).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kh.allocation import NIC_SLOTS
from kh.errors import KhError
from kh.hw import span, stretch
from kh.hw.fabric import Fabric
from kh.hw.stretch import StretchError, Underlay
from kh.hw.tags import FabricConfig
from kh.store_hosts import LOCAL

log = logging.getLogger("kh.hosts")


@dataclass(frozen=True)
class Far:
    """Another host's fabric as khd drives it: its taps (``fabric``), its side of a stretched
    domain (``side``) and its underlay's MTU."""

    fabric: span.RemoteFabric
    side: span.Side
    mtu: int


def hosts_of(where: dict[int, dict[int, int]], host_of: Callable[[int], str], netid: int,
             order: Sequence[str]) -> list[str]:
    """The hosts with a node plugged into domain ``netid``, in ``order`` (local first)."""
    have = {host_of(n) for n, slots in where.items() if netid in slots.values()}
    return [h for h in order if h in have] + sorted(have - set(order))


class HostFabric(Fabric):
    """khd's Fabric, across hosts. ``host_of(number)`` is the node's host (the state);
    ``order()`` the hosts (local first); ``local_underlay()`` this host's underlay end and
    MTU (StretchError when it has none)."""

    def __init__(self, cfg: FabricConfig, ports: Iterable[int] = (), *,
                 host_of: Callable[[int], str] = lambda n: LOCAL) -> None:
        super().__init__(cfg, ports)
        self.host_of = host_of
        self.far: dict[str, Far] = {}
        self.where: dict[int, dict[int, int]] = {}
        self.stretched: dict[int, tuple[str, ...]] = {}
        self._lock = threading.RLock()  # where and stretched
        self._span_lock = threading.Lock()  # one change of stretches at a time

    # -- hosts ----------------------------------------------------------------------------
    def order(self) -> list[str]:
        return [LOCAL, *self.far]

    def local_underlay(self) -> tuple[Underlay, int]:
        from kh.hw.underlay import underlays
        found = underlays(self.cfg)
        if not found:
            raise StretchError(f"host {LOCAL}: khd's fabric {self.cfg.netns} has no underlay",
                               "kh fabric underlay DEV A.B.C.D/LEN moves a NIC in")
        return Underlay(found[0].ifname, found[0].address), found[0].mtu

    def add_host(self, name: str, far: Far) -> None:
        with self._lock:
            self.far[name] = far

    def remove_host(self, name: str) -> None:
        with self._lock:
            self.far.pop(name, None)

    def _side(self, host: str) -> span.Side:
        if host == LOCAL:
            underlay, _ = self.local_underlay()
            return span.local(self, underlay, LOCAL)
        far = self.far.get(host)
        if far is None:
            raise StretchError(f"host {host} is not connected")
        return far.side

    def _mtu(self, host: str) -> int:
        return self.local_underlay()[1] if host == LOCAL else self.far[host].mtu

    # -- plugging -------------------------------------------------------------------------
    def attach(self, node: int, slot: int, netid: int | None) -> None:
        """Plug node ``node``'s interface ``slot`` into domain ``netid`` (None: unplug) on the
        node's host, then make the domain's stretch (and the old one's) what it must be."""
        host = self.host_of(node)
        with self._lock:
            before = dict(self.where.get(node, {}))
            now = dict(before)
            if netid is None:
                now.pop(slot, None)
            else:
                now[slot] = netid
            if now == before and host == LOCAL and netid is None:
                super().attach(node, slot, netid)
                return
        if host == LOCAL:
            super().attach(node, slot, netid)
        else:
            self._far(host).fabric.wire(node, [now.get(s) for s in range(NIC_SLOTS)])
        self._moved(node, now, before)

    def wire(self, node: int, netids: Sequence[int | None]) -> None:
        """All of node ``node``'s interfaces at once: slot i into ``netids[i]`` (missing or
        None: unplugged). One command for a node on another host."""
        host = self.host_of(node)
        padded = [*netids, *[None] * (NIC_SLOTS - len(netids))][:NIC_SLOTS]
        if host == LOCAL:
            for slot, n in enumerate(padded):
                self.attach(node, slot, n)
            return
        now = {s: n for s, n in enumerate(padded) if n is not None}
        with self._lock:
            before = dict(self.where.get(node, {}))
        self._far(host).fabric.wire(node, padded)
        self._moved(node, now, before)

    def _far(self, host: str) -> Far:
        far = self.far.get(host)
        if far is None:
            raise KhError(f"host {host} is not connected", "kh host list shows the hosts")
        return far

    def _moved(self, node: int, now: dict[int, int], before: dict[int, int]) -> None:
        with self._lock:
            if now:
                self.where[node] = now
            else:
                self.where.pop(node, None)
        self.restretch(set(now.values()) | set(before.values()))

    def plan(self, nodes: dict[int, Sequence[int | None]]) -> None:
        """khget, before it plugs anything: record where ``nodes`` (number -> netids by slot)
        go and stretch their domains now (all or nothing: StretchError, nothing recorded), so
        that every node of the allocation boots with the stretched domains' MTU."""
        with self._lock:
            saved = {n: self.where.get(n) for n in nodes}
            for n, netids in nodes.items():
                self.where[n] = {s: x for s, x in enumerate(netids) if x is not None}
        touched = {x for netids in nodes.values() for x in netids if x is not None}
        try:
            self.restretch(touched)
        except BaseException:
            with self._lock:
                for n, old in saved.items():
                    if old is None:
                        self.where.pop(n, None)
                    else:
                        self.where[n] = old
            self.restretch(touched)
            raise

    def forget(self, node: int) -> None:
        """Node ``node`` stopped: its interfaces count in no domain any more."""
        with self._lock:
            before = self.where.pop(node, None)
        if before:
            try:
                self.restretch(set(before.values()))
            except KhError as e:
                log.warning("node %d stopped; its domains' stretches stay as they were: %s",
                            node, e)

    def load(self, where: dict[int, dict[int, int]]) -> list[str]:
        """At khd's start: where the state says the allocated nodes are plugged; every
        stretch it needs made (or made again). The faults, one line each."""
        with self._lock:
            self.where = {n: dict(s) for n, s in where.items() if s}
        faults = []
        for netid in sorted({x for s in where.values() for x in s.values()}):
            try:
                self.restretch({netid})
            except KhError as e:
                faults.append(f"domain {netid}: cannot stretch it: {e}")
        return faults

    # -- stretches ------------------------------------------------------------------------
    def mtu(self, netids: Iterable[int | None]) -> int | None:
        """The boot key MTU for a node in ``netids``: None unless one of them is stretched;
        else the smallest underlay MTU of their hosts less VXLAN's overhead."""
        with self._lock:
            hosts = {h for n in netids if n is not None for h in self.stretched.get(n, ())}
        if not hosts:
            return None
        return min(stretch.guest_mtu(self._mtu(h), h) for h in hosts)

    def restretch(self, netids: Iterable[int]) -> None:
        """Each of ``netids`` stretched over exactly the hosts with a node in it (two or
        more), or not stretched (fewer). StretchError from the first host that refuses
        (span.span leaves nothing of that domain's new stretch)."""
        with self._span_lock:
            for netid in sorted(netids):
                with self._lock:
                    want = tuple(hosts_of(self.where, self.host_of, netid, self.order()))
                    had = self.stretched.get(netid, ())
                if len(want) < 2:
                    want = ()
                if want == had:
                    continue
                if want:
                    span.span(netid, [self._side(h) for h in want])
                gone = [h for h in had if h not in want]
                faults = span.unspan(netid, [self._side(h) for h in gone
                                             if h == LOCAL or h in self.far])
                for f in faults:
                    log.warning("domain %d: %s", netid, f)
                with self._lock:
                    if want:
                        self.stretched[netid] = want
                    else:
                        self.stretched.pop(netid, None)
