"""What khd needs from the host, checked before anything is created.

Each refusal is one line naming what is missing and the command or package that provides it.
A kernel driver that is missing only shows when kh asks for a device of that kind (the kernel
loads modules on demand): kh.hw.fabric names it then.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kh import deps
from kh.errors import ImageError, KhError
from kh.hw import netns as nsutil
from kh.service import density, procid
from kh.service.config import ServiceConfig

TUN = Path("/dev/net/tun")


def check_root() -> None:
    if os.geteuid() != 0:
        raise KhError("khd needs root", "it creates network namespaces, bridges and taps")


def check_images(cfg: ServiceConfig) -> None:
    for image in cfg.images_needed:
        if not image.is_file():
            debians = (", or KH_QEMU=qemu-system-ppc for Debian's QEMU"
                       if image == cfg.khs_qemu else "")
            raise ImageError(f"image {image} is missing",
                             f"build the images: `make images` or `kh images build`{debians}")
    if cfg.runs_khs_qemu and not os.access(cfg.khs_qemu, os.X_OK):
        raise ImageError(f"image {cfg.khs_qemu} is not executable",
                         "publish the images again: `kh images build`, or "
                         "KH_QEMU=qemu-system-ppc for Debian's QEMU")


QEMU_CHOICES = ("unset it for kh's own QEMU, the one among the images, or set "
                "KH_QEMU=qemu-system-ppc for Debian's")


def check_qemu_setting(qemu: str) -> None:
    """KH_QEMU names a program the nodes can run: a path (with a /) to an executable regular
    file, or a name on PATH. Raises KhError in one line saying which of those it is not."""
    if "/" not in qemu:
        if shutil.which(qemu) is None and deps.provider(qemu) is not None:  # Debian's
            raise KhError(f"{qemu} is not installed (not on PATH)", deps.missing_hint(qemu))
        if shutil.which(qemu) is None:
            raise KhError(f"KH_QEMU={qemu}: no program of that name on PATH", QEMU_CHOICES)
        return
    path = Path(qemu)
    if not path.exists():
        raise KhError(f"KH_QEMU={qemu}: no such file", QEMU_CHOICES)
    if path.is_dir():
        raise KhError(f"KH_QEMU={qemu}: is a directory, not a program", QEMU_CHOICES)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise KhError(f"KH_QEMU={qemu}: not an executable file", QEMU_CHOICES)


def check_programs(cfg: ServiceConfig) -> None:
    # kh's own QEMU is one of the images (check_images); another is what KH_QEMU names
    if cfg.qemu is not None and not cfg.runs_khs_qemu:
        check_qemu_setting(cfg.qemu)
    for program in ("nsenter", "nft"):  # nft: the fabric's firewall
        if shutil.which(program) is None:
            raise KhError(f"{program} is not installed (not on PATH)",
                          deps.missing_hint(program))


def check_tun(path: Path = TUN) -> None:
    if not path.exists():
        raise KhError(f"{path} is missing: the kernel's tun driver (node interfaces) is not "
                      "loaded", "load it with `modprobe tun`")


def check_uplink(cfg: ServiceConfig) -> None:
    """An operator's uplink namespace exists and is not kh's own outside world's name."""
    own = cfg.fabric.outside_netns
    if cfg.uplink_netns == own:
        raise KhError(f"--uplink-netns {own} names kh's own outside world, which kh makes "
                      "and removes itself", "leave out --uplink-netns to have it, or name "
                      "a namespace of your own")
    if cfg.uplink_netns and not nsutil.exists(cfg.uplink_netns):
        raise KhError(f"uplink network namespace {cfg.uplink_netns} does not exist",
                      f"create it (`ip netns add {cfg.uplink_netns}`) or leave out "
                      "--uplink-netns")


def check_memory(cfg: ServiceConfig) -> None:
    """The host's memory holds ``cfg.nodes`` booted idle nodes of the nodes' QEMU
    (kh.service.density); the QEMUs of this prefix that run already (nodes outlive khd) hold
    theirs."""
    density.check(cfg.nodes, len(procid.tagged(cfg.prefix)), density.host_memory(),
                  density.budget_mib(cfg.runs_khs_qemu))


def check(cfg: ServiceConfig) -> None:
    """Everything khd needs that can be known without creating anything."""
    check_images(cfg)
    check_root()
    check_programs(cfg)
    check_tun()
    check_uplink(cfg)
    check_memory(cfg)
