"""Issue 16, Speed: ping and HTTP between two real nodes in one domain, on one host and across
two hosts over VXLAN. Prints numbers; asserts nothing.

Two kh fabrics on this machine joined by an underlay (tests/unit/twohost.py, MTU 1500), domain 3
stretched between them. Three ppce500 nodes boot the shell appliance (busybox httpd on port 80)
with their NIC in domain 3 and MTU 1450 (boot key kh.mtu0): nodes 1 and 2 on host a, node 3 on
host b; each node's QEMU runs in its host's fabric namespace (started from a thread that entered
it), on a tap of that fabric. From node 1: `ping` node 2 (same host) and node 3 (across hosts),
and fetch each one's page N times with busybox wget (the loop's time on the node's own clock).

Usage (root, images built): .venv/bin/python -m benchmarks.vxlan_nodes [--pings N] [--gets N]
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

from kh import boot
from kh.allocation import node_address
from kh.hw import stretch
from tests.integration.stretchnodes import node_in
from tests.unit.twohost import two_hosts

D = 3


def ping(node: boot.BootedNode, addr: str, count: int) -> tuple[float, float, float, str]:
    """(min, avg, max) ms of ``count`` pings, and the loss line."""
    out, _ = node.run(f"ping -c {count} -i 0.2 {addr}", timeout=count + 60)
    m = re.search(r"min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    loss = re.search(r"\d+ packets transmitted.*", out)
    if not m:
        raise SystemExit(f"ping {addr}: {out.strip()[-200:]}")
    return float(m[1]), float(m[2]), float(m[3]), loss[0] if loss else ""


def fetches(node: boot.BootedNode, addr: str, gets: int) -> float:
    """Milliseconds per page: ``gets`` fetches of http://addr/ in a loop, timed by the node's
    own clock (/proc/uptime, 10 ms resolution over the whole loop)."""
    out, status = node.run(
        "read a _ < /proc/uptime; i=0; "
        f"while [ $i -lt {gets} ]; do wget -q -O /dev/null http://{addr}/ || exit 1; "
        "i=$((i+1)); done; read b _ < /proc/uptime; echo $a $b", timeout=gets * 5 + 60)
    if status != 0:
        raise SystemExit(f"wget {addr} failed")
    a, b = (float(x) for x in out.split()[-2:])
    return (b - a) * 1000 / gets


def alternate(node: boot.BootedNode, targets: dict[str, str], rounds: int, pings: int,
              gets: int) -> dict[str, list[tuple[float, float]]]:
    """From ``node``, ``rounds`` rounds over ``targets`` (name -> address), every other round
    in reverse order: ``pings`` pings and ``gets`` page fetches each, each result printed;
    per target the (ping avg ms, ms a page) of each round."""
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in targets}
    for i in range(rounds):
        order = list(targets.items())
        for name, addr in (order if i % 2 == 0 else order[::-1]):
            mn, avg, mx, loss = ping(node, addr, pings)
            per_get = fetches(node, addr, gets)
            res[name].append((avg, per_get))
            print(f"  {name:12s} ping min/avg/max {mn:.2f}/{avg:.2f}/{mx:.2f} ms "
                  f"({loss}); HTTP GET {per_get:.1f} ms a page ({gets} pages)", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pings", type=int, default=50)
    ap.add_argument("--gets", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="kh-vxn-logs-"))
    with two_hosts("bvn") as (a, b):
        stretch.ensure(a.fabric, a.underlay, D, [b.peer], a.name)
        stretch.ensure(b.fabric, b.underlay, D, [a.peer], b.name)
        with node_in(a, 1, D, logdir) as n1, node_in(a, 2, D, logdir) as n2, \
                node_in(b, 3, D, logdir) as n3:
            mtus = [n.run("cat /sys/class/net/eth0/mtu")[0].strip() for n in (n1, n2, n3)]
            print(f"nodes' eth0 MTU (boot key kh.mtu0=1450): {', '.join(mtus)}")
            if set(mtus) != {"1450"}:
                raise SystemExit("a node did not take its MTU from kh.mtu0")
            targets = {"same host": str(node_address(D, 2).ip),
                       "across hosts": str(node_address(D, 3).ip)}
            for addr in targets.values():  # ARP and the bridges' learning first
                ping(n1, addr, 3)
            print(f"node 1 (host a) to node 2 (host a) and node 3 (host b), domain {D}, MTU "
                  f"1450; {args.rounds} rounds, alternating")
            res = alternate(n1, targets, args.rounds, args.pings, args.gets)
            same, across = (sorted(res[k]) for k in targets)
            p_same = sum(x for x, _ in same) / len(same)
            p_across = sum(x for x, _ in across) / len(across)
            h_same = sum(y for _, y in same) / len(same)
            h_across = sum(y for _, y in across) / len(across)
            print(f"  mean ping {p_same:.2f} vs {p_across:.2f} ms: across / same "
                  f"{p_across / p_same:.2f}x; HTTP {h_same:.1f} vs {h_across:.1f} ms a page: "
                  f"{h_across / h_same:.2f}x (goal: within 2x)")
    shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    main()
