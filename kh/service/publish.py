"""`kh publish NODE PORT [HOSTPORT]`: a port of an external-domain node on the host's loopback,
as `docker run -p 127.0.0.1:HOSTPORT:PORT` does for a container.

khd listens on 127.0.0.1:HOSTPORT (loopback only; never another address) and relays each
connection to the node's PORT at its external address (10.0.x.y) from the outside world's
namespace (kh.service.forward; kh.hw.outside), so nothing new is opened in kh's fabric: the
connection reaches the node exactly as one from the outside world does. Any local user of the
host can connect to a published port, as to one Docker publishes there.

Only the node's owner may publish it, and only while the node is allocated, not being reset,
and in the external domain; another principal's node is answered exactly as one that does not
exist (404). A published port lasts until the principal removes it (`kh unpublish`), or its
node is released, reset or leaves the external domain, or its principal is removed: core's
hooks call ``sync`` after each of those, and a sweep every few seconds catches the rest (a node
that died). Each new connection is checked against the state first.

The publishes live in table ``publishes`` of khd's state (this module's own, made when first
needed, as kh.service.aoe's): a restarted khd opens them again (``restore``), those whose node
is gone or whose port another program took meanwhile are dropped and listed in its repairs.
Connections open when khd stopped are cut.

Bounds: MAX_PER_PRINCIPAL publishes per principal and MAX_PUBLISHES in all (409 past them);
host ports 1024 to 65535 (a principal never takes a privileged port of the host);
connections, idle time and buffers as kh.service.forward.Limits says.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from kh.allocation import AllocationError, node_address
from kh.errors import UsageError
from kh.model import EXTERNAL, NodeState
from kh.service import membership
from kh.service import request as rq
from kh.service.core import NotFound, Service
from kh.service.request import Caller
from kh.store import Store

log = logging.getLogger("kh.publish")
MAX_PER_PRINCIPAL = 16
MAX_PUBLISHES = 256
MIN_HOST_PORT = 1024  # below it only root may listen; khd is root, a principal is not

TABLE = """CREATE TABLE IF NOT EXISTS publishes (
    host_port INTEGER PRIMARY KEY, uid INTEGER NOT NULL, number INTEGER NOT NULL,
    port INTEGER NOT NULL, principal TEXT NOT NULL, created REAL NOT NULL)"""


@dataclass(frozen=True)
class Published:
    """127.0.0.1:``host_port`` forwarded to node ``node``'s ``port`` (node id ``uid``)."""

    host_port: int
    node: int
    uid: int
    port: int
    principal: str

    @property
    def address(self) -> str:
        """The node's address in the external domain, where connections go."""
        return str(node_address(EXTERNAL, self.node).ip)

    def text(self) -> str:
        return (f"127.0.0.1:{self.host_port} -> node {self.node} port {self.port} "
                f"({self.address})")

    def to_json(self, connections: int | None = None) -> dict[str, Any]:
        return {"host": "127.0.0.1", "host_port": self.host_port, "node": self.node,
                "port": self.port, "address": self.address, "principal": self.principal,
                "connections": connections}


def _rows(db: sqlite3.Connection, where: str = "", args: tuple[object, ...] = ()
          ) -> list[Published]:
    db.execute(TABLE)
    return [Published(*r) for r in db.execute(
        "SELECT host_port, number, uid, port, principal FROM publishes "
        f"{where} ORDER BY host_port", args).fetchall()]


def why_not(store: Store, p: Published) -> str | None:
    """None while ``p`` may be forwarded: its node (the same uid) is its principal's,
    allocated, not being reset and in the external domain; else what stops it."""
    row = store.node(p.node)
    alloc = None if row is None or row.alloc is None else store.allocation(row.alloc)
    if row is None or row.uid != p.uid or alloc is None or alloc.released is not None or \
            alloc.principal != p.principal:
        return f"node {p.node} was released"
    if row.state != NodeState.ALLOCATED:
        return f"node {p.node} is {row.state.value}"
    if row.resetting:
        return f"node {p.node} was reset"
    if EXTERNAL not in membership.node_map(store, p.node, alloc):
        return f"node {p.node} left the external domain"
    return None


