"""A cgroup per node: each node's QEMU gets an equal CPU weight, at most one host core, and a
memory limit of its guest RAM plus QEMU's own overhead; and what it used (for metering).

Layout: ``<khd's cgroup>/kh-<prefix>/node<N>`` in each cgroup v1 hierarchy kh uses (``cpu``,
``cpuacct``, ``memory``); on a cgroup v2 host ``kh-<prefix>`` is made next to khd's cgroup
instead (v2 lets only a cgroup without processes give controllers to its children, and khd's
own cgroup holds khd). The QEMU joins its cgroup between fork and exec (``kh.proc.start``'s
``cgroups``), before it allocates anything, so all its memory is charged there.

Paths and values come from pure functions (unit-tested); the rest reads and writes cgroupfs
and raises ``CgroupError`` (a KhError) with the path and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from kh.errors import KhError

V1_CONTROLLERS = ("cpu", "cpuacct", "memory")  # kh's: weight and limit, CPU time, memory
V2_CONTROLLERS = ("cpu", "memory")  # v2's cpu also counts CPU time (cpu.stat)
CPU_PERIOD_US = 100_000
# One host core per node: a node has one e500v2 core, which TCG runs on one thread.
CPU_QUOTA_US = 100_000
SHARES_V1 = 1024  # cpu.shares: the same for every node (1024 is the kernel's default)
WEIGHT_V2 = 100  # cpu.weight: the same for every node (100 is the kernel's default)
# QEMU itself beyond guest RAM and its translated-code cache (-accel tcg,tb-size): measured
# 20 MiB at the U-Boot prompt and 31 MiB after Linux filled its RAM (rss 87 MiB less a
# 64 MiB code cache that was nearly full, plus page cache and kernel memory); three times that
# so a busy node is never killed by its limit.
OVERHEAD_MIB = 96
NODE_DIR = re.compile(r"node([0-9]+)")


class CgroupError(KhError):
    """A node's cgroup could not be made, joined, read or removed."""


@dataclass(frozen=True)
class Mount:
    """One cgroup file system: v1 with its controllers, or v2 (``controllers`` empty)."""

    version: int
    point: Path  # where it is mounted
    root: str  # the cgroup it shows at ``point`` (a cgroup namespace or bind mount: not "/")
    controllers: frozenset[str]


@dataclass(frozen=True)
class Layout:
    """Where kh's cgroups go: for each controller kh uses, the directory ``kh-<prefix>`` is
    made in (v1: khd's own cgroup in that hierarchy; v2: the parent of khd's cgroup)."""

    version: int
    base: Mapping[str, Path]  # controller → directory

    def dirs(self, *parts: str) -> dict[str, Path]:
        """Controller → ``<base>/<parts...>``."""
        return {c: d.joinpath(*parts) for c, d in self.base.items()}


@dataclass(frozen=True)
class NodeCgroup:
    """One node's cgroup: controller → its directory (v2: the same directory for each)."""

    version: int
    dirs: Mapping[str, Path]

    @property
    def procs(self) -> list[Path]:
        """The ``cgroup.procs`` files a process writes its PID to, to join (each once)."""
        return [d / "cgroup.procs" for d in sorted(set(self.dirs.values()))]


@dataclass(frozen=True)
class Usage:
    """What a node's QEMU used: CPU time since it started, memory now."""

    cpu_ns: int
    mem_bytes: int


def parent_name(prefix: str) -> str:
    return f"kh-{prefix}"


def node_name(number: int) -> str:
    return f"node{number}"


def memory_limit(mem_mib: int, code_cache_mib: int, overhead_mib: int = OVERHEAD_MIB) -> int:
    """Bytes a node's QEMU may hold: guest RAM, QEMU's translated-code cache, QEMU itself."""
    return (mem_mib + code_cache_mib + overhead_mib) << 20


