"""`kh boot`: one ppce500 node through our U-Boot into an appliance, like virtme-ng for PPC.

The kernel and ramdisk are placed in guest RAM by QEMU's loader at U-Boot's ``${loadaddr}``
and ``${ramfsaddr}`` before the firmware runs; U-Boot's own ``run kboot`` then boots them, so
the path from prompt to Linux is exactly the one a principal drives over a control channel.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import shutil
import sys
import tempfile
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kh.appliance import uimage
from kh.errors import ImageError, UsageError
from kh.hw import board, qemu, uboot
from kh.hw.console import Console
from kh.hw.nodeshell import BootedNode as BootedNode  # what booted() yields, named from here too
from kh.settings import Paths

DETACH = b"\x1d"  # Ctrl-]
# `kh boot` runs whose console logs are kept (in <cache>/logs/kh-boot/).
KEEP_LOGS = 20


@dataclass(frozen=True)
class BootConfig:
    kernel: Path
    ramdisk: Path
    bios: Path
    mem_mib: int = 256
    board: board.Board = board.BOARDS["ppce500"]
    khargs: str = ""
    prompt_timeout: float = 30.0
    ready_timeout: float = 90.0
    console_log: Path | None = None
    name: str = "kh-boot"


def default_config(paths: Paths, *, appliance: str = "shell", kernel: Path | None = None,
                   ramdisk: Path | None = None, bios: Path | None = None, mem_mib: int = 256,
                   khargs: str = "", console_log: Path | None = None,
                   ready_timeout: float = 90.0) -> BootConfig:
    """Fill in images/out defaults for whatever the caller did not name. Raises UsageError for
    an appliance that has neither a spec nor a built ramdisk, naming the known ones."""
    if ramdisk is None:
        ramdisk = paths.out / f"{appliance}.cpio.gz.uimg"
        if not ramdisk.exists() and not (paths.specs / f"{appliance}.toml").is_file():
            known = sorted(p.stem for p in paths.specs.glob("*.toml"))
            raise UsageError(f"no appliance named {appliance!r}",
                             f"known appliances: {', '.join(known) or 'none'}")
    return BootConfig(kernel=kernel or paths.out / "uImage", ramdisk=ramdisk,
                      bios=bios or paths.out / "u-boot.elf", mem_mib=mem_mib, khargs=khargs,
                      console_log=console_log, ready_timeout=ready_timeout)


def check_images(cfg: BootConfig) -> None:
    """Refuse a missing or corrupt image before starting anything."""
    if not cfg.bios.is_file():
        raise ImageError(f"U-Boot image {cfg.bios} does not exist", "run `kh images build`")
    if cfg.bios.read_bytes()[:4] != b"\x7fELF":
        raise ImageError(f"U-Boot image {cfg.bios} is not an ELF file")
    kh = uimage.check_file(cfg.kernel, type="kernel", what="kernel")
    uimage.check_file(cfg.ramdisk, type="ramdisk", what="ramdisk")
    room = cfg.board.ramfsaddr - cfg.board.loadaddr
    if kh.size + uimage.HEADER.size > room:
        raise ImageError(f"kernel {cfg.kernel} is {kh.size} bytes; only {room} fit below "
                         f"${{ramfsaddr}}")


def node_spec(cfg: BootConfig, workdir: Path) -> board.NodeSpec:
    return board.NodeSpec(
        name=cfg.name, bios=cfg.bios, console=workdir / "console.sock", board=cfg.board,
        mem_mib=cfg.mem_mib, no_reboot=True,  # a reset (`reboot`) ends QEMU, never loops
        loads=(board.Load(cfg.kernel, cfg.board.loadaddr),
               board.Load(cfg.ramdisk, cfg.board.ramfsaddr)))


def show_command(cfg: BootConfig) -> str:
    spec = node_spec(cfg, Path(tempfile.gettempdir()) / "kh-boot-XXXX")
    return shlex.join(board.qemu_argv(spec))


def attach(console: Console) -> None:
    """Attach this terminal (raw, when it is one) to ``console`` until Ctrl-] or the console
    closes; what the node prints reaches the terminal as is."""
    out = sys.stdout.buffer

    def show(data: bytes) -> None:
        out.write(data)
        out.flush()

    unsub = console.subscribe(show)
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd) if os.isatty(fd) else None
    try:
        if old is not None:
            tty.setraw(fd)
        while not console.closed:
            r, _, _ = select.select([fd], [], [], 0.2)
            if not r:
                continue
            data = os.read(fd, 4096)
            if not data or DETACH in data:
                data = data.split(DETACH)[0]
                if data:
                    console.write(data)
                break
            console.write(data)
    finally:
        unsub()
        if old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
        out.write(b"\r\n")
        out.flush()


def default_console_log(paths: Paths, keep: int = KEEP_LOGS) -> Path:
    """A new file for this `kh boot`'s console transcript (kept after it stops), in
    ``<cache>/logs/kh-boot/``; only the newest ``keep`` runs' logs stay there."""
    d = paths.cache / "logs" / "kh-boot"
    d.mkdir(parents=True, exist_ok=True)
    logs = sorted(d.glob("*.console.log"), key=_mtime)
    for old in logs[: max(0, len(logs) - keep + 1)]:
        for f in (old, *old.parent.glob(old.name + ".*")):  # and its rotated parts
            f.unlink(missing_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    fd, name = tempfile.mkstemp(prefix=f"{stamp}-{os.getpid()}-", suffix=".console.log", dir=d)
    os.close(fd)
    return Path(name)


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:  # pruned by a concurrent kh boot
        return 0.0


@contextlib.contextmanager
def at_prompt(cfg: BootConfig, paths: Paths) -> Iterator[qemu.Node]:
    """Start a node and wait for its U-Boot prompt; always tear it down on the way out."""
    check_images(cfg)
    paths.runtime.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="kh-boot-", dir=paths.runtime))
    try:
        spec = node_spec(cfg, workdir)
        log = cfg.console_log or default_console_log(paths)
        # The node is the calling thread's: its QEMU dies with it even if kh is SIGKILLed.
        with qemu.running(spec, console_log=log, workdir=workdir,
                          die_with_parent=True) as node:
            uboot.wait_prompt(node.console, cfg.prompt_timeout)
            yield node
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def kboot(node: qemu.Node, cfg: BootConfig) -> BootedNode:
    """From the U-Boot prompt: set khargs, `run kboot`, wait for the appliance's ready line."""
    if cfg.khargs:
        uboot.set_khargs(node.console, cfg.khargs)
    return BootedNode(node.console, uboot.run_kboot(node.console, cfg.ready_timeout), node)


@contextlib.contextmanager
def booted(cfg: BootConfig, paths: Paths) -> Iterator[BootedNode]:
    """Start a node, boot it through U-Boot into the appliance; tear it down on exit."""
    with at_prompt(cfg, paths) as node:
        yield kboot(node, cfg)
