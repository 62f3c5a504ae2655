"""The topology as plain data: principals, allocations (control channels), nodes and their
interfaces, domains and published ports; the paper's Figure 2 ("the communication domain
topology as a network-style topology") before it is drawn (kh.topo.render).

Built from the running state (``from_ps``: the JSON of khd's ``GET /v1/ps`` for the operator or
``POST /v1/ps`` for a principal, which already holds only what its reader may see) or from a lab
file that has not run (kh.topo.lab). Pure: no I/O, the same input always gives the same graph,
sorted, so renderers' output can be compared with golden files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from kh.allocation import MAX_NETID, MAX_NODE, NIC_SLOTS, host_address, node_address
from kh.errors import UsageError
from kh.hw.antispoof import nic_mac
from kh.model import EXTERNAL, PUBLIC

KINDS = ("external", "public", "private")


@dataclass(frozen=True)
class Interface:
    """A node's interface ``eth<slot>`` in domain ``domain`` (a TopoDomain key); its MAC and
    address (``10.d.x.y/16``) when known (a lab's nodes have no numbers before they run)."""

    slot: int
    domain: str
    mac: str | None
    ip: str | None


@dataclass(frozen=True)
class TopoNode:
    """A node: ``key`` is unique in the graph ("n5" for node 5, "web.0" for a lab's group
    member); ``number`` is khd's node number (None before it runs); ``state`` khd's state
    (``planned`` for a lab not running)."""

    key: str
    label: str
    number: int | None
    state: str
    principal: str | None
    allocation: str | None  # a TopoAllocation key
    interfaces: tuple[Interface, ...]


@dataclass(frozen=True)
class TopoAllocation:
    """An allocation and its control channel (``con<ID>@server -p port``; a lab group's
    before it runs: ``con?``)."""

    key: str
    label: str
    principal: str
    channel: str
    nodes: tuple[str, ...]  # TopoNode keys


@dataclass(frozen=True)
class TopoDomain:
    """A communication domain: ``key`` "D<netid>" (a lab's private domain before it exists:
    "D:<name>"); external and public are D0 and D1, a private one has its owner."""

    key: str
    label: str
    netid: int | None
    kind: str
    owner: str | None
    gateway: str | None = None  # kh's own address there: the outside world, or khd's API


@dataclass(frozen=True)
class TopoPort:
    """127.0.0.1:``host_port`` on the host forwarded to ``node``'s ``port`` (kh publish)."""

    host_port: int
    node: str
    port: int
    principal: str


@dataclass(frozen=True)
class Topology:
    """The whole picture. ``view`` says whose: "operator" (everything) or a principal's name
    (its own nodes and the shared domains); ``source`` "running" or "lab FILE"."""

    source: str
    view: str
    principals: tuple[str, ...]
    allocations: tuple[TopoAllocation, ...]
    nodes: tuple[TopoNode, ...]
    domains: tuple[TopoDomain, ...]
    ports: tuple[TopoPort, ...] = ()
    free_nodes: int | None = None  # the pool's free nodes (None: not known)
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: lists for tuples, in the order above."""
        return asdict(self)

    def node(self, key: str) -> TopoNode:
        return next(n for n in self.nodes if n.key == key)

    def domain(self, key: str) -> TopoDomain:
        return next(d for d in self.domains if d.key == key)

    def members(self, domain_key: str) -> list[tuple[TopoNode, Interface]]:
        """The nodes in a domain with their interface there, by node."""
        return [(n, i) for n in self.nodes for i in n.interfaces if i.domain == domain_key]


def domain_of(netid: int, kind: str, owner: str | None, label: str | None = None
              ) -> TopoDomain:
    """D<netid> with its gateway: the outside world's in D0, khd's listener in D1."""
    gateway = str(host_address(netid).ip) if netid in (EXTERNAL, PUBLIC) else None
    return TopoDomain(f"D{netid}", label or f"D{netid} {kind}", netid, kind, owner, gateway)


def _int(d: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise UsageError(f"khd's answer has a bad {key!r}: {str(v)[:40]!r}",
                         "a kh and khd of the same version")
    return v


def from_ps(data: Mapping[str, Any], *, server: str = "127.0.0.1", ssh_port: int | None = None,
            view: str | None = None) -> Topology:
    """The topology in ``data``, kh ps's JSON ({"allocations", "nodes", "domains",
    "publishes", "pool"}; a principal's has "principal"). Nodes not in an allocation (the
    pool) are counted, not drawn. ``ssh_port`` completes the control channels' addresses.
    UsageError when the answer is not of that shape."""
    try:
        return _from_ps(data, server, ssh_port, view)
    except (KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"khd's answer is not kh ps's JSON ({type(e).__name__}: {e})",
                         "a kh and khd of the same version") from None


def _from_ps(data: Mapping[str, Any], server: str, ssh_port: int | None, view: str | None
             ) -> Topology:
    who = view or data.get("principal") or "operator"
    domains = {}
    for d in data["domains"]:
        netid = _int(d, "netid", 0, MAX_NETID)
        kind = d["kind"] if d["kind"] in KINDS else "private"
        domains[netid] = domain_of(netid, kind, d.get("owner"))
    port = f" -p {ssh_port}" if ssh_port else ""
    allocs: list[TopoAllocation] = []
    owner: dict[int, tuple[str, str]] = {}
    for a in data["allocations"]:
        aid = _int(a, "id", 0, 1 << 31)
        members = tuple(f"n{_int({'n': n}, 'n', 1, MAX_NODE)}" for n in a["nodes"])
        key = f"A{aid}"
        allocs.append(TopoAllocation(key, f"allocation {aid}", str(a["principal"]),
                                     f"con{aid}@{server}{port}", members))
        for n in a["nodes"]:
            owner[n] = (key, str(a["principal"]))
    nodes: list[TopoNode] = []
    free = 0
    for n in data["nodes"]:
        number = _int(n, "node", 1, MAX_NODE)
        if n.get("allocation") is None or number not in owner:
            free += n.get("state") == "free"
            continue
        ifs = []
        for slot, netid in enumerate((n.get("netids") or [])[:NIC_SLOTS]):
            if netid is None:
                continue
            netid = _int({"netid": netid}, "netid", 0, MAX_NETID)
            if netid not in domains:  # a domain the view does not list: still drawn
                domains[netid] = domain_of(netid, "private" if netid > PUBLIC else
                                           KINDS[netid], None)
            ifs.append(Interface(slot, f"D{netid}", nic_mac(number, slot),
                                 str(node_address(netid, number))))
        akey, principal = owner[number]
        nodes.append(TopoNode(f"n{number}", f"node {number}", number, str(n["state"]),
                              principal, akey, tuple(ifs)))
    ports = tuple(TopoPort(_int(p, "host_port", 1, 65535), f"n{_int(p, 'node', 1, MAX_NODE)}",
                           _int(p, "port", 1, 65535), str(p["principal"]))
                  for p in data.get("publishes") or ())
    used = {i.domain for n in nodes for i in n.interfaces}
    # the shared domains always; private ones that someone in the view owns or uses
    shown = [d for d in domains.values() if d.netid is not None and
             (d.netid <= PUBLIC or d.key in used or d.owner is not None)]
    principals = _names([a.principal for a in allocs] +
                        [d.owner for d in shown if d.owner] +
                        ([who] if who != "operator" else []))
    return Topology("running", who, principals, tuple(sorted(allocs, key=_alloc_order)),
                    tuple(sorted(nodes, key=lambda n: n.number or 0)),
                    tuple(sorted(shown, key=lambda d: d.netid or 0)),
                    tuple(sorted(ports, key=lambda p: p.host_port)),
                    _free(data) if _free(data) is not None or who != "operator" else free)


def _free(data: Mapping[str, Any]) -> int | None:
    pool = data.get("pool")
    v = pool.get("free") if isinstance(pool, Mapping) else None
    return v if isinstance(v, int) else None


def _alloc_order(a: TopoAllocation) -> tuple[str, int]:
    return (a.principal, int(a.key[1:]) if a.key[1:].isdigit() else 0)


def _names(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(names)))
