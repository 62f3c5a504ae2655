"""Issue-4 numbers on this machine: bulk loads into 1/4/16 nodes, a one-line broadcast to 16
nodes, Listing 1 end to end. Runs its own khd and cleans it up. Needs root.

Usage: .venv/bin/python -m benchmarks.channel [--nodes 16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from pyroute2 import netns

from benchmarks.common import CRED, REPO, free_port, khget, nodes_of, release_all
from kh import textobj
from kh.cc.client import ChannelClient
from kh.service import control
from kh.service.config import ServiceConfig
from kh.settings import paths


def khdo(cfg: ServiceConfig, nodes: str, *args: str,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KH_CREDENTIAL": CRED, "KH_SSH_PORT": str(cfg.ssh_port),
           "KHDO_NETNS": cfg.uplink_netns or ""}
    return subprocess.run([str(REPO / ".venv/bin/khdo"), *args], input=nodes, env=env,
                          capture_output=True, text=True, check=check)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kh-bench-") as tmp:
        kernel = Path(tmp) / "kernel.bin"
        ramdisk = Path(tmp) / "ramdisk.bin"
        kernel.write_bytes(os.urandom(5 << 20))
        ramdisk.write_bytes(os.urandom(10 << 20))
        outside = f"kb-out{os.getpid()}"  # the outside world Listing 1 fetches pages from
        netns.create(outside)
        cfg = ServiceConfig(state_dir=Path(tmp) / "state", images=paths().out,
                            nodes=args.nodes, api_port=free_port(), ssh_port=free_port(),
                            prefix=f"kb{os.getpid() % 10000}", uplink_netns=outside)
        control.start(cfg)
        try:
            for count in (1, 4, args.nodes):
                nodes = khget(cfg, count)
                t0 = time.monotonic()
                khdo(cfg, nodes, "loadkernel", str(kernel))
                khdo(cfg, nodes, "loadramdisk", str(ramdisk))
                print(f"loadkernel 5 MB + loadramdisk 10 MB into {count:>2} nodes: "
                      f"{time.monotonic() - t0:.2f} s")
                if count == args.nodes:
                    ch = ChannelClient(f"con{textobj.parse(nodes).id}", "127.0.0.1",
                                       cfg.ssh_port, password=CRED)
                    times = []
                    for _ in range(5):
                        seen: set[bytes] = set()
                        done_at: list[float] = []
                        buf = bytearray()

                        def watch(chunk: bytes, seen=seen, done_at=done_at, buf=buf,
                                  count=count) -> None:
                            buf.extend(chunk)
                            seen.update(ln.split(b":")[0] for ln in bytes(buf).splitlines()
                                        if b"U-Boot 2023" in ln)
                            if len(seen) == count and not done_at:
                                done_at.append(time.monotonic())

                        t0 = time.monotonic()
                        ch.exec("tagged", b"version\n", on_output=watch)
                        assert done_at, bytes(buf)
                        times.append(done_at[0] - t0)
                    ch.close()
                    print(f"one line to {count} nodes at U-Boot, every answer back: "
                          f"median {sorted(times)[2]:.2f} s (min {min(times):.2f})")
                release_all(cfg)
            for count in (1, 4, args.nodes):
                t0 = time.monotonic()
                nodes = khget(cfg, count, "-x")
                khdo(cfg, nodes, "loadkernel", str(paths().out / "uImage"))
                khdo(cfg, nodes, "loadramdisk", str(paths().out / "shell.cpio.gz.uimg"))
                khdo(cfg, nodes, "write", "run kboot")
                numbers = [str(n) for n in nodes_of(nodes)]
                pages = 0
                deadline = time.monotonic() + 180
                while pages < count and time.monotonic() < deadline:
                    r = khdo(cfg, nodes, "peripcmd", "wget -q -T 5 -O - http://%ip%/",
                             check=False)
                    pages = r.stderr.count("</h1>")
                print(f"Listing 1 (khget -x, loadkernel, loadramdisk, run kboot, peripcmd wget) "
                      f"for {count:>2} nodes: {time.monotonic() - t0:.2f} s "
                      f"({pages}/{len(numbers)} pages fetched)")
                release_all(cfg)
        finally:
            control.clean(cfg)
            netns.remove(outside)


if __name__ == "__main__":
    main()
