"""A second libvirt "host" on this machine, reached as a remote one (issue 16, item 4's harness):
a fabric namespace of the test's own prefix with its own libvirtd (kh.hw.libvirtd: private
sockets and directories), reached over ``qemu+ssh://``: the ssh client's ProxyCommand runs a
dropbear in that host's network and mount namespaces in inetd mode, so no address outside a
namespace is used, with a key the test makes and a private /root (authorized_keys) in that
host's mount namespace only. The libvirt backend drives a node there to the U-Boot prompt over
ssh: console stream, RAM writes by volume upload (MB/s printed), link changes."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import zlib

import pytest

from kh.hw import libvirtd
from kh.hw.fabric import Fabric
from kh.hw.uboot import uboot_command
from kh.service.config import ServiceConfig
from tests.integration.conftest import skip_without_private_mounts

pytestmark = pytest.mark.guest
SSH_PORT = 2222  # inside host b's own network namespace
# The ssh client's ProxyCommand: a byte relay to host b's sshd, run inside host b's namespace.
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


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture
def host_b(tmp_path, kh_paths):
    """(ServiceConfig of host b's prefix, its Fabric, the qemu+ssh URI, its daemon)."""
    pytest.importorskip("libvirt")
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, libvirtd)")
    for prog in ("/usr/sbin/libvirtd", "/usr/sbin/dropbear", "/usr/bin/ssh"):
        if not os.path.exists(prog):
            pytest.skip(f"no {prog} (tools/setup-apt)")
    skip_without_private_mounts()
    prefix = f"kr{os.getpid() % 10000}"
    cfg = ServiceConfig(state_dir=tmp_path / "b", images=kh_paths.out, nodes=1, prefix=prefix,
                        outside=False)
    fabric = Fabric(cfg.fabric)
    daemon = libvirtd.Libvirtd(cfg.libvirt_dir, cfg.fabric.netns, None)
    sshd: subprocess.Popen[bytes] | None = None
    try:
        fabric.ensure()
        cfg.logs.mkdir(parents=True)
        libvirtd.start(daemon, cfg.logs / "libvirtd.log")
        pid = libvirtd.running_pid(daemon)
        assert pid is not None
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "key"))
        run("dropbearkey", "-t", "ed25519", "-f", str(tmp_path / "hostkey"))
        root = tmp_path / "broot"
        (root / ".ssh").mkdir(parents=True, mode=0o700)
        (root / ".ssh" / "authorized_keys").write_bytes((tmp_path / "key.pub").read_bytes())
        (root / ".ssh" / "authorized_keys").chmod(0o600)
        netns = f"--net=/run/netns/{cfg.fabric.netns}"
        enter = ["nsenter", netns, f"--mount=/proc/{pid}/ns/mnt"]
        run(*enter, "mount", "--bind", str(root), "/root")  # in host b's mount namespace only
        # host b's sshd, on the loopback of its own namespace (the address is nobody else's)
        sshd = subprocess.Popen([*enter, "dropbear", "-F", "-E", "-s", "-r",
                                 str(tmp_path / "hostkey"), "-W", str(4 << 20),
                                 "-p", f"127.0.0.1:{SSH_PORT}", "-P", str(tmp_path / "sshd.pid")],
                                stdout=subprocess.DEVNULL, stderr=open(cfg.logs / "sshd.log", "wb"))
        (tmp_path / "relay.py").write_text(RELAY)
        proxy = shlex.join(["nsenter", netns, sys.executable, str(tmp_path / "relay.py"),
                            "127.0.0.1", str(SSH_PORT)])
        wrapper = tmp_path / "ssh"
        wrapper.write_text("#!/bin/sh\nexec ssh -o " + shlex.quote(f"ProxyCommand={proxy}")
                           + " -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
                           " -o LogLevel=ERROR \"$@\"\n")
        wrapper.chmod(0o700)
        uri = (f"qemu+ssh://root@hostb/system?command={wrapper}&keyfile={tmp_path / 'key'}"
               "&no_verify=1&no_tty=1")
        yield cfg, fabric, uri, daemon
    finally:
        if sshd is not None:
            sshd.terminate()
            sshd.wait(10)
        if cfg.libvirt_dir.exists() and not libvirtd.answers(daemon):  # a test killed it:
            libvirtd.start(daemon, cfg.logs / "libvirtd.log")  # it takes its QEMUs back
        libvirtd.stop(daemon, prefix)
        fabric.destroy()
        fabric.destroy_outside()


def test_a_node_on_a_libvirt_host_reached_over_ssh(host_b):
    from kh.service.libvirt_nodes import LibvirtNodes

    cfg, fabric, uri, _ = host_b
    nodes = LibvirtNodes(cfg, fabric, uri=uri, host="hostb")
    try:
        t0 = time.monotonic()
        node = nodes.start(1)  # paused, console over ssh, images uploaded, resumed, prompt
        print(f"\nnode on hostb at the U-Boot prompt over qemu+ssh in "
              f"{time.monotonic() - t0:.2f} s")
        assert nodes.running[1] is node and node.alive()
        ram = nodes.open_ram(1)
        data = os.urandom(16 << 20)
        t0 = time.monotonic()
        for off in range(0, len(data), 1 << 20):
            ram.write(0x9000000 + off, data[off:off + (1 << 20)])
        took = time.monotonic() - t0
        print(f"volume upload over qemu+ssh: 16 MiB in {took:.2f} s, "
              f"{len(data) / took / 1e6:.0f} MB/s")
        out = nodes.uboot(1, "crc32 0x9000000 0x1000000")
        assert f"{zlib.crc32(data):08x}" in out, out
        nodes.set_links(1, 2)
        dom_xml = node.dom.XMLDesc(0)
        assert dom_xml.count("<link state='up'/>") == 2, dom_xml
        assert uboot_command(node.console, "echo over-ssh", 10).strip().endswith("over-ssh")
    finally:
        nodes.stop(1)
        nodes.detach_all()


def test_a_host_that_dies_takes_only_its_nodes_down(host_b, monkeypatch):
    from kh.service import libvirt_host
    from kh.service.libvirt_nodes import LibvirtNodes

    monkeypatch.setattr(libvirt_host, "HOST_GRACE", 3.0)  # 30 s in khd
    cfg, fabric, uri, daemon = host_b
    nodes = LibvirtNodes(cfg, fabric, uri=uri, host="hostb")
    try:
        node = nodes.start(1)
        pid = libvirtd.running_pid(daemon)
        assert pid is not None
        os.kill(pid, 9)  # host b's libvirt is gone; its QEMU runs on, unreachable
        deadline = time.monotonic() + 30
        while node.alive():
            assert time.monotonic() < deadline, "the node was not marked gone"
            time.sleep(0.1)
        assert node.death_reason().startswith("lost libvirt host hostb: no connection for 3 s")
    finally:
        nodes.detach_all()
