"""Issue-16 numbers: the libvirt node backend against the direct (qemu) one, in the same run.

For each backend, a khd of its own (own prefix, state dir, ports; cleaned up afterwards):
the pool of N nodes started to the U-Boot prompt, khget of 1 and of N nodes (pool warm), idle
CPU per node at the prompt, a bulk load of kernel + ramdisk into 1 and 4 nodes over the control
channel (khdo loadkernel/loadramdisk), a console round trip (a newline and the prompt back,
through the node's console socket). Then, for the libvirt backend alone, raw volume-upload
speed into one node's RAM from Python (the path a remote host's loads take). Prints numbers,
asserts nothing. Needs root, images/out, libvirtd.
Usage: .venv/bin/python -m benchmarks.libvirt [--nodes 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import CRED, alloc_of, free_port, khget, release, wait_free
from kh.hw import uboot
from kh.hw.console import Console
from kh.service import control
from kh.service.config import ServiceConfig
from kh.settings import paths


def qemu_pids(prefix: str) -> list[int]:
    """Node QEMUs of ``prefix``, direct (``-name kh-node1,process=...``) or libvirt's
    (``-name guest=kh-node1,...``)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"qemu-system-ppc") and \
                any(f"{prefix}-node".encode() in a for a in cmd):
            out.append(int(d))
    return out


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(prefix: str, seconds: float = 10.0) -> float:
    """Mean share of one core per node QEMU over ``seconds``."""
    pids = qemu_pids(prefix)
    c0 = {p: cpu_seconds(p) for p in pids}
    t0 = time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return statistics.mean((cpu_seconds(p) - c0[p]) / dt for p in pids) if pids else 0.0


def env(cfg: ServiceConfig) -> dict[str, str]:
    return {**os.environ, "KH_STATE_DIR": str(cfg.state_dir), "KH_PREFIX": cfg.prefix,
            "KH_API_PORT": str(cfg.api_port), "KH_SSH_PORT": str(cfg.ssh_port),
            "KH_CREDENTIAL": CRED}


def bulk_load(cfg: ServiceConfig, count: int, *opts: str) -> float:
    """MB/s of kernel + ramdisk written into ``count`` nodes (bytes per node x nodes / time);
    ``opts`` for khget (``--host NAME``: the nodes of that host)."""
    text = khget(cfg, count, *opts)
    alloc = alloc_of(text)
    files = [cfg.images / "uImage", cfg.images / f"{cfg.appliance}.cpio.gz.uimg"]
    size = sum(f.stat().st_size for f in files)
    t0 = time.monotonic()
    for cmd, f in zip(("loadkernel", "loadramdisk"), files, strict=True):
        r = subprocess.run([sys.executable, "-m", "kh.cli.khdo", cmd, str(f)], input=text,
                           env=env(cfg), capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise SystemExit(f"khdo {cmd}: {r.stderr.strip()}")
    dt = time.monotonic() - t0
    release(cfg, alloc)
    return size * count / dt / 1e6


def round_trip(cfg: ServiceConfig, node: int, times: int = 20) -> float:
    """Median seconds from a newline written to the node's console to its prompt back."""
    con = Console(cfg.node_dir(node) / "console.sock", None, name=f"node{node}")
    con.connect(5)
    took = []
    try:
        for _ in range(times):
            start = con.mark()
            t0 = time.monotonic()
            con.write(b"\n")
            con.expect(uboot.UBOOT_PROMPT, 10, stage="prompt", start=start)
            took.append(time.monotonic() - t0)
    finally:
        con.close()
    return statistics.median(took)


def volume_upload(cfg: ServiceConfig, node: int, mib: int = 16, uri: str | None = None
                  ) -> float:
    """MB/s of one upload of ``mib`` MiB into a free node's RAM volume, from this process
    (``uri``: the libvirt host's, default kh's own daemon of ``cfg``)."""
    from kh.service.libvirt_nodes import LibvirtNodes  # only for the libvirt backend

    nodes = LibvirtNodes(cfg, None, uri=uri)  # type: ignore[arg-type]  # no fabric for RAM
    try:
        dom = nodes.conn.lookupByName(f"{cfg.prefix}-node{node}")
        ram = nodes.open_ram_of(dom)
        data = os.urandom(mib << 20)
        t0 = time.monotonic()
        for off in range(0, len(data), 1 << 20):
            ram.write(0x9000000 + off, data[off:off + (1 << 20)])
        return len(data) / (time.monotonic() - t0) / 1e6
    finally:
        nodes.detach_all()  # else it would start kh clean's stopped daemon again


class Noted(dict[str, float]):
    """Measurements, each printed as it is taken (a run cut short still says what it had)."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend

    def __setitem__(self, key: str, value: float) -> None:
        super().__setitem__(key, value)
        print(f"{self.backend}: {key}: {value:.3f}", flush=True)


def run(backend: str, count: int, tmp: Path) -> dict[str, float]:
    cfg = ServiceConfig(state_dir=tmp / backend, images=paths().out, nodes=count,
                        api_port=free_port(), ssh_port=free_port(),
                        prefix=f"kb{backend[0]}{os.getpid() % 1000}", backend=backend)
    got = Noted(backend)
    try:
        t0 = time.monotonic()
        control.start(cfg)
        wait_free(cfg, count)
        got["pool of N to U-Boot prompts (s)"] = time.monotonic() - t0
        for n in (1, count):
            t0 = time.monotonic()
            alloc = alloc_of(khget(cfg, n))
            got[f"khget {n} (s)"] = time.monotonic() - t0
            release(cfg, alloc)
            wait_free(cfg, count)
        got["idle CPU per node at the prompt (% of a core)"] = 100 * idle_cpu(cfg.prefix)
        for n in (1, 4):
            got[f"bulk load kernel+ramdisk into {n} (MB/s)"] = bulk_load(cfg, n)
            wait_free(cfg, count)
        got["console round trip (ms)"] = 1000 * round_trip(cfg, 1)
        if backend == "libvirt":
            got["volume upload 16 MiB, 1 MiB pieces (MB/s)"] = volume_upload(cfg, 2)
    finally:
        control.clean(cfg)
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kh-bench-") as tmp:
        results = {b: run(b, args.nodes, Path(tmp)) for b in ("qemu", "libvirt")}
    print(f"{'':52} {'qemu':>10} {'libvirt':>10}")
    for key in results["libvirt"]:
        q = results["qemu"].get(key)
        print(f"{key.replace('N', str(args.nodes), 1) if 'of N' in key else key:52} "
              f"{'' if q is None else f'{q:10.3f}'} {results['libvirt'][key]:10.3f}")


if __name__ == "__main__":
    main()
