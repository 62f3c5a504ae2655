"""Issue 12's intranet numbers: examples/intranet/run.sh (Figure 3 with its growth) against a
khd of its own (14 nodes, an outside world namespace of its own), and from its JSON report:

- bring-up: from the first khget to the workers' ready lines (GW, FS, DS, khgetdisk, workers);
- each step's seconds (khget + Listing 1 boots, khgetdisk, vgextend + lvextend + resize2fs,
  the two new workers), the checks, the whole run;
- the writer's throughput before and during the growth (MB/s over each phase's files, node
  clocks), with its file size and counts.

Prints numbers and asserts nothing (tests never assert wall-clock time). Needs root.
Usage: .venv/bin/python -m benchmarks.intranet [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pyroute2 import NetNS, netns

from benchmarks.common import REPO, free_port
from kh.service import control
from kh.service.config import ServiceConfig
from kh.settings import paths

NODES = 14


def one_run(env: dict[str, str], workdir: Path) -> dict[str, Any]:
    r = subprocess.run([str(REPO / "examples" / "intranet" / "run.sh"), "--dir", str(workdir),
                        "--json"], env=env, capture_output=True, text=True, timeout=7200)
    if not r.stdout.startswith("{"):
        raise SystemExit(f"run.sh exited {r.returncode}:\n{r.stderr[-3000:]}")
    rep: dict[str, Any] = json.loads(r.stdout)
    return rep


def table(rep: dict[str, Any]) -> str:
    out = [f"intranet: {'passed' if rep['ok'] else 'FAILED: ' + str(rep['error'])}, "
           f"{rep['seconds']:.0f} s in all"]
    out += [f"  {s['name']:<58} {s['seconds']:7.1f} s" for s in rep["steps"]]
    g = rep.get("growth") or {}
    w = g.get("writer")
    if w:
        rate = w["mb_per_s"]
        out.append(f"  writer ({w['file_kib']} KiB files, fsync each): "
                   f"{rate.get('before', 0):.2f} MB/s before the growth, "
                   f"{rate.get('during', 0):.2f} MB/s during, {rate.get('after', 0):.2f} "
                   f"MB/s after; files {w['files']}, {w['errors']} errors")
        out.append(f"  volume {g['size_mb'][0]} -> {g['size_mb'][1]} MB, disks "
                   f"{g['disks'][0]} -> {g['disks'][1]}; {g.get('verified')} files verified")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="whole runs, one after another")
    ap.add_argument("--json", action="store_true", help="the reports as JSON")
    args = ap.parse_args()
    uplink = f"ki{os.getpid()}-out"  # the outside world of this khd
    netns.create(uplink)
    with NetNS(uplink) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    tmp = Path(tempfile.mkdtemp(prefix="kh-bench-intranet-"))
    cfg = ServiceConfig(state_dir=tmp / "state", images=paths().out, nodes=NODES,
                        node_quota=NODES, api_port=free_port(), ssh_port=free_port(),
                        prefix=f"kn{os.getpid() % 10000}", uplink_netns=uplink)
    env = {**os.environ, "KH_STATE_DIR": str(cfg.state_dir), "KH_PREFIX": cfg.prefix,
           "KH_API_PORT": str(cfg.api_port), "KH_SSH_PORT": str(cfg.ssh_port),
           "KH_IMAGES_OUT": str(cfg.images), "KHDO_NETNS": uplink}
    reports = []
    try:
        control.start(cfg)
        for i in range(args.runs):
            reports.append(one_run(env, tmp / f"run{i}"))
            if not args.json:
                print(table(reports[-1]), flush=True)
    finally:
        control.clean(cfg)
        netns.remove(uplink)
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
