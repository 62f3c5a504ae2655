"""The meter's tables in khd's state (kh.store_schema, version 6): writes and reads.

meter_usage: one row per sample of an allocated node, in (principal, t) order: t (the sample's
time, us since the epoch), node, alloc (that held the node since its previous sample), and what
it used since then, the previous sample of the same generation: node_us (the interval's length),
cpu_us, mem_mib (reserved; memory-time is mem_mib x node_us), load_bytes. meter_net: the same
per domain interface (slot, netid; the kind follows from the netid) with the node's tx/rx bytes
and packets; rows with nothing sent or received are not written. meter_principals: every
principal with rows. meter_gaps: what could not be measured (t0, t, node, alloc, principal,
what). meter_last: per node, its last sample's raw counters with their generations (JSON for
the interfaces): what the next sample is compared with, also by the next khd.

Compaction (compact) merges the rows older than a day into one per node, allocation (and
interface) and minute, at the minute's last sample: sums stay exact, since rows only add up.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import astuple, dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from kh.metering.usage import (
    US,
    Gap,
    from_us,
)
from kh.model import EXTERNAL, PUBLIC, DomainKind

if TYPE_CHECKING:
    from kh.store import Store

DAY_US = 86400 * US
HOUR_US = 3600 * US
MINUTE_US = 60 * US
KEEP_US = 7 * DAY_US  # samples are kept this long; the hourly sums for good


@dataclass(frozen=True)
class Nic:
    """One domain interface's raw counters as the host sees them on its tap, turned to the
    node's view: tx = what the node sent (the tap received)."""

    slot: int
    gen: int  # the tap's ifindex: a recreated tap gets a new one
    netid: int | None  # the domain it is plugged into from this sample on (None: none)
    kind: DomainKind | None
    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int


@dataclass(frozen=True)
class Last:
    """A node's last sample: its time (us), QEMU generation, who held it from then on (None:
    no one), raw CPU us, reserved memory (MiB) and interfaces."""

    node: int
    t: int
    gen: str
    alloc: int | None
    principal: str | None
    cpu_us: int
    mem_mib: int
    nics: tuple[Nic, ...]


def _amount(value: int, scale: int) -> Decimal:
    return Decimal(value) / scale if scale != 1 else Decimal(value)


def kind_of(netid: int) -> DomainKind:
    return DomainKind.EXTERNAL if netid == EXTERNAL else DomainKind.PUBLIC \
        if netid == PUBLIC else DomainKind.PRIVATE


def gaps(store: Store, lo: int, hi: int, principal: str | None, token: int | None = None,
         removed: bool = False) -> list[Gap]:
    """See kh.metering.usage.gaps (times in us; ``token`` as for sums; ``principal`` and
    ``removed`` as kh.metering.query.who selects, a removed principal's labelled so)."""
    from kh.metering.query import LABEL, who
    sel, by = who(principal, removed) if principal is not None else ("1", [])
    where = f"t > ? AND t0 < ? AND {sel}"
    args: tuple[object, ...] = (lo, hi, *by)
    if token is not None:
        where += " AND alloc IN (SELECT id FROM allocations WHERE token = ?)"
        args = (*args, token)
    return [Gap(r[0], r[1], r[2], from_us(r[3]), from_us(r[4]), r[5]) for r in store._rows(
        f"SELECT {LABEL}, alloc, node, t0, t, what FROM meter_gaps x WHERE {where} "
        "ORDER BY t0, node", args)]


# -- writes (the sampler's) ---------------------------------------------------------------------
def lasts(store: Store) -> dict[int, Last]:
    """Every node's last sample (kept across khd restarts)."""
    out = {}
    for r in store._rows("SELECT node, t, gen, alloc, principal, cpu_us, mem_mib, nics "
                         "FROM meter_last"):
        nics = tuple(Nic(n[0], n[1], n[2], None if n[2] is None else kind_of(n[2]), *n[3:7])
                     for n in json.loads(r[7]))
        out[r[0]] = Last(r[0], r[1], r[2], r[3], r[4], r[5], r[6], nics)
    return out


@dataclass(frozen=True)
class Usage:
    """What node ``node`` used in the ``node_us`` before ``t``, charged to ``alloc``."""

    principal: str
    t: int
    node: int
    alloc: int
    node_us: int
    cpu_us: int
    mem_mib: int
    load_bytes: int


@dataclass(frozen=True)
class NetUsage:
    """What node ``node`` sent and received on interface ``slot``, in domain ``netid``."""

    principal: str
    t: int
    node: int
    slot: int
    alloc: int
    netid: int
    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int


GapRow = tuple[int, int, int, int, str, str]  # t0, t (us), node, alloc, principal, what


