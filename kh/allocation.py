"""Pure allocation decisions: which domains a request puts nodes in, in which order, and the
addresses kh suggests for them. No I/O here, so every rule is unit-tested directly.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from kh.errors import KhError, UsageError
from kh.model import EXTERNAL, FIRST_PRIVATE, PUBLIC, Domain, DomainKind

MAX_NETID = 253  # domain d uses 10.d.0.0/16; 10.254/16 is the external uplink's
MAX_NODE = 65000  # node n is 10.d.(n >> 8).(n & 255) in each domain
NIC_SLOTS = 4  # NICs every node is started with; domains take eth0.. in order
HOST_SUFFIX = (255, 254)  # kh's own address in a domain: 10.d.255.254


class AllocationError(KhError):
    """The request cannot be met (not enough nodes, not the principal's domain, ...)."""


@dataclass(frozen=True)
class Request:
    user: str
    count: int = 1
    new_private: int = 0  # -p N
    existing: tuple[int, ...] = ()  # -n a,b
    public: bool = False  # -i
    external: bool = False  # -x
    host: str | None = None  # --host: every node on this host (kh.service.placement)

    def check(self) -> None:
        if self.host is not None and not re.fullmatch(r"[a-z][a-z0-9-]{0,15}", self.host):
            raise UsageError(f"host name {self.host[:40]!r} is malformed",
                             "kh host list shows the hosts")
        if self.count < 1:
            raise UsageError(f"node count must be at least 1, got {self.count}")
        if self.count > MAX_NODE:
            raise UsageError(f"node count {self.count} is more than a machine has",
                             f"at most {MAX_NODE}")
        if self.new_private < 0:
            raise UsageError(f"-p takes a non-negative number, got {self.new_private}")
        if self.new_private + len(self.existing) > NIC_SLOTS:
            raise UsageError(f"{self.new_private + len(self.existing)} private domains asked "
                             f"for; a node has {NIC_SLOTS} interfaces")
        if len(set(self.existing)) != len(self.existing):
            raise UsageError("-n lists a domain twice")
        for d in self.existing:
            if d in (EXTERNAL, PUBLIC):
                raise UsageError(f"domain {d} is not private", "use -x for 0 and -i for 1")
            if d < FIRST_PRIVATE:
                raise UsageError(f"domain {d} is not a principal's domain")


@dataclass(frozen=True)
class DomainPlan:
    """The domains of one allocation in eth order, and which private ones are new."""

    order: tuple[Domain, ...]
    create: tuple[Domain, ...]


def plan_domains(req: Request, owned: dict[int, str], next_netid: int = FIRST_PRIVATE,
                 quota: int | None = None) -> DomainPlan:
    """Decide the allocation's domains.

    ``owned`` maps every existing private netid to its owner. Without -p/-n the nodes join the
    principal's first private domain, which the first allocation creates. New domains take
    the lowest free ids from ``next_netid`` on (ids of removed domains come back). A principal
    holds at most ``quota`` private domains.
    """
    req.check()
    mine = sorted(d for d, o in owned.items() if o == req.user)
    for d in req.existing:
        # another principal's domain looks exactly like one that does not exist
        if owned.get(d) != req.user:
            raise AllocationError(f"principal {req.user} has no private domain {d}",
                                  "kh ps lists yours")
    create: list[Domain] = []
    private: list[Domain] = [Domain(d, DomainKind.PRIVATE, req.user) for d in req.existing]
    netid = next_netid
    wanted_new = req.new_private
    if not req.existing and not req.new_private:
        if mine:
            private.append(Domain(mine[0], DomainKind.PRIVATE, req.user))
        else:
            wanted_new = 1
    if quota is not None and len(mine) + wanted_new > quota:
        raise AllocationError(
            f"principal {req.user} holds {len(mine)} private "
            f"domain{'' if len(mine) == 1 else 's'} and asks for {wanted_new} more: over its "
            f"private-domain quota of {quota}",
            "remove one with `kh domain rm`, or ask the operator to raise --domain-quota")
    for _ in range(wanted_new):
        while netid in owned or netid < FIRST_PRIVATE:
            netid += 1
        if netid > MAX_NETID:
            raise AllocationError("no private domain ids left", f"at most {MAX_NETID}")
        new = Domain(netid, DomainKind.PRIVATE, req.user)
        create.append(new)
        private.append(new)
        netid += 1
    order: list[Domain] = []
    if req.external:
        order.append(Domain(EXTERNAL, DomainKind.EXTERNAL, None))
    if req.public:
        order.append(Domain(PUBLIC, DomainKind.PUBLIC, None))
    order += private
    if len(order) > NIC_SLOTS:
        raise UsageError(f"{len(order)} domains asked for; a node has {NIC_SLOTS} interfaces")
    return DomainPlan(tuple(order), tuple(create))


def subnet(netid: int) -> ipaddress.IPv4Network:
    if not 0 <= netid <= MAX_NETID:
        raise AllocationError(f"domain {netid} has no address range")
    return ipaddress.IPv4Network(f"10.{netid}.0.0/16")


def node_address(netid: int, node: int) -> ipaddress.IPv4Interface:
    """The address kh suggests (via boot keys) for ``node`` in domain ``netid``."""
    if not 1 <= node <= MAX_NODE:
        raise AllocationError(f"node number {node} out of range")
    return ipaddress.IPv4Interface(f"10.{netid}.{node >> 8}.{node & 255}/16")


def host_address(netid: int) -> ipaddress.IPv4Interface:
    """kh's own address in a domain (the external gateway, the public service listener)."""
    return ipaddress.IPv4Interface(f"10.{netid}.{HOST_SUFFIX[0]}.{HOST_SUFFIX[1]}/16")


def boot_keys(domains: tuple[Domain, ...], node: int, server: str | None,
              channel: str | None = None, mtu: int | None = None) -> str:
    """The khargs that make `run kboot` bring every domain up with its address; with ``mtu``
    (bytes: kh.hw.stretch.guest_mtu, when domains may span hosts) every interface's MTU."""
    words = [f"kh.node={node}", f"kh.hostname=node{node}"]
    for i, d in enumerate(domains):
        words.append(f"kh.eth{i}={node_address(d.netid, node)}")
        if mtu is not None:
            words.append(f"kh.mtu{i}={mtu}")
        if d.netid == EXTERNAL:
            words.append(f"kh.gw={host_address(EXTERNAL).ip}")
    if server:
        words.append(f"kh.server={server}")
    if channel:
        words.append(f"kh.channel={channel}")
    return " ".join(words)


def choose_nodes(free: list[int], count: int) -> list[int]:
    """Lowest-numbered free nodes first, so numbers stay small and predictable."""
    if count > len(free):
        raise AllocationError(f"{count} nodes asked for, {len(free)} free",
                              "ask for fewer or release some (kh ps shows them)")
    return sorted(free)[:count]


def check_node_quota(user: str, held: int, count: int, quota: int) -> None:
    """Refuse a request for ``count`` more nodes when the principal, holding ``held`` now,
    would hold more than ``quota``."""
    if held + count > quota:
        raise AllocationError(
            f"principal {user} holds {held} node{'' if held == 1 else 's'} and asks for "
            f"{count} more: over its node quota of {quota}",
            "release some with `kh release`, or ask the operator to raise --node-quota")
