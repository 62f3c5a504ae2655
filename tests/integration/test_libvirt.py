"""The libvirt node backend with real nodes: khd's nodes as domains of kh's own libvirtd (in
the fabric namespace), booted and networked as the direct backend's are; RAM loads through a
storage volume; khd and libvirtd each stopped and started again under running nodes."""

from __future__ import annotations

import os
import signal
import zlib
from pathlib import Path

import pytest

from kh.hw import libvirtd
from kh.service import control
from tests.integration.conftest import (
    allocate,
    credfile,
    khd_log_mark,
    ps,
    release,
    running_khd,
    shell,
    skip_without_private_mounts,
    wait_free,
    wait_khd_log,
)
from tests.integration.test_channel import khdo, tagged

pytestmark = pytest.mark.guest
NODES = 2


@pytest.fixture(scope="module")
def lvkhd(request, tmp_path_factory, kh_paths, outside):
    pytest.importorskip("libvirt")
    if not os.path.exists("/usr/sbin/libvirtd"):
        pytest.skip("no libvirtd (tools/setup-apt installs libvirt-daemon)")
    skip_without_private_mounts()
    with running_khd(request, tmp_path_factory.mktemp("lvkhd") / "state", kh_paths,
                     keep_as="libvirt-khd-logs", nodes=NODES,
                     prefix=f"kv{os.getpid() % 10000}", uplink_netns=outside,
                     backend="libvirt") as cfg:
        yield cfg
    # kh clean took kh's libvirtd, its domains and its directories with it
    assert not cfg.libvirt_dir.exists()
    assert [p for p in Path("/proc").glob("[0-9]*")
            if str(cfg.libvirt_dir).encode() in read_cmdline(p)] == []


def read_cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""


def daemon(cfg) -> libvirtd.Libvirtd:
    return libvirtd.Libvirtd(cfg.libvirt_dir, cfg.fabric.netns, None)


def test_nodes_boot_and_talk_in_a_private_domain(lvkhd, artifacts):
    wait_free(lvkhd, NODES)
    alloc, nodes, lines = allocate(lvkhd, "-c", credfile("lvcred"), "lvuser", "2")
    netid = int(lines[2].split()[1])
    a, b = (shell(lvkhd, n, artifacts) for n in nodes)
    out, status = a.run(f"ping -c 2 -W 2 10.{netid}.0.{nodes[1]}")
    assert status == 0, out
    out, status = b.run(f"arping -c 2 -w 3 -I eth0 10.{netid}.0.{nodes[0]}")
    assert status == 0, out
    a.console.close()
    b.console.close()
    release(lvkhd, "lvuser", "lvcred", alloc)
    wait_free(lvkhd, NODES)


def test_bulk_load_goes_into_the_nodes_ram_through_a_volume(lvkhd, tmp_path):
    wait_free(lvkhd, NODES)
    alloc, nodes, lines = allocate(lvkhd, "-c", credfile("lvcred"), "lvuser", "2")
    big = os.urandom(6 << 20)
    (tmp_path / "big").write_bytes(big)
    r = khdo(lvkhd, "\n".join(lines) + "\n", "loadramdisk", str(tmp_path / "big"),
             cred="lvcred")
    assert r.returncode == 0, r.stderr
    answers = tagged(lvkhd, alloc, "lvcred", "crc32 0xa000000 600000", tmp_path)
    for n in nodes:
        assert f"==> {zlib.crc32(big):08x}" in answers[n], answers
    release(lvkhd, "lvuser", "lvcred", alloc)


def test_khd_and_libvirtd_restarts_keep_the_nodes(lvkhd, tmp_path):
    wait_free(lvkhd, NODES)
    before = {n["node"]: n["pid"] for n in ps(lvkhd)["nodes"]}
    control.stop(lvkhd)
    control.start(lvkhd)
    assert {n["node"]: n["pid"] for n in ps(lvkhd)["nodes"]} == before
    # libvirtd killed: khd starts it again and reconnects; the nodes are the same domains
    d = daemon(lvkhd)
    pid = libvirtd.running_pid(d)
    assert pid is not None
    mark = khd_log_mark(lvkhd)
    os.kill(pid, signal.SIGKILL)
    # khd starts libvirtd again, connects and reattaches every node's console, then says so
    wait_khd_log(lvkhd, r"libvirt host \S+: reconnected", mark, timeout=60)
    assert libvirtd.running_pid(d) not in (pid, None) and libvirtd.answers(d)
    rows = ps(lvkhd)["nodes"]
    assert {n["node"]: n["pid"] for n in rows} == before, rows
    assert {n["state"] for n in rows} == {"free"}, rows
    # and their consoles still answer: an allocation's node answers a U-Boot command
    alloc, nodes, _ = allocate(lvkhd, "-c", credfile("lvcred"), "lvuser", "1")
    answers = tagged(lvkhd, alloc, "lvcred", "echo lv-alive", tmp_path)
    assert "lv-alive" in answers[nodes[0]], answers
    release(lvkhd, "lvuser", "lvcred", alloc)
