"""Reading the meter's tables (kh.metering.store): sums over a time range, fast.

Usage is kept twice: per sample (meter_usage, meter_net; merged per minute after a day, dropped
after a week) and per hour of sample time (meter_hours, meter_net_hours; updated with every
sample, kept). A range [lo, hi) is read as:

- before the horizon (the oldest sample still kept, a whole hour; ``meter_horizon`` in table
  ``meta``): from the hourly sums, the hours that hold lo and hi taken whole;
- after it: the whole hours from the hourly sums and the partial hours at either end from the
  samples (``hourly``), or everything from the samples (a bucket finer than an hour).

So a month of 64 nodes is ~46,000 hourly rows, not millions of samples; the sums are the same,
exactly, since both tables hold the same increases.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from kh.metering.store import kind_of
from kh.metering.usage import UNITS, US, Grain, Quantity, UsageRecord, from_us

if TYPE_CHECKING:
    from kh.store import Store

HOUR_US = 3600 * US
_USAGE = ("node_us", "cpu_us", "mem_mib_us", "load_bytes")
_NET = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")
_SOURCES = {  # per table: (samples, their time, their columns; hourly sums)
    "usage": ("meter_usage", "t", "node_us, cpu_us, mem_mib * node_us AS mem_mib_us, load_bytes",
              "meter_hours", "node, alloc"),
    "net": ("meter_net", "t", "tx_bytes, rx_bytes, tx_packets, rx_packets", "meter_net_hours",
            "node, alloc, slot, netid")}
_QUANTITIES = {"usage": ((Quantity.NODE_SECONDS, US), (Quantity.CPU_SECONDS, US),
                         (Quantity.MEM_MIB_SECONDS, US), (Quantity.LOAD_BYTES, 1)),
               "net": ((Quantity.NET_TX_BYTES, 1), (Quantity.NET_RX_BYTES, 1),
                       (Quantity.NET_TX_PACKETS, 1), (Quantity.NET_RX_PACKETS, 1))}
_GRAIN: dict[str, tuple[str, ...]] = {"node": ("alloc", "node"), "allocation": ("alloc",),
                                      "principal": ()}


def horizon(store: Store) -> int:
    """The oldest sample time (us) still kept per sample; 0: all are."""
    rows = store._rows("SELECT value FROM meta WHERE key='meter_horizon'")
    return int(rows[0][0]) if rows else 0


def segments(lo: int, hi: int, h: int, hourly: bool) -> list[tuple[str, int, int]]:
    """[lo, hi) as ("hour" | "raw", start, end) pieces (see the module); ``h`` the horizon."""
    out: list[tuple[str, int, int]] = []
    if lo < h:
        out.append(("hour", lo // HOUR_US * HOUR_US, min(-(-hi // HOUR_US) * HOUR_US, h)))
    a = max(lo, h)
    if a >= hi:
        return out
    first, last = -(-a // HOUR_US) * HOUR_US, hi // HOUR_US * HOUR_US
    if hourly and first < last:
        out += [("raw", a, first), ("hour", first, last), ("raw", last, hi)]
    else:
        out.append(("raw", a, hi))
    return [s for s in out if s[1] < s[2]]


# A principal is a name and the allocations made under it: a principal removed (its
# allocations forgotten; their ids are never given again) and another registered with its name
# are two. A row whose allocation is not its principal's now is a removed namesake's.
CURRENT = ("EXISTS (SELECT 1 FROM allocations a WHERE a.id = x.alloc "
           "AND a.principal = x.principal)")
REMOVED = " (removed)"  # the label of a removed principal's rows, after its name
LABEL = f"CASE WHEN {CURRENT} THEN x.principal ELSE x.principal || '{REMOVED}' END"


def who(principal: str | None, removed: bool) -> tuple[str, list[object]]:
    """The WHERE clause (over a meter table aliased ``x``) and its arguments selecting
    ``principal``'s rows: those of the principal of that name now, or with ``removed`` those
    of the removed principals of that name; None: every principal's."""
    if principal is None:
        return "x.principal IN (SELECT name FROM meter_principals)", []
    return f"x.principal = ? AND {'NOT ' if removed else ''}{CURRENT}", [principal]


def _union(kind: str, pieces: list[tuple[str, int, int]], principal: str | None,
           token: int | None, removed: bool = False) -> tuple[str, list[object]]:
    """One SELECT of (principal, t, width, node, alloc[, slot, netid], amounts...) over the
    pieces: samples with their own time and width 0, hourly sums at the hour's start, width
    one hour. A removed principal's rows carry its name and REMOVED (see who)."""
    raw, t, cols, hours, keys = _SOURCES[kind]
    names = _USAGE if kind == "usage" else _NET
    where, by = who(principal, removed)
    tok = " AND alloc IN (SELECT id FROM allocations WHERE token = ?)" if token else ""
    parts: list[str] = []
    args: list[object] = []
    for src, a, b in pieces:
        if src == "raw":
            parts.append(f"SELECT {LABEL} AS principal, {t} AS t, 0 AS w, {keys}, {cols} "
                         f"FROM {raw} x WHERE {where} AND {t} >= ? AND {t} < ?{tok}")
        else:
            parts.append(f"SELECT {LABEL} AS principal, hour AS t, {HOUR_US} AS w, {keys}, "
                         f"{', '.join(names)} FROM {hours} x WHERE {where} AND hour >= ? AND "
                         f"hour < ?{tok}")
        args += by + [a, b] + ([token] if token else [])
    return " UNION ALL ".join(parts), args


