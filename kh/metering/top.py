"""`kh top`: what each node is doing now, from the host's own counters (the meter's).

khd answers ``GET /v1/top`` (the operator: every node) and ``POST /v1/top`` (a principal, with
its credential: its own nodes only) with each node's state and holder and, for nodes held now,
their raw cumulative counters read at that moment (kh.metering.live.read_live: the QEMU's CPU
time, its resident memory, each domain interface's bytes, with their generations). The client
takes two reads and turns the differences into rates (``rates``): CPU % of one host core, bytes
per second sent and received per domain. A counter whose generation changed between the reads (a new
QEMU, a recreated tap) or that went down gives no rate for that read, never a negative one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kh.admission import AuthError
from kh.service import request as rq

if TYPE_CHECKING:
    from kh.metering.live import LiveNode
    from kh.service.core import Service
    from kh.service.request import Caller

Result = tuple[int, str, Any]


def snapshot(nodes: list[LiveNode]) -> dict[str, Any]:
    """Live reads as JSON: {"nodes": [{node, t (s), state, principal, allocation, mem_mib,
    resident_bytes, cpu_gen, cpu_us, nics: [{slot, netid, kind, gen, tx_bytes, rx_bytes}]}]};
    counters None where not read."""
    return {"nodes": [{
        "node": x.node, "t": x.t, "state": x.state, "principal": x.principal,
        "allocation": x.allocation, "mem_mib": x.mem_mib, "resident_bytes": x.resident_bytes,
        "cpu_gen": x.cpu_gen, "cpu_us": x.cpu_us,
        "nics": [{"slot": c.slot, "netid": c.netid, "kind": c.kind.value if c.kind else None,
                  "gen": c.gen, "tx_bytes": c.tx_bytes, "rx_bytes": c.rx_bytes}
                 for c in x.nics if c.netid is not None]} for x in nodes]}


@rq.takes()
def route_get(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    """GET /v1/top: every node (the operator's: khd's unix socket as root)."""
    if not caller.operator:
        raise AuthError("`kh top` over TCP needs a principal's credential", "POST /v1/top")
    from kh.metering.live import read_live
    data = snapshot(read_live(svc))
    return 200, _plain(data), data


@rq.takes(*rq.PRINCIPAL)
def route_post(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    """POST /v1/top {user, credential}: the principal's own nodes."""
    user = rq.user(body)
    svc.authenticate(user, rq.credential(body))
    from kh.metering.live import read_live
    data = snapshot(read_live(svc, user))
    return 200, _plain(data), data


def _plain(data: dict[str, Any]) -> str:
    """The raw counters as text (kh top shows rates; this is for curl)."""
    lines = [f"{'NODE':>5} {'STATE':<10} {'PRINCIPAL':<12} {'CPU_US':>14} NICS"]
    for n in data["nodes"]:
        nics = " ".join(f"{c['netid']}:{c['tx_bytes']}/{c['rx_bytes']}" for c in n["nics"])
        lines.append(f"{n['node']:>5} {n['state']:<10} {n['principal'] or '-':<12} "
                     f"{n['cpu_us'] if n['cpu_us'] is not None else '-'!s:>14} {nics}")
    return "\n".join(lines) + "\n"


ROUTES = [("GET", r"/v1/top", route_get), ("POST", r"/v1/top", route_post)]


# -- the client's side: rates from two snapshots ----------------------------------------------
@dataclass(frozen=True)
class Traffic:
    """A domain interface's rates: bytes per second the node sent and received."""

    netid: int
    kind: str | None
    tx: float | None  # None: no rate this time (a new tap, or a counter that went down)
    rx: float | None

    @property
    def label(self) -> str:
        return {"external": "ext", "public": "pub"}.get(self.kind or "", str(self.netid))


