"""khd's hosts (issue 16): `kh host add|list|rm`, operator only. khd's own host is the implicit
``local``; every added host is a libvirt host (any URI, e.g. qemu+ssh://) whose nodes khd runs
through kh.service.libvirt_nodes (one LibvirtNodes each, behind kh.service.multibackend), whose
taps and stretched domains khd makes there with `kh fabric` through the host's runner
(kh.service.hostfabric), and whose share of the pool is its capacity.

Adding a host checks everything before it records anything, and makes nothing on either host
while it checks: the runner and the kh there answer (`kh fabric underlays`), the host has an
underlay (the one given, or the first), khd's own host has one, the far one answers ARP from
it, libvirt connects and offers qemu-system-ppc with ppce500, and the capacity (given, or
probed from the host's free memory) is at least one node. Each fault is one HostRefused (409)
naming the host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kh import proc
from kh.allocation import NIC_SLOTS, AllocationError
from kh.errors import KhError, UsageError
from kh.hw import span
from kh.hw.stretch import Peer, Underlay
from kh.model import NodeState
from kh.service import hostspec
from kh.service import request as rq
from kh.service.hostfabric import Far
from kh.service.hostspec import HostSpec
from kh.store_hosts import LOCAL, HostRow

if TYPE_CHECKING:
    from kh.service.core import Service

log = logging.getLogger("kh.hosts")
CHECK_TIMEOUT = 60.0  # s for `kh fabric underlays` on the far host
MAX_UNDERLAYS, MAX_MTU = 64, 65535  # what a far `kh fabric underlays` may answer (IPv4's MTUs)
MAX_HOSTS = 32  # added hosts (a stretched domain's peers are bounded too: stretch.MAX_PEERS)


class HostRefused(AllocationError):
    """A host cannot be added (or removed) as asked: 409, one line naming the host."""


def _underlay_entry(f: object, host: str) -> bool:
    """One entry of a far `kh fabric underlays` is what kh there prints: an interface name, an
    IPv4 underlay address, an MTU a stretched domain can use (the far host may be anything)."""
    from kh.hw.stretch import IFNAME, StretchError, _address
    if not (isinstance(f, dict) and isinstance(f.get("ifname"), str) and
            IFNAME.fullmatch(f["ifname"]) and isinstance(f.get("address"), str) and
            type(f.get("mtu")) is int and 68 <= f["mtu"] <= MAX_MTU):
        return False
    try:
        _address(f["address"], "underlay address", host)
    except StretchError:
        return False
    return True


def _refused(name: str, e: KhError) -> HostRefused:
    text = e.message if e.message.startswith("host ") else f"host {name}: {e.message}"
    return HostRefused(text, e.hint)


class Hosts:
    """The registry and its effects on the service's backend, fabric and pool."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.faults: dict[str, str] = {}  # host -> why it is not connected
        self.removing: set[str] = set()  # hosts `kh host rm` is removing (under khd's lock)

    # -- life cycle -----------------------------------------------------------------------
    def connect_all(self) -> None:
        """At khd's start, before the pool adopts: every recorded host's backend and fabric,
        connected now. A host that does not answer is left out (``down: WHY`` in the list):
        its nodes are not found again (allocated ones fail, "host NAME is down: WHY", the
        others are dropped) and the pool starts none there until it is removed and added
        again, or khd restarts."""
        for row in self.svc.store.hosts():
            try:
                self._connect(row, check=True)
            except KhError as e:
                why = e.message.removeprefix(f"host {row.name}: ")  # the list names it
                self.faults[row.name] = why
                log.error("host %s is down: %s", row.name, e)
                for r in self.svc.store.nodes(NodeState.ALLOCATED):  # their principals read it
                    if r.host == row.name:
                        self.svc.store.node_failed(r.number, f"host {row.name} is down: {why}")

    def _connect(self, row: HostRow, check: bool = False) -> None:
        from kh.service.libvirt_nodes import LibvirtNodes  # only with added hosts
        gate = span.host_gate()  # its sshd takes a few connections at once
        rf = span.RemoteFabric(row.runner, row.prefix, row.name, row.kh, gate)
        side = span.remote(row.runner, row.prefix, Underlay(row.underlay_if, row.underlay),
                           row.name, row.kh, gate)
        nodes = LibvirtNodes(dataclasses.replace(self.svc.cfg, prefix=row.prefix),
                             self.svc.fabric, uri=row.uri, host=row.name,
                             taps=lambda n: rf.wire(n, [None] * NIC_SLOTS))
        if check:
            try:
                nodes.link.conn  # noqa: B018 (connects: KhError naming the host)
            except KhError:
                nodes.detach_all()
                raise
        self.svc.fabric.add_host(row.name, Far(rf, side, row.mtu))
        self.svc.nodes.add(row.name, nodes)

    def sizes(self) -> dict[str, int]:
        """Each connected host's share of the pool: ``local`` the service's ``nodes``."""
        return {LOCAL: self.svc.cfg.nodes,
                **{h.name: h.capacity for h in self.svc.store.hosts()
                   if h.name in self.svc.nodes.remote and h.name not in self.removing}}

    # -- kh host add ----------------------------------------------------------------------
    def add(self, spec: HostSpec) -> dict[str, Any]:
        """Check the host (module docstring), record it, connect it; the pool then starts its
        capacity of nodes there. Its row as ``list`` gives it. UsageError for malformed input,
        HostRefused for a name taken or a host that fails a check."""
        spec = hostspec.check(spec, self.svc.cfg.prefix)
        assert spec.prefix is not None and spec.runner is not None
        if self.svc.store.host(spec.name) is not None:
            raise HostRefused(f"host {spec.name} is already added", "kh host list shows it")
        self._bounded(spec.name)  # here (no ssh for nothing), and again as it is recorded
        try:
            far = self._far_underlay(spec)
            local, _ = self.svc.fabric.local_underlay()
            from kh.hw.underlay import check_reaches
            check_reaches(self.svc.fabric.cfg, local, Peer(spec.name, far["address"]), LOCAL)
            capacity = self._probe(spec)
        except HostRefused:
            raise
        except KhError as e:
            raise _refused(spec.name, e) from None
        except OSError as e:  # what the kernel said while checking (the underlay, ARP)
            raise HostRefused(f"host {spec.name}: {e.strerror or e}") from None
        row = HostRow(spec.name, spec.uri, capacity, far["address"], far["ifname"],
                      int(far["mtu"]), spec.prefix, spec.kh, spec.runner)
        with self.svc.lock:
            self._bounded(row.name)  # adds side by side all passed the first check
            for other in self.svc.store.hosts():  # one host under two names would share
                same = ("underlay " + row.underlay if other.underlay == row.underlay else
                        "URI and prefix" if (other.uri, other.prefix) == (row.uri, row.prefix)
                        else None)  # kh's domains and tunnels there
                if same:
                    raise HostRefused(f"host {row.name} is host {other.name} again (the same "
                                      f"{same})", "kh host list shows it")
            try:
                row = self.svc.store.add_host(row)
            except KhError as e:
                raise HostRefused(e.message, e.hint) from None
            self._connect(row)
        self.svc.pool.wake()
        log.info("host %s added: %s, %d nodes", row.name, row.uri, row.capacity)
        return self._entry(row.name, row.to_json())

    def _bounded(self, name: str) -> None:
        if len(self.svc.store.hosts()) >= MAX_HOSTS:
            raise HostRefused(f"host {name}: khd has {MAX_HOSTS} hosts already, the most it "
                              "takes", "kh host rm one first")

    def _far_underlay(self, spec: HostSpec) -> dict[str, Any]:
        assert spec.runner is not None and spec.prefix is not None
        argv = [*spec.runner, spec.kh, "fabric", "underlays", "--prefix", spec.prefix]
        try:
            out = proc.run(argv, timeout=CHECK_TIMEOUT, what=f"kh fabric underlays on {spec.name}",
                           limit=span.REMOTE_OUTPUT)
            found = json.loads(out.stdout)
            ok = isinstance(found, list) and len(found) <= MAX_UNDERLAYS and all(
                _underlay_entry(f, spec.name) for f in found)
        except KhError as e:
            raise span._remote_error(spec.name, e) from None
        except ValueError:
            ok = False
        if not ok:
            raise HostRefused(f"host {spec.name}: `kh fabric underlays` answered something else",
                              "is the same kh installed there?")
        if not found:
            raise HostRefused(f"host {spec.name}: kh's fabric there has no underlay",
                              f"kh fabric underlay DEV A.B.C.D/LEN --prefix {spec.prefix} there")
        match = found[:1] if spec.underlay is None else [
            f for f in found if f["address"] == spec.underlay]
        if not match:
            raise HostRefused(f"host {spec.name}: no underlay there holds {spec.underlay}",
                              "it has " + ", ".join(f"{f['ifname']} {f['address']}"
                                                    for f in found))
        from kh.hw.stretch import StretchError, guest_mtu
        try:  # a domain stretched to it must leave its nodes IPv6's 1280 bytes
            guest_mtu(match[0]["mtu"], spec.name, match[0]["ifname"])
        except StretchError as e:
            raise HostRefused(e.message, e.hint) from None
        return dict(match[0])

    def _probe(self, spec: HostSpec) -> int:
        """libvirt reachable, qemu-system-ppc with ppce500 there; the capacity (given, or
        from the host's free memory). Nothing is made there."""
        import libvirt

        from kh.hw.virtstream import check_ppc, connect, error_text
        conn = connect(spec.uri, spec.name)
        try:
            check_ppc(conn, spec.name)
            if spec.capacity is not None:
                return spec.capacity
            try:
                free = int(conn.getFreeMemory())
            except libvirt.libvirtError as e:
                raise HostRefused(f"host {spec.name}: cannot read its free memory "
                                  f"({error_text(e)})", "give --capacity N") from None
            n = hostspec.probed_capacity(free, self.svc.cfg.mem_mib)
            if n < 1:
                raise HostRefused(f"host {spec.name} has {free >> 20} MiB free: no room for a "
                                  f"node of {self.svc.cfg.mem_mib} MiB",
                                  "free memory there, or give --capacity N")
            return n
        finally:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass

    # -- kh host list ---------------------------------------------------------------------
    def _entry(self, name: str, extra: dict[str, Any]) -> dict[str, Any]:
        rows = [r for r in self.svc.store.nodes() if r.host == name]
        count = {s: sum(1 for r in rows if r.state == s) for s in NodeState}
        failed = [r for r in rows if r.state == NodeState.FAILED]
        state = "up"
        if name in self.removing:
            state = "removing"
        elif name in self.faults:
            state = f"down: {self.faults[name]}"
        elif failed and not count[NodeState.FREE] and not count[NodeState.ALLOCATED]:
            state = f"failing: {failed[-1].reason or 'its nodes fail'}"
        return {**extra, "name": name,
                "used": count[NodeState.ALLOCATED] + count[NodeState.CONFIGURING] +
                sum(1 for r in failed if r.alloc is not None),
                "free": count[NodeState.FREE], "starting": count[NodeState.STARTING],
                "failed": sum(1 for r in failed if r.alloc is None), "state": state}

    def list(self) -> list[dict[str, Any]]:
        """``local`` first, then the hosts in the order added: name, uri, capacity, used,
        free, starting, failed, state (up, down: WHY, failing: WHY, removing) and the host's
        record."""
        out = [self._entry(LOCAL, {"uri": f"({self.svc.cfg.backend})",
                                   "capacity": self.svc.cfg.nodes})]
        return out + [self._entry(h.name, h.to_json()) for h in self.svc.store.hosts()]

    # -- kh host rm -----------------------------------------------------------------------
    def remove(self, name: str) -> dict[str, Any]:
        """Forget host ``name`` (kh.service.hostrm.remove: the remote work without khd's
        lock, each step bounded). {"removed": name, "nodes": [numbers]}."""
        from kh.service import hostrm
        return hostrm.remove(self, name)


