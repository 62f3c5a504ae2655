"""A second libvirt "host" on this machine, reached as a remote one (issue 16, item 4's harness,
tests/integration/farhost.py): a fabric namespace of the test's own prefix with its own libvirtd
(kh.hw.libvirtd: private sockets and directories), reached over ``qemu+ssh://`` through a
dropbear in that host's own network namespace (the ssh client's ProxyCommand relays inside it,
so no address outside a namespace is used), with a key the test makes and a private /root
(authorized_keys) in that sshd's mount namespace only. The libvirt backend drives a node there
to the U-Boot prompt over ssh: console stream, RAM writes by volume upload (MB/s printed), link
changes."""

from __future__ import annotations

import os
import time
import zlib

import pytest

from kh.hw import libvirtd
from kh.hw.fabric import Fabric
from kh.hw.uboot import uboot_command
from tests.integration.farhost import far_host, require_far_host

pytestmark = pytest.mark.guest


@pytest.fixture
def host_b(tmp_path, kh_paths):
    """(ServiceConfig of host b's prefix, its Fabric, the qemu+ssh URI, its daemon)."""
    require_far_host()
    with far_host(tmp_path, kh_paths.out, f"kr{os.getpid() % 10000}") as far:
        yield far.cfg, Fabric(far.cfg.fabric), far.uri, far.daemon


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
