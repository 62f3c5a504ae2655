"""Domains change while nodes run: `kh domain join|leave NODE NETID` plugs a running node's
free interface into a domain, or unplugs it, with no reboot (the paper: "domains form a
physical communication topology to which nodes can be added and removed via requests to the
system service interface").

A node's *slot map* is the domain of each of its NIC_SLOTS interfaces (eth0, eth1, ...; None:
free). It is its allocation's domains in khget's order until the node first joins or leaves;
from then on it is the node's own, kept in the table ``node_domains`` (one row per slot, netid
NULL for a free one). Triggers drop a node's rows whenever its row is replaced, deleted or
moves to another allocation, so a fresh node never inherits another's wiring.

Order of the steps, so that a crash leaves the old membership or the new one:

- join: the state first (one transaction), then the tap onto the domain's bridge
  (Fabric.attach), then the NIC's carrier up (QMP set_link);
- leave: the tap off the bridge first (isolation: from then on no frame of the domain reaches
  the node), then the carrier down, then the state;
- at khd's start (``reconcile``), every tap of a node with its own slot map is put where the
  state says, and its carriers set: a join cut short is finished, a leave cut short undone
  (its caller had no answer).

A reset boots the node afresh, so its slot map is closed up then (``reset_domains``): the
domains keep their order and take eth0, eth1, ... again, and the boot keys name them so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from kh.allocation import NIC_SLOTS, AllocationError, host_address, node_address
from kh.model import EXTERNAL, PUBLIC, Domain, DomainKind, NodeState
from kh.store import AllocRow, Store

if TYPE_CHECKING:
    from kh.service.core import Service

log = logging.getLogger("kh.service")
SlotMap = tuple["int | None", ...]  # netid per interface slot, eth0 first; None: free

# Not a schema version of kh.store's: the table and its triggers are made if missing, in one
# transaction, and an older kh that does not know them leaves them alone.
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS node_domains ("
    " number INTEGER NOT NULL, slot INTEGER NOT NULL, netid INTEGER,"
    " PRIMARY KEY (number, slot))",
    "CREATE TRIGGER IF NOT EXISTS node_domains_deleted AFTER DELETE ON nodes BEGIN"
    " DELETE FROM node_domains WHERE number = OLD.number; END",
    "CREATE TRIGGER IF NOT EXISTS node_domains_inserted AFTER INSERT ON nodes BEGIN"
    " DELETE FROM node_domains WHERE number = NEW.number; END",
    "CREATE TRIGGER IF NOT EXISTS node_domains_moved AFTER UPDATE OF alloc ON nodes"
    " WHEN OLD.alloc IS NOT NEW.alloc BEGIN"
    " DELETE FROM node_domains WHERE number = NEW.number; END",
)


def ensure_schema(store: Store) -> None:
    with store.tx() as db:
        for statement in SCHEMA:
            db.execute(statement)


def trim(slots: SlotMap) -> SlotMap:
    """Without the free slots at the end."""
    out = list(slots)
    while out and out[-1] is None:
        out.pop()
    return tuple(out)


def own_map(store: Store, number: int) -> SlotMap | None:
    """The node's own slot map, or None while it has the allocation's."""
    with store.tx() as db:
        rows = db.execute("SELECT slot, netid FROM node_domains WHERE number=? ORDER BY slot",
                          (number,)).fetchall()
    if not rows:
        return None
    slots: list[int | None] = [None] * NIC_SLOTS
    for slot, netid in rows:
        slots[slot] = netid
    return trim(tuple(slots))


def node_map(store: Store, number: int, alloc: AllocRow) -> SlotMap:
    """The node's domains by interface slot (trailing free slots left out)."""
    own = own_map(store, number)
    return alloc.netids if own is None else own


def put_map(store: Store, number: int, slots: SlotMap) -> None:
    """The node's own slot map, in one transaction."""
    padded = list(slots) + [None] * (NIC_SLOTS - len(slots))
    with store.tx() as db:
        db.execute("DELETE FROM node_domains WHERE number=?", (number,))
        db.executemany("INSERT INTO node_domains VALUES (?, ?, ?)",
                       [(number, s, n) for s, n in enumerate(padded)])


def alloc_map(store: Store, alloc: AllocRow) -> SlotMap:
    """The allocation's domains by slot, as its text object shows them: its nodes' slot map
    where they all agree; a slot where they differ shows as free (`kh ps` has each node's)."""
    maps = [node_map(store, r.number, alloc) for r in store.nodes_of(alloc.id)]
    if not maps:
        return alloc.netids
    width = max(len(m) for m in maps)
    common = [m[0] if len(set(m)) == 1 else None for m in
              zip(*(tuple(x) + (None,) * (width - len(x)) for x in maps), strict=True)]
    return trim(tuple(common))


