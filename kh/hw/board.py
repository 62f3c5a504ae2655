"""Node hardware as data, and the QEMU command line built from it by small pure functions.

Board quirks live in one table. Each device has its own function returning argv pieces, so each
is unit-tested alone and ``--show-command`` prints exactly what would run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from kh.errors import UsageError


@dataclass(frozen=True)
class Board:
    """What differs between emulated boards; one row of BOARDS."""

    name: str
    qemu: str
    machine: str
    cpu: str
    min_mem_mib: int
    loadaddr: int  # U-Boot's default ${loadaddr}: the kernel uImage
    ramfsaddr: int  # U-Boot's default ${ramfsaddr}: the ramdisk uImage
    kernel_console: str
    nic_model: str
    # The device through which the guest hands free RAM back (virtio free page reporting);
    # None: the board has none.
    balloon_model: str | None
    # PCI slots. ppce500 wires INTA of slot S to MPIC line (S % 4) + 1, so four slots in a row
    # share all four lines. Linux drives virtio-net by MSI, but a NIC's INTx can still be
    # asserted when Linux enables the shared line (measured in khd's web farm: the balloon in
    # slot 5, beside eth0's slot 1, took 100000 spurious interrupts at boot until Linux
    # disabled the line, "nobody cared", and with it free page reporting). QEMU 7.2's
    # virtio-balloon-pci has no MSI-X, so the NICs share one line (slots 1, 5, 9, 13: the same
    # order, so the same eth names) and the balloon has another to itself.
    nic_pci_slots: tuple[int, ...]
    balloon_pci_slot: int
    # QEMU's -device loader must not write below this address: an image at 0x2000000 stops
    # ppce500's U-Boot from starting at all (measured), one at 0x8000000 works.
    safe_load_floor: int


BOARDS: dict[str, Board] = {
    "ppce500": Board(name="ppce500", qemu="qemu-system-ppc", machine="ppce500", cpu="e500v2",
                     min_mem_mib=256, loadaddr=0x8000000, ramfsaddr=0xA000000,
                     kernel_console="ttyS0", nic_model="virtio-net-pci",
                     balloon_model="virtio-balloon-pci", nic_pci_slots=(0x1, 0x5, 0x9, 0xd),
                     balloon_pci_slot=0x2, safe_load_floor=0x8000000),
}


@dataclass(frozen=True)
class Load:
    """A file QEMU places in guest RAM before the firmware starts."""

    file: Path
    addr: int


@dataclass(frozen=True)
class Nic:
    """One network interface: a tap of a communication domain, or QEMU's user network."""

    id: str
    mac: str
    tap: str | None = None  # host tap device name; None → QEMU user-mode network
    tftp: Path | None = None  # user-mode only: directory served by QEMU's TFTP server


@dataclass(frozen=True)
class NodeSpec:
    """Everything QEMU needs to run one node."""

    name: str
    bios: Path
    console: Path  # unix socket path; QEMU listens, kh connects
    board: Board = BOARDS["ppce500"]
    mem_mib: int = 256
    qmp: Path | None = None
    loads: tuple[Load, ...] = ()
    nics: tuple[Nic, ...] = field(default_factory=tuple)
    wait_for_console: bool = True
    gdb: Path | None = None  # unix socket of QEMU's gdbstub, for debugging a node
    shared_ram: bool = False  # RAM in a shared memfd: khd's bulk-load path (memload)
    qemu: str | None = None  # the QEMU program; None: the board's (khd's `qemu` setting)
    no_reboot: bool = False  # a guest reset ends QEMU instead of restarting the node
    sandbox: bool = False  # QEMU's seccomp sandbox (sandbox_args)
    run_as: str | None = None  # user QEMU switches to once it has opened what it needs
    code_cache_mib: int | None = None  # TCG's translated-code cache; None: QEMU's (1 GiB)
    free_page_reporting: bool = False  # a balloon device the guest reports free RAM to


MEM_RE = re.compile(r"^(\d+)([MG]?)$", re.IGNORECASE)


def parse_mem(text: str) -> int:
    """'256M', '1G' or '512' (MiB) → MiB."""
    m = MEM_RE.match(text.strip())
    if not m:
        raise UsageError(f"bad memory size {text!r}", "write it like 256M or 1G")
    n = int(m[1]) * (1024 if m[2].upper() == "G" else 1)
    if n <= 0:
        raise UsageError(f"bad memory size {text!r}", "it must be positive")
    return n


RAM_BACKEND = "ram0"


def machine_args(board: Board, shared_ram: bool = False) -> list[str]:
    machine = f"{board.machine},memory-backend={RAM_BACKEND}" if shared_ram else board.machine
    return ["-M", machine, "-cpu", board.cpu]


def memory_args(mem_mib: int, shared_ram: bool = False) -> list[str]:
    """Guest RAM; shared, it is a memfd that khd can open and write loads into."""
    backend = (["-object", f"memory-backend-memfd,id={RAM_BACKEND},size={mem_mib}M,share=on"]
               if shared_ram else [])
    return backend + ["-m", f"{mem_mib}M"]


def firmware_args(bios: Path) -> list[str]:
    return ["-bios", str(bios)]


def name_args(name: str) -> list[str]:
    # The process name carries kh's tag so `kh clean` can recognise its own QEMUs.
    return ["-name", f"{name},process={name}"]


def console_args(sock: Path, wait: bool) -> list[str]:
    return ["-chardev", f"socket,id=con0,path={sock},server=on,wait={'on' if wait else 'off'}",
            "-serial", "chardev:con0"]


def qmp_args(sock: Path | None) -> list[str]:
    if sock is None:
        return []
    return ["-qmp", f"unix:{sock},server=on,wait=off"]