def limits(version: int, mem_bytes: int) -> list[tuple[str, str, str]]:
    """(controller, file, value) to write into a new node cgroup, in this order. Swap counts
    too where the kernel meters it (v1 ``memsw`` no lower than ``limit``, so after it; v2
    ``swap.max``): a node cannot grow past its limit by swapping."""
    if version == 1:
        return [("cpu", "cpu.shares", str(SHARES_V1)),
                ("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
                ("cpu", "cpu.cfs_quota_us", str(CPU_QUOTA_US)),
                ("memory", "memory.limit_in_bytes", str(mem_bytes)),
                ("memory", "memory.memsw.limit_in_bytes", str(mem_bytes))]
    return [("cpu", "cpu.weight", str(WEIGHT_V2)),
            ("cpu", "cpu.max", f"{CPU_QUOTA_US} {CPU_PERIOD_US}"),
            ("memory", "memory.max", str(mem_bytes)),
            ("memory", "memory.swap.max", "0")]


OPTIONAL = {"memory.memsw.limit_in_bytes", "memory.swap.max"}  # absent without swap metering


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup file systems in ``/proc/self/mountinfo`` text (proc(5))."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if tail[0] == "cgroup2":
            mounts.append(Mount(2, point, root, frozenset()))
        elif tail[0] == "cgroup":
            names = frozenset(o for o in tail[2].split(",") if o in V1_CONTROLLERS)
            if names:
                mounts.append(Mount(1, point, root, names))
    return mounts


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` text → controller → cgroup path; v2's line is under ""."""
    found = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "":
            found[""] = parts[2]
        for c in parts[1].split(","):
            if c in V1_CONTROLLERS:
                found[c] = parts[2]
    return found


def _inside(mount: Mount, path: str) -> Path | None:
    """The directory of cgroup ``path`` under ``mount``, or None if the mount does not show it."""
    rel = os.path.relpath(path, mount.root)
    if rel == ".." or rel.startswith("../"):
        return None
    return mount.point if rel == "." else mount.point / rel


def layout(mounts: list[Mount], own: Mapping[str, str], v2_controllers: frozenset[str]
           ) -> Layout | None:
    """Where kh's cgroups go for a process in cgroups ``own`` (parse_proc_cgroup), or None
    when this host has no usable place: v1 when cpu, cpuacct and memory are all v1
    hierarchies, else v2 when its root offers cpu and memory (``v2_controllers``)."""
    v1 = {c: m for m in mounts if m.version == 1 for c in m.controllers}
    if all(c in v1 and c in own for c in V1_CONTROLLERS):
        base = {c: _inside(v1[c], own[c]) for c in V1_CONTROLLERS}
        if all(d is not None for d in base.values()):
            return Layout(1, {c: d for c, d in base.items() if d is not None})
        return None
    v2 = [m for m in mounts if m.version == 2]
    if v2 and "" in own and set(V2_CONTROLLERS) <= v2_controllers:
        here = _inside(v2[0], own[""])
        if here is None:
            return None
        parent = here if here == v2[0].point else here.parent
        return Layout(2, {c: parent for c in V2_CONTROLLERS})
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise CgroupError(f"cannot read {path}: {e.strerror}") from None


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror}") from None


def detect() -> Layout | None:
    """This process's layout (see ``layout``), from /proc/self; None when there is none."""
    try:
        mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
        own = parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
    except OSError:
        return None
    v2: frozenset[str] = frozenset()
    for m in mounts:
        if m.version == 2:
            with contextlib.suppress(OSError):
                v2 = frozenset((m.point / "cgroup.controllers").read_text().split())
            break
    return layout(mounts, own, v2)


def prepare(lay: Layout, prefix: str) -> None:
    """Make kh's parent cgroup ``kh-<prefix>`` (v2: handing cpu and memory down to it and
    from it); raises CgroupError when the host does not allow it."""
    parents = lay.dirs(parent_name(prefix))
    for d in sorted(set(parents.values())):
        try:
            d.mkdir(exist_ok=True)
        except OSError as e:
            raise CgroupError(f"cannot make cgroup {d}: {e.strerror}") from None
    if lay.version == 2:
        for d in sorted({*lay.base.values(), *parents.values()}):
            enabled = set(_read(d / "cgroup.subtree_control").split())
            if not set(V2_CONTROLLERS) <= enabled:
                _write(d / "cgroup.subtree_control", " ".join(f"+{c}" for c in V2_CONTROLLERS))


def create(lay: Layout, prefix: str, number: int, mem_bytes: int) -> NodeCgroup:
    """Make node ``number``'s cgroup (or take over a leftover one) with its limits, and kh's
    parent cgroup first if it is not there (``prepare``)."""
    parents = lay.dirs(parent_name(prefix))
    cg = NodeCgroup(lay.version, {c: d / node_name(number) for c, d in parents.items()})
    _rmdirs(sorted(set(cg.dirs.values())), 0)  # a leftover starts afresh, without old limits
    for again in (True, False):
        prepare(lay, prefix)
        try:
            for d in sorted(set(cg.dirs.values())):
                d.mkdir(exist_ok=True)
            break
        except FileNotFoundError:
            if not again:  # the parent went with another node's last cgroup: make it again
                raise CgroupError(f"cannot make cgroup {cg.dirs} (its parent keeps going)"
                                  ) from None
        except OSError as e:
            raise CgroupError(f"cannot make cgroup {e.filename}: {e.strerror}") from None
    for controller, name, value in limits(lay.version, mem_bytes):
        path = cg.dirs[controller] / name
        if name in OPTIONAL and not path.exists():
            continue
        _write(path, value)
    return cg


def of_pid(pid: int, prefix: str, number: int) -> NodeCgroup | None:
    """The cgroup process ``pid`` is in, when it is kh's cgroup of node ``number`` (a node
    started by an earlier khd, perhaps from another cgroup); else None."""
    try:
        mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
        where = parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return None
    v1 = {c: m for m in mounts if m.version == 1 for c in m.controllers}
    v2 = [m for m in mounts if m.version == 2]
    dirs: dict[str, Path] = {}
    version = 1 if all(c in v1 and c in where for c in V1_CONTROLLERS) else 2
    for c in V1_CONTROLLERS if version == 1 else V2_CONTROLLERS:
        mount = v1[c] if version == 1 else (v2[0] if v2 and "" in where else None)
        path = where.get(c if version == 1 else "")
        d = _inside(mount, path) if mount is not None and path is not None else None
        if d is None or d.name != node_name(number) or d.parent.name != parent_name(prefix):
            return None
        dirs[c] = d
    return NodeCgroup(version, dirs)


def usage(cg: NodeCgroup) -> Usage:
    """What the node's cgroup used: CPU nanoseconds since it was made, memory bytes now."""
    if cg.version == 1:
        cpu = int(_read(cg.dirs["cpuacct"] / "cpuacct.usage"))
        mem = int(_read(cg.dirs["memory"] / "memory.usage_in_bytes"))
        return Usage(cpu, mem)
    stat = dict(line.split() for line in _read(cg.dirs["cpu"] / "cpu.stat").splitlines())
    return Usage(int(stat["usage_usec"]) * 1000, int(_read(cg.dirs["memory"] /
                                                           "memory.current")))


def remove(cg: NodeCgroup, wait: float = 2.0) -> list[Path]:
    """Remove the node's cgroup once its processes are gone (an exiting QEMU may take a
    moment), and kh's parent cgroup with it when that was its last node (kh leaves no empty
    cgroups behind); return what was removed. One still in use after ``wait`` s stays (`kh
    clean` or the node's next start deals with it)."""
    removed = _rmdirs(sorted(set(cg.dirs.values())), wait)
    parents = sorted({d.parent for d in removed if d.parent.name.startswith("kh-")})
    return removed + _rmdirs(parents, 0)  # busy (EBUSY) while it has other nodes


def _rmdirs(dirs: list[Path], wait: float) -> list[Path]:
    """rmdir each of ``dirs`` that is empty of processes and children, waiting up to
    ``wait`` s for processes to leave; those removed."""
    removed = []
    deadline = time.monotonic() + wait
    for d in dirs:
        while True:
            try:
                d.rmdir()
                removed.append(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
    return removed


def _kh_parents(prefix: str) -> Iterator[Path]:
    """Every ``kh-<prefix>`` directory in the cgroup file systems, wherever khd ran from."""
    try:
        mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return
    seen = set()
    for m in mounts:
        if m.point in seen:
            continue
        seen.add(m.point)
        for top, subdirs, _ in os.walk(m.point):
            if os.path.basename(top) == parent_name(prefix):
                subdirs.clear()
                yield Path(top)


def remove_all(prefix: str) -> list[Path]:
    """`kh clean`: remove every cgroup kh made for ``prefix`` (its nodes' processes already
    stopped); return what was removed. One still in use stays."""
    removed = []
    for parent in _kh_parents(prefix):
        nodes = [d for d in parent.iterdir() if d.is_dir() and NODE_DIR.fullmatch(d.name)]
        removed += _rmdirs(sorted(nodes), 2.0) + _rmdirs([parent], 0)
    return removed


def prune(lay: Layout, prefix: str, keep: set[int]) -> list[Path]:
    """Remove this khd's node cgroups that belong to no running node (nodes that died while
    khd was away); one still holding a process stays."""
    removed = []
    for parent in set(lay.dirs(parent_name(prefix)).values()):
        if not parent.is_dir():
            continue
        for d in sorted(parent.iterdir()):
            m = NODE_DIR.fullmatch(d.name)
            if m and d.is_dir() and int(m[1]) not in keep:
                removed += _rmdirs([d], 0)
        removed += _rmdirs([parent], 0)  # none of this khd's nodes runs (yet): none is left
    return removed
