"""The meter's tables in khd's state (kh.store_schema, version 6): writes and reads.

meter_usage: one row per sample of an allocated node: t (the sample's time, us since the epoch),
t0 (the node's previous sample), node, alloc, principal (that held the node in (t0, t]), gen
(the QEMU generation compared), and what it used in (t0, t]: node_us, cpu_us, mem_mib_us,
load_bytes, storage_mib_us. meter_net: the same per domain interface (slot, netid, kind, the
tap's generation) with the node's tx/rx bytes and packets; rows with nothing sent or received
are not written. meter_gaps: what could not be measured. meter_last: per node, the raw counters
of its last sample (JSON for the interfaces), which the next sample is compared with.

Compaction (compact) merges the rows older than a day into one per node, allocation,
generation (and interface) and minute: sums stay exact, since rows only ever add up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from kh.metering.usage import (
    UNITS,
    US,
    Gap,
    Grain,
    Quantity,
    UsageRecord,
    from_us,
)
from kh.model import DomainKind

if TYPE_CHECKING:
    from kh.store import Store

_NODE_COLS = (("node_us", Quantity.NODE_SECONDS, US), ("cpu_us", Quantity.CPU_SECONDS, US),
              ("mem_mib_us", Quantity.MEM_MIB_SECONDS, US),
              ("load_bytes", Quantity.LOAD_BYTES, 1),
              ("storage_mib_us", Quantity.STORAGE_MIB_SECONDS, US))
_NET_COLS = (("tx_bytes", Quantity.NET_TX_BYTES), ("rx_bytes", Quantity.NET_RX_BYTES),
             ("tx_packets", Quantity.NET_TX_PACKETS), ("rx_packets", Quantity.NET_RX_PACKETS))
_GROUP = {"node": ("alloc", "node"), "allocation": ("alloc",), "principal": ()}
DAY_US = 86400 * US
MINUTE_US = 60 * US


@dataclass(frozen=True)
class Nic:
    """One domain interface's raw counters as the host sees them on its tap, turned to the
    node's view: tx = what the node sent (the tap received)."""

    slot: int
    gen: int  # the tap's ifindex: a recreated tap gets a new one
    netid: int
    kind: DomainKind
    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int


@dataclass(frozen=True)
class Last:
    """A node's last sample: its time (us), QEMU generation, who held it from then on (None:
    no one), raw CPU us, reserved memory and storage (MiB) and interfaces."""

    node: int
    t: int
    gen: str
    alloc: int | None
    principal: str | None
    cpu_us: int
    mem_mib: int
    storage_mib: int
    nics: tuple[Nic, ...]


def _amount(value: int, scale: int) -> Decimal:
    return Decimal(value) / scale if scale != 1 else Decimal(value)


def records(store: Store, lo: int, hi: int, principal: str | None, step: int,
            by: Grain) -> list[UsageRecord]:
    """See kh.metering.usage.usage_records (times and step in us)."""
    group = _GROUP[by]
    where = "t >= ? AND t < ?" + (" AND principal = ?" if principal is not None else "")
    args: tuple[object, ...] = (lo, hi) if principal is None else (lo, hi, principal)
    keys = ", ".join(("b", "principal", *group))
    out: list[UsageRecord] = []
    sums = ", ".join(f"SUM({c})" for c, _q, _s in _NODE_COLS)
    for row in store._rows(f"SELECT (t / {step}) * {step} AS b, principal"
                           f"{''.join(', ' + g for g in group)}, {sums} FROM meter_usage "
                           f"WHERE {where} GROUP BY {keys}", args):
        b, who = row[0], row[1]
        alloc = row[2] if group else None
        node = row[3] if len(group) > 1 else None
        for (_c, q, scale), v in zip(_NODE_COLS, row[2 + len(group):], strict=True):
            if v:
                out.append(UsageRecord(who, alloc, node, q, None, None, from_us(b),
                                       from_us(b + step), _amount(v, scale), UNITS[q]))
    sums = ", ".join(f"SUM({c})" for c, _q in _NET_COLS)
    for row in store._rows(f"SELECT (t / {step}) * {step} AS b, principal"
                           f"{''.join(', ' + g for g in group)}, kind, netid, {sums} "
                           f"FROM meter_net WHERE {where} GROUP BY {keys}, kind, netid", args):
        b, who = row[0], row[1]
        alloc = row[2] if group else None
        node = row[3] if len(group) > 1 else None
        kind, netid = DomainKind(row[2 + len(group)]), row[3 + len(group)]
        for (_c, q), v in zip(_NET_COLS, row[4 + len(group):], strict=True):
            if v:
                out.append(UsageRecord(who, alloc, node, q, kind, netid, from_us(b),
                                       from_us(b + step), Decimal(v), UNITS[q]))
    order = list(Quantity)
    out.sort(key=lambda r: (r.start, r.principal, r.allocation or 0, r.node or 0,
                            order.index(r.quantity), -1 if r.netid is None else r.netid))
    return out


