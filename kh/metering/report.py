"""`kh usage` and /v1/usage: a principal's (or everyone's) usage over a time range, summed.

Times (``--since``/``--until``, the API's ``since``/``until``): ``now``; ``-N[smhd]`` (that long
before now); or ISO 8601 (``2026-11-30``, ``2026-11-30T08:00``, ``...Z``, ``...+01:00``; without
an offset it is UTC), in the years 1970 to 9998 (kh.metering.clock.YEARS). Defaults: until
now, since 30 days before until. A sample counts in the range when its time does
(kh.metering.usage). ``by``: principal (default), node (and allocation), allocation, hour
(UTC), domain (traffic per domain; the rest per principal).
Amounts are exact decimals (strings in JSON and CSV).
"""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from kh.errors import UsageError
from kh.metering import clock, query
from kh.metering import store as mstore
from kh.metering.usage import US, check_range, from_us, to_us
from kh.model import DomainKind

if TYPE_CHECKING:
    from kh.store import Store

BYS = ("principal", "node", "allocation", "hour", "domain")
DEFAULT_SPAN = timedelta(days=30)
_RELATIVE = re.compile(r"-([0-9]{1,6})([smhd])", re.ASCII)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
KINDS = tuple(k.value for k in (DomainKind.PRIVATE, DomainKind.PUBLIC, DomainKind.EXTERNAL))
NET = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")
COLUMNS = ("node_seconds", "cpu_seconds", "mem_mib_seconds", "load_bytes")


def parse_time(text: object, name: str, now: datetime) -> datetime:
    """One time of a range (see the module); UsageError naming ``name`` if malformed."""
    if not isinstance(text, str) or not text or len(text) > 40:
        raise UsageError(f"{name} must be a time: now, -N[smhd] or ISO 8601, not {text!r:.60}")
    if text == "now":
        return now
    m = _RELATIVE.fullmatch(text)
    try:
        if m:
            t = now - timedelta(seconds=int(m.group(1)) * _UNIT[m.group(2)])
        else:
            t = datetime.fromisoformat(text)
            t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    except ValueError:
        raise UsageError(f"{name} {text!r} is not a time",
                         "now, -N[smhd] (e.g. -2h) or ISO 8601 (e.g. 2026-11-30T08:00Z)") from None
    except OverflowError:  # past datetime's years 1..9999
        t = None
    lo, hi = clock.YEARS
    if t is None or not lo <= t.year <= hi:  # a day either side must stay within datetime's
        raise UsageError(f"{name} {text!r} is not in the years {lo} to {hi}")
    return t


def time_range(since: object, until: object, now: datetime | None = None
               ) -> tuple[datetime, datetime]:
    """[since, until) from their texts (None: the defaults); UsageError if malformed or
    reversed."""
    now = now or datetime.now(UTC)
    end = now if until is None else parse_time(until, "until", now)
    start = end - DEFAULT_SPAN if since is None else parse_time(since, "since", now)
    check_range(start, end)
    return start, end


def check_by(by: object) -> str:
    if by is None:
        return "principal"
    if by not in BYS:
        raise UsageError(f"by must be one of {', '.join(BYS)}, not {by!r:.40}")
    return str(by)


def _sec(us: int) -> str:
    return str(Decimal(us) / US)


def report(st: Store, since: datetime, until: datetime, principal: str | None, by: str,
           token: int | None = None, floor: datetime | None = None, removed: bool = False
           ) -> dict[str, Any]:
    """The usage of ``principal`` (None: everyone; ``token``: only the allocations made with
    that token) in [since, until) by ``by``, as JSON data:
    {"since", "until" (ISO), "by", "principal", "rows": [...], "gaps": [...]}. A row: the
    principal, its keys (allocation and node, or hour; for ``domain`` traffic rows netid and
    kind), node_seconds, cpu_seconds, mem_mib_seconds (decimal strings), load_bytes, and
    ``net``: {kind: {tx_bytes, rx_bytes, tx_packets, rx_packets}}. With ``floor``, the range
    starts there at the earliest (a principal sees nothing from before it was registered:
    another principal of that name, since removed, used it). ``principal`` is the one of that
    name now, or with ``removed`` the removed ones of that name (kh.metering.query.who: a
    removed principal's rows read "NAME (removed)")."""
    lo, hi = check_range(since, until)
    if floor is not None and floor > since:  # nothing before ``floor`` is shown
        since = min(floor, until)
        lo = min(to_us(since), hi)
    usage, net = query.sums(st, lo, hi, principal, by, token, removed) if lo < hi else \
        ([], [])
    keys = {"principal": (), "node": ("allocation", "node"), "allocation": ("allocation",),
            "hour": ("hour",), "domain": ()}[by]
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}

    def row(key: tuple[Any, ...]) -> dict[str, Any]:
        if key not in rows:
            r: dict[str, Any] = {"principal": key[0]}
            for name, v in zip(keys, key[1:], strict=True):
                r[name] = from_us(v).isoformat() if name == "hour" else v
            r.update({"node_seconds": "0", "cpu_seconds": "0", "mem_mib_seconds": "0",
                      "load_bytes": 0, "net": {}})
            rows[key] = r
        return rows[key]
    n = 1 + len(keys)
    for u in usage:
        r = row(tuple(u[:n]))
        r.update({"node_seconds": _sec(u[n]), "cpu_seconds": _sec(u[n + 1]),
                  "mem_mib_seconds": _sec(u[n + 2]), "load_bytes": int(u[n + 3])})
    traffic = []
    for x in net:
        counts = dict(zip(NET, map(int, x[n + 2:]), strict=True))
        if by == "domain":
            traffic.append({"principal": x[0], "netid": x[n + 1], "kind": x[n], **counts})
            have = row((x[0],))["net"].setdefault(x[n], dict.fromkeys(NET, 0))
            for k, v in counts.items():
                have[k] += v
        else:
            row(tuple(x[:n]))["net"][x[n]] = counts
    out: dict[str, Any] = {"since": since.isoformat(), "until": until.isoformat(), "by": by,
                           "principal": principal + query.REMOVED if principal and removed
                           else principal, "rows": list(rows.values())}
    if by == "domain":
        out["traffic"] = traffic
    out["gaps"] = [{"principal": g.principal, "allocation": g.allocation, "node": g.node,
                    "start": g.start.isoformat(), "end": g.end.isoformat(), "what": g.what}
                   for g in (mstore.gaps(st, lo, hi, principal, token, removed)
                             if lo < hi else [])]
    return out


