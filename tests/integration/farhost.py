"""A second kh host on this machine, reached as a remote one (issue 16, item 4's harness).

``far_host`` makes host "b" the way another machine would be: its own network namespace (its
"host" namespace: the test's own, ``<prefix>-host``), in it a dropbear sshd on its loopback,
running in a mount namespace of its own where a private ``/root`` holds the test's key in
``authorized_keys`` (the host's ``/root`` is never touched) and ``/run/libvirt`` is its kh
libvirtd's socket directory (so ``qemu+ssh://root@hostb/system`` reaches that daemon, as the
system daemon of a real host); ``/run/netns`` stays the machine's (network namespace names
are this machine's: kh on b uses a prefix of its own). kh's libvirtd there (kh.hw.libvirtd)
runs in b's fabric namespace ``<prefix>-fabric``. The ssh client reaches the sshd through its
``ProxyCommand``: a byte relay run inside b's namespace, so no address outside a namespace is
used. Commands run on b over that ssh (``FarHost.ssh``), e.g. this repo's ``kh fabric ...``
(``FarHost.kh``).

With a ``Wire`` (tests/unit/twohost.py), b's NIC on it (``eth1`` in b's host namespace) becomes
its underlay the way an operator makes one: `kh fabric underlay eth1 ADDRESS/24` run there over
ssh, which also makes b's fabric (another host's side). Without one, the caller's fabric for b
is made here in-process (a libvirt host with no domains across hosts).

Needs root, libvirtd, dropbear, ssh; a chroot needs / to be a mount point (tools/check-fresh
makes it one). ``python -m tests.integration.farhost sshd ROOT RUN -- DROPBEAR...`` is the
sshd's entry inside its new mount namespace (the mounts, then dropbear); ``... hide FILE --
PROGRAM...`` a daemon's that must not see FILE (``daemon_without_ppc``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import NetNS, netns

from kh.hw import libvirtd
from kh.hw import netns as nsutil
from kh.hw.fabric import Fabric
from kh.service.config import ServiceConfig
from tests.integration.conftest import skip_without_private_mounts

REPO = Path(__file__).resolve().parents[2]
KH = str(Path(sys.executable).parent / "kh")  # this repo's kh (.venv/bin/kh), on both hosts
MNT_NS = os.readlink("/proc/self/ns/mnt")  # the test's: farhost's entries never mount in it
SSH_PORT = 2222  # inside b's own network namespace
NIC = "eth1"  # b's NIC on the underlay, before kh takes it
# The ssh client's ProxyCommand: a byte relay to b's sshd, run inside b's namespace.
RELAY = """import os, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def up():
    while data := os.read(0, 65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    os.write(1, data)
"""


def require_far_host() -> None:
    """Skip, naming why, where a far host cannot be made: not root, no libvirt binding, no
    libvirtd, dropbear or ssh (tools/setup-apt), no private mounts."""
    pytest.importorskip("libvirt")
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, libvirtd)")
    for prog in ("/usr/sbin/libvirtd", "/usr/sbin/dropbear", "/usr/bin/ssh"):
        if not os.path.exists(prog):
            pytest.skip(f"no {prog} (tools/setup-apt)")
    skip_without_private_mounts()


def run(*argv: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``argv`` here; AssertionError with its output when it fails."""
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{shlex.join(str(a) for a in argv)}: {r.stderr or r.stdout}"
    return r


@dataclass(frozen=True)
class FarHost:
    """Host b as khd sees it: its name, its kh prefix, the ``qemu+ssh`` URI of its libvirtd,
    and the argv prefix that runs a command there over ssh (``runner``, as khd's `kh host add`
    derives it from the URI: the wrapper, the key)."""

    name: str
    cfg: ServiceConfig  # b's prefix, its state directory (libvirtd, logs)
    netns: str  # b's own network namespace (its sshd's)
    daemon: libvirtd.Libvirtd
    uri: str
    runner: tuple[str, ...]
    underlay: str | None  # b's underlay address (with a wire)
    sshd_pid: int

    @property
    def prefix(self) -> str:
        return self.cfg.prefix

    def ssh(self, *argv: str, timeout: float = 60, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """``argv`` run on b over ssh (words joined by ssh: each must need no quoting)."""
        r = subprocess.run([*self.runner, *argv], capture_output=True, text=True,
                           timeout=timeout)
        assert not check or r.returncode == 0, f"on {self.name}: {' '.join(argv)}: {r.stderr}"
        return r

    def kh(self, *words: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """This repo's kh on b, over ssh."""
        return self.ssh(KH, *words, check=check)

    def libvirtd_pid(self) -> int | None:
        return libvirtd.running_pid(self.daemon)

    def start_libvirtd(self) -> None:
        """b's kh libvirtd (again): it takes back the QEMUs a daemon before it started."""
        libvirtd.start(self.daemon, self.cfg.logs / "libvirtd.log")


def _sshd(tmp: Path, netns_name: str, daemon: libvirtd.Libvirtd, log: Path
          ) -> subprocess.Popen[bytes]:
    """b's dropbear: in b's namespace, in a mount namespace of its own (private /root with the
    test's key, /run/libvirt = b's daemon's sockets); its PID holds that mount namespace."""
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp / "key")
    run("dropbearkey", "-t", "ed25519", "-f", tmp / "hostkey")
    root = tmp / "broot"
    (root / ".ssh").mkdir(parents=True, mode=0o700)
    (root / ".ssh" / "authorized_keys").write_bytes((tmp / "key.pub").read_bytes())
    (root / ".ssh" / "authorized_keys").chmod(0o600)
    argv = [*nsutil.enter_argv(netns_name), "unshare", "--mount", "--propagation", "unchanged",
            "--", sys.executable, "-m", "tests.integration.farhost", "sshd", MNT_NS, str(root),
            str(daemon.socket.parent), "--",
            "dropbear", "-F", "-E", "-s", "-r", str(tmp / "hostkey"), "-W", str(4 << 20),
            "-p", f"127.0.0.1:{SSH_PORT}", "-P", str(tmp / "sshd.pid")]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "ab"))


