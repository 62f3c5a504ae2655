"""At khd's start, before anything is served: finish or undo the changes a khd that died left
half-done (see kh.store and kh.service.core).

- a node `configuring` belonged to a khget that never committed: the request is undone (nothing
  of it is in the state), and the node, which may hold the principal's khargs and wiring, is
  scrapped: its QEMU stopped, its row dropped, so the pool starts a fresh one;
- a node `releasing` was being given back: the release is finished the same way, and its
  allocation released once no node is left in it;
- a principal `removing` is removed: its rows go in one transaction (the bridges of its domains
  then go with the fabric's sync to the state).

Resets cut short are done again once the nodes are adopted (``resume_resets``).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from kh.errors import KhError
from kh.hw.backend import Backend
from kh.model import Domain, NodeState
from kh.service import membership
from kh.service.config import ServiceConfig
from kh.store import Store

if TYPE_CHECKING:
    from kh.service.core import Service

log = logging.getLogger("kh.service")


def recover(store: Store, cfg: ServiceConfig, nodes: Backend) -> list[str]:
    """Do it; return one line per repair, for `kh ps` and khd's log. ``nodes`` (the backend)
    stops what the half-done requests' nodes left running."""
    repairs = []
    half = store.nodes(NodeState.CONFIGURING, NodeState.RELEASING)
    for r in half:  # only if the recorded process (domain) is still the node's
        nodes.kill_recorded(r.number, r.pid)
    if half:
        released = store.drop_nodes([r.number for r in half])
        for r in half:
            what = ("being configured for a khget that did not finish" if
                    r.state == NodeState.CONFIGURING else "being released")
            repairs.append(f"node {r.number}: was {what} when khd stopped; its QEMU is "
                           "stopped and a fresh node takes its place")
        repairs += [f"allocation {a}: released (its release was under way)" for a in released]
    for name in store.removing_principals():
        gone = store.forget_principal(name)
        repairs.append(f"principal {name}: removed (its removal was under way; domains "
                       f"{gone['domains'] or 'none'})")
    return repairs


def resume_resets(svc: Service) -> list[str]:
    """After the nodes are adopted: resets a dead khd had begun are done again, each in the
    background (a release of the node waits for it, as for any reset); a node that did not
    come back from khd's absence just loses the mark. Returns the repairs."""
    todo = []
    with svc.lock:
        for row in svc.store.nodes(NodeState.ALLOCATED, NodeState.FAILED):
            if not row.resetting:
                continue
            if row.state == NodeState.ALLOCATED and row.alloc is not None \
                    and row.number in svc.nodes.running:
                alloc = svc.store.allocation(row.alloc)
                if alloc is None:
                    continue
                svc._resetting.add(row.number)
                todo.append((row.number, membership.reset_domains(svc, row.number, alloc)))
            else:
                svc.store.node_resetting(row.number, False)

    def again(number: int, domains: tuple[Domain, ...]) -> None:
        try:
            svc._do_reset(number, domains)
        except KhError as e:
            log.warning("%s", e)

    for number, domains in todo:
        threading.Thread(target=again, args=(number, domains), daemon=True,
                         name=f"reset{number}").start()
    return [f"node {n}: was being reset when khd stopped; resetting it again" for n, _ in todo]
