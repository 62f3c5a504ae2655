"""Issue-10 numbers: khd's RSS and threads while every node of a full pool prints at once, until
their console logs together grew by ``size_mib`` MiB (1 GiB with ``--console-mib 1024``), with
one session that reads everything and one that never reads attached to all of them.

The nodes print at the U-Boot prompt: ``md.l`` of 128 MiB of their RAM (about 570 MB of lines a
node), sent by the non-reading session; the reading session ends it with Ctrl-C. Used by
benchmarks/hostile.py (``--only console-gib``).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.hostile_load import (
    MIB,
    Failed,
    Sampler,
    Usage,
    alloc_of,
    cli,
    khget,
    nodes_of,
    quiet_session,
    release,
    settled,
    usage,
    wait_free,
)
from kh.service.config import ServiceConfig

Result = dict[str, Any]
FLOOD_MD = b"md.l 0 0x2000000\n"  # 128 MiB of RAM as 8 Mi lines of about 68 bytes
CTRL_C = b"\x03"  # U-Boot's md looks for it after every line
DROPPED = re.compile(rb"\[kh: (\d+) bytes of node \d+'s output dropped")


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LogBytes:
    """Bytes khd wrote to one node's console log since this object was made, across rotations
    (node<N>.log moves to .1, .1 to .2): poll it at least once per rotation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        st = path.stat()
        self.ino, self.size, self.done = st.st_ino, st.st_size, -st.st_size

    def poll(self) -> int:
        try:
            st = self.path.stat()
        except FileNotFoundError:  # between the rename and the new file
            return self.done + self.size
        if st.st_ino != self.ino:  # rotated: the old file's final size is in .1
            try:
                old = self.path.with_name(self.path.name + ".1").stat()
                self.done += old.st_size if old.st_ino == self.ino else self.size
            except FileNotFoundError:
                self.done += self.size
            self.ino = st.st_ino
        self.size = st.st_size
        return self.done + self.size


def log_disk(logs: Path) -> int:
    """Bytes the nodes' console logs take on disk now, rotated files included."""
    total = 0
    for p in logs.glob("node*.log*"):
        if ".qemu." in p.name:
            continue
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


class ReadingSession:
    """A principal's raw session on ``con<alloc>`` that reads everything: stock OpenSSH with a
    key ``user`` registers for the allocation (a C client, so that reading costs the host's
    cores little beside the nodes). ``received`` bytes so far, ``dropped`` the bytes khd's
    notes say it lost; ``send`` writes to the nodes."""

    def __init__(self, cfg: ServiceConfig, alloc: int, user: str, cred: str,
                 tmp: Path) -> None:
        key = tmp / "reader"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        r = cli(cfg, "kh", "key", "add", "-u", user, "--allocation", str(alloc),
                f"{key}.pub", cred=cred)
        if r.returncode:
            raise Failed(f"kh key add: {r.stderr.strip()}")
        self.proc = subprocess.Popen(
            ["ssh", "-T", "-i", str(key), "-p", str(cfg.ssh_port), "-o", "BatchMode=yes",
             "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
             f"con{alloc}@127.0.0.1", "raw"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.received = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="reader")
        self._thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        while data := os.read(fd, 1 << 16):
            self.received += len(data)
            # a note may be cut between two reads: look at the end of the last read too
            text = tail + data
            self.dropped += sum(int(m.group(1)) for m in DROPPED.finditer(text)
                                if m.end() > len(tail))
            tail = text[-120:]

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._thread.join(10)


def _wait_quiet(counters: list[LogBytes], quiet: float, limit: float) -> int:
    """Poll until the logs have not grown for ``quiet`` seconds (or ``limit``); their total."""
    deadline = time.monotonic() + limit
    last, since = sum(c.poll() for c in counters), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.25)
        now = sum(c.poll() for c in counters)
        if now != last:
            last, since = now, time.monotonic()
    return last


