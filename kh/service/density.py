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
IDLE_BOOTED_MIB = 66  # an idle booted apache node (64-66 MiB; RSS 86-88 MiB)
PROMPT_MIB = 22  # a node at the U-Boot prompt, kept warm (RSS 44 MiB)
IDLE_CPU_PCT = 0.1  # an idle booted apache node, % of one host core (0.05-0.1)
BOOT_CPU_S = 4.0  # CPU-seconds one apache node takes from khget to its page (3.5-4.4)
# What khd counts a node as when it checks that the host holds N: an idle booted node and some
# room. A node whose guest fills its RAM holds up to its cgroup's limit (kh.hw.cgroup), which
# kh does not reserve: that is overcommitment the operator chooses by running such guests.
NODE_BUDGET_MIB = 80
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


def holds(mem: HostMemory) -> int:
    """Booted idle nodes the available memory holds, the host's reserve kept."""
    return max(0, (mem.available_mib - HOST_RESERVE_MIB) // NODE_BUDGET_MIB)


def check(nodes: int, running: int, mem: HostMemory) -> None:
    """Refuse ``nodes`` when the ones not yet ``running`` (this khd's QEMUs that run already
    hold their memory) would not fit in the available memory as booted idle nodes. Raises
    KhError naming the memory needed and available and the largest N that fits."""
    new = max(0, nodes - running)
    need = new * NODE_BUDGET_MIB
    room = mem.available_mib - HOST_RESERVE_MIB
    if need <= room:
        return
    most = running + holds(mem)
    raise KhError(f"{nodes} nodes need about {need} MiB more memory ({NODE_BUDGET_MIB} MiB "
                  f"each, a booted idle node as measured, for {new} new ones), and the host "
                  f"has {mem.available_mib} MiB available, of which kh leaves "
                  f"{HOST_RESERVE_MIB} MiB to the host",
                  f"start at most {most}: --nodes {most}" if most > 0 else
                  "free memory on the host first")


def describe(mem: HostMemory, cores: int | None = None) -> dict[str, str]:
    """`kh hw`'s density: the measured costs, and what this host holds by them."""
    cores = cores or os.cpu_count() or 1
    return {
        "idle booted node": f"{IDLE_CPU_PCT:g} % of a host core, {IDLE_BOOTED_MIB} MiB "
                            "(apache appliance, measured: docs/density.md)",
        "node at the U-Boot prompt": f"{PROMPT_MIB} MiB",
        "boot": f"{BOOT_CPU_S:g} CPU-seconds per node from khget to its page: "
                f"{cores} cores boot about {int(60 * cores / BOOT_CPU_S)} nodes a minute",
        "this host": f"{cores} cores, {mem.total_mib} MiB, {mem.available_mib} MiB "
                     f"available: about {holds(mem)} more booted idle nodes by memory "
                     f"({NODE_BUDGET_MIB} MiB each, {HOST_RESERVE_MIB} MiB left to the host), "
                     f"{int(100 / IDLE_CPU_PCT) * cores} by idle CPU"}
