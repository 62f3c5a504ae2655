"""What one node costs the host, as measured (docs/density.md), and how many a host holds.

`kh service start --nodes N` refuses an N whose booted nodes the host's memory cannot hold
(there is no swap to thrash into: the kernel's OOM killer would end QEMUs), and `kh hw` states
the figures and what they make of this host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kh.errors import KhError

# Measured with benchmarks/webfarm.py on a 2-core host (issue 13): per node's QEMU, PSS (its
# share of QEMU's binary and libraries, which the host holds once, plus all else it holds).
# khd's nodes run kh's own QEMU (images/recipes/qemu.toml); Debian's full build holds more.
IDLE_BOOTED_MIB = 38  # an idle booted apache node, kh's QEMU (37-38 MiB; RSS 46-50 MiB)
DEBIAN_IDLE_BOOTED_MIB = 66  # the same with Debian's qemu-system-ppc (64-67; RSS 86-90)
PROMPT_MIB = 16  # a node at the U-Boot prompt, kept warm, kh's QEMU (RSS 25)
DEBIAN_PROMPT_MIB = 22  # the same with Debian's (RSS 44)
IDLE_CPU_PCT = 0.1  # an idle booted apache node, % of one host core (0.05-0.1)
PROMPT_CPU_PCT = 0.2  # a node dozing at the U-Boot prompt, % of one host core (0.13-0.23)
BOOT_CPU_S = 4.0  # CPU-seconds one apache node takes from khget to its page (3.5-4.4)
# What khd counts a node as when it checks that the host holds N: an idle booted node and some
# room (with Debian's QEMU: its own figure and room). A node whose guest fills its RAM holds up
# to its cgroup's limit (kh.hw.cgroup), which kh does not reserve: that is overcommitment the
# operator chooses by running such guests.
NODE_BUDGET_MIB = 56
DEBIAN_NODE_BUDGET_MIB = 80
# Memory left to the host itself: khd, its shells and sshd sessions, page cache.
HOST_RESERVE_MIB = 1024


@dataclass(frozen=True)
class HostMemory:
    """/proc/meminfo's MemTotal and MemAvailable, in MiB."""

    total_mib: int
    available_mib: int


def host_memory(meminfo: Path = Path("/proc/meminfo")) -> HostMemory:
    """Raises KhError when the file cannot be read or lacks the two fields."""
    try:
        fields = {line.split(":")[0]: int(line.split()[1])
                  for line in meminfo.read_text().splitlines() if line.split()[1:2]}
        return HostMemory(fields["MemTotal"] >> 10, fields["MemAvailable"] >> 10)
    except (OSError, KeyError, ValueError) as e:
        raise KhError(f"cannot read the host's memory from {meminfo} ({e})") from None


def budget_mib(khs_qemu: bool) -> int:
    """MiB khd counts per node: kh's own QEMU, or Debian's (or another, KH_QEMU)."""
    return NODE_BUDGET_MIB if khs_qemu else DEBIAN_NODE_BUDGET_MIB


def holds(mem: HostMemory, budget: int = NODE_BUDGET_MIB) -> int:
    """Booted idle nodes of ``budget`` MiB the available memory holds, the host's reserve
    kept."""
    return max(0, (mem.available_mib - HOST_RESERVE_MIB) // budget)


def check(nodes: int, running: int, mem: HostMemory, budget: int = NODE_BUDGET_MIB) -> None:
    """Refuse ``nodes`` when the ones not yet ``running`` (this khd's QEMUs that run already
    hold their memory) would not fit in the available memory as booted idle nodes of
    ``budget`` MiB. Raises KhError naming the memory needed and available and the largest N
    that fits."""
    new = max(0, nodes - running)
    need = new * budget
    room = mem.available_mib - HOST_RESERVE_MIB
    if need <= room:
        return
    most = running + holds(mem, budget)
    raise KhError(f"{nodes} nodes need about {need} MiB more memory ({budget} MiB "
                  f"each, a booted idle node as measured, for {new} new ones), and the host "
                  f"has {mem.available_mib} MiB available, of which kh leaves "
                  f"{HOST_RESERVE_MIB} MiB to the host",
                  f"start at most {most}: --nodes {most}" if most > 0 else
                  "free memory on the host first")


def describe(mem: HostMemory, cores: int | None = None, khs_qemu: bool = True
             ) -> dict[str, str]:
    """`kh hw`'s density: the measured costs, and what this host holds by them, for the nodes'
    QEMU (kh's own, or Debian's)."""
    cores = cores or os.cpu_count() or 1
    budget = budget_mib(khs_qemu)
    idle = (f"{IDLE_BOOTED_MIB} MiB with kh's QEMU" if khs_qemu else
            f"{DEBIAN_IDLE_BOOTED_MIB} MiB with Debian's QEMU (kh's: {IDLE_BOOTED_MIB})")
    return {
        "idle booted node": f"{IDLE_CPU_PCT:g} % of a host core, {idle} "
                            "(apache appliance, measured: docs/density.md)",
        "node at the U-Boot prompt": f"{PROMPT_CPU_PCT:g} % of a host core, "
                                     f"{PROMPT_MIB if khs_qemu else DEBIAN_PROMPT_MIB} MiB",
        "boot": f"{BOOT_CPU_S:g} CPU-seconds per node from khget to its page: "
                f"{cores} cores boot about {int(60 * cores / BOOT_CPU_S)} nodes a minute",
        "this host": f"{cores} cores, {mem.total_mib} MiB, {mem.available_mib} MiB "
                     f"available: about {holds(mem, budget)} more booted idle nodes by memory "
                     f"({budget} MiB each, {HOST_RESERVE_MIB} MiB left to the host), "
                     f"{int(100 / IDLE_CPU_PCT) * cores} by idle CPU"}
