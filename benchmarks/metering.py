"""Metering (issue 14): what the meter costs, and how `kh usage` answers over 30 days.

1. The sampler for 64 allocated nodes: 64 stand-in QEMUs (`sleep` processes, each in a cgroup
   of its own made by kh.hw.cgroup when the host has them, else read through /proc/PID/stat)
   and 4 real taps each (256, in a network namespace of the benchmark's own; needs root,
   otherwise no taps), over a real store. The meter's thread takes SAMPLES samples; its own
   CPU time (thread_time) per sample, and the share of one core that is at a 10 s interval.
2. A store holding 30 days of 64 nodes (8 principals of 8; see synthesize), each node with one
   interface's traffic; then a compaction (a day merged per minute, a day of samples dropped),
   the state's size, and how long the reports take in-process: everyone's (`kh usage`), one
   principal's by node and by hour, and the records rating reads (usage_records, hourly and
   per minute).

Prints numbers; asserts nothing. `python -m benchmarks.metering [--samples N] [--skip-store]`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kh import proc
from kh.hw import cgroup
from kh.metering import report
from kh.metering import store as mstore
from kh.metering.sampler import HostSource, Meter
from kh.metering.usage import US, usage_records
from kh.model import Domain, DomainKind, NodeState
from kh.service import membership
from kh.store import NodeRow, Store

NODES = 64
PRINCIPALS = 8
SLOTS = 4
DAY = 86400


@dataclass
class FakeNode:
    pid: int


class FakeBackend:
    """What HostSource reads of a backend: running nodes with a PID, and their accounting."""

    name = "qemu"

    def __init__(self, cgroups: dict[int, cgroup.NodeCgroup]) -> None:
        self.running: dict[int, FakeNode] = {}
        self.cgroups = cgroups

    def usage(self, number: int) -> cgroup.Usage | None:
        cg = self.cgroups.get(number)
        return None if cg is None else cgroup.usage(cg)


def populate(st: Store, pids: dict[int, int]) -> None:
    membership.ensure_schema(st)
    for p in range(PRINCIPALS):
        user = f"p{p}"
        st.add_principal(user, b"s", b"h")
        st.add_domain(Domain(3 + p, DomainKind.PRIVATE, user))
        for k in range(NODES // PRINCIPALS):
            n = 1 + p * (NODES // PRINCIPALS) + k
            alloc = st.add_allocation(user, (3 + p, 1, 0))
            st.put_node(NodeRow(n, n, NodeState.ALLOCATED, pids[n], alloc, "/tmp", time.time(),
                                None))


def sampler(samples: int) -> None:
    root = os.geteuid() == 0
    lay = cgroup.detect() if root else None
    prefix = f"kb{os.getpid() % 100000}"
    netns = f"{prefix}-meter" if root else None
    cgs: dict[int, cgroup.NodeCgroup] = {}
    sleepers: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="kh-bench-meter-"))
    try:
        if lay is not None:
            try:
                cgroup.prepare(lay, prefix)
            except cgroup.CgroupError as e:
                print(f"(no cgroups: {e})")
                lay = None
        for n in range(1, NODES + 1):
            cg = cgroup.create(lay, prefix, n, 64 << 20) if lay is not None else None
            sleepers.append(proc.start(["sleep", "3600"], cgroups=cg.procs if cg else ()))
            if cg is not None:
                cgs[n] = cg
        if netns is not None:
            from pyroute2 import NetNS
            from pyroute2 import netns as pnetns
            pnetns.create(netns)
            with NetNS(netns) as ns:
                for n in range(1, NODES + 1):
                    for s in range(SLOTS):
                        ns.link("add", ifname=f"{prefix}{n}s{s}", kind="tuntap", mode="tap")
        backend = FakeBackend(cgs)
        for n, p in enumerate(sleepers, 1):
            backend.running[n] = FakeNode(p.pid)
        st = Store(tmp / "state.db")
        populate(st, {n: p.pid for n, p in enumerate(sleepers, 1)})
        m = Meter(st, HostSource(backend, netns), mem_mib=256,  # type: ignore[arg-type]
                  tap_name=lambda n, s: f"{prefix}{n}s{s}", interval=3600)
        m.start()
        m.sample()  # the first one after the start's: both warm the caches
        c0, w0 = m.cpu_seconds, time.monotonic()
        for _ in range(samples):
            m.sample()
        cpu = (m.cpu_seconds - c0) / samples
        wall = (time.monotonic() - w0) / samples
        c1, w1 = m.cpu_seconds, time.monotonic()
        for i in range(samples):  # what a khget or a release waits for: its nodes' sample
            m.sample([1 + i % NODES])
        hook_cpu = (m.cpu_seconds - c1) / samples
        hook_wall = (time.monotonic() - w1) / samples
        m.stop()
        rows = st._rows("SELECT COUNT(*) FROM meter_usage")[0][0]
        print(f"sampler, {NODES} nodes ({'cgroups' if cgs else '/proc/PID/stat'}, "
              f"{NODES * SLOTS if netns else 0} taps): {cpu * 1000:.2f} ms CPU per sample "
              f"({wall * 1000:.2f} ms wall), {cpu / 10 * 100:.3f} % of one core at 10 s "
              f"({rows} usage rows written); one node's sample (a khget's, a release's): "
              f"{hook_cpu * 1000:.2f} ms CPU, {hook_wall * 1000:.2f} ms wall")
        st.close()
    finally:
        for p in sleepers:
            proc.reap(p, grace=0.0)
        if cgs:
            cgroup.remove_all(prefix)
        if netns is not None:
            from pyroute2 import netns as pnetns
            pnetns.remove(netns)
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def synthesize(path: Path, now: int) -> None:
    """30 days of 64 nodes straight into a new state, as the sampler and a week of compaction
    would have left it: samples every 10 s for the last 2 days (so one day is still to merge),
    one a minute for the 6 days before, only hourly sums before that (and the 8th day's
    samples, still to drop); the hourly sums of all 30 days. One transaction."""
    st = Store(path)
    rng = random.Random(14)
    node_rows, net_rows = [], []
    hours: dict[tuple[str, int, int], list[int]] = {}
    net_hours: dict[tuple[str, int, int, int], list[int]] = {}
    users = [f"p{p}" for p in range(PRINCIPALS)]
    hour = 3600 * US
    for n in range(1, NODES + 1):
        user = users[(n - 1) // (NODES // PRINCIPALS)]
        alloc, netid = n, 3 + (n - 1) // (NODES // PRINCIPALS)
        t = now - 30 * DAY * US
        while t < now:
            step = 60 if t < now - 2 * DAY * US else 10
            t += step * US
            cpu, b = rng.randrange(0, step * 20_000), rng.randrange(0, step * 2000)
            h = hours.setdefault((user, t // hour * hour, n), [0, 0, 0])
            h[0] += step * US
            h[1] += cpu
            h[2] += 256 * step * US
            nh = net_hours.setdefault((user, t // hour * hour, n, netid), [0, 0, 0, 0])
            for i, v in enumerate((b, b // 2, b // 1000, b // 2000)):
                nh[i] += v
            if t >= now - 8 * DAY * US:
                node_rows.append((user, t, n, alloc, step * US, cpu, 256, 0))
                net_rows.append((user, t, n, 0, alloc, netid, b, b // 2, b // 1000, b // 2000))
    with st.tx() as db:
        # the principals and their allocations (node n's is n): usage is a principal's by its
        # allocations (kh.metering.query.who), not by its name alone
        start = (now - 30 * DAY * US) / US
        db.executemany("INSERT INTO principals (name, salt, hash, created) VALUES "
                       "(?, x'00', x'00', ?)", [(u, start) for u in users])
        db.executemany("INSERT INTO allocations (id, principal, created) VALUES (?, ?, ?)",
                       [(n, users[(n - 1) // (NODES // PRINCIPALS)], start)
                        for n in range(1, NODES + 1)])
        db.executemany("INSERT OR IGNORE INTO meter_principals VALUES (?)",
                       [(u,) for u in users])
        db.executemany("INSERT INTO meter_usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)", node_rows)
        db.executemany("INSERT INTO meter_net VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", net_rows)
        db.executemany("INSERT INTO meter_hours VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       [(u, h, n, n, *v, 0) for (u, h, n), v in hours.items()])
        db.executemany("INSERT INTO meter_net_hours VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [(u, h, n, 0, n, nid, *v) for (u, h, n, nid), v in net_hours.items()])
        db.execute("INSERT INTO meta VALUES ('meter_horizon', ?)",
                   (str((now - 8 * DAY * US) // hour * hour),))
    st.close()


@contextlib.contextmanager
def synthesized(prefix: str) -> Iterator[tuple[Store, Path, int, float]]:
    """A new state in a temporary directory (named by ``prefix``) holding synthesize's 30
    days up to ``now`` (the last whole minute, us since the epoch): the open store, its path,
    ``now`` and the seconds the synthesis took. The store is closed and the directory removed
    afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    path = tmp / "state.db"
    now = int(time.time() // 60 * 60 * US)
    try:
        t0 = time.perf_counter()
        synthesize(path, now)
        seconds = time.perf_counter() - t0
        st = Store(path)
        try:
            yield st, path, now, seconds
        finally:
            st.close()
    finally:
        shutil.rmtree(tmp)


def size(path: Path) -> float:
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20


def timed(what: str, fn) -> object:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn()
    print(f"  {what}: {time.perf_counter() - t0:.3f} s")
    return out


def store_bench() -> None:
    with synthesized("kh-bench-usage-") as (st, path, now, seconds):
        rows = st._rows("SELECT COUNT(*) FROM meter_usage")[0][0]
        print(f"30 days x {NODES} nodes synthesized in {seconds:.1f} s: "
              f"{rows} usage rows (+ as many traffic rows), {size(path):.1f} MiB")
        merged = timed("compaction: the day older than a day (10 s -> 1 min), the 8th day's "
                       "samples dropped", lambda: mstore.compact(st, now))
        rows = st._rows("SELECT COUNT(*) FROM meter_usage")[0][0]
        print(f"  {merged} rows merged; now {rows} usage rows, {size(path):.1f} MiB "
              f"(after VACUUM: ", end="")
        st.db.execute("VACUUM")
        print(f"{size(path):.1f} MiB)")
        until = datetime.fromtimestamp(now / US, UTC)
        since = until - timedelta(days=30)
        timed("everyone's usage, by principal (kh usage)",
              lambda: report.report(st, since, until, None, "principal"))
        timed("one principal's, by node (kh usage p3 --by node)",
              lambda: report.report(st, since, until, "p3", "node"))
        timed("one principal's, by hour (720 rows)",
              lambda: report.report(st, since, until, "p3", "hour"))
        timed("everyone's, by node", lambda: report.report(st, since, until, None, "node"))
        recs = timed("records rating reads: one principal, hourly",
                     lambda: usage_records(st, since, until, "p3", step=3600, by="principal"))
        print(f"  ({len(recs)} records)")  # type: ignore[arg-type]
        recs = timed("records rating reads: one principal, per minute",
                     lambda: usage_records(st, since, until, "p3", step=60, by="principal"))
        print(f"  ({len(recs)} records)")  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--skip-store", action="store_true")
    args = ap.parse_args()
    sampler(args.samples)
    if not args.skip_store:
        store_bench()


if __name__ == "__main__":
    main()
