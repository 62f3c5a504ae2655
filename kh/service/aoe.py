"""AoE addresses that are unique per domain: khd hands each disk node its shelf.slot.

AoE has no arbiter. Two targets answering one shelf.slot in a domain look to an initiator like
two paths to one disk, and its writes are spread over both (a file server's volume then breaks
with no word of why). So khgetdisk asks khd for each disk node's address, and khd gives out the
lowest slot of the shelf that no live node holds in that domain (nor one the caller says
already answers there: a disk the principal booted by hand with ``kh.aoe``).

The addresses live in table ``aoe_addresses`` of khd's state, one row per (domain, shelf, slot)
with the node's uid (never given to a later node). An address is held for exactly as long as
its node is in the state and in that domain: once a release or a principal's removal drops
the node's row, or the node leaves the domain (kh domain leave, kh.service.membership), the
address is free; each request first purges such rows. The table is this module's own, made
when first needed (``CREATE TABLE IF NOT EXISTS``): nothing else in the state refers to it, so
the schema's versions (kh.store_schema) need not know it.

Routes (kh.service.api serves ROUTES):
  POST /v1/aoe/addresses       {user, credential, node, netid, shelf=1, avoid=[slots]}
                               -> 201 "e1.0" (200 when the node already had it)
  POST /v1/aoe/addresses/list  {user, credential, netid?} -> the principal's addresses
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from kh.allocation import MAX_NETID, MAX_NODE, AllocationError
from kh.errors import UsageError
from kh.model import NodeState
from kh.service import membership, tokens
from kh.service import request as rq
from kh.service.core import NotFound, Service
from kh.service.request import Caller
from kh.store import Store

MAX_SHELF = 65534  # 0xffff is the broadcast shelf: no disk may have it
MAX_SLOT = 254  # 0xff is the broadcast slot

TABLE = """CREATE TABLE IF NOT EXISTS aoe_addresses (
    netid INTEGER NOT NULL, shelf INTEGER NOT NULL, slot INTEGER NOT NULL,
    uid INTEGER NOT NULL, assigned REAL NOT NULL,
    PRIMARY KEY (netid, shelf, slot), UNIQUE (uid, netid))"""


@dataclass(frozen=True)
class Address:
    """One disk node's AoE address in one domain."""

    netid: int
    shelf: int
    slot: int
    node: int

    @property
    def name(self) -> str:
        """As vblade and /dev/etherd name it: ``e1.0``."""
        return f"e{self.shelf}.{self.slot}"

    def to_json(self) -> dict[str, Any]:
        return {"address": self.name, "netid": self.netid, "shelf": self.shelf,
                "slot": self.slot, "node": self.node}


def _purge(store: Store, db: sqlite3.Connection) -> None:
    """Make the table if it is not there yet; drop the addresses whose node is gone, or is
    no longer in that domain (it left it: kh domain leave, kh.service.membership)."""
    db.execute(TABLE)
    db.execute("DELETE FROM aoe_addresses WHERE uid NOT IN (SELECT uid FROM nodes)")
    for netid, uid, number, alloc_id in db.execute(
            "SELECT x.netid, x.uid, n.number, n.alloc FROM aoe_addresses x "
            "JOIN nodes n ON n.uid = x.uid").fetchall():
        alloc = None if alloc_id is None else store.allocation(alloc_id)
        if alloc is None or netid not in membership.node_map(store, number, alloc):
            db.execute("DELETE FROM aoe_addresses WHERE netid=? AND uid=?", (netid, uid))


def lowest_free(taken: set[int], avoid: set[int]) -> int | None:
    """The lowest slot 0..MAX_SLOT in neither set; None when the shelf is full."""
    return next((s for s in range(MAX_SLOT + 1) if s not in taken and s not in avoid), None)