def _purge(store: Store, reset: int | None = None) -> list[tuple[Published, str]]:
    """Drop (in one transaction) the publishes that may no longer be forwarded, and node
    ``reset``'s; returns them with why."""
    gone = []
    with store.tx() as db:
        for p in _rows(db):
            why = f"node {p.node} was reset" if p.node == reset else why_not(store, p)
            if why is not None:
                db.execute("DELETE FROM publishes WHERE host_port=?", (p.host_port,))
                gone.append((p, why))
    return gone


def khd_ports(svc: Service) -> frozenset[int]:
    """khd's own ports on 127.0.0.1, which no publish may take: the API's, the control
    channel's and the live page's (when on). A restarted khd opens the publishes (restore)
    before it listens on these, so a publish on one would keep khd from its own port."""
    return frozenset(p for p in (svc.cfg.api_port, svc.cfg.ssh_port, svc.cfg.page_port) if p)


def _open(svc: Service, p: Published, host_port: int) -> int:
    """Forward 127.0.0.1:``host_port`` (0: a free one) to ``p``'s node; the port. Before each
    connection the forwarder asks again: the publish is still in the state, for the same
    node, and may still be forwarded."""
    def allowed(port: int) -> bool:
        with svc.store.tx() as db:
            rows = _rows(db, "WHERE host_port=?", (port,))
        return bool(rows) and rows[0].uid == p.uid and why_not(svc.store, rows[0]) is None

    return svc.forwards.open(host_port, (p.address, p.port), allowed)


def add(svc: Service, user: str, credential: str | None, node: int, port: int,
        host_port: int = 0) -> Published:
    """Publish the principal's node ``node``'s TCP ``port`` on 127.0.0.1:``host_port`` (0: a
    free port). NotFound (404) unless the node is the principal's allocated node (another's
    looks the same as none); AllocationError (409) when the node is not in the external
    domain, khd has no outside world, a bound is reached or the port is taken; AuthError."""
    if svc.cfg.outside_netns is None or not svc.forwards.running:
        raise AllocationError("khd runs without an outside world (--no-outside): nothing on "
                              "the host can reach the external domain",
                              "kh service stop, then kh service start without --no-outside")
    with svc.admitted(user, credential):
        row = svc.store.node(node)
        alloc = None if row is None or row.alloc is None else svc.store.allocation(row.alloc)
        if row is None or alloc is None or alloc.released is not None or \
                alloc.principal != user or row.state != NodeState.ALLOCATED:
            raise NotFound(f"principal {user} has no allocated node {node}")
        if row.resetting:
            raise AllocationError(f"node {node} is being reset", "publish it once it is back")
        if EXTERNAL not in membership.node_map(svc.store, node, alloc):
            raise AllocationError(f"node {node} is not in the external domain",
                                  f"khget -x gives it an interface there, or "
                                  f"`kh domain join {node} 0`")
        _purge(svc.store)
        with svc.store.tx() as db:
            held = len(_rows(db, "WHERE principal=?", (user,)))
            total = len(_rows(db))
        if held >= MAX_PER_PRINCIPAL:
            raise AllocationError(f"principal {user} has {held} published ports, the most "
                                  "one may have", "kh unpublish one first")
        if total >= MAX_PUBLISHES:
            raise AllocationError(f"khd forwards {total} published ports, the most it "
                                  "will", "try again once some are gone")
        if host_port in khd_ports(svc):
            raise AllocationError(f"port {host_port} on 127.0.0.1 is khd's own",
                                  "pick another, or leave it out for a free one")
        want = Published(host_port, node, row.uid, port, user)
        got = _open(svc, want, host_port)
        p = Published(got, node, row.uid, port, user)
        try:
            with svc.store.tx() as db:
                db.execute(TABLE)
                db.execute("INSERT INTO publishes VALUES (?, ?, ?, ?, ?, ?)",
                           (got, row.uid, node, port, user, time.time()))
        except BaseException:
            svc.forwards.close(got)
            raise
    log.info("principal %s published %s", user, p.text())
    return p


def remove(svc: Service, user: str, credential: str | None, host_port: int) -> Published:
    """Stop forwarding the principal's 127.0.0.1:``host_port`` and cut its connections.
    NotFound (404) when it is not the principal's (another's looks the same as none)."""
    with svc.admitted(user, credential):
        with svc.store.tx() as db:
            rows = _rows(db, "WHERE host_port=? AND principal=?", (host_port, user))
            if not rows:
                raise NotFound(f"principal {user} has no published port {host_port}")
            db.execute("DELETE FROM publishes WHERE host_port=?", (host_port,))
        svc.forwards.close(host_port)
    return rows[0]


