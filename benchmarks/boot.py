"""Issue-2 speed numbers on this machine: prompt, kboot, `kh boot -- true`, mrw, image cache.

Prints numbers; asserts nothing (tests never assert wall-clock time).
Usage: .venv/bin/python -m benchmarks.boot [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kh import boot
from kh.hw import qemu, uboot
from kh.settings import paths

REPO = Path(__file__).resolve().parents[1]


def prompt_and_kboot(runs: int) -> tuple[list[float], list[float]]:
    p = paths()
    prompt, kboot = [], []
    for _ in range(runs):
        cfg = boot.default_config(p)
        boot.check_images(cfg)
        workdir = Path(os.path.join(p.runtime, f"kh-bench-{os.getpid()}"))
        workdir.mkdir(exist_ok=True)
        spec = boot.node_spec(cfg, workdir)
        t0 = time.monotonic()
        with qemu.running(spec, console_log=None, workdir=workdir) as node:
            node.console.expect(uboot.UBOOT_PROMPT, 30, stage="U-Boot prompt")
            t1 = time.monotonic()
            node.console.write(b"run kboot\n")
            node.console.expect(uboot.READY, 60, stage="ready line")
            t2 = time.monotonic()
        prompt.append(t1 - t0)
        kboot.append(t2 - t1)
    return prompt, kboot


def mrw_rate(size: int = 65536) -> float:
    p = paths()
    with boot.at_prompt(boot.default_config(p), p) as node:
        blob = os.urandom(size)
        t0 = time.monotonic()
        uboot.mrw(node.console, 0x9000000, blob)  # free RAM between kernel and ramdisk
        return size / (time.monotonic() - t0)


def idle_cpu(seconds: float = 10.0) -> float:
    """Share of one host core a node burns while waiting at the U-Boot prompt."""
    p = paths()
    tick = os.sysconf("SC_CLK_TCK")
    with boot.at_prompt(boot.default_config(p), p) as node:
        time.sleep(1.0)  # let U-Boot go idle (it dozes after 20 ms without input)
        stat = Path(f"/proc/{node.process.pid}/stat")

        def cpu() -> float:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick

        c0, t0 = cpu(), time.monotonic()
        time.sleep(seconds)
        return (cpu() - c0) / (time.monotonic() - t0)


def end_to_end(runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run([str(REPO / ".venv/bin/kh"), "boot", "--", "true"], check=True,
                       capture_output=True)
        out.append(time.monotonic() - t0)
    return out


def cached_build() -> float:
    t0 = time.monotonic()
    subprocess.run([str(REPO / ".venv/bin/kh"), "images", "build", "-q"], check=True)
    return time.monotonic() - t0


def cold_build_times() -> dict[str, float]:
    """Seconds each cached image took when it was built (from the cache's records)."""
    builds = json.loads((paths().out / "builds.json").read_text())
    return {str(b["recipe"]): float(b["seconds"]) for b in builds}


def fmt(xs: list[float]) -> str:
    return (f"median {statistics.median(xs):.2f} s "
            f"(min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"cached `kh images build`:          {cached_build():.2f} s")
    prompt, kb = prompt_and_kboot(args.runs)
    print(f"QEMU start -> U-Boot prompt:       {fmt(prompt)}")
    print(f"`run kboot` -> appliance ready:    {fmt(kb)}")
    print(f"`kh boot -- true` end to end:      {fmt(end_to_end(args.runs))}")
    print(f"mrw throughput (64 KiB):           {mrw_rate():.0f} bytes/s")
    print(f"idle node at the U-Boot prompt:    {idle_cpu() * 100:.1f}% of a core")
    times = cold_build_times()
    for name, secs in times.items():
        print(f"cold build of {name:<10}           {secs:.0f} s")
    print(f"cold build, all images:            {sum(times.values()):.0f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
