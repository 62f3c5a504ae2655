"""Issue 10, least privilege: a khd node's QEMU runs sandboxed (seccomp), as the user kh-node
when the host has it, in a cgroup of its own with its CPU and memory limits; and it still
boots, resets and takes bulk loads into its RAM. `kh clean` removes its cgroups.

Its own khd with two nodes, its own prefix, state directory and ports.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from kh.hw import board, cgroup, memload, uboot
from kh.hw.console import Console
from kh.service import control
from kh.service.config import ServiceConfig
from kh.service.qemunode import CODE_CACHE_MIB, NODE_USER
from tests.integration.conftest import allocate, credfile, free_port, kh, ps, release, shell

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def small_khd(tmp_path_factory: pytest.TempPathFactory, kh_paths) -> Iterator[ServiceConfig]:
    if os.geteuid() != 0:
        pytest.fail("the service tests need root (network namespaces, bridges, taps)")
    cfg = ServiceConfig(state_dir=tmp_path_factory.mktemp("khd") / "state",
                        images=kh_paths.out, nodes=2, api_port=free_port(),
                        ssh_port=free_port(), prefix=f"kp{os.getpid() % 10000}")
    try:
        control.start(cfg)
        yield cfg
    finally:
        control.clean(cfg)


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def node_pids(cfg: ServiceConfig) -> dict[int, int]:
    return {n["node"]: n["pid"] for n in ps(cfg)["nodes"] if n["pid"]}


def test_a_node_qemu_is_sandboxed_unprivileged_and_in_its_cgroup(small_khd):
    cfg = small_khd
    pids = node_pids(cfg)
    assert sorted(pids) == [1, 2], ps(cfg)
    limit = cgroup.memory_limit(cfg.mem_mib, CODE_CACHE_MIB)
    for number, pid in pids.items():
        st = status(pid)
        assert st["Seccomp"] == "2", st  # filtered
        assert st["CapEff"] == st["CapPrm"] == "0000000000000000", st
        try:
            user = pwd.getpwnam(NODE_USER)
        except KeyError:
            user = None
        if user is not None:  # the host has the user: QEMU switched to it, groups and all
            assert st["Uid"].split() == [str(user.pw_uid)] * 4, st
            assert st["Gid"].split() == [str(user.pw_gid)] * 4, st
            assert st["Groups"].split() in ([], [str(user.pw_gid)]), st
        cg = cgroup.of_pid(pid, cfg.prefix, number)
        assert cg is not None, Path(f"/proc/{pid}/cgroup").read_text()
        if cg.version == 1:
            mem, cpu = cg.dirs["memory"], cg.dirs["cpu"]
            assert int((mem / "memory.limit_in_bytes").read_text()) == limit
            assert (cpu / "cpu.shares").read_text().strip() == str(cgroup.SHARES_V1)
            assert int((cpu / "cpu.cfs_quota_us").read_text()) == cgroup.CPU_QUOTA_US
            assert str(pid) in (mem / "cgroup.procs").read_text().split()
            assert str(pid) in (cg.dirs["cpuacct"] / "cgroup.procs").read_text().split()
        else:
            d = cg.dirs["memory"]
            assert int((d / "memory.max").read_text()) == limit
            assert (d / "cpu.max").read_text().split() == [str(cgroup.CPU_QUOTA_US),
                                                           str(cgroup.CPU_PERIOD_US)]
        used = cgroup.usage(cg)
        # it ran U-Boot (CPU time) and holds at least U-Boot's part of guest RAM, all of it
        # charged here from its first byte (joined before exec)
        assert used.cpu_ns > 0 and 1 << 20 < used.mem_bytes <= limit, used


def test_a_sandboxed_node_takes_loads_resets_and_boots(small_khd, artifacts):
    cfg = small_khd
    alloc, (node,), _ = allocate(cfg, "-c", credfile("pcred"), "pat")
    try:
        pid = node_pids(cfg)[node]
        data = b"kh-privilege-" + os.urandom(8).hex().encode()
        memload.write(memload.ram_file(pid), 0x1000000, data)  # khd's bulk-load path
        con = Console(cfg.node_dir(node) / "console.sock", artifacts / f"node{node}.log",
                      name=f"node{node}")
        con.connect(5)
        try:
            out = uboot.uboot_command(con, f"md.b 0x1000000 {len(data):x}", 10)
        finally:
            con.close()
        assert data[:16].hex(" ") in out.replace("  ", " "), out
        # a reset brings the service's kernel back (khd writes it: issue 13, no QEMU loader)
        memload.write(memload.ram_file(pid), board.BOARDS["ppce500"].loadaddr, b"\0" * 4096)
        r = kh(cfg, "reset", "-u", "pat", "-c", credfile("pcred"), str(node))
        assert r.returncode == 0, r.stderr
        assert node_pids(cfg)[node] == pid  # the same QEMU, reset
        booted = shell(cfg, node, artifacts)
        out, code = booted.run("cat /proc/meminfo")
        assert code == 0 and "MemTotal" in out
    finally:
        release(cfg, "pat", "pcred", alloc)


def test_kh_clean_removes_the_nodes_cgroups(kh_paths, tmp_path):
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=kh_paths.out, nodes=1,
                        api_port=free_port(), ssh_port=free_port(),
                        prefix=f"kq{os.getpid() % 10000}")
    try:
        control.start(cfg)
        (pid,) = node_pids(cfg).values()
        cg = cgroup.of_pid(pid, cfg.prefix, 1)
        assert cg is not None
        dirs = set(cg.dirs.values())
        assert all(d.is_dir() for d in dirs)
    finally:
        done = control.clean(cfg)
    assert not [d for d in dirs if d.exists()], done
    assert not [d for d in dirs if d.parent.exists()], done
    assert any(line.startswith("removed cgroup ") for line in done), done
