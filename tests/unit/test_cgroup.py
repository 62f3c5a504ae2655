"""Issue 10: every node's QEMU ran with no cgroup limit. The pure parts of kh.hw.cgroup (where
a node's cgroup goes, its limits) and its file handling on a stand-in cgroup tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kh import proc
from kh.hw import cgroup

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_SELF = """\
9:name=systemd:/
4:memory:/process_api/b227
2:cpuacct:/
1:cpu:/
0::/
"""
V2 = "25 1 0:22 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
P = Path("/sys/fs/cgroup")


def test_mountinfo_names_kh_controllers_and_the_v2_mount():
    mounts = cgroup.parse_mountinfo(HYBRID + r"50 1 0:40 / /mnt/a\040b rw - cgroup x rw,cpu"
                                    + "\n")
    assert [(m.version, str(m.point), sorted(m.controllers)) for m in mounts] == [
        (1, "/sys/fs/cgroup/cpu", ["cpu"]), (1, "/sys/fs/cgroup/cpuacct", ["cpuacct"]),
        (1, "/sys/fs/cgroup/memory", ["memory"]), (2, "/sys/fs/cgroup/unified", []),
        (1, "/mnt/a b", ["cpu"])]


def test_proc_cgroup_lines():
    assert cgroup.parse_proc_cgroup("3:cpu,cpuacct:/a\n4:memory:/b c\n0::/d\n") == {
        "cpu": "/a", "cpuacct": "/a", "memory": "/b c", "": "/d"}


def test_v1_nests_under_khds_own_cgroup_in_each_hierarchy():
    lay = cgroup.layout(cgroup.parse_mountinfo(HYBRID), cgroup.parse_proc_cgroup(HYBRID_SELF),
                        frozenset())
    assert lay is not None and lay.version == 1
    assert lay.dirs("kh-ab", "node3") == {
        "cpu": P / "cpu/kh-ab/node3", "cpuacct": P / "cpuacct/kh-ab/node3",
        "memory": P / "memory/process_api/b227/kh-ab/node3"}


def test_v1_with_cpu_and_cpuacct_in_one_hierarchy():
    mounts = cgroup.parse_mountinfo(
        "1 0 0:1 / /c rw - cgroup cgroup rw,cpu,cpuacct\n2 0 0:2 / /m rw - cgroup cgroup "
        "rw,memory\n")
    lay = cgroup.layout(mounts, cgroup.parse_proc_cgroup("2:cpu,cpuacct:/s\n1:memory:/s\n"),
                        frozenset())
    assert lay is not None
    cg = cgroup.NodeCgroup(1, lay.dirs("kh-ab", "node1"))
    assert cg.procs == [Path("/c/s/kh-ab/node1/cgroup.procs"),
                        Path("/m/s/kh-ab/node1/cgroup.procs")]  # each hierarchy joined once


def test_v2_goes_next_to_khds_cgroup_which_holds_khd():
    mounts = cgroup.parse_mountinfo(V2)
    both = frozenset({"cpu", "memory", "io"})
    lay = cgroup.layout(mounts, {"": "/user.slice/session-1.scope"}, both)
    assert lay is not None and lay.version == 2
    assert set(lay.dirs("kh-ab").values()) == {P / "user.slice/kh-ab"}
    root = cgroup.layout(mounts, {"": "/"}, both)
    assert root is not None and set(root.base.values()) == {P}
    assert cgroup.layout(mounts, {"": "/"}, frozenset({"memory"})) is None  # no cpu offered


def test_no_layout_without_the_controllers_or_outside_the_mount():
    assert cgroup.layout(cgroup.parse_mountinfo(HYBRID), {"cpu": "/", "memory": "/"},
                         frozenset()) is None  # no cpuacct, and v2 offers nothing
    ns = cgroup.parse_mountinfo("1 0 0:1 /k /c rw - cgroup c rw,cpu,cpuacct,memory\n")
    assert cgroup.layout(ns, {c: "/elsewhere" for c in ("cpu", "cpuacct", "memory")},
                         frozenset()) is None
    inside = cgroup.layout(ns, {c: "/k/x" for c in ("cpu", "cpuacct", "memory")}, frozenset())
    assert inside is not None and inside.base["memory"] == Path("/c/x")


def test_memory_limit_is_guest_ram_code_cache_and_qemu():
    assert cgroup.memory_limit(256, 64) == (256 + 64 + cgroup.OVERHEAD_MIB) << 20
    assert cgroup.memory_limit(256, 64, overhead_mib=0) == 320 << 20


def test_limits_one_core_an_equal_weight_and_memory_with_swap():
    assert cgroup.limits(1, 5 << 20) == [
        ("cpu", "cpu.shares", "1024"), ("cpu", "cpu.cfs_period_us", "100000"),
        ("cpu", "cpu.cfs_quota_us", "100000"), ("memory", "memory.limit_in_bytes", "5242880"),
        ("memory", "memory.memsw.limit_in_bytes", "5242880")]  # memsw >= limit: after it
    assert cgroup.limits(2, 5 << 20) == [
        ("cpu", "cpu.weight", "100"), ("cpu", "cpu.max", "100000 100000"),
        ("memory", "memory.max", "5242880"), ("memory", "memory.swap.max", "0")]


def fake_v2(tmp_path: Path) -> cgroup.Layout:
    base = tmp_path / "user.slice"
    base.mkdir()
    (base / "cgroup.subtree_control").write_text("memory\n")
    (base / "kh-ab").mkdir()
    (base / "kh-ab" / "cgroup.subtree_control").write_text("")
    return cgroup.Layout(2, {"cpu": base, "memory": base})


def test_v2_parent_hands_cpu_and_memory_down_and_a_node_gets_its_limits(tmp_path):
    lay = fake_v2(tmp_path)
    cgroup.prepare(lay, "ab")
    base = tmp_path / "user.slice"
    for d in (base, base / "kh-ab"):
        assert (d / "cgroup.subtree_control").read_text() == "+cpu +memory"
    cg = cgroup.create(lay, "ab", 4, 300 << 20)
    node = base / "kh-ab/node4"
    assert cg.dirs == {"cpu": node, "memory": node} and cg.procs == [node / "cgroup.procs"]
    assert (node / "memory.max").read_text() == str(300 << 20)
    assert (node / "cpu.max").read_text() == "100000 100000"
    assert not (node / "memory.swap.max").exists()  # a kernel without swap metering
    (node / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\n")
    (node / "memory.current").write_text("4096\n")
    assert cgroup.usage(cg) == cgroup.Usage(cpu_ns=1_500_000, mem_bytes=4096)


def test_v1_usage_reads_cpuacct_and_memory(tmp_path):
    dirs = {c: tmp_path / c for c in ("cpu", "cpuacct", "memory")}
    for d in dirs.values():
        d.mkdir()
    (dirs["cpuacct"] / "cpuacct.usage").write_text("123456789\n")
    (dirs["memory"] / "memory.usage_in_bytes").write_text("8192\n")
    assert cgroup.usage(cgroup.NodeCgroup(1, dirs)) == cgroup.Usage(123456789, 8192)


def test_unreadable_is_a_kh_error(tmp_path):
    with pytest.raises(cgroup.CgroupError, match="cannot read"):
        cgroup.usage(cgroup.NodeCgroup(1, {c: tmp_path for c in ("cpuacct", "memory")}))


def test_remove_takes_empty_directories_and_leaves_others(tmp_path):
    empty, full = tmp_path / "node1", tmp_path / "node2"
    empty.mkdir()
    full.mkdir()
    (full / "x").write_text("")
    assert cgroup.remove(cgroup.NodeCgroup(1, {"a": empty, "b": full}), wait=0) == [empty]
    assert full.exists() and not empty.exists()
    assert cgroup.remove(cgroup.NodeCgroup(1, {"a": empty}), wait=0) == []  # already gone


def test_a_nodes_last_cgroup_takes_khs_parent_along(tmp_path):
    """kh leaves no empty cgroup behind (tests start nodes too); the parent comes back with
    the next node."""
    base = {c: tmp_path / c for c in ("cpu", "cpuacct", "memory")}
    for d in base.values():
        d.mkdir()
    lay = cgroup.Layout(1, base)

    def emptied(cg: cgroup.NodeCgroup) -> cgroup.NodeCgroup:
        for d in cg.dirs.values():  # a stand-in tree holds files; cgroupfs would not
            for f in d.iterdir():
                f.unlink()
        return cg

    one, two = (emptied(cgroup.create(lay, "ab", n, 1 << 30)) for n in (1, 2))
    assert (base["memory"] / "kh-ab/node2").is_dir()
    assert cgroup.remove(one, wait=0) == sorted(d / "kh-ab/node1" for d in base.values())
    assert cgroup.remove(two, wait=0) == sorted(
        [d / "kh-ab/node2" for d in base.values()]) + sorted(d / "kh-ab" for d in base.values())
    assert not any((d / "kh-ab").exists() for d in base.values())
    again = cgroup.create(lay, "ab", 1, 1 << 30)
    assert (again.dirs["memory"] / "memory.limit_in_bytes").read_text() == str(1 << 30)


def test_prune_keeps_running_nodes(tmp_path):
    lay = fake_v2(tmp_path)
    parent = tmp_path / "user.slice/kh-ab"
    for n in (1, 2, 3):
        (parent / f"node{n}").mkdir()
    (parent / "other").mkdir()
    assert cgroup.prune(lay, "ab", keep={2}) == [parent / "node1", parent / "node3"]
    assert sorted(p.name for p in parent.iterdir() if p.is_dir()) == ["node2", "other"]


def test_a_child_joins_its_cgroups_before_it_runs(tmp_path):
    """kh.proc.start writes the child's PID into each cgroup.procs between fork and exec
    (a regular file stands in for cgroupfs here)."""
    files = [tmp_path / "a.procs", tmp_path / "b.procs"]
    for f in files:
        f.write_text("")
    p = proc.start(["true"], cgroups=files)
    try:
        assert p.wait(10) == 0
    finally:
        proc.reap(p)
    assert [f.read_text() for f in files] == [str(p.pid)] * 2


def test_a_child_that_cannot_join_does_not_run(tmp_path):
    d = tmp_path / "not-a-file"
    d.mkdir()
    with pytest.raises(Exception, match="cannot start true"):
        proc.start(["true"], cgroups=[d])


@pytest.mark.skipif(os.geteuid() != 0 or cgroup.detect() is None,
                    reason="needs root and a cgroup hierarchy kh can use")
def test_a_real_node_cgroup_limits_and_meters_a_process(tmp_path):
    """On this host's cgroups: a child started into a node cgroup is in it, under its memory
    limit, metered; the cgroup goes once the child has."""
    lay = cgroup.detect()
    assert lay is not None
    prefix = f"kc{os.getpid() % 10000}"
    cgroup.prepare(lay, prefix)
    try:
        cg = cgroup.create(lay, prefix, 1, 64 << 20)
        limit = "memory.limit_in_bytes" if cg.version == 1 else "memory.max"
        assert int((cg.dirs["memory"] / limit).read_text()) == 64 << 20
        # it spins a while, then waits for its stdin to close
        p = proc.start(["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; read x"],
                       cgroups=cg.procs, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        try:
            assert cgroup.of_pid(p.pid, prefix, 1) == cg
            assert cgroup.of_pid(p.pid, prefix, 2) is None
            assert cgroup.of_pid(os.getpid(), prefix, 1) is None
            assert p.stdin is not None
            p.stdin.close()
            p.wait(60)
            used = cgroup.usage(cg)
        finally:
            proc.reap(p)
        assert used.cpu_ns > 0 and used.mem_bytes <= 64 << 20
        removed = cgroup.remove(cg)
        assert set(removed) == {*cg.dirs.values(), *(d.parent for d in cg.dirs.values())}
    finally:
        removed = cgroup.remove_all(prefix)
    assert not [d for d in lay.dirs(cgroup.parent_name(prefix)).values() if d.exists()], removed
