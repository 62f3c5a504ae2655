"""The service: admission control + allocation decisions + hardware configuration.

Every public method is one request of the API. Allocation holds one lock from the free-node
check to the state change, so concurrent khget calls never share a node.

khget, release, reset and a principal's removal reach the host (bridges, taps, QEMU, U-Boot)
as well as the state. Each records its intent in one transaction, acts, then commits its
outcome in one transaction; a khd killed in between leaves a mark that the next start acts on
(kh.service.recovery): a khget is undone and its nodes scrapped, a release or a removal
finished, a reset done again. So a crash leaves the old state or the new one, never half, and
no principal's configuration survives into the pool.

Parts of it are modules of their own, each one job: a request's admission (kh.service.admit),
resets (kh.service.resets), domain membership (kh.service.membership), tokens, publishing,
a principal's removal, the views.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kh import admission
from kh.allocation import (
    NIC_SLOTS,
    AllocationError,
    Request,
    boot_keys,
    check_node_quota,
    host_address,
    node_address,
    plan_domains,
)
from kh.errors import KhError
from kh.metering.sampler import HostSource, Meter
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
from kh.service import admit, membership, placement, recovery, resets, tokens, views
from kh.service.admit import Admitted
from kh.service.backends import make_backend
from kh.service.config import ServiceConfig
from kh.service.forward import Forwarder
from kh.service.hardware import Hardware
from kh.service.hostfabric import HostFabric
from kh.service.hosts import Hosts, allocated_map
from kh.service.multibackend import MultiBackend
from kh.service.pins import channel_boot_key
from kh.service.pool import Pool, shortage
from kh.store import Store

log = logging.getLogger("kh.service")
__all__ = ["Admitted", "Hardware", "NotFound", "Service"]


class NotFound(KhError):
    exit_code = 4


class Service:
    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.store = Store(cfg.db)
        membership.ensure_schema(self.store)
        # kh's fabric, reaching other hosts' taps and stretching domains across them
        self.fabric = HostFabric(cfg.fabric, ports=(cfg.api_port, cfg.ssh_port),
                                 host_of=self.host_of)
        # kh.hw.backend: this host's (qemu or libvirt), and each added host's (kh.service.hosts)
        self.nodes = MultiBackend(make_backend(cfg, self.fabric), self.host_of)
        self.nodes.stopped.append(self.fabric.forget)
        self.hosts = Hosts(self)
        self.lock = threading.RLock()
        self.idle = threading.Condition(self.lock)  # notified when a node's reset ends
        self._resetting: set[int] = set()  # nodes being reset (under the lock)
        self.pool = Pool(cfg, self.store, self.nodes, self.lock, sizes=self.hosts.sizes)
        self.repairs: list[str] = []
        self.limiter = admission.Limiter()  # refused credentials, per source and principal
        # `kh publish`'s ports (kh.service.publish), relayed from the outside world
        self.forwards = Forwarder(cfg.outside_netns, tick=self.publish_sync)
        self.meter = Meter(self.store, HostSource(self.nodes, cfg.fabric.netns),
                           mem_mib=cfg.mem_mib, tap_name=cfg.fabric.tap,
                           interval=cfg.meter_interval)  # kh.metering: usage, per sample

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Finish or undo what a khd that died left half-done, bring the fabric to what the
        state says, take over the nodes that kept running (reporting what had to be
        repaired), and start filling the pool in the background."""
        self.cfg.run.mkdir(parents=True, exist_ok=True)
        self.fabric.ensure()
        self.hosts.connect_all()
        with self.lock:
            self.repairs = recovery.recover(self.store, self.cfg, self.nodes) + self.pool.adopt()
        self.sync_fabric()
        with self.lock:
            self.repairs += membership.reconcile(self)
            self.repairs += self.fabric.load(allocated_map(self))
        self.repairs += recovery.resume_resets(self)
        if self.cfg.outside_netns is not None:
            self.forwards.start()
        from kh.service import publish  # it builds on this module
        self.repairs += publish.restore(self)
        for r in self.repairs:
            log.warning("repaired: %s", r)
        self.pool.start()
        self.meter.start()  # its first sample: what the nodes used while no khd ran

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
        self.meter.stop()  # a last sample
        self.pool.stop()
        self.forwards.stop()
        self.nodes.detach_all()
        self.store.close()

    def publish_sync(self, reset: int | None = None) -> None:
        """Close the published ports (kh.service.publish) whose node is gone: released,
        reset (node ``reset``), out of the external domain, or its principal removed."""
        from kh.service import publish  # it builds on this module
        publish.sync(self, reset)

    # -- admission -----------------------------------------------------------------------------
    def authenticate(self, user: str, credential: str | None, *, register: bool = False,
                     source: str | None = None) -> Admitted:
        """Check a principal's credential, without khd's lock, rate-limited
        (kh.service.admit.authenticate)."""
        return admit.authenticate(self, user, credential, register=register, source=source)

    def admitted(self, user: str, credential: str | None, *, register: bool = False,
                 source: str | None = None) -> contextlib.AbstractContextManager[Admitted]:
        """Authenticate, then hold khd's lock for the request while the principal is as
        checked (kh.service.admit.admitted)."""
        return admit.admitted(self, user, credential, register=register, source=source)

    # -- khget -------------------------------------------------------------------------------
    def khget(self, req: Request, credential: str | None, token: str | None = None
              ) -> AllocationInfo:
        """Allocate: the chosen nodes are marked `configuring`, wired and configured, then
        the principal (when new), its new domains, the allocation and its nodes are committed
        in one transaction. A failure (or khd's death) before that commit scraps the nodes
        (they may hold the principal's khargs) and the bridges: nothing of it is left. With a
        ``token`` instead of a credential, only within its scope and budget (kh.service.tokens)."""
        req.check()
        with tokens.admit_khget(self, req, credential, token) as (adm, tok):
            owned = self.store.private_owners()
            # the lowest free id: ids of removed domains are given out again
            plan = plan_domains(req, owned, FIRST_PRIVATE, quota=self.cfg.domain_quota)
            check_node_quota(req.user, self.store.held_nodes(req.user), req.count,
                             self.cfg.node_quota)
            free: dict[str, list[int]] = {}
            for r in self.store.nodes(NodeState.FREE):
                if r.number in self.nodes.running:
                    free.setdefault(r.host, []).append(r.number)
            have = sum(len(v) for v in free.values())
            if req.host is None and req.count > have:
                raise shortage(req.count, have, self.pool.status())
            chosen = placement.place(free, self.fabric.order(), req.count, self.cfg.placement,
                                     req.host)  # kh.service.placement
            self.store.nodes_configuring(chosen)
            made: list[int] = []
            try:
                for d in plan.create:
                    made.append(d.netid)
                    self.fabric.ensure_domain(d.netid)
                # domains the nodes' hosts share stretched first: each boots with their MTU
                self.fabric.plan({n: [d.netid for d in plan.order] for n in chosen})
                with ThreadPoolExecutor(max_workers=8) as ex:
                    list(ex.map(lambda n: self._configure(n, plan.order), chosen))
                alloc = self.store.commit_allocation(
                    req.user, adm.pending, plan.create, tuple(d.netid for d in plan.order),
                    chosen, tok)
            except BaseException:
                self._scrap(chosen)
                self._drop_bridges(made)
                raise
            self.meter.sample(chosen)  # the allocation's start: its baseline
            return self.info(alloc)

    def _scrap(self, numbers: list[int]) -> None:
        """Under the lock: nodes that may hold a principal's configuration leave the pool:
        their QEMUs are stopped first, then their rows dropped (the pool starts fresh ones)."""
        stopped = []
        for n in numbers:
            try:
                self.nodes.stop(n)
                stopped.append(n)
            except Exception:  # its row stays as it is: the next khd start stops it
                log.exception("node %d: cannot stop its QEMU", n)
        if stopped:
            self.store.drop_nodes(stopped)
        self.publish_sync()
        self.pool.wake()

    def _drop_bridges(self, netids: list[int]) -> None:
        """Bridges of domains the state does not have (any more); one that stays is removed
        by the next khd start (sync_fabric)."""
        for netid in netids:
            try:
                self.fabric.remove_domain(netid)
            except Exception as e:
                log.warning("the bridge of domain %d stays until khd's next start: %s",
                            netid, e)

    def host_of(self, number: int) -> str:
        """Node ``number``'s host (kh.store_hosts; ``local`` for a node the state lacks)."""
        row = self.store.node(number)
        return row.host if row is not None else "local"

    def _configure(self, number: int, domains: tuple[Domain, ...]) -> None:
        netids = [d.netid for d in domains][:NIC_SLOTS]
        self.fabric.wire(number, netids)  # on the node's host (kh.service.hostfabric)
        self.nodes.set_links(number, len(domains))
        host = host_address(PUBLIC).ip
        keys = boot_keys(domains, number, f"{host}:{self.cfg.api_port}",
                         channel_boot_key(f"{host}:{self.cfg.ssh_port}", self.cfg.host_key),
                         mtu=self.fabric.mtu(netids))
        self.nodes.uboot(number, f"setenv khargs '{keys}'")

    def info(self, alloc: int) -> AllocationInfo:
        row = self.store.allocation(alloc)
        if row is None:
            raise NotFound(f"no allocation {alloc}")
        doms = {d.netid: d for d in self.store.domains()}
        # a node that joined or left domains has its own slot map (kh.service.membership)
        order = tuple(None if n is None else doms.get(n, Domain(n, DomainKind.PRIVATE,
                                                                row.principal))
                      for n in membership.alloc_map(self.store, row))
        nodes = []
        for r in self.store.nodes_of(alloc):
            first = [n for n in membership.node_map(self.store, r.number, row) if n is not None]
            nodes.append(NodeInfo(r.number, r.uid,
                                  str(node_address(first[0], r.number).ip) if first else "",
                                  r.host))
        return AllocationInfo(alloc, self.cfg.server, order, tuple(nodes))

    # -- management --------------------------------------------------------------------------
    def _own_allocation(self, alloc: int, user: str) -> None:
        """Under the lock, for an authenticated ``user``: ``alloc`` is live and theirs."""
        row = self.store.allocation(alloc)
        # another principal's allocation looks exactly like one that does not exist
        if row is None or row.released is not None or row.principal != user:
            raise NotFound(f"principal {user} has no active allocation {alloc}")

    def _await_resets(self, numbers: list[int]) -> bool:
        """Under the lock: wait while a node of ``numbers`` is being reset
        (kh.service.resets.await_resets; False: check again)."""
        return resets.await_resets(self, numbers)

    def release(self, alloc: int, user: str, credential: str | None,
                nodes: list[int] | None = None, token: str | None = None) -> list[int]:
        """Give nodes back; their QEMUs are replaced by fresh ones (no principal data
        survives into the pool). Domains stay until `kh domain rm`. The nodes are marked
        `releasing`, their QEMUs stopped, then they leave the state with the allocation's
        release in one transaction. A node being reset is waited for. A ``token`` releases
        only the allocations it made."""
        with tokens.admit_own(self, user, credential, token, alloc):
            while True:
                self._own_allocation(alloc, user)
                numbers = [r.number for r in self.store.nodes_of(alloc)]
                if nodes:
                    stray = sorted(set(nodes) - set(numbers))
                    if stray:
                        raise NotFound(f"node {stray[0]} is not in allocation {alloc}")
                    numbers = sorted(set(nodes))
                if self._await_resets(numbers):
                    break
            self.store.nodes_releasing(numbers)
            self.meter.sample(numbers)  # what they used up to their release
            self._scrap(numbers)
        return numbers

    def reset(self, number: int, user: str, credential: str | None) -> None:
        """Back to the U-Boot prompt with the allocation's khargs (kh.service.resets.reset);
        a failed reset leaves the node `failed` with the reason (AllocationError)."""
        resets.reset(self, number, user, credential)

    def _do_reset(self, number: int, domains: tuple[Domain, ...]) -> None:
        """The reset proper, for a node marked as being reset (kh.service.resets.do_reset)."""
        resets.do_reset(self, number, domains)

    def remove_domain(self, netid: int, user: str, credential: str | None) -> None:
        """Remove a private domain of the principal's, wholly or not at all: the state first
        (one transaction, refused while a live allocation uses the domain), then the bridge.
        Should the bridge outlive a failure, the next khd start removes it, and a domain
        given the same id later takes the bridge over (it has no node left on it)."""
        with self.admitted(user, credential):
            owners = self.store.private_owners()
            if netid in (EXTERNAL, PUBLIC) or owners.get(netid) != user:
                # another principal's domain looks exactly like one that does not exist
                raise NotFound(f"principal {user} has no private domain {netid}")
            if membership.in_use(self.store, netid) or not self.store.remove_domain(netid):
                raise AllocationError(f"domain {netid} still has allocated nodes",
                                      "release them first")
            try:
                self.fabric.remove_domain(netid)
            except Exception as e:  # the state is already right; the bridge goes later
                log.warning("domain %d removed, but not its bridge yet: %s", netid, e)

    def join(self, number: int, netid: int, user: str, credential: str | None
             ) -> membership.Change:
        """Plug running node ``number``'s next free interface into domain ``netid``
        (kh.service.membership.join)."""
        self.meter.sample([number])  # traffic up to the change is the old domains'
        try:
            return membership.join(self, number, netid, user, credential)
        finally:
            self.meter.sample([number])

    def leave(self, number: int, netid: int, user: str, credential: str | None
              ) -> membership.Change:
        """Unplug node ``number``'s interface in domain ``netid`` (membership.leave)."""
        self.meter.sample([number])
        try:
            change = membership.leave(self, number, netid, user, credential)
        finally:
            self.meter.sample([number])
        self.publish_sync()  # out of the external domain: its published ports go
        return change

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

    # -- views and principals -------------------------------------------------------------------
    def ps(self) -> dict[str, Any]:
        """The operator's view: every allocation, node (with its QEMU's PID) and domain."""
        return views.operator(self.store, self.cfg, self.repairs,
                              sum(self.hosts.sizes().values()))

    def ps_of(self, user: str, credential: str | None) -> dict[str, Any]:
        """A principal's view, in ps's shape: its own allocations, nodes and domains and the
        shared domains, the pool's counts and its quotas; nothing of another principal's."""
        self.authenticate(user, credential)
        return views.principal(self.store, self.cfg, user, sum(self.hosts.sizes().values()))

    def principals(self) -> list[dict[str, Any]]:
        """The operator's list: name, created, live allocations, nodes, domains, keys."""
        return self.store.principals()

    def remove_principal(self, name: str) -> dict[str, Any]:
        """The operator removes a principal (kh.service.principals.remove)."""
        from kh.service import principals  # it builds on this module
        return principals.remove(self, name)