def in_use(store: Store, netid: int) -> bool:
    """A node of a live allocation has joined domain ``netid`` (beyond its allocation's)."""
    with store.tx() as db:
        return db.execute(
            "SELECT 1 FROM node_domains nd JOIN nodes n ON n.number = nd.number "
            "JOIN allocations a ON a.id = n.alloc WHERE nd.netid=? AND a.released IS NULL "
            "LIMIT 1", (netid,)).fetchone() is not None


def domain_of(store: Store, netid: int, owner: str) -> Domain:
    if netid == EXTERNAL:
        return Domain(EXTERNAL, DomainKind.EXTERNAL, None)
    if netid == PUBLIC:
        return Domain(PUBLIC, DomainKind.PUBLIC, None)
    return Domain(netid, DomainKind.PRIVATE, owner)


def tap_master(svc: Service, number: int, slot: int) -> int | None:
    """The domain whose bridge the node's tap ``slot`` is on now (None: none, or no tap)."""
    cfg = svc.fabric.cfg
    with svc.fabric.ns() as ns:
        tap = ns.link_lookup(ifname=cfg.tap(number, slot))
        master = ns.get_links(tap[0])[0].get_attr("IFLA_MASTER") if tap else None
        if not master:
            return None
        name = str(ns.get_links(master)[0].get_attr("IFLA_IFNAME"))
    prefix = cfg.bridge(0)[:-1]
    tail = name[len(prefix):]
    return int(tail) if name.startswith(prefix) and tail.isdigit() else None


def set_carrier(svc: Service, number: int, slot: int, up: bool) -> None:
    """The carrier of the node's NIC ``slot`` (the backend's link up/down)."""
    svc.nodes.set_link(number, slot, up)


@dataclass(frozen=True)
class Change:
    """One join or leave, as answered: the node, the domain, its interface, the address kh
    computes for the node there, and the node's slot map after it."""

    node: int
    netid: int
    slot: int
    joined: bool
    slots: SlotMap

    @property
    def address(self) -> str:
        return str(node_address(self.netid, self.node))

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "netid": self.netid, "interface": f"eth{self.slot}",
                "joined" if self.joined else "left": True,
                "address": self.address if self.joined else None,
                "netids": list(self.slots)}

    def text(self) -> str:
        dev = f"eth{self.slot}"
        if not self.joined:
            return f"node {self.node} left domain {self.netid}: {dev} is unplugged\n"
        gw = f" (gateway {host_address(EXTERNAL).ip})" if self.netid == EXTERNAL else ""
        return (f"node {self.node} joined domain {self.netid} on {dev}: address "
                f"{self.address}{gw}\n"
                f"on the node: ip addr add {self.address} dev {dev} && ip link set {dev} up\n")


def _owned_node(svc: Service, number: int, user: str) -> AllocRow:
    """Under the lock: the principal's allocated, running node's allocation, with no reset
    under way (one is waited for); another's node is answered as one that does not exist."""
    while True:
        row = svc.store.node(number)
        alloc = None if row is None or row.alloc is None else svc.store.allocation(row.alloc)
        if row is None or alloc is None or alloc.released is not None or \
                alloc.principal != user or row.state not in (NodeState.ALLOCATED,
                                                             NodeState.FAILED):
            raise_not_found(f"principal {user} has no allocated node {number}")
        if svc._await_resets([number]):
            break
    if row.state != NodeState.ALLOCATED or number not in svc.nodes.running:
        raise_not_found(f"node {number} is not running ({row.state.value})")
    return alloc


def raise_not_found(message: str) -> NoReturn:
    from kh.service.core import NotFound  # core uses this module
    raise NotFound(message)


def _check_domain(svc: Service, netid: int, user: str) -> None:
    """The principal may put its node in ``netid``: a shared domain, or a private one of its
    own (another's answered exactly like one that does not exist)."""
    if netid in (EXTERNAL, PUBLIC):
        return
    if svc.store.private_owners().get(netid) != user:
        raise_not_found(f"principal {user} has no private domain {netid}")


