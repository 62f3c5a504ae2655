"""A node as a libvirt domain: a frozen DomainSpec, rendered to domain XML by a Jinja2 template
(kh/hw/templates/node.xml.j2).

The domain is what khd's direct QEMU runs (kh.hw.board), as far as libvirt can say it:
``type='qemu'`` (TCG), ``arch='ppc'``, ``machine='ppce500'``, U-Boot as ``<loader type='rom'>``,
guest RAM shared and file-backed (in the daemon's ``memory_backing_dir``, so khd can write a
remote node's RAM as a storage volume: kh.service.libvirt_nodes), one pty serial port (the
console, reached through libvirt's console stream), one virtio NIC per domain slot on an
existing tap (``type='ethernet'``, ``managed='no'``, no option ROM: ppce500 cannot run QEMU's
x86 iPXE ROM), in the same PCI slots as kh.hw.board. No USB, no balloon: libvirt's
``<memballoon>`` has no free-page-reporting switch in libvirt 9.0, and a plain balloon is only a
device the guest would probe. ``<cpu><model>`` is refused for ppc, so the CPU is QEMU's default
for ppce500 (e500v2, as the direct backend names).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from xml.sax.saxutils import escape

import jinja2

from kh.errors import UsageError
from kh.hw.board import BOARDS, Board

NAMESPACE = "https://kittyhawk.invalid/kh/node/1"  # the metadata element's XML namespace
TEMPLATE = "node.xml.j2"
RAM_SOURCES = ("file", "memfd")


@dataclass(frozen=True)
class DomainNic:
    """One NIC: its MAC, the existing tap it uses, its carrier at start and its PCI slot."""

    mac: str
    tap: str
    pci_slot: int
    up: bool = False


@dataclass(frozen=True)
class DomainSpec:
    """Everything the domain XML says about one node. ``uuid`` is derived from the name
    (``domain_uuid``), so the same node is the same domain to every libvirt host."""

    name: str
    prefix: str
    number: int
    loader: Path  # U-Boot (ELF) on the libvirt host
    emulator: str  # qemu-system-ppc's path on the libvirt host
    mem_mib: int = 256
    nics: tuple[DomainNic, ...] = ()
    ram_source: str = "file"  # file: memory_backing_dir (bulk loads via volumes); or memfd
    board: Board = BOARDS["ppce500"]

    @property
    def uuid(self) -> str:
        return domain_uuid(self.name)

    @property
    def machine(self) -> str:
        return self.board.machine


def domain_uuid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{NAMESPACE}/{name}"))


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.PackageLoader("kh.hw", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    return env.get_template(TEMPLATE)


def check(spec: DomainSpec) -> None:
    """UsageError for a spec no domain can be made of."""
    if spec.ram_source not in RAM_SOURCES:
        raise UsageError(f"unknown guest RAM source {spec.ram_source!r}",
                         f"one of {', '.join(RAM_SOURCES)}")
    if spec.mem_mib < spec.board.min_mem_mib:
        raise UsageError(f"{spec.mem_mib} MiB is too little memory for a {spec.board.name} "
                         "node", f"use at least {spec.board.min_mem_mib}M")
    if len(spec.nics) > len(spec.board.nic_pci_slots):
        raise UsageError(f"a {spec.board.name} node has at most "
                         f"{len(spec.board.nic_pci_slots)} network interfaces")


def render(spec: DomainSpec) -> str:
    """The domain XML of ``spec`` (every value escaped by the template's autoescape)."""
    check(spec)
    return _template().render(spec=spec, namespace=NAMESPACE)


def nic_xml(nic: DomainNic, up: bool) -> str:
    """One interface's XML as virDomainUpdateDeviceFlags takes it to change its link state
    (libvirt finds the device by its MAC)."""
    return (f"<interface type='ethernet'><mac address='{escape(nic.mac)}'/>"
            f"<target dev='{escape(nic.tap)}' managed='no'/><model type='virtio'/>"
            f"<link state='{'up' if up else 'down'}'/></interface>")