def gdb_args(sock: Path | None) -> list[str]:
    if sock is None:
        return []
    return ["-chardev", f"socket,id=gdb0,path={sock},server=on,wait=off", "-gdb", "chardev:gdb0"]


def headless_args() -> list[str]:
    return ["-nodefaults", "-display", "none", "-monitor", "none"]


def sandbox_args(sandbox: bool, run_as: str | None) -> list[str]:
    """QEMU's seccomp filter: no obsolete system calls, no new processes or programs, no
    changes to scheduling or CPU affinity, and no set*uid/set*gid. QEMU 7.2 installs the filter
    before ``-runas`` switches users, so with ``run_as`` set*uid must stay allowed for that
    switch (else QEMU dies of SIGSYS); once switched, the process has no capabilities and
    every id is the user's, so set*uid can change nothing."""
    if not sandbox:
        return []
    privileges = "" if run_as else ",elevateprivileges=deny"
    return ["-sandbox", f"on,obsolete=deny{privileges},spawn=deny,resourcecontrol=deny"]


def user_args(run_as: str | None) -> list[str]:
    """Drop root: QEMU opens its files, sockets and taps as root, then becomes ``run_as``
    (its groups too) before the guest runs, and checks it cannot become root again."""
    return ["-runas", run_as] if run_as else []


def accel_args(code_cache_mib: int | None) -> list[str]:
    """TCG with a bounded translated-code cache (QEMU flushes it when full): QEMU's memory
    beyond guest RAM stays small and known, which a node's memory limit needs."""
    return ["-accel", f"tcg,tb-size={code_cache_mib}"] if code_cache_mib else []


def balloon_args(board: Board, free_page_reporting: bool) -> list[str]:
    """A virtio-balloon device that only takes free page reports: the guest's kernel
    (CONFIG_VIRTIO_BALLOON) reports free blocks of its RAM (128 KiB and up) and QEMU drops them
    from the RAM's backing (a hole punched in the memfd), so RAM the guest used once and freed
    (U-Boot, the loaded images, an unpacked initrd) stops costing the host. The balloon is never
    inflated: the guest keeps all its RAM, and a reported page it uses again reads as zeros."""
    if not free_page_reporting or board.balloon_model is None:
        return []
    return ["-device", f"{board.balloon_model},free-page-reporting=on,"
            f"addr=0x{board.balloon_pci_slot:x}"]


def reset_args(no_reboot: bool) -> list[str]:
    return ["-no-reboot"] if no_reboot else []


def loader_args(loads: tuple[Load, ...], board: Board) -> list[str]:
    args: list[str] = []
    for ld in loads:
        if ld.addr < board.safe_load_floor:
            raise UsageError(f"cannot preload {ld.file} at 0x{ld.addr:x}",
                             f"{board.name}'s U-Boot does not start with images below "
                             f"0x{board.safe_load_floor:x}")
        args += ["-device", f"loader,file={ld.file},addr=0x{ld.addr:x},force-raw=on"]
    return args


def nic_args(nics: tuple[Nic, ...], board: Board) -> list[str]:
    """Each NIC in its own PCI slot of ``board.nic_pci_slots``, in order. Raises UsageError
    for more NICs than the board has slots for."""
    if not nics:
        return ["-nic", "none"]
    if len(nics) > len(board.nic_pci_slots):
        raise UsageError(f"a {board.name} node has at most {len(board.nic_pci_slots)} network "
                         f"interfaces, not {len(nics)}")
    args: list[str] = []
    for i, nic in enumerate(nics):
        if nic.tap is not None:
            args += ["-netdev", f"tap,id={nic.id},ifname={nic.tap},script=no,downscript=no"]
        else:
            user = f"user,id={nic.id},restrict=on"
            if nic.tftp is not None:
                user += f",tftp={nic.tftp}"
            args += ["-netdev", user]
        # romfile= (empty): no option ROM. QEMU would load an x86 iPXE ROM (efi-virtio.rom,
        # package ipxe-qemu, only a Recommends of QEMU) that a ppce500 node can never run; without
        # the package the node does not start at all.
        args += ["-device", f"{board.nic_model},netdev={nic.id},mac={nic.mac},romfile=,"
                 f"addr=0x{board.nic_pci_slots[i]:x}"]
    return args


def check_memory(spec: NodeSpec) -> None:
    b = spec.board
    if spec.mem_mib < b.min_mem_mib:
        raise UsageError(f"{spec.mem_mib} MiB is too little memory for a {b.name} node",
                         f"use at least {b.min_mem_mib}M")
    top = spec.mem_mib * 1024 * 1024
    for ld in spec.loads:
        end = ld.addr + ld.file.stat().st_size
        if end > top:
            raise UsageError(f"{ld.file} does not fit in {spec.mem_mib} MiB at 0x{ld.addr:x}",
                             "give the node more memory with --mem")


def qemu_argv(spec: NodeSpec) -> list[str]:
    """The whole command line for one node."""
    b = spec.board
    return ([spec.qemu or b.qemu] + name_args(spec.name) + machine_args(b, spec.shared_ram)
            + accel_args(spec.code_cache_mib) + memory_args(spec.mem_mib, spec.shared_ram)
            + headless_args() + reset_args(spec.no_reboot) + firmware_args(spec.bios)
            + console_args(spec.console, spec.wait_for_console) + qmp_args(spec.qmp)
            + gdb_args(spec.gdb)
            + loader_args(spec.loads, b) + nic_args(spec.nics, b)
            + balloon_args(b, spec.free_page_reporting)
            + sandbox_args(spec.sandbox, spec.run_as) + user_args(spec.run_as))
