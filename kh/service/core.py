"""The service: admission control + allocation decisions + hardware configuration.

Every public method is one request of the API. Allocation holds one lock from the free-node
check to the state change, so concurrent khget calls never share a node.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kh import admission
from kh.allocation import (
    NIC_SLOTS,
    AllocationError,
    Request,
    boot_keys,
    choose_nodes,
    host_address,
    node_address,
    plan_domains,
)
from kh.errors import KhError
from kh.hw.fabric import Fabric
from kh.model import (
    EXTERNAL,
    FIRST_PRIVATE,
    PUBLIC,
    AllocationInfo,
    Domain,
    DomainKind,
    NodeInfo,
    NodeState,
)
from kh.service.config import ServiceConfig
from kh.service.nodes import NodeManager
from kh.service.pool import Pool, note, shortage, summarize
from kh.service.request import current_caller
from kh.store import Store

log = logging.getLogger("kh.service")


class NotFound(KhError):
    exit_code = 4


@dataclass(frozen=True)
class Admitted:
    """A principal whose credential was checked: its stored (salt, hash) as seen then (None:
    a new principal), and for a new one the salted hash to store once the request succeeds."""

    user: str
    seen: tuple[bytes, bytes] | None
    pending: tuple[bytes, bytes] | None


@dataclass(frozen=True)
class Hardware:
    """`kh hw`: the documented node."""

    cfg: ServiceConfig

    def describe(self) -> dict[str, Any]:
        return {"board": "QEMU ppce500 (Freescale MPC85xx e500 platform)",
                "cpu": "1 x PowerPC e500v2 (32-bit Book E, SPE, no classic FPU: Linux emulates)",
                "memory_mib": self.cfg.mem_mib,
                "firmware": "U-Boot 2023.01 (Debian) + kh patches (mrw, environment)",
                "console": "16550 UART, 115200 8N1: the node's control interface",
                "interfaces": [f"eth{s}: virtio-net-pci, one per domain in khget's order"
                               for s in range(NIC_SLOTS)],
                "preloaded": {"kernel": "${loadaddr}=0x8000000 (Linux 6.1 uImage)",
                              "ramdisk": f"${{ramfsaddr}}=0xa000000 ({self.cfg.appliance})"},
                "boot": "run kboot (kernel arguments from ${khargs})",
                "nodes": self.cfg.nodes}


class Service:
    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.store = Store(cfg.db)
        self.fabric = Fabric(cfg.fabric)
        self.nodes = NodeManager(cfg, self.fabric)
        self.lock = threading.RLock()
        self.pool = Pool(cfg, self.store, self.nodes, self.lock)
        self.repairs: list[str] = []
        self.limiter = admission.Limiter()  # refused credentials, per source and principal

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Bring the fabric to what the state says, take over the nodes that kept running
        (reporting what had to be repaired), and start filling the pool in the background."""
        self.cfg.run.mkdir(parents=True, exist_ok=True)
        self.fabric.ensure()
        self.sync_fabric()
        with self.lock:
            self.repairs = self.pool.adopt()
        for r in self.repairs:
            log.warning("repaired: %s", r)
        self.pool.start()

    def sync_fabric(self) -> None:
        """A bridge for every domain of the state, and none for a domain it no longer has (a
        `kh domain rm` whose bridge removal did not happen is finished here)."""
        known = {d.netid for d in self.store.domains()}
        for netid in sorted(known):
            self.fabric.ensure_domain(netid)
        for netid in sorted(set(self.fabric.domain_bridges()) - known):
            self.fabric.remove_domain(netid)
            log.warning("removed the bridge of domain %d, which the state no longer has",
                        netid)

    def shutdown(self) -> None:
        """khd is going away: starts under way are ended; running nodes keep running."""
        self.pool.stop()
        self.nodes.detach_all()
        self.store.close()

    # -- admission -----------------------------------------------------------------------------
    def authenticate(self, user: str, credential: str | None, *, register: bool = False,
                     source: str | None = None) -> Admitted:
        """Check a principal's credential, without khd's lock (scrypt takes ~15 ms). An
        unknown principal and a wrong credential get the same answer after the same work.
        With ``register`` an unknown principal is new: its salted hash comes back, to be stored
        once the request has succeeded (a refused request leaves no trace).

        Refused checks are rate-limited per ``source`` and per principal (admission.Limiter):
        past the limit, admission.Throttled (HTTP 429) comes before any hash is computed.
        ``source`` defaults to the API caller's (request.current_caller; the operator on the
        unix socket is not limited: it can read the state anyway); None outside a request
        (the ssh channel, until it passes its peer) limits by principal only."""
        admission.check_user(user)
        if credential is not None:
            admission.check_credential(credential)
        caller = current_caller()
        if source is None and caller is not None:
            source = caller.source
        limited = not (caller is not None and caller.operator and source == caller.source)
        known = self.store.principal(user)
        if known is None and register:
            if credential is None:
                raise admission.missing(user)
            return Admitted(user, None, admission.hash_credential(credential))
        if limited and credential is not None:
            self.limiter.check(user, source)
        try:
            admission.verify(credential, known, user)
        except admission.AuthError:
            if limited and credential is not None:
                self.limiter.failed(user, source)
            raise
        return Admitted(user, known, None)

    @contextlib.contextmanager
    def admitted(self, user: str, credential: str | None, *, register: bool = False,
                 source: str | None = None) -> Iterator[Admitted]:
        """Authenticate outside the lock, then hold khd's lock for the request while the
        principal is still as it was checked (a concurrent first use may have registered
        it in between: then the check is made again)."""
        for _ in range(3):
            adm = self.authenticate(user, credential, register=register, source=source)
            with self.lock:
                if self.store.principal(user) != adm.seen:
                    continue
                yield adm
                return
        raise admission.refused(user)

    # -- khget -------------------------------------------------------------------------------
    def khget(self, req: Request, credential: str | None) -> AllocationInfo:
        req.check()
        with self.admitted(req.user, credential, register=True) as adm:
            owned = self.store.private_owners()
            # the lowest free id: ids of removed domains are given out again
            plan = plan_domains(req, owned, FIRST_PRIVATE, quota=self.cfg.domain_quota)
            free = [r.number for r in self.store.nodes(NodeState.FREE)
                    if r.number in self.nodes.running]
            if req.count > len(free):
                raise shortage(req.count, len(free), self.pool.status())
            chosen = choose_nodes(free, req.count)
            with contextlib.ExitStack() as undo:
                if adm.pending is not None:
                    self.store.add_principal(req.user, *adm.pending)
                    undo.callback(self.store.remove_principal, req.user)
                for d in plan.create:
                    self.store.add_domain(d)
                    undo.callback(self.store.remove_domain, d.netid)
                    self.fabric.ensure_domain(d.netid)
                    undo.callback(self.fabric.remove_domain, d.netid)
                netids = tuple(d.netid for d in plan.order)
                alloc = self.store.add_allocation(req.user, netids)
                undo.callback(self.store.forget_allocation, alloc)
                with ThreadPoolExecutor(max_workers=8) as ex:
                    list(ex.map(lambda n: self._configure(n, plan.order), chosen))
                for n in chosen:
                    self.store.node_allocated(n, alloc)
                undo.pop_all()
            return self.info(alloc)

    def _configure(self, number: int, domains: tuple[Domain, ...]) -> None:
        for slot in range(NIC_SLOTS):
            self.fabric.attach(number, slot, domains[slot].netid if slot < len(domains)
                               else None)
        self.nodes.set_links(number, len(domains))
        host = host_address(PUBLIC).ip
        keys = boot_keys(domains, number, f"{host}:{self.cfg.api_port}",
                         f"{host}:{self.cfg.ssh_port}")
        self.nodes.uboot(number, f"setenv khargs '{keys}'")

    def info(self, alloc: int) -> AllocationInfo:
        row = self.store.allocation(alloc)
        if row is None:
            raise NotFound(f"no allocation {alloc}")
        doms = {d.netid: d for d in self.store.domains()}
        order = tuple(doms.get(n, Domain(n, DomainKind.PRIVATE, row.principal))
                      for n in row.netids)
        nodes = tuple(NodeInfo(r.number, r.uid, str(node_address(order[0].netid, r.number).ip)
                               if order else "")
                      for r in self.store.nodes_of(alloc))
        return AllocationInfo(alloc, self.cfg.server, order, nodes)

    # -- management --------------------------------------------------------------------------
    def _own_allocation(self, alloc: int, user: str) -> None:
        """Under the lock, for an authenticated ``user``: ``alloc`` is live and theirs."""
        row = self.store.allocation(alloc)
        if row is None or row.released is not None:
            raise NotFound(f"no active allocation {alloc}")
        if row.principal != user:
            raise admission.AuthError(f"allocation {alloc} belongs to another principal")

    def release(self, alloc: int, user: str, credential: str | None,
                nodes: list[int] | None = None) -> list[int]:
        """Give nodes back; their QEMUs are replaced by fresh ones (no principal data
        survives into the pool). Domains stay until `kh domain rm`."""
        with self.admitted(user, credential):
            self._own_allocation(alloc, user)
            numbers = [r.number for r in self.store.nodes_of(alloc)]
            if nodes:
                stray = sorted(set(nodes) - set(numbers))
                if stray:
                    raise NotFound(f"node {stray[0]} is not in allocation {alloc}")
                numbers = sorted(nodes)
            for n in numbers:
                self.nodes.stop(n)
                self.store.delete_node(n)
            if not self.store.nodes_of(alloc):
                self.store.release_allocation(alloc)
        self.pool.wake()
        return numbers

    def reset(self, number: int, user: str, credential: str | None) -> None:
        with self.admitted(user, credential):
            row = self.store.node(number)
            if row is None or row.alloc is None:
                raise NotFound(f"node {number} is not allocated")
            self._own_allocation(row.alloc, user)
            if number not in self.nodes.running:
                raise NotFound(f"node {number} is not running ({row.state.value})")
            a = self.info(row.alloc)
        self.nodes.reset(number)
        self._configure(number, a.domains)

    def remove_domain(self, netid: int, user: str, credential: str | None) -> None:
        """Remove a private domain of the principal's, wholly or not at all: the state first
        (one transaction, refused while a live allocation uses the domain), then the bridge.
        Should the bridge outlive a failure, the next khd start removes it, and a domain
        given the same id later takes the bridge over (it has no node left on it)."""
        with self.admitted(user, credential):
            owners = self.store.private_owners()
            if netid in (EXTERNAL, PUBLIC) or netid not in owners:
                raise NotFound(f"no private domain {netid}")
            if owners[netid] != user:
                raise admission.AuthError(f"domain {netid} belongs to another principal")
            if not self.store.remove_domain(netid):
                raise AllocationError(f"domain {netid} still has allocated nodes",
                                      "release them first")
            try:
                self.fabric.remove_domain(netid)
            except Exception as e:  # the state is already right; the bridge goes later
                log.warning("domain %d removed, but not its bridge yet: %s", netid, e)

    # -- control-channel keys ------------------------------------------------------------------
    def add_key(self, user: str, credential: str | None, key: str, alloc: int | None) -> int:
        """Let a public key open the principal's channels (or only allocation ``alloc``'s)."""
        from kh.cc.sshd import parse_public_key
        with self.admitted(user, credential):
            if alloc is not None:
                self._own_allocation(alloc, user)
            blob, comment = parse_public_key(key)
            return self.store.add_key(user, blob, comment, alloc)

    def remove_key(self, user: str, credential: str | None, key_id: int) -> None:
        with self.admitted(user, credential):
            if not self.store.remove_key(user, key_id):
                raise NotFound(f"principal {user} has no key {key_id}")

    def list_keys(self, user: str, credential: str | None) -> list[dict[str, Any]]:
        self.authenticate(user, credential)
        return [{"id": k[0], "allocation": k[2], "key": k[3][:40] + "...", "comment": k[4]}
                for k in self.store.keys(user)]

    def ps(self) -> dict[str, Any]:
        nodes = self.store.nodes()
        now = time.time()
        return {
            "allocations": [{"id": a.id, "principal": a.principal, "netids": list(a.netids),
                             "nodes": [n.number for n in nodes if n.alloc == a.id],
                             "created": a.created} for a in self.store.allocations()],
            "nodes": [{"node": n.number, "uid": n.uid, "state": n.state.value, "pid": n.pid,
                       "allocation": n.alloc, "reason": n.reason, "attempts": n.attempts,
                       "retry_at": n.retry_at, "note": note(n, now)} for n in nodes],
            "domains": [{"netid": d.netid, "kind": d.kind.value, "owner": d.owner}
                        for d in self.store.domains()],
            "pool": summarize(nodes, self.cfg.nodes).to_json(),
            "repairs": self.repairs,
        }
