"""Issue-5 numbers on this machine: per-package build times, the full root's size, each
appliance's size and share, the cached no-op build, and `run kboot` → first HTTP 200 from the
apache appliance (fetched from outside the node, on the public domain).

Prints numbers; asserts nothing (tests never assert wall-clock time).
Usage: .venv/bin/python -m benchmarks.appliances [--runs N]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.channel import khdo
from benchmarks.common import REPO, alloc_of, free_port, khget, nodes_of, release, wait_free
from kh.hw import netns
from kh.hw.console import Console
from kh.images import build as image_build
from kh.service import control
from kh.service.config import ServiceConfig
from kh.settings import paths


def build_report() -> None:
    p = paths()
    builds = json.loads((p.out / "builds.json").read_text())
    total = 0.0
    print("cold build time per recipe (the build that made the cached result):")
    for b in sorted(builds, key=lambda b: -float(b["seconds"])):
        total += float(b["seconds"])
        print(f"  {b['recipe']:<12} {float(b['seconds']):7.1f} s")
    print(f"  {'all':<12} {total:7.1f} s")
    rows = image_build.listing(p)
    root = next(r for r in rows if r["image"] == "root")
    print(f"full root: {int(str(root['size'])) / 1e6:.1f} MB")
    for r in rows:
        if "share" in r:
            print(f"  {r['recipe']!s:<22} {int(str(r['size'])) / 1e6:6.2f} MB "
                  f"{float(str(r['share'])) * 100:6.2f}% of the root")
    t0 = time.monotonic()
    subprocess.run([str(REPO / ".venv/bin/kh"), "images", "build", "-q"], check=True)
    print(f"cached no-op `kh images build`: {time.monotonic() - t0:.2f} s")


def http_status(ns: str, ip: str) -> int:
    def get() -> int:
        c = http.client.HTTPConnection(ip, 80, timeout=1)
        try:
            c.request("GET", "/")
            return c.getresponse().status
        finally:
            c.close()
    try:
        return netns.run_in(ns, get)
    except OSError:
        return 0


def apache_first_200(runs: int) -> list[float]:
    out = []
    with tempfile.TemporaryDirectory(prefix="kh-bench-") as tmp:
        cfg = ServiceConfig(state_dir=Path(tmp) / "state", images=paths().out, nodes=2,
                            api_port=free_port(), ssh_port=free_port(),
                            prefix=f"kb{os.getpid() % 10000}")
        control.start(cfg)
        try:
            for _ in range(runs):
                wait_free(cfg, 1)
                text = khget(cfg, 1, "-i")
                (node,) = nodes_of(text)
                ip = f"10.1.{node >> 8}.{node & 255}"
                khdo(cfg, text, "loadkernel", str(cfg.images / "uImage"))
                khdo(cfg, text, "loadramdisk", str(cfg.images / "apache.cpio.gz.uimg"))
                with Console(cfg.node_dir(node) / "console.sock", name=f"node{node}") as con:
                    con.connect(5)
                    con.write(b"run kboot\n")
                    t0 = time.monotonic()
                    while http_status(cfg.fabric.netns, ip) != 200:
                        if time.monotonic() - t0 > 60:
                            raise SystemExit(f"no HTTP 200 from node {node}: {con.tail()}")
                        time.sleep(0.05)
                    out.append(time.monotonic() - t0)
                release(cfg, alloc_of(text))
        finally:
            control.stop(cfg)
            control.clean(cfg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    build_report()
    times = apache_first_200(args.runs)
    print(f"apache: `run kboot` → first HTTP 200 from outside: median "
          f"{statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f}, "
          f"{len(times)} runs)")


if __name__ == "__main__":
    main()
