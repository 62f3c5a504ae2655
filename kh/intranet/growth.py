"""The intranet grows on demand while a worker keeps writing (the paper: "the pool of disk
nodes and workers can be easily scaled based on demand"): khgetdisk on DS, then on FS
vgextend + lvextend + an online resize2fs of the mounted ext3 (``khstorage``), then more
workers that mount the export and write. At the end every file written before, during and
after the growth is read back, on another worker, with the sha256 it was written with.

The writer is the worker appliance's ``khwrite``: files of KIB KiB, each written from RAM
after its sha256 was taken, one record per file (name, sha256, bytes, phase, start, end).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kh.errors import KhError
from kh.intranet import figure3
from kh.intranet.figure3 import Figure, Plan
from kh.intranet.report import Report
from kh.scenario import Allocation, Scenario

WRITER_KIB = 128  # each file's size
VERIFY_TIMEOUT = 900.0  # seconds to read back and hash every file on a worker
STATUS = re.compile(r"files=(\d+) bytes=(\d+) errors=(\d+) state=(\w+)")


@dataclass(frozen=True)
class Written:
    """One file's record in khwrite's log."""

    name: str
    sha256: str
    size: int
    phase: str
    t0: float
    t1: float


def records(text: str) -> list[Written]:
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) == 6 and re.fullmatch(r"f\d{6}", f[0]) and re.fullmatch(r"[0-9a-f]{64}", f[1]):
            out.append(Written(f[0], f[1], int(f[2]), f[3], float(f[4]), float(f[5])))
    return out


def status(corp: Scenario, a: Allocation, node: int) -> tuple[int, int, str]:
    """khwrite status: (files, errors, state)."""
    m = STATUS.search(corp.check(a, node, "khwrite status", 60))
    if not m:
        raise KhError(f"worker {node}: khwrite status said nothing understandable")
    return int(m[1]), int(m[3]), m[4]


def wait_files(corp: Scenario, a: Allocation, node: int, count: int, timeout: float,
               phase: str | None = None, alive: Callable[[], None] = lambda: None) -> None:
    """Until the writer on ``node`` has written ``count`` files (in ``phase``, if given),
    or has stopped; KhError after ``timeout`` seconds, or whatever ``alive`` raises (a node
    of the intranet died)."""
    deadline = time.monotonic() + timeout
    while True:
        alive()
        if phase is None:
            files, _, state = status(corp, a, node)
        else:
            recs = records(corp.check(a, node, "cat /run/khwrite/files", 60))
            files = sum(r.phase == phase for r in recs)
            state = status(corp, a, node)[2]
        if files >= count or state != "running":
            return
        if time.monotonic() > deadline:
            raise KhError(f"worker {node} wrote {files} of {count} files in {timeout:.0f} s")
        time.sleep(2)


def rates(recs: list[Written]) -> dict[str, float]:
    """MB/s of each phase: its bytes over the time from its first write's start to its last
    write's end (node clocks)."""
    out = {}
    for phase in dict.fromkeys(r.phase for r in recs):
        rs = [r for r in recs if r.phase == phase]
        span = max(r.t1 for r in rs) - min(r.t0 for r in rs)
        out[phase] = round(sum(r.size for r in rs) / span / 1e6, 3) if span > 0 else 0.0
    return out


def verify(corp: Scenario, reader: tuple[Allocation, int], directory: str,
           recs: list[Written]) -> list[str]:
    """The names of the files in ``directory`` whose sha256, read on ``reader``, is not the
    one they were written with (or that are missing)."""
    a, node = reader
    out = corp.check(a, node, f"cd {directory} && sha256sum f*", VERIFY_TIMEOUT)
    out = out.replace("\r", "")
    got = {m[2]: m[1] for m in re.finditer(r"^([0-9a-f]{64})\s+(f\d{6})$", out, re.M)}
    return [r.name for r in recs if got.get(r.name) != r.sha256]


def volume(corp: Scenario, fig: Figure) -> tuple[int, int]:
    """(disks in khvg, size of /export in MB) on FS."""
    out = corp.check(fig.fs, fig.one(fig.fs), "lvm vgs --noheadings -o pv_count khvg; "
                     "df -m /export | awk 'NR == 2 {print $2}'", 180)
    nums = [int(x) for x in out.split() if x.isdigit()]
    if len(nums) != 2:
        raise KhError(f"FS did not say its volume's size: {out.strip()[-200:]}")
    return nums[0], nums[1]


