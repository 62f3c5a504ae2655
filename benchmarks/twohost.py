"""Issue-16 numbers across two hosts, through khd: its own nodes ("local", the direct backend)
against the nodes of a second host added with `kh host add` (libvirt over ``qemu+ssh://``), in
the same run. Prints numbers, asserts nothing.

The second host is tests/integration/farhost.py's (its own namespace, kh libvirtd and sshd on
this machine; the underlay a veth wire at MTU 1500, so stretched domains have 1450). Measured:
each host's pool of N nodes to the U-Boot prompt, khget of 1 and N nodes pinned to each host
(pool warm), idle CPU per node, a console round trip, a bulk load of kernel + ramdisk into 1
and 4 nodes of each host over the control channel (khdo loadkernel/loadramdisk: the remote
ones by libvirt volume upload over ssh), and between booted shell-appliance nodes of one
private domain (node 1 and 2 on khd's host, node 3 on host b): ping and HTTP from node 1 to
node 2 (same host) and to node 3 (across hosts, VXLAN), alternating rounds; and the raw
volume upload into a host-b node's RAM over ssh from this process (the bulk-load path).

Usage (root, images built): .venv/bin/python -m benchmarks.twohost [--nodes 16] [--pings 30]
[--gets 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import common
from benchmarks.common import free_port, release
from benchmarks.libvirt import bulk_load, idle_cpu, round_trip, volume_upload
from benchmarks.vxlan_nodes import alternate, ping
from kh import textobj
from kh.allocation import node_address
from kh.service import control
from kh.service.config import ServiceConfig
from kh.settings import paths
from tests.integration.conftest import shell
from tests.integration.farhost import added_far_host, khctl
from tests.unit.twohost import Wire, own


def khget(cfg: ServiceConfig, count: int, *opts: str, user: str = "bench") -> str:
    """benchmarks.common.khget, its error said (khget's one line) instead of a traceback."""
    try:
        return common.khget(cfg, count, *opts, user=user)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"khget {' '.join(opts)} {user} {count}: {e.stderr.strip()}") from None


def host_counts(cfg: ServiceConfig) -> dict[str, dict]:
    r = khctl(cfg, "host", "list", "--json")
    if r.returncode:
        raise SystemExit(f"kh host list: {r.stderr.strip()}")
    return {h["name"]: h for h in json.loads(r.stdout)}


def wait_all_free(cfg: ServiceConfig, want: dict[str, int], timeout: float = 600) -> float:
    """Seconds until every host has ``want[host]`` free nodes."""
    t0 = time.monotonic()
    while {n: host_counts(cfg).get(n, {}).get("free") for n in want} != want:
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"nodes did not come up: {host_counts(cfg)}")
        time.sleep(0.2)
    return time.monotonic() - t0


def timed(fn: Callable[[], str]) -> tuple[float, textobj.AllocationInfo]:
    t0 = time.monotonic()
    text = fn()
    return time.monotonic() - t0, textobj.parse(text)