def write(store: Store, usage: list[Usage], net: list[NetUsage], found: list[GapRow],
          new: list[Last], gone: list[int]) -> None:
    """One sample's outcome in one transaction: usage rows, gaps, the nodes' new last samples,
    and the nodes no longer metered."""
    with store.tx() as db:
        db.executemany("INSERT OR IGNORE INTO meter_principals VALUES (?)",
                       sorted({(u.principal,) for u in usage}))
        db.executemany("INSERT INTO meter_usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       [astuple(u) for u in usage])
        db.executemany("INSERT INTO meter_net VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [astuple(n) for n in net])
        db.executemany("INSERT INTO meter_hours VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO "
                       "UPDATE SET node_us = node_us + excluded.node_us, cpu_us = cpu_us + "
                       "excluded.cpu_us, mem_mib_us = mem_mib_us + excluded.mem_mib_us, "
                       "load_bytes = load_bytes + excluded.load_bytes",
                       [(u.principal, u.t // HOUR_US * HOUR_US, u.node, u.alloc, u.node_us,
                         u.cpu_us, u.mem_mib * u.node_us, u.load_bytes) for u in usage])
        db.executemany("INSERT INTO meter_net_hours VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON "
                       "CONFLICT DO UPDATE SET tx_bytes = tx_bytes + excluded.tx_bytes, "
                       "rx_bytes = rx_bytes + excluded.rx_bytes, tx_packets = tx_packets + "
                       "excluded.tx_packets, rx_packets = rx_packets + excluded.rx_packets",
                       [(n.principal, n.t // HOUR_US * HOUR_US, n.node, n.slot, n.alloc,
                         n.netid, n.tx_bytes, n.rx_bytes, n.tx_packets, n.rx_packets)
                        for n in net])
        db.executemany("INSERT INTO meter_gaps VALUES (?, ?, ?, ?, ?, ?)", found)
        db.executemany("INSERT OR REPLACE INTO meter_last VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       [(x.node, x.t, x.gen, x.alloc, x.principal, x.cpu_us, x.mem_mib,
                         json.dumps([[n.slot, n.gen, n.netid, n.tx_bytes, n.rx_bytes,
                                      n.tx_packets, n.rx_packets] for n in x.nics]))
                        for x in new])
        db.executemany("DELETE FROM meter_last WHERE node=?", [(n,) for n in gone])


def compact(store: Store, now: int, age: int = DAY_US, bucket: int = MINUTE_US,
            keep: int = KEEP_US) -> int:
    """Merge the rows whose sample is older than ``age`` us (whole buckets only) into one per
    principal, node, allocation (interface, domain) and ``bucket`` us of sample time, at the
    bucket's last sample, amounts summed: exact. Drop the samples older than ``keep`` us
    (whole hours; their hourly sums stay) and move the horizon (kh.metering.query) there.
    Returns how many rows were merged. Idempotent."""
    cut = (now - age) // bucket * bucket
    edge = (now - keep) // HOUR_US * HOUR_US
    with store.tx() as db:
        old = db.execute("SELECT value FROM meta WHERE key='meter_horizon'").fetchone()
        if old is None or int(old[0]) < edge:
            db.execute("DELETE FROM meter_usage WHERE t < ?", (edge,))
            db.execute("DELETE FROM meter_net WHERE t < ?", (edge,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('meter_horizon', ?)", (str(edge),))
        before = db.total_changes
        _merge(db, "meter_usage", ("principal", "node", "alloc", "mem_mib"),
               ("node_us", "cpu_us", "load_bytes"), cut, bucket)
        _merge(db, "meter_net", ("principal", "node", "slot", "alloc", "netid"),
               ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets"), cut, bucket)
        return int(db.total_changes - before) // 2  # each merged row: a delete, an insert


def _merge(db: sqlite3.Connection, table: str, keys: tuple[str, ...], sums: tuple[str, ...],
           cut: int, bucket: int) -> None:
    k = ", ".join(keys)
    rows = db.execute(f"SELECT MAX(t), {k}, {', '.join(f'SUM({s})' for s in sums)}, COUNT(*) "
                      f"FROM {table} WHERE t < ? GROUP BY t / {bucket}, {k} "
                      "HAVING COUNT(*) > 1", (cut,)).fetchall()
    cols = ("t", *keys, *sums)
    marks = ", ".join("?" * len(cols))
    match = " AND ".join(f"{c} = ?" for c in keys)
    for r in rows:
        t, key = r[0], r[1:1 + len(keys)]
        db.execute(f"DELETE FROM {table} WHERE t >= ? AND t <= ? AND {match}",
                   (t // bucket * bucket, t, *key))
        db.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})", r[:-1])



def known(store: Store, principal: str) -> bool:
    """A principal of the state, or one whose usage is kept (it may have been removed)."""
    return store.principal(principal) is not None or bool(store._rows(
        "SELECT 1 FROM meter_principals WHERE name=?", (principal,)))
