"""`kh hw`: the documented node, as khd describes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kh.allocation import NIC_SLOTS
from kh.service import density
from kh.service.config import ServiceConfig


@dataclass(frozen=True)
class Hardware:
    """`kh hw`: the documented node."""

    cfg: ServiceConfig

    def describe(self) -> dict[str, Any]:
        return {"board": "QEMU ppce500 (Freescale MPC85xx e500 platform)",
                "cpu": "1 x PowerPC e500v2 (32-bit Book E, SPE, no classic FPU: Linux emulates)",
                "memory_mib": self.cfg.mem_mib,
                "firmware": "U-Boot 2023.01 (Debian) + kh patches (mrw, environment)",
                "console": "16550 UART, 115200 8N1: the node's control interface",
                "interfaces": [f"eth{s}: virtio-net-pci, one per domain in khget's order"
                               for s in range(NIC_SLOTS)],
                "balloon": "virtio-balloon-pci: free page reporting only (free RAM goes back "
                           "to the host)",
                "preloaded": {"kernel": "${loadaddr}=0x8000000 (Linux 6.1 uImage)",
                              "ramdisk": f"${{ramfsaddr}}=0xa000000 ({self.cfg.appliance})"},
                "boot": "run kboot (kernel arguments from ${khargs})",
                "nodes": self.cfg.nodes,
                "qemu": ("kh's own qemu-system-ppc 7.2 (Debian's source, a ppce500 node's devices "
                         "only; docs/density.md)" if self.cfg.runs_khs_qemu
                         else "Debian's qemu-system-ppc" if self.cfg.qemu == "qemu-system-ppc"
                         else "the libvirt host's" if self.cfg.backend != "qemu"
                         else "the operator's (KH_QEMU)"),
                "density": density.describe(density.host_memory(),
                                            khs_qemu=self.cfg.runs_khs_qemu)}
