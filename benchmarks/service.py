"""Issue-3 numbers on this machine: khget latency, idle cost of allocated nodes, leaks.

Runs its own khd (own name prefix, state dir and port) and cleans it up. Needs root.
Usage: .venv/bin/python -m benchmarks.service [--nodes 16] [--cycles 100] [--many 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import alloc_of, free_port, khget, release, wait_free
from kh.client import Client
from kh.hw.fabric import Fabric
from kh.service import control
from kh.service.config import ServiceConfig
from kh.settings import paths


def timed_khget(cfg: ServiceConfig, count: int) -> tuple[float, int]:
    t0 = time.monotonic()
    alloc = alloc_of(khget(cfg, count))
    return time.monotonic() - t0, alloc


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def idle_share(pids: list[int], seconds: float = 10.0) -> list[float]:
    c0 = {p: cpu_seconds(p) for p in pids}
    t0 = time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return [(cpu_seconds(p) - c0[p]) / dt for p in pids]


def snapshot(cfg: ServiceConfig) -> dict[str, int]:
    import sqlite3
    pid = control.pid_of(cfg) or 0
    db = sqlite3.connect(str(cfg.db))
    rows = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("nodes", "principals", "domains")}
    active = db.execute("SELECT count(*) FROM allocations WHERE released IS NULL").fetchone()[0]
    db.close()
    return {"qemu": len(control.kh_qemu_pids(cfg.prefix)),
            "links": len(Fabric(cfg.fabric).links()),
            "khd_fds": len(os.listdir(f"/proc/{pid}/fd")), "active_allocations": active,
            **{f"rows_{k}": v for k, v in rows.items()}}


def start(nodes: int, state: Path) -> ServiceConfig:
    cfg = ServiceConfig(state_dir=state, images=paths().out, nodes=nodes,
                        api_port=free_port(), prefix=f"kb{os.getpid() % 10000}")
    t0 = time.monotonic()
    control.start(cfg)
    wait_free(cfg, nodes)
    print(f"khd start with {nodes} warm nodes:        {time.monotonic() - t0:.2f} s")
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--many", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kh-bench-") as tmp:
        cfg = start(args.nodes, Path(tmp) / "state")
        try:
            one = []
            for _ in range(5):
                dt, alloc = timed_khget(cfg, 1)
                one.append(dt)
                release(cfg, alloc)
                wait_free(cfg, args.nodes)
            print(f"khget 1 node -> U-Boot prompt:       median {statistics.median(one):.2f} s "
                  f"(min {min(one):.2f}, n={len(one)})")
            dt, alloc = timed_khget(cfg, args.nodes)
            print(f"khget {args.nodes} nodes -> U-Boot prompt:     {dt:.2f} s")
            shares = idle_share(control.kh_qemu_pids(cfg.prefix))
            print(f"idle allocated node at the prompt:   mean {statistics.mean(shares) * 100:.1f}%"
                  f" of a core (max {max(shares) * 100:.1f}%, {len(shares)} nodes, 10 s)")
            release(cfg, alloc)
            wait_free(cfg, args.nodes)
            before = snapshot(cfg)
            t0 = time.monotonic()
            for _ in range(args.cycles):
                _, alloc = timed_khget(cfg, 1)
                release(cfg, alloc)
                wait_free(cfg, args.nodes)
            after = snapshot(cfg)
            print(f"{args.cycles} khget/release cycles:           "
                  f"{time.monotonic() - t0:.1f} s")
            for k in before:
                print(f"  {k:<20} before {before[k]:>4}  after {after[k]:>4}")
        finally:
            control.clean(cfg)
        if args.many:
            cfg = start(args.many, Path(tmp) / "state-many")
            try:
                t0 = time.monotonic()
                Client(cfg.socket).call("GET", "/v1/ps")
                api = time.monotonic() - t0
                t0 = time.monotonic()
                subprocess.run([sys.executable, "-c", "pass"], check=True)
                py = time.monotonic() - t0
                shares = idle_share(control.kh_qemu_pids(cfg.prefix), 5.0)
                print(f"with {args.many} idle nodes: API answer {api * 1000:.0f} ms, python "
                      f"start {py * 1000:.0f} ms, nodes use {sum(shares) * 100:.0f}% of a core "
                      f"in all; load average {os.getloadavg()[0]:.2f}")
            finally:
                control.clean(cfg)


if __name__ == "__main__":
    main()
