"""Usage records: what a principal used, read from khd's state (the interface rating reads).

The meter (kh.metering.sampler) samples each allocated node's raw cumulative counters (QEMU's
CPU time, its taps' bytes and packets) every interval and at every change, and stores per
sample the increase since the node's previous sample of the same *generation* (a new QEMU
process or a recreated tap starts a new one: its counters are not compared with the old one's),
with the time the interval ends (the sample's time) and the allocation and principal that held
the node during it. A record here sums those increases for the samples whose time lies in
[start, end): so every increase is counted once, in the bucket of the sample that saw it.

Quantities (fixed names; units in UNITS):
  node_seconds         s      the node was allocated (allocation to release)
  cpu_seconds          s      CPU time of the node's QEMU (kernel accounting: its cgroup, else
                              /proc/PID/stat), host side: every vCPU, device and I/O thread
  mem_mib_seconds      MiB*s  guest memory reserved for the node x time allocated
  net_tx_bytes         B      sent by the node on one domain interface (the tap's rx)
  net_rx_bytes         B      received by the node on one domain interface (the tap's tx)
  net_tx_packets       packets, as net_tx_bytes
  net_rx_packets       packets, as net_rx_bytes
  load_bytes           B      bulk bytes written to the node over the control channel
Net quantities carry the domain (its kind and id); the others carry none. Storage has no
quantity of its own: kh's AoE disks are nodes serving from their RAM (khgetdisk, khstorage), so
a disk is its disk node's reserved memory and time, charged as mem_mib_seconds and node_seconds;
the host knows no other storage of a principal's.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

from kh.errors import UsageError
from kh.model import DomainKind

if TYPE_CHECKING:
    from kh.store import Store

__all__ = ["NET", "UNITS", "Gap", "Grain", "Quantity", "UsageRecord", "gaps", "usage_records"]


class Quantity(str, enum.Enum):
    NODE_SECONDS = "node_seconds"
    CPU_SECONDS = "cpu_seconds"
    MEM_MIB_SECONDS = "mem_mib_seconds"
    NET_TX_BYTES = "net_tx_bytes"
    NET_RX_BYTES = "net_rx_bytes"
    NET_TX_PACKETS = "net_tx_packets"
    NET_RX_PACKETS = "net_rx_packets"
    LOAD_BYTES = "load_bytes"


UNITS: dict[Quantity, str] = {
    Quantity.NODE_SECONDS: "s", Quantity.CPU_SECONDS: "s", Quantity.MEM_MIB_SECONDS: "MiB*s",
    Quantity.NET_TX_BYTES: "B", Quantity.NET_RX_BYTES: "B", Quantity.NET_TX_PACKETS: "packets",
    Quantity.NET_RX_PACKETS: "packets", Quantity.LOAD_BYTES: "B"}
NET = frozenset({Quantity.NET_TX_BYTES, Quantity.NET_RX_BYTES, Quantity.NET_TX_PACKETS,
                 Quantity.NET_RX_PACKETS})

# How records are grouped below the principal: per node (and allocation), per allocation, or
# only per principal (and domain, for net quantities).
Grain = Literal["node", "allocation", "principal"]


@dataclass(frozen=True)
class UsageRecord:
    """``amount`` (exact, in ``unit``) of ``quantity`` used by ``principal``'s allocation
    ``allocation`` on node ``node`` (None: summed over them, by the grain asked for), measured
    by the samples taken in [start, end) (aware UTC datetimes; bucket bounds, aligned to
    multiples of the step since the epoch; a bucket finer than an hour older than the samples
    kept, a week, comes from hourly sums and spans its hour). ``domain``/``netid``: the
    domain of a net quantity (its kind and id), None for the others."""

    principal: str
    allocation: int | None
    node: int | None
    quantity: Quantity
    domain: DomainKind | None
    netid: int | None
    start: datetime
    end: datetime
    amount: Decimal
    unit: str


@dataclass(frozen=True)
class Gap:
    """Node ``node`` of ``principal``'s allocation ``allocation`` was not metered between
    ``start`` and ``end`` (aware UTC): its counters' generation changed in between (its QEMU
    or a tap was replaced while khd could not see it, e.g. khd was down), so what it used
    between its last sample of the old generation and the first of the new is not known.
    ``what`` names the counters (e.g. "cpu", "net slot 1"). Node- and memory-seconds are
    time, not counters: they are charged across a gap all the same."""

    principal: str
    allocation: int
    node: int
    start: datetime
    end: datetime
    what: str


US = 1_000_000  # the state keeps times and CPU time in integer microseconds


def to_us(t: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch (UsageError if naive)."""
    if t.tzinfo is None:
        raise UsageError(f"time {t.isoformat()} has no time zone")
    delta = t - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * US + delta.microseconds


def from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us // US, UTC).replace(microsecond=us % US)


def check_range(since: datetime, until: datetime) -> tuple[int, int]:
    """[since, until) as microseconds; UsageError if it is reversed or empty."""
    a, b = to_us(since), to_us(until)
    if b <= a:
        raise UsageError(f"the time range {since.isoformat()} .. {until.isoformat()} is "
                         "reversed or empty", "--since must come before --until")
    return a, b


def usage_records(store: Store, since: datetime, until: datetime,
                  principal: str | None = None, *, step: int = 3600,
                  by: Grain = "node", removed: bool = False) -> list[UsageRecord]:
    """The usage of ``principal`` (None: every principal) whose samples were taken in
    [since, until), summed per ``step`` seconds (1 <= step; buckets aligned to the epoch, so
    60 gives whole UTC minutes) and per ``by``; records with a zero amount are left out.
    Ordered by start, principal, allocation, node, quantity, netid. ``principal`` is the one
    of that name now; with ``removed``, the removed principals of that name (their records'
    principal reads "NAME (removed)", as in every principal's). UsageError if the range is
    reversed or a datetime is naive, or step < 1. Reads only."""
    from kh.metering import query  # the tables' layout lives there
    lo, hi = check_range(since, until)
    if step < 1:
        raise UsageError(f"step {step} s is not a positive number of seconds")
    return query.records(store, lo, hi, principal, step * US, by, removed)


def gaps(store: Store, since: datetime, until: datetime,
         principal: str | None = None, removed: bool = False) -> list[Gap]:
    """The gaps (see Gap) that overlap [since, until), of ``principal`` (None: everyone's),
    by start. UsageError as usage_records."""
    from kh.metering import store as mstore
    lo, hi = check_range(since, until)
    return mstore.gaps(store, lo, hi, principal, removed=removed)


def total(records: Iterable[UsageRecord]) -> dict[tuple[Quantity, DomainKind | None], Decimal]:
    """Sums per quantity (and domain kind, for net quantities)."""
    out: dict[tuple[Quantity, DomainKind | None], Decimal] = {}
    for r in records:
        key = (r.quantity, r.domain)
        out[key] = out.get(key, Decimal(0)) + r.amount
    return out