def gaps(store: Store, lo: int, hi: int, principal: str | None) -> list[Gap]:
    """See kh.metering.usage.gaps (times in us)."""
    where = "t > ? AND t0 < ?" + (" AND principal = ?" if principal is not None else "")
    args: tuple[object, ...] = (lo, hi) if principal is None else (lo, hi, principal)
    return [Gap(r[0], r[1], r[2], from_us(r[3]), from_us(r[4]), r[5]) for r in store._rows(
        f"SELECT principal, alloc, node, t0, t, what FROM meter_gaps WHERE {where} "
        "ORDER BY t0, node", args)]


# -- writes (the sampler's) ---------------------------------------------------------------------
def lasts(store: Store) -> dict[int, Last]:
    """Every node's last sample (kept across khd restarts)."""
    out = {}
    for r in store._rows("SELECT node, t, gen, alloc, principal, cpu_us, mem_mib, "
                         "storage_mib, nics FROM meter_last"):
        nics = tuple(Nic(n[0], n[1], n[2], DomainKind(n[3]), *n[4:8])
                     for n in json.loads(r[8]))
        out[r[0]] = Last(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], nics)
    return out


@dataclass(frozen=True)
class Usage:
    """What one node used in (t0, t] (see meter_usage)."""

    t: int
    t0: int
    node: int
    alloc: int
    principal: str
    gen: str
    node_us: int
    cpu_us: int
    mem_mib_us: int
    load_bytes: int
    storage_mib_us: int


@dataclass(frozen=True)
class NetUsage:
    t: int
    t0: int
    node: int
    alloc: int
    principal: str
    slot: int
    netid: int
    kind: DomainKind
    gen: int
    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int


GapRow = tuple[int, int, int, int, str, str]  # t0, t (us), node, alloc, principal, what


def write(store: Store, usage: list[Usage], net: list[NetUsage], found: list[GapRow],
          new: list[Last], gone: list[int]) -> None:
    """One sample's outcome in one transaction: usage rows, gaps ((t0, t, node, alloc,
    principal, what) in us), the nodes' new last samples, and nodes no longer metered."""
    with store.tx() as db:
        db.executemany("INSERT INTO meter_usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [(u.t, u.t0, u.node, u.alloc, u.principal, u.gen, u.node_us, u.cpu_us,
                         u.mem_mib_us, u.load_bytes, u.storage_mib_us) for u in usage])
        db.executemany("INSERT INTO meter_net VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [(n.t, n.t0, n.node, n.alloc, n.principal, n.slot, n.netid,
                         n.kind.value, n.gen, n.tx_bytes, n.rx_bytes, n.tx_packets,
                         n.rx_packets) for n in net])
        db.executemany("INSERT INTO meter_gaps VALUES (?, ?, ?, ?, ?, ?)",
                       found)
        db.executemany("INSERT OR REPLACE INTO meter_last VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [(x.node, x.t, x.gen, x.alloc, x.principal, x.cpu_us, x.mem_mib,
                         x.storage_mib, json.dumps([[n.slot, n.gen, n.netid, n.kind.value,
                                                     n.tx_bytes, n.rx_bytes, n.tx_packets,
                                                     n.rx_packets] for n in x.nics]))
                        for x in new])
        db.executemany("DELETE FROM meter_last WHERE node=?", [(n,) for n in gone])


def compact(store: Store, now: int, age: int = DAY_US, bucket: int = MINUTE_US) -> int:
    """Merge the rows whose sample is older than ``age`` us into one per node, allocation,
    generation (interface) and ``bucket`` us of sample time: t the last sample's, t0 the first
    one's start, amounts summed (exact). Returns how many rows went. Idempotent."""
    cut = (now - age) // bucket * bucket
    with store.tx() as db:
        before = db.total_changes
        _merge(db, "meter_usage", ("node", "alloc", "principal", "gen"),
               ("node_us", "cpu_us", "mem_mib_us", "load_bytes", "storage_mib_us"), cut,
               bucket)
        _merge(db, "meter_net", ("node", "alloc", "principal", "slot", "netid", "kind", "gen"),
               ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets"), cut, bucket)
        return int(db.total_changes - before)


def _merge(db: object, table: str, keys: tuple[str, ...], sums: tuple[str, ...], cut: int,
           bucket: int) -> None:
    import sqlite3
    assert isinstance(db, sqlite3.Connection)
    k = ", ".join(keys)
    grouped = (f"SELECT MAX(t), MIN(t0), {k}, {', '.join(f'SUM({s})' for s in sums)} "
               f"FROM {table} WHERE t < ? GROUP BY t / {bucket}, {k} "
               "HAVING COUNT(*) > 1")
    rows = db.execute(grouped, (cut,)).fetchall()
    if not rows:
        return
    # the rows merged: every row of a group that has more than one
    db.execute(f"CREATE TEMP TABLE IF NOT EXISTS merged AS SELECT * FROM {table} WHERE 0")
    db.execute("DELETE FROM temp.merged")
    cols = ("t", "t0", *keys, *sums)
    db.executemany(f"INSERT INTO temp.merged ({', '.join(cols)}) VALUES "
                   f"({', '.join('?' * len(cols))})", rows)
    db.execute(f"DELETE FROM {table} WHERE t < ? AND ((t / {bucket}), {k}) IN "
               f"(SELECT t / {bucket}, {k} FROM temp.merged)", (cut,))
    db.execute(f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} "
               "FROM temp.merged")
    db.execute("DROP TABLE temp.merged")
