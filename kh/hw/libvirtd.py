"""A libvirt daemon of kh's own, inside a network namespace of kh's, never on the host's sockets.

bookworm's libvirt 9.0 has only the monolithic ``libvirtd``. Its socket directory and config
file can be given (``--config``), but ``qemu.conf`` and ``/run|/var/lib|/var/cache|/var/log/
libvirt`` are fixed paths, so kh runs it in a mount namespace of its own (``unshare --mount``)
with private copies of those directories bind-mounted over them (``python -m kh.hw.libvirtd``
does the mounts there, then becomes libvirtd), and in the network namespace whose taps its
nodes use (``nsenter --net``). Its QEMUs are born there, see only that namespace, and outlive
khd; a libvirtd that is stopped and started again re-attaches to them.

Layout of ``root`` (all kh's): ``etc/`` (libvirtd.conf, qemu.conf; mounted over /etc/libvirt),
``run/`` (the socket ``libvirt-sock``, /run/libvirt), ``lib/`` (/var/lib/libvirt: guest RAM
files under ``lib/qemu/ram``), ``cache/``, ``log/``, ``lock/`` (/run/lock: console lock files)
and ``libvirtd.pid``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kh import proc
from kh.errors import KhError, KhTimeout
from kh.hw import netns as nsutil

# Private directory (under the daemon's root) -> the fixed path it is mounted over.
MOUNTS = (("etc", "/etc/libvirt"), ("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"),
          ("cache", "/var/cache/libvirt"), ("log", "/var/log/libvirt"),
          ("lock", "/run/lock"))  # its console lock files (/var/lock/LCK.._pts_N)
SOCKET = "libvirt-sock"
RAM_DIR = "/var/lib/libvirt/qemu/ram"  # memory_backing_dir, as every kh daemon sees it
START_WAIT = 20.0  # seconds a starting libvirtd may take to answer on its socket


class LibvirtdError(KhError):
    """kh's libvirt daemon could not be started or reached."""


@dataclass(frozen=True)
class Libvirtd:
    """One private libvirt daemon: its directory and the network namespace it runs in."""

    root: Path
    netns: str | None  # None: the caller's namespace (tests that are in theirs already)
    qemu_user: str | None = None  # the user its QEMUs run as (None: root)

    @property
    def socket(self) -> Path:
        return self.root / "run" / SOCKET

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.root / "libvirtd.pid"



def libvirtd_conf(d: Libvirtd) -> str:
    """The daemon's own settings: only its unix socket (root only), no TCP, no polkit."""
    return ("listen_tls = 0\nlisten_tcp = 0\nunix_sock_group = \"root\"\n"
            "unix_sock_ro_perms = \"0700\"\nunix_sock_rw_perms = \"0700\"\n"
            "auth_unix_ro = \"none\"\nauth_unix_rw = \"none\"\n"
            "unix_sock_dir = \"/run/libvirt\"\nlog_outputs = \"3:stderr\"\n")


def qemu_conf(d: Libvirtd) -> str:
    """The QEMU driver: QEMUs as ``qemu_user`` (files kh owns are never chowned: no dynamic
    ownership), no security driver (the host has none), no per-domain mount namespace, guest
    RAM files in the daemon's private /var/lib/libvirt."""
    user = d.qemu_user or "root"
    return (f"user = \"{user}\"\ngroup = \"{user}\"\ndynamic_ownership = 0\n"
            "remember_owner = 0\nsecurity_driver = \"none\"\nnamespaces = [ ]\n"
            f"memory_backing_dir = \"{RAM_DIR}\"\nstdio_handler = \"file\"\n")


def prepare(d: Libvirtd) -> None:
    """Make the private directories and write the daemon's configuration."""
    d.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for sub, _ in MOUNTS:
        (d.root / sub).mkdir(exist_ok=True)
        # its QEMUs (as qemu_user) open their RAM files under /var/lib/libvirt/qemu/ram
        (d.root / sub).chmod(0o755 if sub in ("lib", "run", "lock") else 0o700)
    (d.root / "lib" / "qemu").mkdir(exist_ok=True)
    (d.root / "lib" / "qemu").chmod(0o711)
    (d.root / "lib" / "qemu" / "ram").mkdir(exist_ok=True)
    (d.root / "etc" / "libvirtd.conf").write_text(libvirtd_conf(d))
    (d.root / "etc" / "qemu.conf").write_text(qemu_conf(d))
    if d.qemu_user:  # its QEMUs write their RAM files there
        pw = pwd.getpwnam(d.qemu_user)
        os.chown(d.root / "lib" / "qemu" / "ram", pw.pw_uid, pw.pw_gid)