def console_flood(cfg: ServiceConfig, pid: int, cred: str, size_mib: int,
                  timeout: float) -> Result:
    """Every node of the pool prints until their logs grew by ``size_mib`` MiB (or ``timeout``
    seconds passed). khd's usage idle, with the sessions attached, at every sixteenth of the
    output, at its peak, once the nodes stopped, and after release (settled); the logs' disk
    use at its peak. Raises Failed when a step a principal takes does not work."""
    wait_free(cfg, cfg.nodes)
    idle = settled(pid)
    text = khget(cfg, "flooder", cred, cfg.nodes)
    alloc, nodes = alloc_of(text), nodes_of(text)
    reader = quiet = None
    series: list[Result] = []
    disk_peak = 0
    tmp = tempfile.TemporaryDirectory(prefix="kh-flood-")
    try:
        counters = [LogBytes(cfg.console_log(n)) for n in nodes]
        reader = ReadingSession(cfg, alloc, "flooder", cred, Path(tmp.name))
        time.sleep(2)  # logged in, its command started and subscribed to the consoles
        if reader.proc.poll() is not None:
            raise Failed(f"the reading session's ssh exited ({reader.proc.returncode})")
        attached = settled(pid)
        target, step = size_mib * MIB, size_mib * MIB // 16
        quiet = quiet_session(cfg, alloc, cred, FLOOD_MD)
        t0, cpu0 = time.monotonic(), cpu_seconds(pid)
        written = 0
        with Sampler(pid, interval=0.5) as s:
            while written < target and time.monotonic() - t0 < timeout:
                time.sleep(0.5)
                written = sum(c.poll() for c in counters)
                disk_peak = max(disk_peak, log_disk(cfg.logs))
                if written >= (len(series) + 1) * step:
                    u = usage(pid)
                    series.append({"log_mib": round(written / MIB), "rss_mib": mib(u.rss_kib),
                                   "threads": u.threads,
                                   "seconds": round(time.monotonic() - t0)})
            seconds, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu0
            reader.send(CTRL_C)
            written = _wait_quiet(counters, 3.0, 120)
            disk_peak = max(disk_peak, log_disk(cfg.logs))
        stopped = settled(pid)
        received, dropped = reader.received, reader.dropped
    finally:
        for sess in (reader, quiet):
            if sess is not None:
                sess.close()
        release(cfg, "flooder", cred, alloc)
        tmp.cleanup()
    wait_free(cfg, cfg.nodes)
    after = settled(pid)
    if written < target:
        raise Failed(f"the logs grew by {written // MIB} of {size_mib} MiB in {timeout:.0f} s")
    return {"nodes": len(nodes), "log_mib": round(written / MIB, 1),
            "console_mib_read": round(received / MIB, 1),
            "reader_dropped_bytes": dropped, "seconds": round(seconds),
            "rate_kib_s": round(written / 1024 / seconds, 1),
            "khd_cpu_share": round(cpu / seconds, 2),
            "disk_peak_mib": round(disk_peak / MIB, 1),
            "idle": _u(idle), "attached": _u(attached), "stopped": _u(stopped),
            "after": _u(after), "peak": _u(s.peak), "series": series}


def _u(u: Usage) -> Result:
    return {"rss_mib": mib(u.rss_kib), "threads": u.threads}


def rows(f: Result) -> list[tuple[str, str]]:
    """The table rows of a console_flood result."""
    def u(k: str) -> str:
        return f"{f[k]['rss_mib']} MiB/{f[k]['threads']}"

    curve = ", ".join(f"{p['log_mib']}:{p['rss_mib']}" for p in f["series"])
    return [
        (f"(f) {f['nodes']} nodes printing at once",
         f"logs grew {f['log_mib']} MiB in {f['seconds']} s ({f['rate_kib_s']} KiB/s; khd used "
         f"{f['khd_cpu_share']} of a core); the "
         f"reading session got {f['console_mib_read']} MiB (dropped {f['reader_dropped_bytes']}"
         f" bytes); logs on disk at most {f['disk_peak_mib']} MiB"),
        ("(f) khd RSS/threads idle / attached / peak / stopped / released",
         " / ".join(u(k) for k in ("idle", "attached", "peak", "stopped", "after"))),
        ("(f) khd RSS (MiB) by log MiB written", curve)]