def allocated_map(svc: Service) -> dict[int, dict[int, int]]:
    """Where the state says each allocated node is plugged: number -> {slot: netid}
    (kh.service.membership's slot maps), for HostFabric.load at khd's start."""
    from kh.service import membership
    out: dict[int, dict[int, int]] = {}
    for row in svc.store.nodes(NodeState.ALLOCATED):
        alloc = None if row.alloc is None else svc.store.allocation(row.alloc)
        if alloc is None:
            continue
        slots = membership.node_map(svc.store, row.number, alloc)
        out[row.number] = {s: n for s, n in enumerate(slots) if n is not None}
    return out


# -- the API (operator only; kh.service.api serves ROUTES) -------------------------------------
def _operator(caller: Any, what: str) -> None:
    from kh.admission import AuthError
    if not caller.operator:
        raise AuthError(what, "as root, on khd's unix socket")


def table(hosts: list[dict[str, Any]]) -> str:
    lines = [f"{'HOST':<16} {'CAP':>4} {'USED':>4} {'FREE':>4}  {'STATE':<10} URI"]
    for h in hosts:
        lines.append(f"{h['name']:<16} {h['capacity']:>4} {h['used']:>4} {h['free']:>4}  "
                     f"{h['state']:<10} {h['uri']}")
    return "\n".join(lines) + "\n"


