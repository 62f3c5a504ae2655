"""Bulk loads: write bytes straight into a node's RAM.

The emulated UART carries ~20 KB/s, far too slow for kernels and ramdisks. A service node's
RAM is a memfd that QEMU shares (``memory-backend-memfd,share=on``), so khd opens it through
``/proc/<qemu pid>/fd`` and copies the principal's bytes to the guest-physical address: one
memcpy per node, with no guest involvement and nothing for QEMU to parse. The file is reachable
only by root on the host; a principal only ever reaches it through its control channel.

ppce500 maps RAM from guest-physical address 0, so the file offset is the address.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from pathlib import Path

from kh.errors import KhError
from kh.hw.board import Load

# QEMU names the memfd after the backend type.
MEMFD_NAME = "/memfd:memory-backend-memfd"


class LoadError(KhError):
    """A bulk load into a node failed."""


def ram_file(pid: int, proc: Path = Path("/proc")) -> Path:
    """The /proc path of the memfd holding QEMU ``pid``'s guest RAM."""
    fd_dir = proc / str(pid) / "fd"
    try:
        fds = sorted(fd_dir.iterdir(), key=lambda p: int(p.name))
    except OSError as e:
        raise LoadError(f"the node's process is gone ({e.strerror})") from None
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(MEMFD_NAME):
            return fd
    raise LoadError("the node's RAM is not shared", "the node was started without a RAM file")


class RamFile:
    """A RAM file (a QEMU memfd, or any file in tests) opened once; pieces written with pwrite,
    so nothing is mapped or buffered: memory per load is one piece."""

    def __init__(self, path: Path) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise LoadError(f"cannot open the node's RAM ({e.strerror})") from None
        self.size = os.fstat(self.fd).st_size

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise LoadError(f"0x{offset:x}+{len(data)} is outside the node's "
                            f"{self.size >> 20} MiB")
        view = memoryview(data)
        while view:
            try:
                done = os.pwrite(self.fd, view, offset)
            except OSError as e:
                raise LoadError(f"writing the node's RAM failed ({e.strerror})") from None
            view, offset = view[done:], offset + done

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write(ram: Path, addr: int, data: bytes) -> None:
    """Put ``data`` at guest-physical ``addr`` of the RAM behind ``ram``."""
    try:
        fd = os.open(ram, os.O_RDWR)
    except OSError as e:
        raise LoadError(f"cannot open the node's RAM ({e.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        if addr < 0 or addr + len(data) > size:
            raise LoadError(f"0x{addr:x}+{len(data)} is outside the node's {size >> 20} MiB")
        if not data:
            return
        # Map only the pages touched; mmap offsets must be page-aligned.
        start = addr - addr % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(fd, addr + len(data) - start, offset=start) as m:
            m[addr - start:addr - start + len(data)] = data
    finally:
        os.close(fd)


def read(ram: Path, addr: int, size: int) -> bytes:
    """Read back ``size`` bytes at ``addr`` (for checks and tests)."""
    with open(ram, "rb") as f:
        f.seek(addr)
        return f.read(size)


def load_files(pid: int, loads: Iterable[Load]) -> None:
    """Write each file of ``loads`` at its guest-physical address in the RAM of QEMU ``pid``
    (best paused: the guest sees no half-written file). Raises LoadError for a file that
    cannot be read or does not fit, or a QEMU without shared RAM."""
    ram = ram_file(pid)
    for ld in loads:
        try:
            data = ld.file.read_bytes()
        except OSError as e:
            raise LoadError(f"cannot read {ld.file} ({e.strerror})") from None
        write(ram, ld.addr, data)