def ssh_client(tmp: Path, netns_name: str, port: int = SSH_PORT, host: str = "hostb"
               ) -> tuple[str, tuple[str, ...]]:
    """The qemu+ssh URI of ``host`` and the runner: ssh through a wrapper whose ProxyCommand
    relays to ``port`` inside ``netns_name``; the key ``tmp``/key; host keys not checked
    (made by the test). Another ``port`` is a host that does not answer."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "relay.py").write_text(RELAY)
    proxy = shlex.join([*nsutil.enter_argv(netns_name), sys.executable,
                        str(tmp / "relay.py"), "127.0.0.1", str(port)])
    wrapper = tmp / f"ssh-{port}"
    wrapper.write_text("#!/bin/sh\nexec ssh -o " + shlex.quote(f"ProxyCommand={proxy}")
                       + " -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
                       " -o LogLevel=ERROR \"$@\"\n")
    wrapper.chmod(0o700)
    key = tmp / "key"
    uri = (f"qemu+ssh://root@{host}/system?command={wrapper}&keyfile={key}"
           "&no_verify=1&no_tty=1")
    runner = (str(wrapper), "-T", "-o", "BatchMode=yes", "-i", str(key), f"root@{host}", "--")
    return uri, runner


def _wait_ssh(runner: tuple[str, ...], sshd: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        r = subprocess.run([*runner, "true"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return
        assert sshd.poll() is None, f"b's sshd exited: {log.read_text()[-500:]}"
        assert time.monotonic() < deadline, f"b's sshd does not answer: {r.stderr}"
        time.sleep(0.2)


@contextlib.contextmanager
def far_host(tmp: Path, images: Path, prefix: str, wire: object = None,
             address: str = "172.31.254.2/24", name: str = "hostb") -> Iterator[FarHost]:
    """Host ``name`` with kh prefix ``prefix`` (not khd's: both hosts' namespaces share this
    machine's names), its files under ``tmp``; on ``wire`` (a tests.unit.twohost.Wire) with
    underlay ``address`` when given. Everything is removed afterwards, whatever happened: its
    domains, libvirtd, sshd, fabric and namespace."""
    cfg = ServiceConfig(state_dir=tmp / "b", images=images, nodes=1, prefix=prefix,
                        outside=False)
    host_ns = f"{prefix}-host"
    daemon = libvirtd.Libvirtd(cfg.libvirt_dir, cfg.fabric.netns, None)
    sshd: subprocess.Popen[bytes] | None = None
    fabric = Fabric(cfg.fabric)
    try:
        cfg.logs.mkdir(parents=True)
        netns.create(host_ns)
        with contextlib.closing(NetNS(host_ns)) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        sshd = _sshd(tmp, host_ns, daemon, cfg.logs / "sshd.log")
        uri, runner = ssh_client(tmp, host_ns)
        _wait_ssh(runner, sshd, cfg.logs / "sshd.log")
        far = FarHost(name, cfg, host_ns, daemon, uri, runner,
                      address.split("/")[0] if wire is not None else None, sshd.pid)
        if wire is not None:  # b's NIC on the underlay, taken by kh there (fabric made)
            wire.cable(host_ns, NIC)  # type: ignore[attr-defined]
            far.kh("fabric", "underlay", "--prefix", prefix, "--host", name, NIC, address)
        else:
            fabric.ensure()
        far.start_libvirtd()
        yield far
    finally:
        if libvirtd.answers(daemon) or cfg.libvirt_dir.exists():
            if cfg.libvirt_dir.exists() and not libvirtd.answers(daemon):
                with contextlib.suppress(Exception):  # a test killed it: it takes its QEMUs
                    libvirtd.start(daemon, cfg.logs / "libvirtd.log")  # back to destroy them
            libvirtd.stop(daemon, prefix)
        if sshd is not None:
            sshd.terminate()
            try:
                sshd.wait(10)
            except subprocess.TimeoutExpired:
                sshd.kill()
                sshd.wait(10)
        fabric.destroy()
        if nsutil.exists(host_ns):
            netns.remove(host_ns)


def khd_underlay(cfg: ServiceConfig, wire: Any, address: str = "172.31.254.1/24") -> None:
    """khd's (host a's) underlay: a NIC on ``wire`` (a tests.unit.twohost.Wire), taken into
    khd's fabric by `kh fabric underlay`, run in the wire's namespace (where that NIC is: the
    machine's own namespace is never used)."""
    wire.cable(wire.name, "ula")
    run(*nsutil.enter_argv(wire.name), KH, "fabric", "underlay", "--prefix", cfg.prefix,
        "--host", "local", "ula", address)


def khctl(cfg: ServiceConfig, *args: str) -> subprocess.CompletedProcess[str]:
    """`kh ARGS` against khd ``cfg`` (its state directory, prefix, ports)."""
    e = {**os.environ, "KH_STATE_DIR": str(cfg.state_dir), "KH_PREFIX": cfg.prefix,
         "KH_API_PORT": str(cfg.api_port), "KH_SSH_PORT": str(cfg.ssh_port)}
    return subprocess.run([KH, *args], env=e, capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def added_far_host(cfg: ServiceConfig, wire: Any, tmp: Path, prefix: str, capacity: int
                   ) -> Iterator[FarHost]:
    """Host b on ``wire`` (far_host), khd ``cfg``'s underlay on it too, and b added to that
    khd with `kh host add hostb URI --capacity CAPACITY --prefix PREFIX --kh KH`; removed
    again afterwards (`kh host rm`, if still there; an allocation left there keeps it)."""
    khd_underlay(cfg, wire)
    with far_host(tmp, cfg.images, prefix, wire=wire) as far:
        r = khctl(cfg, "host", "add", far.name, far.uri, "--capacity", str(capacity),
                  "--prefix", far.prefix, "--kh", KH)
        assert r.returncode == 0, r.stderr
        try:
            yield far
        finally:
            khctl(cfg, "host", "rm", far.name)


@contextlib.contextmanager
def daemon_without_ppc(tmp: Path, netns_name: str) -> Iterator[libvirtd.Libvirtd]:
    """A kh libvirtd (in ``netns_name``) whose machine has no qemu-system-ppc: /dev/null is
    bound over it in the daemon's mount namespace, so its capabilities offer no ppc guest (a
    host without it). Stopped afterwards."""
    d = libvirtd.Libvirtd(tmp / "libvirt", netns_name, None)
    emulator = "/usr/bin/qemu-system-ppc"
    argv = libvirtd.argv(d)
    # right after unshare's own "--" (nsenter's comes before it): in the new mount namespace,
    # never in the machine's
    inner = argv.index("--", argv.index("unshare")) + 1
    assert argv[inner - 4:inner] == ["--mount", "--propagation", "private", "--"], argv
    argv[inner:inner] = [sys.executable, "-m", "tests.integration.farhost", "hide", MNT_NS,
                         emulator, "--"]
    libvirtd.prepare(d)
    tmp.mkdir(parents=True, exist_ok=True)
    log = open(tmp / "libvirtd.log", "ab")
    p = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + libvirtd.START_WAIT
        while not libvirtd.answers(d):
            assert p.poll() is None, (tmp / "libvirtd.log").read_text()[-500:]
            assert time.monotonic() < deadline, "the daemon without ppc did not answer"
            time.sleep(0.05)
        import libvirt
        conn = libvirt.open(d.uri)
        try:
            assert "<arch name='ppc'>" not in conn.getCapabilities()
        finally:
            conn.close()
        yield d
    finally:
        libvirtd.stop(d, "none")
        p.wait(10)
        log.close()


def main(args: list[str]) -> None:
    """Entries inside a new mount namespace, each ending in exec of the program after
    ``--``: ``sshd OUTER ROOT RUN`` (b's sshd: ROOT over /root, RUN over /run/libvirt), ``hide
    OUTER FILE`` (/dev/null over FILE); each refuses to run in mount namespace OUTER (the
    test's)."""
    what, outer, *args = args
    # never the caller's mounts: only in a mount namespace of its own (unshare --mount)
    if os.readlink("/proc/self/ns/mnt") == outer:
        raise SystemExit("farhost: refusing to mount in the caller's mount namespace")
    sep = args.index("--")
    program = args[sep + 1:]
    assert program, args
    if what == "hide":
        subprocess.run(["mount", "--bind", "/dev/null", args[0]], check=True)
        os.execvp(program[0], program)
    root, run_dir = args[:sep]
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    Path("/run/libvirt").mkdir(parents=True, exist_ok=True)
    # a checkout under /root (CI's clean root has it at /root/kh) would be hidden by the
    # private /root, and with it the kh b runs: held open here, bound back in below
    keep = os.open(REPO, os.O_PATH) if REPO.is_relative_to("/root") else None
    for source, target in ((root, "/root"), (run_dir, "/run/libvirt")):
        # the mount holding the target stops propagating (to this namespace's peers: the
        # machine's), so the bind stays here; /run/netns stays shared, so kh's namespaces made
        # over ssh are the machine's, as khd's and the test's are
        holder = subprocess.run(["findmnt", "-n", "-o", "TARGET", "-T", target], check=True,
                                capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", "--make-private", holder], check=True)
        subprocess.run(["mount", "--bind", source, target], check=True)
    if keep is not None:
        REPO.mkdir(parents=True, exist_ok=True)  # in the private /root, the test's directory
        subprocess.run(["mount", "--no-canonicalize", "--bind", f"/proc/self/fd/{keep}",
                        str(REPO)], check=True,
                       pass_fds=(keep,))
        os.close(keep)
    os.execvp(program[0], program)


if __name__ == "__main__" and sys.argv[1:2] in (["sshd"], ["hide"]):
    main(sys.argv[1:])