def between_nodes(cfg: ServiceConfig, n: int, logs: Path, args: argparse.Namespace,
                  row: Callable[[str, str, float], None]) -> None:
    """Ping and HTTP from node 1 to a node of its host and one of host b, one private domain
    (MTU 1450: stretched); n - 2 of khd's own nodes held so that fill places 2 + 1."""
    hold = textobj.parse(khget(cfg, n - 2, "--host", "local", user="hold")) if n > 2 else None
    a = textobj.parse(khget(cfg, 3, "-p", "1"))
    try:
        netid = next(d.netid for d in a.domains if d is not None)
        here = [x for x in a.nodes if x.host == "local"]
        there = [x for x in a.nodes if x.host != "local"]
        if len(here) != 2 or len(there) != 1:
            raise SystemExit(f"placement gave {[(x.number, x.host) for x in a.nodes]}")
        n1, n2, n3 = (shell(cfg, x.number, logs) for x in (*here, *there))
        mtus = [x.run("cat /sys/class/net/eth0/mtu")[0].strip() for x in (n1, n2, n3)]
        print(f"nodes' eth0 MTU: {', '.join(mtus)}", flush=True)
        targets = {"same host": str(node_address(netid, here[1].number).ip),
                   "across hosts": str(node_address(netid, there[0].number).ip)}
        for addr in targets.values():
            ping(n1, addr, 3)  # ARP and the bridges' learning first
        res = alternate(n1, targets, args.rounds, args.pings, args.gets)
        for name, got in res.items():  # same host in local's column, across in hostb's
            col = "local" if name == "same host" else "hostb"
            row("ping from node 1 to a node there, mean of avgs (ms)", col,
                statistics.mean(x for x, _ in got))
            row("HTTP GET from node 1, a page (ms)", col, statistics.mean(y for _, y in got))
    finally:
        release(cfg, a.id)
        if hold is not None:
            release(cfg, hold.id, user="hold")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--pings", type=int, default=30)
    ap.add_argument("--gets", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    n = args.nodes
    tmp = Path(tempfile.mkdtemp(prefix="kh-bench-2h-"))
    cfg = ServiceConfig(state_dir=tmp / "state", images=paths().out, nodes=n,
                        api_port=free_port(), ssh_port=free_port(), prefix=own("bt"),
                        outside=False, node_quota=max(16, n))
    table: dict[str, dict[str, float]] = {}
    failed: list[str] = []

    def row(key: str, host: str, value: float) -> None:
        table.setdefault(key, {})[host] = value
        print(f"{host}: {key}: {value:.3f}", flush=True)

    wire = Wire(f"{own('bt')}-wire")
    try:
        t0 = time.monotonic()
        control.start(cfg)
        want = {"local": n}
        wait_all_free(cfg, want)
        row("pool of N nodes to U-Boot prompts (s)", "local", time.monotonic() - t0)
        t0 = time.monotonic()
        with added_far_host(cfg, wire, tmp / "b", own("bu"), n) as far:
            want["hostb"] = n
            wait_all_free(cfg, want)
            row("pool of N nodes to U-Boot prompts (s)", "hostb", time.monotonic() - t0)
            for host, prefix in (("local", cfg.prefix), ("hostb", far.prefix)):
                for count in (1, n):
                    try:
                        took, a = timed(lambda c=count, h=host: khget(cfg, c, "--host", h))
                    except SystemExit as e:  # said, and the run goes on
                        print(f"{host}: khget {count} FAILED: {e}", flush=True)
                        failed.append(f"{host}: {e}")
                        wait_all_free(cfg, want)
                        continue
                    row(f"khget {'N' if count == n else count} (s)", host, took)
                    release(cfg, a.id)
                    wait_all_free(cfg, want)
                row("idle CPU per node at the prompt (% of a core)", host,
                    100 * idle_cpu(prefix))
                a = textobj.parse(khget(cfg, 1, "--host", host))
                row("console round trip (ms)", host, 1000 * round_trip(cfg, a.nodes[0].number))
                release(cfg, a.id)
                for count in sorted({1, min(4, n)}):
                    row(f"bulk load kernel+ramdisk into {count} (MB/s)", host,
                        bulk_load(cfg, count, "--host", host))
                    wait_all_free(cfg, want)
            a = textobj.parse(khget(cfg, 1, "--host", "hostb"))
            row("volume upload into a node's RAM, 16 MiB from here (MB/s)", "hostb",
                volume_upload(far.cfg, a.nodes[0].number, uri=far.uri))
            release(cfg, a.id)
            wait_all_free(cfg, want)
            between_nodes(cfg, n, tmp, args, row)
            wait_all_free(cfg, want)
    finally:
        control.clean(cfg)
        wire.close()
    print(f"\n{'':56} {'local':>9} {'hostb':>9}")
    for key, v in table.items():
        cells = [f"{v[h]:9.2f}" if h in v else f"{'':9}" for h in ("local", "hostb")]
        print(f"{key.replace('N', str(n), 1) if 'N' in key.split()[:3] else key:56} "
              f"{' '.join(cells)}")
    for line in failed:
        print(f"FAILED {line}")


if __name__ == "__main__":
    main()