def join(svc: Service, number: int, netid: int, user: str, credential: str | None) -> Change:
    """Plug the node's lowest free interface into domain ``netid``. NotFound (404): not the
    principal's running node or domain; AllocationError (409): already in it, or no free
    interface (NIC_SLOTS)."""
    with svc.admitted(user, credential):
        alloc = _owned_node(svc, number, user)
        _check_domain(svc, netid, user)
        slots = list(node_map(svc.store, number, alloc)) + [None] * NIC_SLOTS
        slots = slots[:NIC_SLOTS]
        if netid in slots:
            raise AllocationError(f"node {number} is already in domain {netid} "
                                  f"(eth{slots.index(netid)})")
        if None not in slots:
            raise AllocationError(
                f"node {number} has no free interface: all {NIC_SLOTS} (NIC_SLOTS) are in "
                "domains", f"`kh domain leave -u {user} {number} NETID` frees one")
        slot = slots.index(None)
        before = tuple(slots)
        slots[slot] = netid
        after = trim(tuple(slots))
        svc.fabric.ensure_domain(netid)
        put_map(svc.store, number, after)
        try:
            svc.fabric.attach(number, slot, netid)
            set_carrier(svc, number, slot, True)
        except BaseException:
            _unplug(svc, number, slot)
            put_map(svc.store, number, trim(before))
            raise
        log.info("node %d joined domain %d on eth%d", number, netid, slot)
        return Change(number, netid, slot, True, after)


def _unplug(svc: Service, number: int, slot: int) -> None:
    """Off the bridge first, then the carrier down (a carrier that cannot be set is logged:
    the tap is already on no bridge)."""
    svc.fabric.attach(number, slot, None)
    try:
        set_carrier(svc, number, slot, False)
    except Exception as e:
        log.warning("node %d: eth%d is unplugged but its carrier stays up: %s", number, slot, e)


def leave(svc: Service, number: int, netid: int, user: str, credential: str | None) -> Change:
    """Unplug the node's interface in domain ``netid``: off the bridge before anything else.
    NotFound (404) as for join; AllocationError (409): the node is not in that domain."""
    with svc.admitted(user, credential):
        alloc = _owned_node(svc, number, user)
        _check_domain(svc, netid, user)
        slots = list(node_map(svc.store, number, alloc))
        if netid not in slots:
            raise AllocationError(f"node {number} is not in domain {netid}")
        slot = slots.index(netid)
        if own_map(svc.store, number) is None:
            # the node's own map first, as it is: a khd that dies after the unplug then finds
            # one, and puts the tap back where it says (reconcile)
            put_map(svc.store, number, tuple(slots))
        _unplug(svc, number, slot)
        slots[slot] = None
        after = trim(tuple(slots))
        put_map(svc.store, number, after)
        log.info("node %d left domain %d (eth%d)", number, netid, slot)
        return Change(number, netid, slot, False, after)


def reset_domains(svc: Service, number: int, alloc: AllocRow) -> tuple[Domain, ...]:
    """Under the lock, before a reset: the node's domains closed up (eth0, eth1, ... in
    their order), stored as its slot map if it has its own."""
    slots = node_map(svc.store, number, alloc)
    closed = tuple(n for n in slots if n is not None)
    if own_map(svc.store, number) is not None and closed != slots:
        put_map(svc.store, number, closed)
    return tuple(domain_of(svc.store, n, alloc.principal) for n in closed)


def reconcile(svc: Service) -> list[str]:
    """At khd's start, after the bridges are made: every running allocated node with its own
    slot map gets its taps where the state says and its carriers set. Returns the repairs
    (one line per tap that was elsewhere)."""
    repairs = []
    for row in svc.store.nodes(NodeState.ALLOCATED):
        own = own_map(svc.store, row.number)
        if own is None or row.number not in svc.nodes.running:
            continue
        padded = list(own) + [None] * (NIC_SLOTS - len(own))
        for slot, netid in enumerate(padded):
            was: int | str | None
            try:  # another host's tap is not read from here: set all the same, unreported
                was = tap_master(svc, row.number, slot) if svc.host_of(row.number) == "local" \
                    else netid
            except Exception as e:  # then it is set all the same
                log.warning("node %d eth%d: cannot read its bridge: %s", row.number, slot, e)
                was = "unknown"
            try:
                if netid is None:
                    _unplug(svc, row.number, slot)
                else:
                    svc.fabric.attach(row.number, slot, netid)
                    set_carrier(svc, row.number, slot, True)
            except Exception as e:
                log.warning("node %d eth%d: cannot put it in domain %s: %s", row.number, slot,
                            netid, e)
                continue
            if was != netid:
                repairs.append(f"node {row.number}: eth{slot} was in domain {was}, the state "
                               f"says {netid} (a join or leave was cut short); set so")
    return repairs
