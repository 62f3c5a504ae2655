"""The nodes' counters read now, for `kh top` (kh.metering.top): nothing is stored.

The same readings the meter samples (kh.metering.sampler): each node's emulator CPU time with
its generation, and each domain interface's bytes and packets (the node's view: tx is what it
sent) with the tap's generation, plus who holds the node. A reader computes rates from two
reads; a generation that changed between them means the counter started again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kh.metering.sampler import HostSource, TapCounters, holders, nics_of, read_taps
from kh.model import DomainKind

if TYPE_CHECKING:
    from kh.service.core import Service

log = logging.getLogger("kh.metering")


@dataclass(frozen=True)
class LiveNic:
    slot: int
    netid: int | None  # the domain it is plugged into (None: none)
    kind: DomainKind | None
    gen: int  # the tap's ifindex
    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int


@dataclass(frozen=True)
class LiveNode:
    """One node now: ``state`` (kh.model.NodeState's value), its holder (None: free or in a
    change), memory reserved (MiB) and resident (bytes, None where unknown), CPU time (us,
    None when not running) with its generation, its interfaces, and ``t`` (s since the epoch)
    when it was read."""

    node: int
    state: str
    principal: str | None
    allocation: int | None
    mem_mib: int
    resident_bytes: int | None
    cpu_gen: str | None
    cpu_us: int | None
    nics: tuple[LiveNic, ...]
    t: float


def _taps(netns: str) -> dict[str, TapCounters]:
    from kh.hw import netns as nsutil
    try:
        return nsutil.run_in(netns, read_taps)
    except Exception as e:  # no fabric (not root): no traffic figures
        log.debug("cannot read the taps: %s", e)
        return {}


def read_live(svc: Service, principal: str | None = None) -> list[LiveNode]:
    """Every node of the state (``principal``: only the nodes it holds), by number. The
    caller decides who may see what."""
    hold = holders(svc.store)
    kinds = {d.netid: d.kind for d in svc.store.domains()}
    rows = [r for r in svc.store.nodes()
            if principal is None or (r.number in hold and hold[r.number].principal == principal)]
    taps = _taps(svc.cfg.fabric.netns) if rows else {}
    src = HostSource(svc.nodes, svc.cfg.fabric.netns)
    out = []
    for r in rows:
        h = hold.get(r.number)
        cpu = src.cpu(r.number)
        try:
            used = svc.nodes.usage(r.number)
        except Exception:
            used = None
        nics = [LiveNic(x.slot, x.netid, x.kind, x.gen, x.tx_bytes, x.rx_bytes, x.tx_packets,
                        x.rx_packets)
                for x in nics_of(r.number, h, kinds, taps, svc.cfg.fabric.tap)]
        out.append(LiveNode(r.number, r.state.value, None if h is None else h.principal,
                            None if h is None else h.alloc, svc.cfg.mem_mib,
                            None if used is None else used.mem_bytes,
                            None if cpu is None else cpu[0], None if cpu is None else cpu[1],
                            tuple(nics), time.time()))
    return out