@dataclass(frozen=True)
class Row:
    node: int
    state: str
    principal: str | None
    allocation: int | None
    cpu_pct: float | None  # of one host core; None: no rate (not held, or a new QEMU)
    mem_mib: int | None  # reserved
    resident: int | None  # bytes the node's QEMU holds in RAM now, where the host knows
    traffic: tuple[Traffic, ...]

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "state": self.state, "principal": self.principal,
                "allocation": self.allocation,
                "cpu_percent": None if self.cpu_pct is None else round(self.cpu_pct, 2),
                "mem_mib": self.mem_mib, "resident_bytes": self.resident,
                "domains": [{"netid": t.netid, "kind": t.kind,
                             "tx_bytes_per_s": None if t.tx is None else round(t.tx, 1),
                             "rx_bytes_per_s": None if t.rx is None else round(t.rx, 1)}
                            for t in self.traffic]}


def rates(before: dict[str, Any], now: dict[str, Any]) -> list[Row]:
    """Each node of ``now`` with its rates since ``before`` (two snapshots' JSON): over the
    time between the node's two reads, while it stayed in the same allocation and its
    counters in the same generation without going down."""
    old = {n["node"]: n for n in before["nodes"]}
    return [_row(n, old.get(n["node"])) for n in now["nodes"]]


def _row(n: dict[str, Any], o: dict[str, Any] | None) -> Row:
    if o is None or o["allocation"] != n["allocation"] or not n["t"] > o["t"]:
        o = None
    dt = 0.0 if o is None else n["t"] - o["t"]

    def rate(a: int | None, b: int | None) -> float | None:
        return None if a is None or b is None or b < a or o is None else (b - a) / dt

    cpu = None
    if o is not None and o["cpu_gen"] == n["cpu_gen"]:
        used = rate(o["cpu_us"], n["cpu_us"])  # us per s
        cpu = None if used is None else used / 1e4  # % of one core
    prev = {} if o is None else {c["slot"]: c for c in o["nics"]}
    traffic = []
    for c in n["nics"]:
        p = prev.get(c["slot"])
        if p is None or p["gen"] != c["gen"] or p["netid"] != c["netid"]:
            traffic.append(Traffic(c["netid"], c["kind"], None, None))
        else:
            traffic.append(Traffic(c["netid"], c["kind"], rate(p["tx_bytes"], c["tx_bytes"]),
                                   rate(p["rx_bytes"], c["rx_bytes"])))
    return Row(n["node"], n["state"], n["principal"], n["allocation"], cpu, n["mem_mib"],
               n.get("resident_bytes"), tuple(traffic))


def human_rate(value: float | None) -> str:
    """Bytes per second in a few characters: 0 B, 950 B, 1.2 kB, 3.4 MB (SI, per second)."""
    if value is None:
        return "?"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


HEADER = ("NODE", "STATE", "PRINCIPAL", "ALLOC", "CPU%", "MEM MiB", "RSS MiB",
          "DOMAIN TX/s RX/s")
RIGHT = frozenset({0, 3, 4, 5, 6})  # columns aligned right


def cells(r: Row) -> tuple[str, ...]:
    """A row's columns as text (HEADER's order), for the screen and for --once alike."""
    doms = "  ".join(f"{t.label}: {human_rate(t.tx)} {human_rate(t.rx)}" for t in r.traffic)
    return (str(r.node), r.state, r.principal or "-",
            "-" if r.allocation is None else str(r.allocation),
            "-" if r.cpu_pct is None else f"{r.cpu_pct:.1f}",
            "-" if r.mem_mib is None else str(r.mem_mib),
            "-" if r.resident is None else f"{r.resident / 2**20:.0f}", doms or "-")


def text(rows: list[Row]) -> str:
    """One screen as plain text (`kh top --once`)."""
    table = [HEADER, *(cells(r) for r in rows)]
    w = [max(len(row[i]) for row in table) for i in range(len(HEADER) - 1)]
    out = []
    for row in table:
        cols = [c.rjust(w[i]) if i in RIGHT else c.ljust(w[i]) for i, c in enumerate(row[:-1])]
        out.append("  ".join([*cols, row[-1]]).rstrip())
    return "\n".join(out) + "\n"