def argv(d: Libvirtd) -> list[str]:
    """The command line: the network namespace, a private mount namespace, the mounts, the
    daemon (in the foreground, its own process group: it outlives khd)."""
    inner = [sys.executable, "-m", "kh.hw.libvirtd", str(d.root), "libvirtd",
             "--config", "/etc/libvirt/libvirtd.conf", "--pid-file", str(d.pidfile)]
    unshare = ["unshare", "--mount", "--propagation", "private", "--"]
    return (nsutil.enter_argv(d.netns) if d.netns else []) + unshare + inner


def answers(d: Libvirtd) -> bool:
    """Whether a daemon listens on ``d``'s socket now."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(1.0)
        s.connect(str(d.socket))
        return True
    except OSError:
        return False
    finally:
        s.close()


def start(d: Libvirtd, log_file: Path) -> subprocess.Popen[bytes] | None:
    """Start ``d``'s daemon unless one answers already (None then); wait until it answers.
    Raises LibvirtdError naming what it said when it does not come up."""
    if answers(d):
        return None
    prepare(d)
    # A daemon that was killed leaves its consoles' lock files, naming its PID; its successor
    # would refuse those consoles while that PID lives on (a zombie no one reaped).
    for stale in (d.root / "lock").glob("LCK..*"):
        stale.unlink(missing_ok=True)
    with open(log_file, "ab") as out:
        p = proc.start(argv(d), stdout=out, stderr=out)
    deadline = time.monotonic() + START_WAIT
    while not answers(d):
        if p.poll() is not None:
            said = log_file.read_text(errors="replace").strip().splitlines()[-1:]
            raise LibvirtdError(f"libvirtd exited at start with status {p.returncode}"
                                + (f": {said[0]}" if said else ""), f"see {log_file}")
        if time.monotonic() > deadline:
            proc.reap(p)
            raise KhTimeout(f"libvirtd did not answer on {d.socket} within {START_WAIT:.0f} s",
                            f"see {log_file}")
        time.sleep(0.05)
    return p


def running_pid(d: Libvirtd) -> int | None:
    """The daemon's PID from its pidfile, if that process is alive."""
    try:
        pid = int(d.pidfile.read_text().strip())
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return None if state in ("Z", "X") else pid


def stop(d: Libvirtd, prefix: str, wait: float = 10.0) -> list[str]:
    """`kh clean`: destroy the daemon's domains and pools of kh's ``prefix`` (through the
    daemon, so it forgets them), then end the daemon (SIGTERM, SIGKILL after ``wait`` s) when
    its pidfile names a live libvirtd; say what was done."""
    done: list[str] = []
    if answers(d):
        import libvirt  # only when a daemon of kh's is there to ask

        conn = libvirt.open(d.uri)
        try:
            for dom in conn.listAllDomains(0):
                if dom.name().startswith(f"{prefix}-node"):
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.destroy()
                    done.append(f"destroyed libvirt domain {dom.name()}")
            for pool in conn.listAllStoragePools(0):
                if pool.name().startswith(f"{prefix}-node"):
                    with contextlib.suppress(libvirt.libvirtError):
                        pool.destroy()
        finally:
            conn.close()
    pid = running_pid(d)
    if pid is not None and "libvirtd" in _cmdline(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while running_pid(d) == pid and time.monotonic() < deadline:
            time.sleep(0.05)
        if running_pid(d) == pid:
            os.kill(pid, signal.SIGKILL)
        done.append(f"stopped kh's libvirtd {pid}")
    return done


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def main(args: list[str]) -> None:
    """In the new mount namespace: bind each private directory over its fixed path, then
    become the daemon (``args``: ROOT PROGRAM ARG...)."""
    root, program = Path(args[0]), args[1:]
    for sub, target in MOUNTS:
        Path(target).mkdir(parents=True, exist_ok=True)
        proc.run(["mount", "--bind", str(root / sub), target])
    os.execvp(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
