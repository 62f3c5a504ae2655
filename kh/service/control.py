"""Starting, stopping and cleaning up after khd, from the host side.

`kh service start` either succeeds, with khd running and its pool settled, or leaves nothing
behind but khd's logs: any failure stops khd and removes what it made.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kh import proc
from kh.client import Client, Disconnected, NotRunning
from kh.errors import KhError
from kh.hw import cgroup, libvirtd
from kh.hw import netns as nsutil
from kh.hw.fabric import Fabric
from kh.service import config, preflight, procid, statedir
from kh.service.config import ServiceConfig
from kh.service.pool import PoolStatus, summarize_json

STALL = 180.0  # `kh service start` gives up when the pool changes for this long: longer
# than any one start may take (console 10 s, QMP 10 s, U-Boot prompt 30 s) plus a backoff


class PoolFailed(KhError):
    """Not one node of the pool could start."""


@dataclass(frozen=True)
class Started:
    pid: int
    status: PoolStatus | None  # None: khd was running already
    already: bool = False


def _cmdlines() -> Iterator[tuple[int, list[bytes]]]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                yield int(entry), Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue


def khd_pids(cfg: ServiceConfig) -> list[int]:
    """khd processes serving ``cfg``'s state directory, found by command line (khd gets it as
    an option), so also a khd that has no pidfile yet or any more."""
    state = os.path.abspath(cfg.state_dir).encode()
    found = []
    for pid, args in _cmdlines():
        if b"kh.service.daemon" in args and any(
                a == b"--state-dir" and b == state for a, b in itertools.pairwise(args)):
            found.append(pid)
    return found


def pid_of(cfg: ServiceConfig) -> int | None:
    """The running khd of ``cfg``'s state directory."""
    pids = khd_pids(cfg)
    try:
        recorded = int(cfg.pidfile.read_text().strip())
    except (OSError, ValueError):
        recorded = None
    if recorded in pids:
        return recorded
    return pids[0] if pids else None


def kh_qemu_pids(prefix: str) -> list[int]:
    """PIDs of processes carrying kh's node tag (QEMU's ``-name X,process=<prefix>-nodeN``),
    whatever program the `qemu` setting names, and nothing else."""
    marker = f",process={prefix}-node".encode()
    return [pid for pid, args in _cmdlines() if any(marker in a for a in args)]