def assign(svc: Service, user: str, credential: str | None, node: int, netid: int,
           shelf: int, avoid: tuple[int, ...] = (), token: str | None = None
           ) -> tuple[Address, bool]:
    """Give the principal's allocated ``node`` an address on ``shelf`` in domain ``netid``
    (one of its node's domains), skipping the slots in ``avoid``. Returns (address, new):
    a node that already has one in that domain gets it again (new False).

    Errors: NotFound (404) when the node is not the principal's allocated node (another's
    looks the same as none); AllocationError (409) when the node is not in ``netid``, holds
    an address on another shelf there, or the shelf has no free slot; AuthError (403).
    A ``token`` (kh.service.tokens) serves only for the nodes of allocations it made."""
    with tokens.admit_node(svc, user, credential, token, node):
        row = svc.store.node(node)
        alloc = None if row is None or row.alloc is None else svc.store.allocation(row.alloc)
        if row is None or alloc is None or alloc.released is not None or \
                alloc.principal != user or row.state != NodeState.ALLOCATED:
            raise NotFound(f"principal {user} has no allocated node {node}")
        doms = [n for n in membership.node_map(svc.store, node, alloc) if n is not None]
        if netid not in doms:
            raise AllocationError(f"node {node} is not in domain {netid}",
                                  f"its domains are {', '.join(map(str, doms)) or 'none'}")
        with svc.store.tx() as db:
            _purge(svc.store, db)
            had = db.execute("SELECT shelf, slot FROM aoe_addresses WHERE uid=? AND netid=?",
                             (row.uid, netid)).fetchone()
            if had is not None:
                if had[0] != shelf:
                    raise AllocationError(
                        f"node {node} already has address e{had[0]}.{had[1]} in domain {netid}",
                        "one disk per node: ask for that shelf, or release the node")
                return Address(netid, had[0], had[1], node), False
            taken = {r[0] for r in db.execute(
                "SELECT slot FROM aoe_addresses WHERE netid=? AND shelf=?", (netid, shelf))}
            slot = lowest_free(taken, set(avoid))
            if slot is None:
                raise AllocationError(f"shelf {shelf} of domain {netid} has no free slot "
                                      f"({len(taken)} held by nodes, {len(set(avoid))} "
                                      "answering already)", "use another shelf")
            db.execute("INSERT INTO aoe_addresses VALUES (?, ?, ?, ?, ?)",
                       (netid, shelf, slot, row.uid, time.time()))
            return Address(netid, shelf, slot, node), True


def addresses(svc: Service, user: str, credential: str | None,
              netid: int | None = None) -> list[Address]:
    """The addresses the principal's live nodes hold (in domain ``netid`` only, if given),
    by domain, shelf and slot. AuthError (403) on a wrong credential."""
    with svc.admitted(user, credential), svc.store.tx() as db:
        _purge(svc.store, db)
        rows = db.execute(
            "SELECT x.netid, x.shelf, x.slot, n.number FROM aoe_addresses x "
            "JOIN nodes n ON n.uid = x.uid JOIN allocations a ON a.id = n.alloc "
            "WHERE a.principal=? AND a.released IS NULL AND (? IS NULL OR x.netid=?) "
            "ORDER BY x.netid, x.shelf, x.slot", (user, netid, netid)).fetchall()
    return [Address(*r) for r in rows]


# -- the routes (kh.service.api) ------------------------------------------------------------
Result = tuple[int, str, Any]


def _required(body: dict[str, Any], key: str, lo: int, hi: int) -> int:
    if body.get(key) is None:
        raise UsageError(f"`{key}` is required (an integer from {lo} to {hi})")
    return rq.integer(body, key, lo, lo, hi)


@rq.takes(*rq.PRINCIPAL, "token", "node", "netid", "shelf", "avoid")
def route_assign(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    a, new = assign(svc, rq.user(body), rq.credential(body),
                    _required(body, "node", 1, MAX_NODE), _required(body, "netid", 0, MAX_NETID),
                    rq.integer(body, "shelf", 1, 0, MAX_SHELF),
                    rq.integers(body, "avoid", MAX_SLOT), tokens.from_body(body))
    return (201 if new else 200), a.name + "\n", a.to_json()


@rq.takes(*rq.PRINCIPAL, "netid")
def route_list(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    netid = None if body.get("netid") is None else rq.integer(body, "netid", 0, 0, MAX_NETID)
    found = addresses(svc, rq.user(body), rq.credential(body), netid)
    text = "".join(f"{a.name} node {a.node} domain {a.netid}\n" for a in found)
    return 200, text, [a.to_json() for a in found]


ROUTES = [
    ("POST", r"/v1/aoe/addresses", route_assign),
    ("POST", r"/v1/aoe/addresses/list", route_list),
]
