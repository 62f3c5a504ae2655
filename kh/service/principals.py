"""The operator removes a principal (`kh principal rm`; kh.service.core.Service's request,
moved here to keep core small)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kh import admission

if TYPE_CHECKING:
    from kh.service.core import Service

log = logging.getLogger("kh.service")


def remove(svc: Service, name: str) -> dict[str, Any]:
    """The operator removes a principal: its allocations are released (nodes back to the
    pool as fresh QEMUs), its private domains (bridges), keys and itself removed; marked
    first, then every row in one transaction. Returns {"removed": name, "allocations":
    [ids], "nodes": [numbers], "domains": [netids], "keys": count}; NotFound if none."""
    from kh.service.core import NotFound
    admission.check_user(name)
    with svc.lock:
        while True:
            if svc.store.principal(name) is None:
                raise NotFound(f"no principal {name}", "kh principal list shows them")
            numbers = [n.number for a in svc.store.allocations() if a.principal == name
                       for n in svc.store.nodes_of(a.id)]
            if svc._await_resets(numbers):
                break
        svc.store.principal_removing(name, numbers)
        svc.meter.sample(numbers)
        for n in numbers:
            svc.nodes.stop(n)
        gone = svc.store.forget_principal(name)
        svc.publish_sync()
    svc._drop_bridges(gone["domains"])
    svc.pool.wake()
    log.info("principal %s removed: %s", name, gone)
    return {"removed": name, "allocations": gone["allocations"], "nodes": gone["nodes"],
            "domains": gone["domains"], "keys": len(gone["keys"])}