def _total(r: dict[str, Any], key: str) -> int:
    return sum(int(v[key]) for v in r["net"].values())


def text(data: dict[str, Any]) -> str:
    """The report as a table (amounts rounded for reading; --json and --csv are exact)."""
    by = data["by"]
    keys = {"node": ["ALLOC", "NODE"], "allocation": ["ALLOC"], "hour": ["HOUR (UTC)"]}.get(
        by, [])
    head = ["PRINCIPAL", *keys, "NODE-S", "CPU-S", "MEM-MiB-S", "TX-BYTES", "RX-BYTES",
            "LOAD-BYTES"]
    lines = [head]
    for r in data["rows"]:
        vals = [r["principal"]] + [str(r[k]) if k != "hour" else r[k][:16] for k in
                                   {"node": ["allocation", "node"], "allocation":
                                    ["allocation"], "hour": ["hour"]}.get(by, [])]
        lines.append(vals + [f"{Decimal(r['node_seconds']):.1f}",
                             f"{Decimal(r['cpu_seconds']):.2f}",
                             f"{Decimal(r['mem_mib_seconds']):.0f}", str(_total(r, "tx_bytes")),
                             str(_total(r, "rx_bytes")), str(r["load_bytes"])])
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = [" ".join(v.ljust(w) if i < 1 + len(keys) else v.rjust(w)
                    for i, (v, w) in enumerate(zip(x, widths, strict=True))).rstrip()
           for x in lines]
    if by == "domain":
        out.append("")
        out.append(f"{'PRINCIPAL':<16} {'DOMAIN':>6} {'KIND':<8} {'TX-BYTES':>12} "
                   f"{'RX-BYTES':>12} {'TX-PKTS':>9} {'RX-PKTS':>9}")
        out += [f"{t['principal']:<16} {t['netid']:>6} {t['kind']:<8} {t['tx_bytes']:>12} "
                f"{t['rx_bytes']:>12} {t['tx_packets']:>9} {t['rx_packets']:>9}"
                for t in data.get("traffic", [])]
    out.append(f"from {data['since']} until {data['until']}"
               + ("" if data["rows"] else ": no usage"))
    out += [f"gap: node {g['node']} (allocation {g['allocation']}, {g['principal']}) "
            f"{g['start']} .. {g['end']}: {g['what']} not metered" for g in data["gaps"]]
    return "\n".join(out) + "\n"


def to_csv(data: dict[str, Any]) -> str:
    """The report as CSV: one line per row, exact amounts; traffic per domain kind columns
    (``domain``: one line per domain instead)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if data["by"] == "domain":
        w.writerow(["principal", "netid", "kind", *NET])
        for t in data.get("traffic", []):
            w.writerow([t["principal"], t["netid"], t["kind"], *(t[k] for k in NET)])
        return buf.getvalue()
    keys = {"node": ["allocation", "node"], "allocation": ["allocation"],
            "hour": ["hour"]}.get(data["by"], [])
    w.writerow(["principal", *keys, *COLUMNS, *(f"{k}_{c}" for k in KINDS for c in NET)])
    for r in data["rows"]:
        w.writerow([r["principal"], *(r[k] for k in keys), *(r[c] for c in COLUMNS),
                    *(r["net"].get(k, {}).get(c, 0) for k in KINDS for c in NET)])
    return buf.getvalue()