def _words(v: object) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise UsageError("`runner` must be a list of words (an argv prefix)")
    return hostspec.runner_words(v)


@rq.operator_only("adding a host is the operator's")
@rq.takes("name", "uri", "capacity", "underlay", "prefix", "kh", "runner")
def route_add(svc: Service, caller: Any, body: dict[str, Any]) -> tuple[int, str, Any]:
    _operator(caller, "adding a host is the operator's")
    cap = body.get("capacity")
    spec = HostSpec(name=rq.text(body, "name", 64), uri=rq.text(body, "uri", hostspec.MAX_URI),
                    capacity=None if cap is None else rq.integer(
                        body, "capacity", 1, 1, hostspec.MAX_CAPACITY),
                    underlay=None if body.get("underlay") is None else
                    rq.text(body, "underlay", 64),
                    prefix=None if body.get("prefix") is None else rq.text(body, "prefix", 16),
                    kh="kh" if body.get("kh") is None else rq.text(body, "kh", hostspec.MAX_WORD),
                    runner=None if body.get("runner") is None else _words(body["runner"]))
    h = svc.hosts.add(spec)
    return 201, (f"host {h['name']} added: {h['uri']}, {h['capacity']} nodes "
                 f"(underlay {h['underlay']})\n"), h


@rq.operator_only("listing hosts is the operator's")
@rq.takes()
def route_list(svc: Service, caller: Any, body: dict[str, Any]) -> tuple[int, str, Any]:
    _operator(caller, "listing hosts is the operator's")
    data = svc.hosts.list()
    return 200, table(data), data


@rq.operator_only("removing a host is the operator's")
@rq.takes()
def route_remove(svc: Service, caller: Any, body: dict[str, Any], name: str
                 ) -> tuple[int, str, Any]:
    _operator(caller, "removing a host is the operator's")
    gone = svc.hosts.remove(name)
    return 200, (f"host {name} removed; nodes stopped there: "
                 f"{' '.join(map(str, gone['nodes'])) or 'none'}\n"), gone


ROUTES: list[tuple[str, str, Callable[..., Any]]] = [
    ("POST", r"/v1/hosts", route_add), ("GET", r"/v1/hosts", route_list),
    ("POST", r"/v1/hosts/([^/]+?)/remove", route_remove)]
