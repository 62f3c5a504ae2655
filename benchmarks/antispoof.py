"""Issue 11, item 2: what anti-spoofing costs. Prints numbers; asserts nothing.

Throughput between two nodes on the public domain, with kh's anti-spoofing table and without
it (the table deleted), measured tap to tap through the bridge: frames are written into node
1's tap (as its QEMU would) and read from node 2's tap, both opened directly. Guests under TCG
move far fewer frames than this (the guest's CPU, not the bridge, is their bottleneck), so the
host-side path shows the rules' own cost. Also the cost of moving a tap onto the public domain
and off it (the nft set updates Fabric.attach makes).

Usage (root): .venv/bin/python -m benchmarks.antispoof [--frames N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from kh import proc
from kh.hw import netns as nsutil
from kh.hw.antispoof import FAMILY, TABLE, nic_mac
from kh.hw.fabric import Fabric
from kh.hw.tags import FabricConfig
from kh.model import PUBLIC
from tests.unit.tapdev import BROADCAST, ETH_IP, Tap, eth, ipv4_udp, wait_forwarding

BATCH = 256  # frames written before the receiver is drained (a tap queues at most 500)


def one_way(src: Tap, dst: Tap, frame: bytes, frames: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, frames received) to push ``frames`` copies of ``frame`` from
    src to dst. A tap write carries the frame through the bridge and the nft hook in the
    writer's own context (softirq on the way out of the system call), so this process's CPU
    time holds the rules' cost, and it suffers less than wall time from a loaded host."""
    got = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(frames // BATCH):
        for _ in range(BATCH):
            src.send(frame)
        got += len(dst.drain())
    got += len(dst.drain())
    return time.perf_counter() - t0, time.process_time() - c0, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    fabric = Fabric(FabricConfig(prefix=f"sb{os.getpid() % 100000}"))
    taps: list[Tap] = []
    try:
        fabric.ensure()
        fabric.ensure_domain(PUBLIC)
        for node in (1, 2):
            fabric.ensure_tap(node, 0)
            fabric.attach(node, 0, PUBLIC)
            taps.append(Tap(fabric.cfg.netns, fabric.cfg.tap(node, 0)))
        wait_forwarding(fabric.cfg.netns, (t.name for t in taps))
        src, dst = taps
        nft = nsutil.enter_argv(fabric.cfg.netns) + ["nft"]
        for size in (64, 1514):
            payload = b"x" * (size - 14 - 28)
            frame = eth(nic_mac(2, 0), nic_mac(1, 0), ETH_IP,
                        ipv4_udp("10.1.0.1", "10.1.0.2", payload))
            dst.send(eth(BROADCAST, nic_mac(2, 0), ETH_IP,  # the bridge learns node 2's MAC
                         ipv4_udp("10.1.0.2", "10.1.0.1", b"hello")))
            results: dict[str, list[float]] = {"with rules": [], "without": []}
            cpu: dict[str, list[float]] = {"with rules": [], "without": []}
            for i in range(args.rounds):
                # alternate which goes first: the host is shared, its load drifts
                for mode in (("with rules", "without"), ("without", "with rules"))[i % 2]:
                    if mode == "without":
                        proc.run(nft + ["delete", "table", FAMILY, TABLE])
                    secs, cpu_secs, got = one_way(src, dst, frame, args.frames)
                    if mode == "without":
                        fabric.antispoof.rebuild()
                    if got != args.frames // BATCH * BATCH:
                        print(f"  ({mode}: {got} of {args.frames // BATCH * BATCH} arrived)")
                    results[mode].append(got / secs)
                    cpu[mode].append(cpu_secs / got)
            print(f"frames of {len(frame)} bytes, node 1 -> node 2 on the public bridge "
                  f"(median of {args.rounds} rounds of {args.frames}):")
            base = statistics.median(results["without"])
            for mode, rates in results.items():
                r = statistics.median(rates)
                print(f"  {mode:11s} {r / 1000:8.1f} kframes/s  {r * len(frame) * 8 / 1e6:8.1f}"
                      f" Mbit/s  ({(r / base - 1) * 100:+.1f}% vs without; rounds "
                      f"{min(rates) / 1000:.0f}..{max(rates) / 1000:.0f} kframes/s)")
            c_with, c_without = (statistics.median(cpu[m]) for m in ("with rules", "without"))
            print(f"  CPU per frame (writer's user+system): with rules {c_with * 1e9:.0f} ns, "
                  f"without {c_without * 1e9:.0f} ns: the rules cost "
                  f"{(c_with - c_without) * 1e9:+.0f} ns a frame")
        moves, updates = [], []
        for _ in range(50):
            t0 = time.perf_counter()
            fabric.attach(1, 0, None)
            fabric.attach(1, 0, PUBLIC)
            moves.append((time.perf_counter() - t0) / 2)
            t0 = time.perf_counter()
            with fabric.antispoof.moving(1, 0, None):
                pass  # the table's side of the move alone, no link change
            with fabric.antispoof.moving(1, 0, PUBLIC):
                pass
            updates.append((time.perf_counter() - t0) / 2)
        print(f"moving a tap on or off the public domain: Fabric.attach median "
              f"{statistics.median(moves) * 1000:.1f} ms, of which the anti-spoofing set "
              f"update {statistics.median(updates) * 1000:.2f} ms")
    finally:
        for t in taps:
            t.close()
        fabric.destroy()


if __name__ == "__main__":
    main()
