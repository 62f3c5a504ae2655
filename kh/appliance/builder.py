"""Spec + PPC root → reproducible gzip'd newc cpio wrapped as a U-Boot ramdisk image."""

from __future__ import annotations

import gzip
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kh.appliance import cpio, uimage
from kh.appliance.elf import Closure
from kh.appliance.spec import Spec
from kh.errors import SpecError

# Fixed timestamp for archive members and headers: the same inputs give the same bytes.
EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


@dataclass(frozen=True)
class Result:
    name: str
    path: Path
    size: int  # bytes of the wrapped image
    cpio_size: int  # uncompressed archive
    root_size: int
    members: int

    @property
    def share(self) -> float:
        return self.size / self.root_size if self.root_size else 0.0


def tree_size(root: Path) -> int:
    """Bytes of regular files under ``root`` (symlinks not followed), like ``du --apparent``."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


APPLETS = "usr/share/kh/applets"


def _listed_applets(closure: Closure, targets: tuple[str, ...]) -> None:
    """Link the applets the root lists for a target (``/usr/share/kh/applets/<name>``) to it.

    The full root lets a real program (coreutils' ``ls``) take the place of a busybox applet
    link; the list keeps every applet, so an appliance still gets them all. A path the
    appliance takes as a real file stays a file.
    """
    for t in targets:
        listing = closure.root / APPLETS / PurePosixPath(t).name
        if not listing.is_file():
            continue
        for line in listing.read_text().splitlines():
            link = line.strip()
            if not link.startswith("/") or link in closure.files or link in closure.links:
                continue
            closure.links[link] = os.path.relpath(t, str(PurePosixPath(link).parent))


def _symlinks_to(closure: Closure, targets: tuple[str, ...]) -> list[str]:
    """Every symlink in the root whose chain ends at one of ``targets`` (busybox applets)."""
    wanted = {closure.resolve(t, why="symlinks_to") for t in targets}
    found = []
    root = closure.root
    for dirpath, dirs, files in os.walk(root):
        for f in files + dirs:
            hp = os.path.join(dirpath, f)
            if os.path.islink(hp):
                rel = "/" + os.path.relpath(hp, root)
                try:
                    probe = Closure(root)
                    if probe.resolve(rel, why="symlinks_to") in wanted:
                        found.append(rel)
                except SpecError:
                    continue  # a dangling link elsewhere in the root is not our business
    return sorted(found)


def collect(spec: Spec, root: Path) -> list[cpio.Entry]:
    """The archive members of ``spec`` taken from ``root``."""
    if not root.is_dir():
        raise SpecError(f"the PPC root {root} does not exist", "run `kh images build` first")
    cl = Closure(root)
    for p in spec.programs:
        cl.add(p, why=f"program of {spec.name}")
    for p in spec.files:
        cl.add(p, why=f"file of {spec.name}")
    for lib in spec.libraries:
        cl.add_library(lib, why=f"library of {spec.name}")
    for svc in spec.nss:
        cl.add_library(f"libnss_{svc}.so.2", why=f"NSS module {svc} of {spec.name}")
    for link in _symlinks_to(cl, spec.symlinks_to):
        cl.resolve(link, why="symlinks_to")
    _listed_applets(cl, spec.symlinks_to)
    tree_dirs: list[str] = []
    for t in spec.trees:
        real = cl.resolve(t, why=f"tree of {spec.name}")
        hp = cl.host(real)
        if not hp.is_dir():
            raise SpecError(f"{t} is not a directory in the PPC root (tree of {spec.name})")
        for dirpath, dirs, files in os.walk(hp):
            rel_dir = "/" + os.path.relpath(dirpath, root)
            tree_dirs.append(rel_dir)
            for f in sorted(files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]):
                cl.add(f"{rel_dir}/{f}", why=f"in tree {t}")

    entries: list[cpio.Entry] = []
    for real in sorted(cl.files):
        st = os.lstat(cl.host(real))
        entries.append(cpio.Entry.file(real, cl.host(real).read_bytes(),
                                       stat.S_IMODE(st.st_mode)))
    for link, target in sorted(cl.links.items()):
        entries.append(cpio.Entry.symlink(link, target))
    for d in sorted(set(spec.dirs) | set(tree_dirs)):
        entries.append(cpio.Entry.directory(d, 0o1777 if d in ("/tmp", "/var/tmp") else 0o755))
    for dev in spec.devices:
        make = cpio.Entry.chardev if dev.kind == "c" else cpio.Entry.blockdev
        entries.append(make(dev.path, dev.major, dev.minor, dev.mode))
    for dest, src in spec.extra:
        entries.append(cpio.Entry.file(dest, src.read_bytes(),
                                       0o755 if os.access(src, os.X_OK) else 0o644))
    entries.append(cpio.Entry.file("/init", spec.init.read_bytes(), 0o755))
    return entries


# U-Boot (ppce500) moves the ramdisk to the top of its 64 MiB boot map, 4 KiB aligned down, and
# then puts the kernel command line in the last 512 bytes of that map without regard for the
# ramdisk: a ramdisk ending there loses its tail to the command line, and Linux stops with
# "Initramfs unpacking failed: invalid magic at start of compressed archive" and a panic.
# Measured on the gateway appliance, padded to end at several distances below the top: 93, 300,
# 450 and 510 bytes failed, 530, 600, 800, 1024 and 2048 booted. So the payload is padded with
# zero bytes (which the kernel skips after the gzip member) to end at least TOP_CLEAR bytes
# below a 4 KiB boundary. (U-Boot's environment, initrd_high, would be the other place.)
TOP_CLEAR = 1024


def pad_below_top(payload: bytes) -> bytes:
    """``payload`` with 0 to TOP_CLEAR zero bytes added, so that its end lies at least
    TOP_CLEAR bytes below the next 4 KiB boundary when it starts on one."""
    gap = -len(payload) % 4096
    return payload if gap >= TOP_CLEAR else payload + bytes(gap + 1)


def build(spec: Spec, root: Path, out_dir: Path, *, root_size: int | None = None) -> Result:
    """Build ``spec`` into ``out_dir/<name>.cpio.gz.uimg`` (written whole, then renamed)."""
    entries = collect(spec, root)
    raw = io.BytesIO()
    try:
        cpio.write(raw, entries, mtime=EPOCH)
    except ValueError as e:
        raise SpecError(f"{spec.source}: {e}") from None
    gz = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=EPOCH, compresslevel=9) as g:
        g.write(raw.getvalue())
    image = uimage.wrap(pad_below_top(gz.getvalue()), name=f"kh {spec.name}", type="ramdisk",
                        time=EPOCH)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f"{spec.name}.cpio.gz.uimg"
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(image)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return Result(name=spec.name, path=dest, size=len(image), cpio_size=len(raw.getvalue()),
                  root_size=root_size if root_size is not None else tree_size(root),
                  members=len(cpio.with_parents(entries)))
