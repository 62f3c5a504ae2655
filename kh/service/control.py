"""Starting, stopping and cleaning up after khd, from the host side."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from kh import proc
from kh.client import Client, NotRunning
from kh.errors import KhError
from kh.hw.fabric import Fabric
from kh.service.config import ServiceConfig
from kh.service.nodes import kill_pids


def pid_of(cfg: ServiceConfig) -> int | None:
    try:
        pid = int(cfg.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"kh.service.daemon" in cmd else None


def start(cfg: ServiceConfig, timeout: float = 120.0, debug: bool = False) -> int:
    """Start khd in the background and wait until it answers; return its PID."""
    if os.geteuid() != 0:
        raise KhError("khd needs root", "it creates network namespaces, bridges and taps")
    existing = pid_of(cfg)
    if existing:
        return existing
    cfg.logs.mkdir(parents=True, exist_ok=True)
    cfg.run.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "kh.service.daemon", "--foreground",
            "--state-dir", str(cfg.state_dir), "--nodes", str(cfg.nodes),
            "--port", str(cfg.api_port), "--ssh-port", str(cfg.ssh_port)]
    if cfg.uplink_netns:
        argv += ["--uplink-netns", cfg.uplink_netns]
    if debug:
        argv.append("--debug")
    logf = open(cfg.logs / "khd.log", "ab")
    try:
        p = proc.daemon(argv, logf, env={"KH_PREFIX": cfg.prefix,
                                         "KH_IMAGES_OUT": str(cfg.images)})
    finally:
        logf.close()
    client = Client(cfg.socket, timeout=5)
    deadline = time.monotonic() + timeout
    while True:
        if p.poll() is not None:
            tail = (cfg.logs / "khd.log").read_text(errors="replace").strip().splitlines()
            raise KhError(f"khd exited at start: {tail[-1] if tail else 'no output'}",
                          f"log: {cfg.logs / 'khd.log'}")
        try:
            client.call("GET", "/v1/status")
            return p.pid
        except (NotRunning, TimeoutError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise KhError(f"khd did not answer within {timeout:.0f} s",
                          f"log: {cfg.logs / 'khd.log'}")
        time.sleep(0.1)


def stop(cfg: ServiceConfig, timeout: float = 30.0) -> bool:
    pid = pid_of(cfg)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_of(cfg) == pid and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_of(cfg) == pid:
        os.kill(pid, signal.SIGKILL)
    return True


def kh_qemu_pids(prefix: str) -> list[int]:
    """PIDs of QEMUs carrying kh's node tag (and nothing else)."""
    marker = f",process={prefix}-node".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd and marker in cmd:
            pids.append(int(entry))
    return pids


def clean(cfg: ServiceConfig) -> list[str]:
    """Remove every host object kh created (by kh's tags) and nothing else."""
    done = []
    if stop(cfg):
        done.append("stopped khd")
    pids = kh_qemu_pids(cfg.prefix)
    kill_pids(pids)
    done += [f"stopped node QEMU {pid}" for pid in pids]
    with contextlib.suppress(KhError):
        if Fabric(cfg.fabric).destroy():
            done.append(f"removed network namespace {cfg.fabric.netns}")
    for name in ("kh.db", "kh.db-wal", "kh.db-shm", "ssh_host_rsa_key"):
        p = cfg.state_dir / name
        if p.exists():
            p.unlink()
            done.append(f"removed {p}")
    for d in (cfg.run, cfg.logs):
        if d.exists():
            shutil.rmtree(d)
            done.append(f"removed {d}")
    with contextlib.suppress(OSError):
        cfg.state_dir.rmdir()
    return done


