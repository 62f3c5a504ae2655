"""The paper's primitives as plain data: principals, domains, nodes, allocations."""

from __future__ import annotations

import enum
from dataclasses import dataclass

EXTERNAL = 0  # D0: the outside world
PUBLIC = 1  # D1: shared by every principal
POOL = 2  # the free pool's domain id, as in khctl; never handed out
FIRST_PRIVATE = 3


class NodeState(str, enum.Enum):
    STARTING = "starting"
    FREE = "free"  # at the U-Boot prompt, in the pool
    ALLOCATED = "allocated"
    FAILED = "failed"  # died or misbehaved; never handed out again
    # In the middle of a change that crosses the state and the host (see kh.service.core):
    CONFIGURING = "configuring"  # chosen by a khget not yet committed: wired and configured
    RELEASING = "releasing"  # leaving its allocation: its QEMU is being stopped


class DomainKind(str, enum.Enum):
    EXTERNAL = "external"
    PUBLIC = "public"
    PRIVATE = "private"


@dataclass(frozen=True)
class Domain:
    netid: int
    kind: DomainKind
    owner: str | None  # principal owning a private domain

    @property
    def label(self) -> str:
        """How khget's `network` line names the domain."""
        if self.netid == EXTERNAL:
            return "External"
        if self.netid == PUBLIC:
            return "Internal"
        return str(self.netid)


@dataclass(frozen=True)
class NodeInfo:
    """One allocated node as khget reports it."""

    number: int
    uid: int
    address: str
    host: str = "local"  # the host it runs on (kh.service.hosts; "local": khd's own)


@dataclass(frozen=True)
class AllocationInfo:
    """What khget prints: the paper's text object."""

    id: int
    server: str
    # in the order the nodes see them: eth0, eth1, ...; None: a free interface (a domain its
    # nodes left while running, kh.service.membership)
    domains: tuple[Domain | None, ...]
    nodes: tuple[NodeInfo, ...]
    protocol: str = "uboot"

    @property
    def channel(self) -> str:
        return f"con{self.id}@{self.server}"
