"""What `kh ps` and `kh principal list` show: the operator's view of everything, and one
principal's view of its own (no other principal's names, allocation ids or node PIDs).

Both views have one shape: {"allocations": [...], "nodes": [...], "domains": [...],
"pool": PoolStatus JSON, "repairs": [...]}; a principal's adds "principal" and "quota".
"""

from __future__ import annotations

import time
from typing import Any

from kh.model import DomainKind
from kh.service import membership
from kh.service.config import ServiceConfig
from kh.service.pool import note, summarize
from kh.store import AllocRow, NodeRow, Store


def _node(store: Store, allocs: dict[int, AllocRow], n: NodeRow, now: float, *, pid: bool
          ) -> dict[str, Any]:
    """A node; "netids": its domains by interface (null: free), for an allocated node."""
    a = allocs.get(n.alloc) if n.alloc is not None else None
    return {"node": n.number, "uid": n.uid, "state": n.state.value,
            "pid": n.pid if pid else None, "allocation": n.alloc, "reason": n.reason,
            "attempts": n.attempts, "retry_at": n.retry_at, "note": note(n, now),
            "netids": None if a is None else list(membership.node_map(store, n.number, a)),
            "host": n.host}


def operator(store: Store, cfg: ServiceConfig, repairs: list[str], size: int | None = None
             ) -> dict[str, Any]:
    """Every allocation, node (with its QEMU's PID and its host) and domain, the pool (of
    ``size`` nodes on all hosts; default the service's ``nodes``), khd's repairs."""
    nodes = store.nodes()
    now = time.time()
    allocs = {a.id: a for a in store.allocations()}
    return {
        "allocations": [{"id": a.id, "principal": a.principal,
                         "netids": list(membership.alloc_map(store, a)),
                         "nodes": [n.number for n in nodes if n.alloc == a.id],
                         "created": a.created} for a in allocs.values()],
        "nodes": [_node(store, allocs, n, now, pid=True) for n in nodes],
        "domains": [{"netid": d.netid, "kind": d.kind.value, "owner": d.owner}
                    for d in store.domains()],
        "pool": summarize(nodes, cfg.nodes if size is None else size).to_json(),
        "repairs": repairs,
    }


def principal(store: Store, cfg: ServiceConfig, user: str, size: int | None = None
              ) -> dict[str, Any]:
    """``user``'s live allocations and their nodes (with states, without PIDs), its private
    domains and the shared ones, the pool's counts (no node of another principal is named),
    and its quotas: {"nodes": [held, quota], "domains": [held, quota]}."""
    nodes = store.nodes()
    now = time.time()
    allocs = [a for a in store.allocations() if a.principal == user]
    ids = {a.id for a in allocs}
    mine = [n for n in nodes if n.alloc in ids]
    domains = [d for d in store.domains() if d.kind != DomainKind.PRIVATE or d.owner == user]
    pool = summarize(nodes, cfg.nodes if size is None else size).to_json()
    # the pool's own failures name pool nodes only; a node that died in another principal's
    # allocation is counted in "lost", never named
    return {
        "principal": user,
        "allocations": [{"id": a.id, "principal": user,
                         "netids": list(membership.alloc_map(store, a)),
                         "nodes": [n.number for n in mine if n.alloc == a.id],
                         "created": a.created} for a in allocs],
        "nodes": [_node(store, {a.id: a for a in allocs}, n, now, pid=False) for n in mine],
        "domains": [{"netid": d.netid, "kind": d.kind.value, "owner": d.owner}
                    for d in domains],
        "pool": pool,
        "repairs": [],
        "quota": {"nodes": [store.held_nodes(user), cfg.node_quota],
                  "domains": [sum(d.owner == user for d in domains), cfg.domain_quota]},
    }
