"""Issue 11: what a node pays to ask the service over the control channel's ssh (the in-node
khget: dbclient, api+USER, the pinned host key) instead of clear HTTP. Prints numbers; asserts
nothing.

On one shell node (TCG, real dropbear): a command typed on its console that does nothing (the
console's own round trip), a clear HTTP GET of /v1/status with busybox wget (what a POST cost
before), the in-node khget refused by khd (a whole ssh login, key exchange and one command,
no allocation), and the in-node khget allocating one node; the host's khget of one node beside
it. Runs its own khd and cleans it up. Needs root and images/out.

Usage: .venv/bin/python -m benchmarks.chanapi [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import CRED, free_port
from kh import textobj
from kh.scenario import Principal, Scenario
from kh.service import control
from kh.service.config import ServiceConfig
from kh.settings import paths


def timed(sc: Scenario, alloc, node: int, command: str, runs: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds for ``command`` on the node (typed on its console, its status awaited)."""
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        sc.run(alloc, node, command, 300)
        times.append(time.monotonic() - t0)
    return times


def show(what: str, times: list[float]) -> None:
    print(f"{what:<58} median {statistics.median(times):6.2f} s  "
          f"(min {min(times):.2f}, max {max(times):.2f}, {len(times)} runs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kh-bench-") as tmp:
        cfg = ServiceConfig(state_dir=Path(tmp) / "state", images=paths().out, nodes=3,
                            api_port=free_port(), ssh_port=free_port(),
                            prefix=f"kc{os.getpid() % 10000}")
        cred = Path(tmp) / "cred"
        cred.write_text(CRED + "\n")
        env = {**os.environ, "KH_STATE_DIR": str(cfg.state_dir), "KH_PREFIX": cfg.prefix,
               "KH_SSH_PORT": str(cfg.ssh_port)}
        control.start(cfg)
        try:
            with Scenario(Principal("bench", cred), env=env, name="chanapi") as sc:
                a = sc.khget("-i", "-p", "1")
                net = a.netid(1)
                tok = json.loads(sc.cli("main", "token", "add", "-u", "bench", "-c", str(cred),
                                        "--allocate-on", str(net), "--json").stdout)["token"]
                sc.boot(a, "shell", keys=f"kh.token={tok}")
                node = a.nodes[0]
                server = f"10.1.255.254:{cfg.api_port}"
                show("console round trip (`true`)", timed(sc, a, node, "true", args.runs))
                show("clear HTTP GET /v1/status (busybox wget)", timed(
                    sc, a, node, f"wget -q -O /dev/null http://{server}/v1/status", args.runs))
                show("in-node khget refused by khd (ssh login + 1 command)", timed(
                    sc, a, node, "khget -x bench 1 2>/dev/null; true", args.runs))
                alloc_times, host_times = [], []
                for _ in range(args.runs):
                    t0 = time.monotonic()
                    out = sc.check(a, node, f"khget -n {net} bench 1", 300)
                    alloc_times.append(time.monotonic() - t0)
                    sc.release(textobj.parse(out.strip() + "\n").id)
                    t0 = time.monotonic()
                    b = sc.khget("-n", str(net))
                    host_times.append(time.monotonic() - t0)
                    sc.release(b)
                show("in-node khget of 1 node (over ssh)", alloc_times)
                show("host khget of 1 node (unix socket)", host_times)
        finally:
            control.clean(cfg)


if __name__ == "__main__":
    main()