def grouped(store: Store, kind: str, lo: int, hi: int, principal: str | None,
            keys: tuple[str, ...], *, step: int | None = None, token: int | None = None,
            removed: bool = False) -> list[tuple[Any, ...]]:
    """Sums of table ``kind`` ("usage" or "net") over [lo, hi), grouped by principal and
    ``keys`` (SQL over the union's columns: t, w, node, alloc, slot, netid), and by bucket of
    ``step`` us when given (then the first two columns after the principal are the bucket and
    its width). Rows: principal, [bucket, width,] *keys, then the amounts. ``principal`` and
    ``removed`` select as who does."""
    pieces = segments(lo, hi, horizon(store), step is None or step % HOUR_US == 0)
    if not pieces:
        return []
    union, args = _union(kind, pieces, principal, token, removed)
    names = _USAGE if kind == "usage" else _NET
    lead = [f"(t / {step}) * {step}", f"MAX(w, {step})"] if step is not None else []
    cols = ", ".join(["principal", *lead, *keys])
    sums = ", ".join(f"SUM({n})" for n in names)
    group = ", ".join(["principal", *lead, *keys])
    return store._rows(f"SELECT {cols}, {sums} FROM ({union}) GROUP BY {group} "
                       f"ORDER BY {group}", tuple(args))


def records(store: Store, lo: int, hi: int, principal: str | None, step: int,
            by: Grain, removed: bool = False) -> list[UsageRecord]:
    """See kh.metering.usage.usage_records (times and step in us). A record read from hourly
    sums (before the horizon, or with a step finer than an hour) spans its hour."""
    keys = _GRAIN[by]
    out: list[UsageRecord] = []
    for kind in ("usage", "net"):
        extra = ("netid",) if kind == "net" else ()
        for row in grouped(store, kind, lo, hi, principal, keys + extra, step=step,
                           removed=removed):
            who, b, w = row[0], row[1], row[2]
            alloc = row[3] if keys else None
            node = row[4] if len(keys) > 1 else None
            netid = row[3 + len(keys)] if extra else None
            for (q, scale), v in zip(_QUANTITIES[kind], row[3 + len(keys) + len(extra):],
                                     strict=True):
                if v:
                    out.append(UsageRecord(
                        who, alloc, node, q, None if netid is None else kind_of(netid), netid,
                        from_us(b), from_us(b + w), Decimal(v) / scale if scale != 1 else
                        Decimal(v), UNITS[q]))
    order = list(Quantity)
    out.sort(key=lambda r: (r.start, r.principal, r.allocation or 0, r.node or 0,
                            order.index(r.quantity), -1 if r.netid is None else r.netid))
    return out


_BY_KEYS = {"principal": (), "node": ("alloc", "node"), "allocation": ("alloc",),
            "hour": (f"(t / {HOUR_US}) * {HOUR_US}",), "domain": ()}


def sums(store: Store, lo: int, hi: int, principal: str | None, by: str,
         token: int | None = None, removed: bool = False
         ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Integer sums over the samples taken in [lo, hi) us (of the allocations made with
    ``token``, if one), per principal and ``by`` (principal, node, allocation, hour, domain):
    (usage rows: principal, *keys, node_us, cpu_us, mem_mib_us, load_bytes; net rows:
    principal, *keys, kind, netid (None unless by domain), tx_bytes, rx_bytes, tx_packets,
    rx_packets). For ``domain``, usage rows are per principal and net rows per domain."""
    keys = _BY_KEYS[by]
    usage = grouped(store, "usage", lo, hi, principal, keys, token=token, removed=removed)
    if by == "domain":
        net = [(r[0], kind_of(r[1]).value, r[1], *r[2:])
               for r in grouped(store, "net", lo, hi, principal, ("netid",), token=token,
                                removed=removed)]
    else:
        got: dict[tuple[Any, ...], list[int]] = {}
        for r in grouped(store, "net", lo, hi, principal, (*keys, "netid"), token=token,
                         removed=removed):
            key = (*r[:1 + len(keys)], kind_of(r[1 + len(keys)]).value, None)
            acc = got.setdefault(key, [0, 0, 0, 0])
            for i, v in enumerate(r[2 + len(keys):]):
                acc[i] += v
        net = [(*k, *v) for k, v in sorted(got.items(), key=lambda kv: tuple(
            "" if x is None else x for x in kv[0]))]
    return usage, net
