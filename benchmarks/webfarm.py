"""Issue 12's Speed: examples/webfarm.sh for COUNT 1, 4, 16, 32 and 64 in one run, against a
khd of its own sized for the largest COUNT (nodes and node quota), and per COUNT:

- wall: the script's own figure, from khget to the last page (khdo polls every node at once);
- memory: the host's MemTotal - MemAvailable after the last page less before khget (MiB);
- RSS: the farm's QEMU processes' resident memory, summed (MiB), and all of khd's QEMUs';
- boot CPU: each farm node's QEMU CPU time (user + system) from before khget to the last page;
- idle CPU: each booted node's QEMU (and khd) over ``--idle`` seconds, ``--settle`` seconds after
  the last page (what each node did meanwhile is reported too), in % of one host core;
- memory per node: RssAnon (QEMU itself, its code cache), RssShmem (guest RAM), RssFile (QEMU's
  binary and libraries, shared by all nodes) and PSS; the same for the pool's other nodes, at
  their U-Boot prompt;
- khd's CPU time during the script, and how busy the host's cores were (anyone's work: the
  host is shared, and a figure taken while others ran is slower than the farm alone);
- efficiency: wall / (COUNT x one node's boot CPU-seconds / cores): 1.0 is the physical limit
  on this CPU-bound host (the nodes' boots need that much CPU, the cores give no more).
  One node's boot CPU-seconds is the COUNT 1 run's when it is among --counts, else this run's
  mean.

Prints numbers and asserts nothing (tests never assert wall-clock time). Needs root.
Usage: .venv/bin/python -m benchmarks.webfarm [--counts 1,4,16,32,64] [--idle 10] [--json]
                                              [--settle 30] [--kernel UIMAGE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import CRED, REPO, free_port, release, wait_free
from kh.client import Client
from kh.service import control
from kh.service.config import ServiceConfig
from kh.settings import paths

TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
SUMMARY = re.compile(r"^(\d+)/(\d+) pages in ([0-9.]+) s$", re.M)
KEPT = re.compile(r"^kept: con(\d+) ", re.M)


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def memory_kib(pid: int) -> dict[str, int]:
    """The process's resident memory in KiB: RssAnon, RssFile, RssShmem (/proc/PID/status)
    and Pss (/proc/PID/smaps_rollup: shared pages divided among the processes sharing them;
    QEMU's binary and libraries are one copy for all nodes)."""
    out = {}
    for name in ("status", "smaps_rollup"):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile", "RssShmem", "Pss"):
                out[key] = int(line.split()[1])
    return out


def host_busy_seconds() -> float:
    """CPU time the whole host spent not idle, all cores (/proc/stat): what else ran too."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / TICK  # less idle and iowait; guest time is in user


def host_used_mib() -> float:
    info = {ln.split(":")[0]: int(ln.split()[1])
            for ln in Path("/proc/meminfo").read_text().splitlines()}
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def ps(cfg: ServiceConfig) -> dict[str, Any]:
    return json.loads(Client(cfg.socket).call("GET", "/v1/ps", as_json=True))


def qemu_pids(cfg: ServiceConfig) -> dict[int, int]:
    """Every running node's QEMU PID, by node."""
    return {n["node"]: n["pid"] for n in ps(cfg)["nodes"] if n["pid"]}


def one_count(cfg: ServiceConfig, env: dict[str, str], count: int, idle: float,
              settle: float = 30.0) -> dict[str, Any]:
    wait_free(cfg, cfg.nodes, timeout=1200)  # every node up and sampled before khget
    pids = qemu_pids(cfg)
    cpu0 = {p: cpu_seconds(p) for p in pids.values()}
    mem0 = host_used_mib()
    khd = control.pid_of(cfg)
    khd0, busy0, t0 = cpu_seconds(khd) if khd else 0.0, host_busy_seconds(), time.monotonic()
    r = subprocess.run(["bash", str(REPO / "examples" / "webfarm.sh"), str(count), "--keep"],
                       env=env, capture_output=True, text=True, timeout=3600)
    mem1 = host_used_mib()
    busy = host_busy_seconds() - busy0
    span = time.monotonic() - t0
    khd_cpu = cpu_seconds(khd) - khd0 if khd else 0.0
    kept = KEPT.search(r.stdout)
    summary = SUMMARY.search(r.stdout)
    if not kept:
        raise Failed(f"webfarm.sh {count} exited {r.returncode} without a farm: "
                     f"{r.stderr.strip()[-500:]}")
    alloc = int(kept[1])
    if not summary or summary[1] != summary[2]:
        release(cfg, alloc)
        raise Failed(f"webfarm.sh {count} exited {r.returncode}: "
                     f"{summary[0] if summary else 'no summary'}: {r.stderr.strip()[-500:]}")
    try:
        view = ps(cfg)
        farm = next(a["nodes"] for a in view["allocations"] if a["id"] == alloc)
        farm_pids = [n["pid"] for n in view["nodes"] if n["node"] in farm]
        if any(p not in cpu0 for p in farm_pids):
            raise SystemExit(f"a farm node's QEMU started after khget: {view['nodes']}")
        boot_cpu = [cpu_seconds(p) - cpu0[p] for p in farm_pids]
        # The nodes' boots end together (they share the cores), and each still has its
        # console shell to start and Apache's children to settle after its page: not idle.
        after_boot = {p: cpu_seconds(p) for p in farm_pids}
        time.sleep(settle)
        settle_cpu = [cpu_seconds(p) - after_boot[p] for p in farm_pids]
        before = {p: cpu_seconds(p) for p in farm_pids}
        khd_before = cpu_seconds(khd) if khd else 0.0
        i0 = time.monotonic()
        time.sleep(idle)
        idle_span = time.monotonic() - i0
        idle_pct = [100 * (cpu_seconds(p) - before[p]) / idle_span for p in farm_pids]
        khd_idle = 100 * (cpu_seconds(khd) - khd_before) / idle_span if khd else 0.0
        rss = sum(rss_mib(p) for p in farm_pids)
        mem = [memory_kib(p) for p in farm_pids]
        all_pids = qemu_pids(cfg).values()
        rss_all = sum(rss_mib(p) for p in all_pids)
        warm = [memory_kib(p) for p in all_pids if p not in farm_pids]  # at the U-Boot prompt
    finally:
        release(cfg, alloc)
    return {"count": count, "pages": int(summary[1]), "wall_s": float(summary[3]),
            "host_mem_mib": round(mem1 - mem0, 1), "farm_rss_mib": round(rss, 1),
            "all_qemu_rss_mib": round(rss_all, 1),
            "farm_pss_mib": round(sum(m["Pss"] for m in mem) / 1024, 1),
            "node_mib": {k: round(statistics.median(m[k] for m in mem) / 1024, 1)
                         for k in ("RssAnon", "RssShmem", "RssFile", "Pss")},
            "node_rss_max_mib": round(max(m["RssAnon"] + m["RssShmem"] + m["RssFile"]
                                          for m in mem) / 1024, 1),
            # the largest node's own figures: what it holds more than the median, and whether
            # it was still busy (an idle node's QEMU gives its code cache back)
            "largest_node": largest_node(mem, idle_pct, settle_cpu),
            "prompt_node_mib": ({k: round(statistics.median(m[k] for m in warm) / 1024, 1)
                                 for k in ("RssAnon", "RssShmem", "RssFile", "Pss")}
                                if warm else None),
            "boot_cpu_s": [round(x, 2) for x in boot_cpu], "khd_cpu_s": round(khd_cpu, 2),
            "khd_idle_cpu_pct": round(khd_idle, 2), "settle_s": settle,
            "settle_cpu_s": [round(x, 2) for x in settle_cpu],
            "host_busy_pct": round(100 * busy / (span * CORES), 1),
            "idle_cpu_pct": [round(x, 2) for x in idle_pct]}


def largest_node(mem: list[dict[str, int]], idle_pct: list[float],
                 settle_cpu: list[float]) -> dict[str, float]:
    """The farm node with the largest RSS: its anon / guest RAM / files MiB, its idle % of a
    core and its CPU-seconds while settling."""
    i = max(range(len(mem)), key=lambda k: mem[k]["RssAnon"] + mem[k]["RssShmem"]
            + mem[k]["RssFile"])
    return {**{k: round(mem[i][k] / 1024, 1) for k in ("RssAnon", "RssShmem", "RssFile")},
            "idle_cpu_pct": idle_pct[i], "settle_cpu_s": round(settle_cpu[i], 2)}


class Failed(Exception):
    """One COUNT's run did not serve every page: said in the table, the next COUNT runs."""


def efficiency(rows: list[dict[str, Any]]) -> None:
    ones = [r for r in rows if r["count"] == 1 and "error" not in r]
    for r in rows:
        if "error" in r:
            continue
        ref = ones[0]["boot_cpu_s"][0] if ones else statistics.mean(r["boot_cpu_s"])
        r["one_node_boot_cpu_s"] = round(ref, 2)
        r["efficiency"] = round(r["wall_s"] / (r["count"] * ref / CORES), 2)


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'COUNT':>5} {'pages':>6} {'wall s':>7} {'host MiB':>9} {'farm RSS':>9} "
            f"{'all RSS':>8} {'boot CPU s/node':>16} {'idle %core/node':>18} {'ratio':>6} "
            f"{'khd CPU s':>9} {'host busy':>9}")
    out = [head]
    for r in rows:
        if "error" in r:
            out.append(f"{r['count']:>5} failed: {r['error'][:200]}")
            continue
        b, i = r["boot_cpu_s"], r["idle_cpu_pct"]
        out.append(f"{r['count']:>5} {r['pages']:>3}/{r['count']:<2} {r['wall_s']:>7.1f} "
                   f"{r['host_mem_mib']:>9.0f} {r['farm_rss_mib']:>9.0f} "
                   f"{r['all_qemu_rss_mib']:>8.0f} "
                   f"{statistics.mean(b):>7.1f} ({min(b):.1f}-{max(b):.1f}) "
                   f"{statistics.median(i):>7.2f} ({min(i):.1f}-{max(i):.1f})"
                   f"{r['efficiency']:>7.2f} {r['khd_cpu_s']:>9.1f} {r['host_busy_pct']:>8.0f}%")
    out.append(f"ratio = wall / (COUNT x one node's boot CPU-seconds / {CORES} cores); "
               "idle: median (min-max); host busy: all cores, anyone's, during the script")
    for r in rows:
        if "error" not in r:
            n = r["node_mib"]
            out.append(f"COUNT {r['count']}: a node's MiB (median): RSS "
                       f"{n['RssAnon'] + n['RssShmem'] + n['RssFile']:.0f} = anon "
                       f"{n['RssAnon']:.0f} + guest RAM {n['RssShmem']:.0f} + files "
                       f"{n['RssFile']:.0f} (shared by all QEMUs); PSS {n['Pss']:.0f}; "
                       f"farm PSS {r['farm_pss_mib']:.0f}; khd while the farm idles "
                       f"{r['khd_idle_cpu_pct']:.1f} % of a core; a node's CPU in the "
                       f"{r['settle_s']:g} s before: {statistics.median(r['settle_cpu_s']):.2f} s; "
                       f"the largest node's RSS {r['node_rss_max_mib']:.0f}")
            g = r["largest_node"]
            out.append(f"COUNT {r['count']}: the largest node: anon {g['RssAnon']:.0f} + guest "
                       f"RAM {g['RssShmem']:.0f} + files {g['RssFile']:.0f}; idle "
                       f"{g['idle_cpu_pct']:.2f} % of a core, {g['settle_cpu_s']:.2f} CPU-s "
                       f"while settling")
            w = r.get("prompt_node_mib")
            if w:
                out.append(f"COUNT {r['count']}: a node at the U-Boot prompt (the pool's others): "
                           f"RSS {w['RssAnon'] + w['RssShmem'] + w['RssFile']:.0f} = anon "
                           f"{w['RssAnon']:.0f} + guest RAM {w['RssShmem']:.0f} + files "
                           f"{w['RssFile']:.0f}; PSS {w['Pss']:.0f}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="1,4,16,32,64",
                    help="comma-separated COUNTs, run in this order")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU sampling")
    ap.add_argument("--settle", type=float, default=30.0,
                    help="seconds after the last page before the idle sampling begins")
    ap.add_argument("--json", action="store_true", help="the numbers as JSON")
    ap.add_argument("--kernel", type=Path, default=None,
                    help="boot this uImage instead of images/out's (a kernel being tried)")
    ap.add_argument("--qemu", default=None,
                    help="the nodes' QEMU program (default: khd's, kh's own build among the "
                         "images; Debian's: qemu-system-ppc)")
    args = ap.parse_args()
    counts = [int(x) for x in args.counts.split(",")]
    size = max(counts)
    tmp = tempfile.mkdtemp(prefix="kh-bench-webfarm-")
    images = Path(tmp) / "images"  # a copy: images/out may be rebuilt while this runs
    images.mkdir()
    for name in ("u-boot.elf", "uImage", "shell.cpio.gz.uimg", "apache.cpio.gz.uimg",
                 "qemu-system-ppc"):  # kh's QEMU, khd's default for its nodes
        shutil.copy2(paths().out / name, images / name)
    if args.kernel is not None:
        shutil.copy2(args.kernel, images / "uImage")
    cfg = ServiceConfig(state_dir=Path(tmp) / "state", images=images, nodes=size,
                        node_quota=size, api_port=free_port(), ssh_port=free_port(),
                        qemu=args.qemu,
                        prefix=f"kw{os.getpid() % 10000}")  # with its own outside world
    env = {**os.environ, "KH_STATE_DIR": str(cfg.state_dir), "KH_PREFIX": cfg.prefix,
           "KH_API_PORT": str(cfg.api_port), "KH_SSH_PORT": str(cfg.ssh_port),
           "KH_IMAGES_OUT": str(cfg.images), "KH_CREDENTIAL": CRED, "USER": "bench"}
    rows: list[dict[str, Any]] = []
    try:
        t0 = time.monotonic()
        control.start(cfg)
        warm = time.monotonic() - t0
        print(f"khd with {size} warm nodes in {warm:.1f} s; {CORES} cores; nodes' QEMU "
              f"{cfg.node_qemu}", file=sys.stderr)
        for count in counts:
            try:
                rows.append(one_count(cfg, env, count, args.idle, args.settle))
            except Failed as e:
                rows.append({"count": count, "error": str(e)})
            print(f"COUNT {count}: " + (rows[-1].get("error") or f"{rows[-1]['pages']}/{count} "
                  f"pages in {rows[-1]['wall_s']:.1f} s"), file=sys.stderr, flush=True)
    finally:
        control.clean(cfg)
        shutil.rmtree(tmp, ignore_errors=True)
    efficiency(rows)
    if args.json:
        print(json.dumps({"cores": CORES, "pool_warm_s": round(warm, 1), "runs": rows},
                         indent=1))
    else:
        print(table(rows))


if __name__ == "__main__":
    main()