def netns_pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (they keep it alive when it is removed)."""
    try:
        st = os.stat(nsutil.path(name))
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ns = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
                pids.append(int(entry))
    return pids


def running_config(pid: int) -> ServiceConfig | None:
    """The settings khd ``pid`` runs with, read back from its command line."""
    try:
        args = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except (OSError, UnicodeDecodeError):
        return None
    if "kh.service.daemon" not in args:
        return None
    try:
        return config.parse_argv(args[args.index("kh.service.daemon") + 1:])
    except (KhError, TypeError, SystemExit):
        return None


def mismatch(running: ServiceConfig, asked: ServiceConfig, given: set[str]) -> str | None:
    """`khd already running with 8 nodes, not 4`, when a setting asked for differs."""
    def value(cfg: ServiceConfig, field: str) -> object:
        v = getattr(cfg, field)
        if field == "qemu":  # unset is kh's own build: the same thing as naming it
            v = cfg.node_qemu
        if isinstance(v, bool):
            v = "on" if v else "off"
        return Path(os.path.abspath(v)) if isinstance(v, Path) else v  # khd's are absolute

    diffs = [(s.describe(value(running, s.field)), value(asked, s.field))
             for s in config.SETTINGS
             if s.field in given and value(running, s.field) != value(asked, s.field)]
    if not diffs:
        return None
    return "khd already running with " + ", ".join(f"{r}, not {a}" for r, a in diffs)


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"status {returncode}"


def _status(cfg: ServiceConfig) -> PoolStatus:
    return summarize_json(json.loads(Client(cfg.socket, timeout=10).call(
        "GET", "/v1/status", as_json=True)))


def start(cfg: ServiceConfig, *, debug: bool = False, wait: bool = True,
          timeout: float = 120.0, progress: Callable[[PoolStatus], None] | None = None,
          given: set[str] | None = None) -> Started:
    """Start khd in the background; with ``wait``, until its pool has settled (every node at
    the U-Boot prompt or failed for good). Raises PoolFailed when no node could start. Any
    failure (a signal's Stopped too) stops khd and removes what it made (its logs stay): into a
    state directory that held a state already (principals, allocations, nodes that kept
    running since `kh service stop`) a failed start made none of that, so it stops only khd.

    When khd runs already, ``given`` names the settings the caller asked for: any that differ
    from the running khd's are refused (KhError), the rest is Started(already=True)."""
    existing = pid_of(cfg)  # a running khd's settings first: the host's checks count its nodes
    if existing:
        running = running_config(existing)
        differs = mismatch(running, cfg, given or set()) if running else None
        if differs:
            raise KhError(differs, "kh service stop first")
        return Started(existing, None, already=True)
    preflight.check(cfg)  # refuses before anything is created
    # -I: root's khd imports nothing from the directory it was started in (`python -m` would
    # put it first on sys.path: a stray http.py there ran as root) nor from PYTHON* variables.
    argv = [sys.executable, "-I", "-m", "kh.service.daemon", "--foreground",
            *config.to_argv(cfg)]
    if debug:
        argv.append("--debug")
    log_start = 0
    p = None

    def exited() -> KhError:
        assert p is not None
        with contextlib.suppress(Exception):  # khd is gone or going: let it finish its log
            p.wait(5)
        text = cfg.khd_log.read_bytes()[log_start:].decode(errors="replace").strip()
        last = text.splitlines()[-1] if text else ""
        if last.startswith("khd: "):  # khd's own one-line error, with its hint
            return KhError(last.removeprefix("khd: "))
        how = "" if p.returncode is None else f" ({_exit_text(p.returncode)})"
        return KhError(f"khd exited at start{how}: {last or 'no output'}",
                       f"log: {cfg.khd_log}")

    def ask() -> PoolStatus | None:
        """khd's pool status; None while khd does not answer yet. khd gone is exited()."""
        if p is not None and p.poll() is not None:
            raise exited()
        try:
            return _status(cfg)
        except (NotRunning, Disconnected, TimeoutError, ConnectionError):
            if p is not None and p.poll() is not None:
                raise exited() from None
            return None

    had_state = cfg.db.exists()
    try:
        statedir.prepare(cfg)
        log_start = cfg.khd_log.stat().st_size if cfg.khd_log.exists() else 0
        # khd.log is the operator's alone (0600), like everything khd itself writes.
        fd = os.open(cfg.khd_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "ab") as logf:
            # glibc: 2 malloc arenas, not 8 per core that keep freed scrypt buffers (service.md)
            p = proc.daemon(argv, logf, env={"MALLOC_ARENA_MAX": "2"})
        deadline = time.monotonic() + timeout
        while (status := ask()) is None:
            if time.monotonic() > deadline:
                raise KhError(f"khd did not answer within {timeout:.0f} s",
                              f"log: {cfg.khd_log}")
            time.sleep(0.1)
        last, changed = status, time.monotonic()
        while wait and not status.ready:
            if time.monotonic() - changed > STALL:
                raise KhError(f"the pool made no progress for {STALL:.0f} s "
                              f"({status.progress_text()})", f"log: {cfg.khd_log}")
            time.sleep(0.25)
            status = ask() or status
            if status != last:
                last, changed = status, time.monotonic()
                if progress:
                    progress(status)
        if status.dead:
            first = status.failures[0]
            left = ("its state and the nodes it had kept" if had_state
                    else "nothing of it left running")
            raise PoolFailed(f"no node of the pool could start: node {first.node}: "
                             f"{first.reason}", f"khd stopped, {left}; logs in {cfg.logs}")
    except BaseException:
        if had_state:
            stop(cfg)
        else:
            clean(cfg, keep_logs=True)
        raise
    return Started(p.pid, status)


def stop(cfg: ServiceConfig, timeout: float = 30.0, kill_wait: float = 30.0) -> list[int]:
    """Stop every khd of ``cfg``'s state directory (SIGTERM; SIGKILL after ``timeout`` s) and
    return once none is left; return their PIDs. A process that shows up meanwhile with
    khd's command line is stopped too: a khd's child between fork and exec (a QEMU about to
    start, which carries its node tag only once it has exec'd) looks like khd, so a `clean`
    looks for node QEMUs only once it is gone. Raises KhError if one outlives SIGKILL by
    ``kill_wait`` s."""
    signalled: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        left = khd_pids(cfg)
        if not left:
            return signalled
        sig = signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL
        if sig == signal.SIGKILL and time.monotonic() > deadline + kill_wait:
            raise KhError(f"khd {left[0]} is still there {kill_wait:.0f} s after SIGKILL",
                          "see its state in /proc; kh clean again once it is gone")
        for pid in left:
            if pid not in signalled or sig == signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if pid not in signalled:
                signalled.append(pid)
        time.sleep(0.05)


def clean(cfg: ServiceConfig, *, keep_logs: bool = False) -> list[str]:
    """Remove every host object kh created (by kh's tags) and nothing else: khd, node QEMUs
    (with whatever they started), the fabric namespace and everything in it, the external
    uplink's outside end, kh's own outside world (``<prefix>-outside``; an operator's
    --uplink-netns is left alone), and khd's files in the directories it marked
    (kh.service.statedir).
    Processes and namespaces are found by the prefix tag, so two kh instances on one host
    need different prefixes."""
    done = [f"stopped khd {pid}" for pid in stop(cfg)]
    # kh's own libvirtd (the libvirt backend): its domains, then the daemon itself
    done += libvirtd.stop(libvirtd.Libvirtd(cfg.libvirt_dir, cfg.fabric.netns),
                          cfg.prefix)
    # Only now, with no khd left to start one: each found with its identity (PID, start time,
    # tag), checked again before each signal, and looked for again until none is found.
    stopped, left = procid.sweep(cfg.prefix)
    done += [f"stopped node QEMU {i.pid}" for i in stopped]
    if left:
        raise KhError(f"node QEMU {left[0]} is still running after SIGKILL",
                      "kh clean again once it has exited; nothing else was removed")
    done += [f"removed cgroup {d}" for d in cgroup.remove_all(cfg.prefix)]
    fabric = Fabric(cfg.fabric)
    for name, destroy in ((cfg.fabric.netns, fabric.destroy),
                          (cfg.fabric.outside_netns, fabric.destroy_outside)):
        for pid in netns_pids(name):
            done.append(f"left process {pid} alone: it is in {name} but not kh's "
                        "(the namespace lives on until it exits)")
        try:
            if destroy():
                done.append(f"removed network namespace {name}")
        except OSError as e:
            raise KhError(f"cannot remove network namespace {name}: {e.strerror}",
                          "kh clean needs root") from None
    return done + statedir.remove(cfg, keep_logs=keep_logs)
