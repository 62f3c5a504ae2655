"""Issue 16, item 3: a domain across hosts against one on a single host. Prints numbers;
asserts nothing.

Two kh fabrics on this machine joined by an underlay (tests/unit/twohost.py: veths through a
bridge in a namespace of the benchmark's own, MTU 1500), domain 3 stretched over VXLAN between
them. Measured with raw frames written into taps opened directly (as a node's QEMU would) and
read from the other tap, the same way for both paths:

- same host: node 1 -> node 2, both taps on host a's bridge;
- across hosts: node 1 on host a -> node 3 on host b (bridge, vxlan, underlay, vxlan, bridge).

Round trip: a frame from one tap, read at the other, sent back, read again (median of N, µs).
Throughput: frames pushed in batches, those that arrive counted (64-byte frames and full
1464-byte ones: the stretched domain's MTU 1450). Guests under TCG move far fewer frames than
this; the host-side path shows what the tunnel itself adds.

Usage (root): .venv/bin/python -m benchmarks.vxlan [--frames N] [--rounds R] [--pings P]
"""

from __future__ import annotations

import argparse
import select
import statistics
import time

from kh.hw import stretch
from kh.hw.antispoof import nic_mac
from tests.unit.tapdev import BROADCAST, Tap, eth
from tests.unit.twohost import Host, two_hosts

PROBE = 0x88B5
BATCH = 128  # frames written before the receiver is drained (a tap queues at most 500)
D = 3


def read_one(tap: Tap, timeout: float = 1.0) -> bytes | None:
    if not select.select([tap.fd], [], [], timeout)[0]:
        return None
    frames = tap.drain()
    return frames[0] if frames else None


def round_trips(a: Tap, b: Tap, mac_a: str, mac_b: str, n: int) -> list[float]:
    """Seconds for a frame a -> b and its answer b -> a, n times (lost ones left out)."""
    out = []
    there = eth(mac_b, mac_a, PROBE, b"ping")
    back = eth(mac_a, mac_b, PROBE, b"pong")
    for _ in range(n):
        t0 = time.perf_counter()
        a.send(there)
        if read_one(b) is None:
            continue
        b.send(back)
        if read_one(a) is None:
            continue
        out.append(time.perf_counter() - t0)
    return out


def throughput(src: Tap, dst: Tap, frame: bytes, frames: int) -> tuple[float, int]:
    """(frames per second arrived, frames arrived) pushing ``frames`` copies src -> dst."""
    got = 0
    t0 = time.perf_counter()
    for _ in range(frames // BATCH):
        for _ in range(BATCH):
            src.send(frame)
        time.sleep(0)  # let the receiving softirq run
        got += len(dst.drain())
    deadline = time.perf_counter() + 0.5
    while time.perf_counter() < deadline:
        more = dst.drain()
        if not more and got >= frames // BATCH * BATCH:
            break
        got += len(more)
    return got / (time.perf_counter() - t0), got


def plug(h: Host, node: int) -> Tap:
    h.fabric.ensure_domain(D)
    h.fabric.ensure_tap(node, 0)
    h.fabric.attach(node, 0, D)
    return Tap(h.cfg.netns, h.cfg.tap(node, 0))


def settle(src: Tap, dst: Tap, mac_src: str) -> None:
    """Broadcast until one arrives (ports forwarding, the underlay's ARP done); the bridges
    learn both MACs."""
    for _ in range(100):
        src.send(eth(BROADCAST, mac_src, PROBE, b"hello"))
        if read_one(dst, 0.1) is not None:
            time.sleep(0.2)
            dst.drain()
            return
    raise SystemExit(f"no frame from {src.name} reached {dst.name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pings", type=int, default=2000)
    args = ap.parse_args()
    with two_hosts("bvx") as (a, b):
        stretch.ensure(a.fabric, a.underlay, D, [b.peer], a.name)
        stretch.ensure(b.fabric, b.underlay, D, [a.peer], b.name)
        taps = [plug(a, 1), plug(a, 2), plug(b, 3)]
        try:
            n1, n2, n3 = taps
            macs = {1: nic_mac(1, 0), 2: nic_mac(2, 0), 3: nic_mac(3, 0)}
            for src, dst, m in ((n1, n2, 1), (n2, n1, 2), (n1, n3, 1), (n3, n1, 3)):
                settle(src, dst, macs[m])
            paths = {"same host": (n2, 2), "across hosts": (n3, 3)}
            print(f"domain {D}: same host (one bridge) vs across hosts (VXLAN, MTU "
                  f"{stretch.stretched(a.cfg)[D].mtu}), raw frames tap to tap")
            rtt = {name: round_trips(n1, t, macs[1], macs[m], args.pings)
                   for name, (t, m) in paths.items()}
            for name, times in rtt.items():
                print(f"  round trip {name:12s}: median {statistics.median(times) * 1e6:7.1f} µs"
                      f", p90 {sorted(times)[len(times) * 9 // 10] * 1e6:7.1f} µs "
                      f"({len(times)} of {args.pings})")
            ratio = statistics.median(rtt["across hosts"]) / statistics.median(rtt["same host"])
            print(f"  across / same: {ratio:.2f}x (goal: within 2x)")
            for size in (64, 14 + 1450):
                rates: dict[str, list[float]] = {name: [] for name in paths}
                for i in range(args.rounds):
                    order = list(paths.items())
                    for name, (t, m) in (order if i % 2 == 0 else order[::-1]):
                        frame = eth(macs[m], macs[1], PROBE, b"x" * (size - 14))
                        r, got = throughput(n1, t, frame, args.frames)
                        rates[name].append(r)
                        if got < args.frames // BATCH * BATCH:
                            lost = args.frames // BATCH * BATCH - got
                            print(f"    ({name}, {size} bytes: {lost} frames lost)")
                print(f"  throughput, {size}-byte frames (median of {args.rounds} rounds of "
                      f"{args.frames}):")
                for name, rs in rates.items():
                    r = statistics.median(rs)
                    print(f"    {name:12s} {r / 1000:8.1f} kframes/s {r * size * 8 / 1e6:8.1f}"
                          f" Mbit/s")
        finally:
            for t in taps:
                t.close()


if __name__ == "__main__":
    main()