def grow(corp: Scenario, rep: Report, fig: Figure, plan: Plan, max_files: int,
         alive: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """The growth under a writer; its part of the report. Checks are reported as they go.
    ``alive`` raises when a node of the intranet died (each wait asks it)."""
    g: dict[str, Any] = {}
    rep.growth = g
    w1, w2 = fig.workers.nodes[:2]
    d0, s0 = volume(corp, fig)
    g["disks"], g["size_mb"] = [d0, d0], [s0, s0]
    rep.command(f"khwrite start /mnt/nfs/w{w1} {WRITER_KIB} {max_files}    # on worker {w1}")
    corp.check(fig.workers, w1, f"mkdir -p /mnt/nfs/w{w1} && khwrite phase before && "
                                f"khwrite start /mnt/nfs/w{w1} {WRITER_KIB} {max_files}")
    wait_files(corp, fig.workers, w1, 3, 300, alive=alive)
    corp.check(fig.workers, w1, "khwrite phase during")
    with corp.step("growth: everything, under the writer"):
        figure3.khgetdisk(corp, rep, fig.ds, plan.grow_disks)
        rep.command(f"khstorage    # on FS (node {fig.one(fig.fs)}): vgextend, lvextend, "
                    f"resize2fs of the mounted ext3")
        with corp.step(f"vgextend + lvextend + resize2fs on FS ({plan.grow_disks} disks)"):
            out = corp.check(fig.fs, fig.one(fig.fs), "khstorage", 900)
        for line in out.strip().splitlines():
            rep.say(f"    {line}")
        d1, s1 = volume(corp, fig)
        g["disks"], g["size_mb"] = [d0, d1], [s0, s1]
        rep.check("growth: the volume grew online", d1 == d0 + plan.grow_disks and s1 > s0,
                  f"khvg/data on /export: {s0} MB on {d0} disks -> {s1} MB on {d1} disks, "
                  f"resized while mounted and exported")
        corp.check(fig.workers, w1, "khwrite phase after")
        new = figure3.khget(corp, rep, "more", "-n", str(fig.pnet), count=plan.grow_workers)
        fs_ip = fig.ip(fig.pnet, fig.one(fig.fs))
        gw_in = fig.ip(fig.pnet, fig.one(fig.gw))
        figure3.boot(corp, rep, "more", new, "worker",
                     keys=f"kh.nfs={fs_ip}:/export kh.gw={gw_in}")
        for n in new.nodes:
            rep.command(f"khwrite start /mnt/nfs/w{n} {WRITER_KIB} 4    # on new worker {n}")
            corp.check(new, n, f"mkdir -p /mnt/nfs/w{n} && khwrite phase after && "
                               f"khwrite start /mnt/nfs/w{n} {WRITER_KIB} 4")
        for n in new.nodes:
            wait_files(corp, new, n, 4, 300, alive=alive)
    wait_files(corp, fig.workers, w1, 2, 300, phase="after", alive=alive)
    rep.command(f"khwrite stop    # on worker {w1}")
    stopped = corp.check(fig.workers, w1, "khwrite stop", 120)
    recs = records(corp.check(fig.workers, w1, "cat /run/khwrite/files", 120))
    errs = corp.check(fig.workers, w1, "cat /run/khwrite/errors", 60).strip()
    phases = {p: sum(r.phase == p for r in recs) for p in ("before", "during", "after")}
    m = STATUS.search(stopped)
    errors = int(m[3]) if m else -1
    g["writer"] = {"node": w1, "files": phases, "bytes": sum(r.size for r in recs),
                   "errors": errors, "mb_per_s": rates(recs), "file_kib": WRITER_KIB}
    rep.check("growth: the writer kept writing through it, with no error",
              all(phases.values()) and errors == 0 and m is not None and m[4] == "stopped",
              f"worker {w1} wrote {phases['before']} files before, {phases['during']} during "
              f"and {phases['after']} after the growth, {errors} errors"
              + (f" ({errs.splitlines()[0][:120]})" if errs else ""))
    # Read back: the first worker's files on a new worker, the new workers' on the second.
    checked, bad = 0, []
    bad += verify(corp, (new, new.nodes[0]), f"/mnt/nfs/w{w1}", recs)
    checked += len(recs)
    for n in new.nodes:
        theirs = records(corp.check(new, n, "cat /run/khwrite/files", 60))
        n_errs = status(corp, new, n)[1]
        if n_errs or len(theirs) < 4:
            bad.append(f"worker {n}: {len(theirs)} files, {n_errs} errors")
        bad += [f"w{n}/{x}" for x in verify(corp, (fig.workers, w2), f"/mnt/nfs/w{n}", theirs)]
        checked += len(theirs)
    g["verified"], g["mismatched"] = checked - len(bad), bad
    rep.check("growth: every file reads back with the checksum it was written with",
              not bad and checked > 0,
              f"{checked} files (before, during and after the growth; workers {w1} "
              f"{' '.join(map(str, new.nodes))}) read on other workers: "
              + ("all sha256 match" if not bad else f"{len(bad)} do not: {', '.join(bad[:5])}"))
    return g
