"""The shared-library closure of PPC ELF programs inside a root directory.

Computed by reading the ELF files (pyelftools), never by running the target's loader: the root
is another architecture. Paths are resolved inside the root, symlink by symlink, so an appliance
carries the same links the root has (``libc.so.6`` → real file) and nothing it does not need.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from kh.errors import SpecError

# Debian multiarch first, then the classic directories: the search order of Debian's
# powerpc ld.so.1 when no ld.so.cache is present.
DEFAULT_LIBDIRS = ("/lib/powerpc-linux-gnu", "/usr/lib/powerpc-linux-gnu", "/lib", "/usr/lib")
MAX_LINKS = 40


@dataclass(frozen=True)
class ElfInfo:
    machine: str
    elfclass: int
    interp: str | None
    needed: tuple[str, ...]
    runpath: tuple[str, ...]


def elf_info(path: Path) -> ElfInfo | None:
    """ELF facts of ``path``, or None when it is not an ELF file at all."""
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            return None
        f.seek(0)
        try:
            elf = ELFFile(f)
            interp = None
            needed: list[str] = []
            runpath: list[str] = []
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_INTERP":
                    interp = seg.get_interp_name()  # type: ignore[attr-defined]
            for sec in elf.iter_sections():
                if isinstance(sec, DynamicSection):
                    for tag in sec.iter_tags():
                        if tag.entry.d_tag == "DT_NEEDED":
                            needed.append(tag.needed)  # type: ignore[attr-defined]
                        elif tag.entry.d_tag == "DT_RUNPATH":
                            runpath.extend(tag.runpath.split(":"))  # type: ignore[attr-defined]
                        elif tag.entry.d_tag == "DT_RPATH":
                            runpath.extend(tag.rpath.split(":"))  # type: ignore[attr-defined]
            return ElfInfo(elf["e_machine"], elf.elfclass, interp, tuple(needed),
                           tuple(p for p in runpath if p))
        except ELFError as e:
            raise SpecError(f"{path} is a broken ELF file: {e}") from None


@dataclass
class Closure:
    """Files and symlinks (root-relative absolute paths) an appliance needs from ``root``."""

    root: Path
    machine: str = "EM_PPC"
    libdirs: tuple[str, ...] = DEFAULT_LIBDIRS
    files: set[str] = field(default_factory=set)
    links: dict[str, str] = field(default_factory=dict)
    _seen_elf: set[str] = field(default_factory=set)

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def resolve(self, path: str, *, why: str) -> str:
        """Resolve ``path`` inside the root, recording every symlink met on the way.

        Returns the real path (inside the root) of the final file or directory.
        """
        parts = [p for p in PurePosixPath(path).parts if p != "/"]
        real = PurePosixPath("/")
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == ".":
                continue
            if part == "..":
                real = real.parent
                continue
            cand = real / part
            hp = self.host(str(cand))
            try:
                st = os.lstat(hp)
            except FileNotFoundError:
                raise SpecError(f"{path} is not in the PPC root ({why})",
                                "add the package that provides it to the root, "
                                "or drop it from the spec") from None
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_LINKS:
                    raise SpecError(f"{path}: too many levels of symlinks in the PPC root")
                target = os.readlink(hp)
                self.links[str(cand)] = target
                tparts = list(PurePosixPath(target).parts)
                if target.startswith("/"):
                    real = PurePosixPath("/")
                    tparts = tparts[1:]
                parts = tparts + parts
                continue
            real = cand
        return str(real)

    def add(self, path: str, *, why: str = "named in the spec") -> None:
        """Add ``path`` and, if it is an ELF file, its interpreter and libraries."""
        real = self.resolve(path, why=why)
        hp = self.host(real)
        if hp.is_dir():
            raise SpecError(f"{path} is a directory in the PPC root ({why})",
                            "name files, or use `trees` for whole directories")
        if real in self.files:
            return
        self.files.add(real)
        info = elf_info(hp)
        if info is None:
            return
        if info.machine != self.machine or info.elfclass != 32:
            raise SpecError(f"{path} is not a 32-bit PowerPC ELF ({info.machine}, "
                            f"{info.elfclass}-bit)", "appliances run on ppce500 nodes")
        self._elf_deps(real, info)

    def add_library(self, soname: str, *, why: str, origin: str = "/",
                    runpath: tuple[str, ...] = ()) -> None:
        """Add a library by soname, searched like the dynamic loader would (dlopen'ed too)."""
        dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in runpath]
        dirs += list(self.libdirs)
        if "/" in soname:
            self.add(soname, why=why)
            return
        for d in dirs:
            cand = f"{d.rstrip('/')}/{soname}"
            if os.path.lexists(self.host(cand)):
                self.add(cand, why=why)
                return
        raise SpecError(f"{soname} is not in the PPC root ({why})",
                        "add the package that provides it to the root's recipe")

    def _elf_deps(self, real: str, info: ElfInfo) -> None:
        if real in self._seen_elf:
            return
        self._seen_elf.add(real)
        if info.interp:
            self.add(info.interp, why=f"interpreter of {real}")
        origin = str(PurePosixPath(real).parent)
        for soname in info.needed:
            self.add_library(soname, why=f"needed by {real}", origin=origin,
                             runpath=info.runpath)