def sync(svc: Service, reset: int | None = None) -> list[str]:
    """Drop the publishes that may no longer be forwarded (and node ``reset``'s), then close
    every forward the state does not hold; returns what was dropped, one line each. Under
    khd's lock, so that no publish is being added meanwhile."""
    with svc.lock:
        gone = _purge(svc.store, reset)
        if not svc.forwards.running:
            return []
        with svc.store.tx() as db:
            held = {p.host_port for p in _rows(db)}
        for port in set(svc.forwards.ports()) - held:
            svc.forwards.close(port)
    lines = [f"unpublished {p.text()}: {why}" for p, why in gone]
    for line in lines:
        log.info("%s", line)
    return lines


def restore(svc: Service) -> list[str]:
    """At khd's start: open every publish of the state again; those that may no longer be
    forwarded, or whose port is taken now, are dropped. Returns the repairs, one line each."""
    if not svc.forwards.running:  # no outside world any more: none can be served
        with svc.store.tx() as db:
            dropped = _rows(db)
            db.execute("DELETE FROM publishes")
        return [f"dropped the publish of {p.text()}: khd has no outside world" for p in dropped]
    repairs = [f"dropped the publish of {p.text()}: {why}" for p, why in _purge(svc.store)]
    with svc.store.tx() as db:
        held = _rows(db)
    for p in held:
        try:
            if p.host_port in khd_ports(svc):  # khd's, since its restart
                raise AllocationError(f"port {p.host_port} is khd's own now")
            _open(svc, p, p.host_port)
        except AllocationError as e:
            with svc.store.tx() as db:
                db.execute("DELETE FROM publishes WHERE host_port=?", (p.host_port,))
            repairs.append(f"dropped the publish of {p.text()}: {e.message}")
    return repairs


def listing(svc: Service, user: str | None = None) -> list[dict[str, Any]]:
    """The publishes (``user``'s only, if given) with their connections now, by host port."""
    with svc.store.tx() as db:
        rows = _rows(db) if user is None else _rows(db, "WHERE principal=?", (user,))
    conns = svc.forwards.ports()
    return [p.to_json(conns.get(p.host_port)) for p in rows]


def table(publishes: list[dict[str, Any]]) -> str:
    """`kh ps`'s lines for the published ports (none when there are none)."""
    if not publishes:
        return ""
    lines = ["", f"{'PUBLISHED':<16} {'NODE':>5} {'PORT':>5} {'ADDRESS':<12} {'CONNS':>5} "
             "PRINCIPAL"]
    for p in publishes:
        conns = "-" if p["connections"] is None else str(p["connections"])
        lines.append(f"127.0.0.1:{p['host_port']:<6} {p['node']:>5} {p['port']:>5} "
                     f"{p['address']:<12} {conns:>5} {p['principal']}")
    return "\n".join(lines) + "\n"


# -- the routes (kh.service.api) ------------------------------------------------------------
Result = tuple[int, str, Any]


def _port(body: dict[str, Any], key: str, lo: int, required: bool) -> int:
    if body.get(key) is None:
        if required:
            raise UsageError(f"`{key}` is required (a TCP port from {lo} to 65535)")
        return 0
    return rq.integer(body, key, 0, lo, 65535)


@rq.takes(*rq.PRINCIPAL, "port", "host_port")
def route_add(svc: Service, caller: Caller, body: dict[str, Any], node: str) -> Result:
    p = add(svc, rq.user(body), rq.credential(body), rq.path_id(node, "node"),
            _port(body, "port", 1, True), _port(body, "host_port", MIN_HOST_PORT, False))
    return 201, p.text() + "\n", p.to_json(0)


@rq.takes(*rq.PRINCIPAL)
def route_remove(svc: Service, caller: Caller, body: dict[str, Any], host_port: str) -> Result:
    p = remove(svc, rq.user(body), rq.credential(body), rq.path_id(host_port, "published port"))
    return 200, f"unpublished {p.text()}\n", p.to_json()


ROUTES = [
    ("POST", r"/v1/nodes/([^/]+)/publish", route_add),
    ("POST", r"/v1/publishes/([^/]+)/remove", route_remove),
]
