"""The full PPC root: a general-purpose Debian-derived system that appliances are cut from.

It is put together from four kinds of parts, in this order:

1. Debian's powerpc cross runtime (glibc, libgcc) in multiarch layout;
2. the stage of every package recipe it lists, busybox first: where a cross-built program
   (coreutils' ``ls``) lands on a path busybox had an applet link for, the real program wins, as
   on a Debian system with busybox installed; any other path two packages ship is an error;
3. Debian's architecture-independent binary packages (``debs``: time zones, terminfo, netbase)
   as Debian ships them, docs and man pages left out as from every package (DEV_GLOBS);
4. the recipe's ``overlay`` directory: the base system's own files (inittab, rcS, passwd).

Every busybox applet path is listed in ``/usr/share/kh/applets/busybox`` so appliances can
still link all of them to busybox even where the root holds the GNU program. The whole root is
also written as a reproducible ``root.tar.gz`` (sorted, uid 0, fixed mtime) for nodes that
serve it, like the file server that exports it as an NFS root.
"""

from __future__ import annotations

import fnmatch
import gzip
import os
import shutil
import stat
import tarfile
from pathlib import Path

from kh import proc
from kh.appliance.elf import Closure
from kh.errors import ImageError, SpecError
from kh.images import apt, builders, packages
from kh.images.builders import Context
from kh.images.recipe import Recipe

APPLETS = "usr/share/kh/applets"
TARBALL = "root.tar.gz"
MTIME = 0
# Mount points and the directories a Debian system has even when empty.
BASE_DIRS = ["etc", "usr/share", "usr/lib/powerpc-linux-gnu",
             "dev", "proc", "sys", "tmp", "run", "root", "home", "mnt", "srv", "opt",
             "var/log", "var/tmp", "var/lib", "var/cache", "var/spool", "usr/local/bin",
             "usr/local/sbin"]


def facts(recipe: Recipe) -> list[str]:
    """The cross runtime's versions and the exact .deb of every binary package taken."""
    return builders.facts(recipe) + [apt.binary_version(d) for d in recipe.params.get("debs", [])]


def build_root(recipe: Recipe, ctx: Context, work: Path, dest: Path) -> None:
    stage = dest / "stage"
    _install_runtime(recipe.params["runtime"], stage)
    applets: set[str] = set()  # busybox's links, which real programs may take over
    for pkg in recipe.params.get("packages", []):
        pstage = ctx.deps[pkg] / "stage"
        merge_tree(pstage, stage, pkg, yielding=applets)
        if pkg == "busybox":
            applets = links_in(pstage)
    for deb in recipe.params.get("debs", []):
        _install_deb(deb, ctx, work, stage)
    if "overlay" in recipe.params:
        merge_tree(recipe.repo_file("overlay", ctx.repo), stage, "the root's overlay")
    for d in BASE_DIRS:
        (stage / d).mkdir(parents=True, exist_ok=True)
    for d in ("tmp", "var/tmp"):
        (stage / d).chmod(0o1777)
    if applets:
        listing = stage / APPLETS / "busybox"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(f"/{p}\n" for p in sorted(applets)))
    check_libraries(stage)
    for path in stage.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (MTIME, MTIME))
    (dest / "artifacts").mkdir()
    write_tarball(stage, dest / "artifacts" / TARBALL)


def check_libraries(stage: Path) -> None:
    """Every program and library in the root finds its interpreter and libraries there.

    A dependency the packages' own links did not catch (libcrypto needs libatomic on 32-bit
    powerpc) would otherwise surface only as an ImportError on a node.
    """
    closure = Closure(stage)
    for dirpath, _dirs, files in os.walk(stage):
        for name in sorted(files):
            p = Path(dirpath) / name
            if p.is_symlink() or not p.is_file():
                continue
            try:  # adds ELF files' interpreters and libraries; other files are just listed
                closure.add("/" + str(p.relative_to(stage)), why="in the root")
            except SpecError as e:
                raise ImageError(f"the root is incomplete: {e.message}",
                                 "add the package or cross runtime that provides it") from None


def _install_runtime(packages: list[str], stage: Path) -> None:
    libdir = stage / builders.TARGET_LIBDIR
    libdir.mkdir(parents=True)
    for pkg in packages:
        for f in _runtime_files(pkg):
            target = libdir / f.name
            if f.is_symlink():
                link = os.readlink(f)
                if "/" in link:
                    link = os.path.basename(link)
                target.symlink_to(link)
            else:
                shutil.copy2(f, target)
                target.chmod(0o755 if os.access(f, os.X_OK) else 0o644)
    # PT_INTERP of every powerpc binary is /lib/ld.so.1.
    (stage / "lib" / "ld.so.1").symlink_to("powerpc-linux-gnu/ld.so.1")


def _runtime_files(package: str) -> list[Path]:
    """Shared objects (files and links) a Debian cross runtime package ships."""
    out = proc.run(["dpkg", "-L", package], what=f"dpkg -L {package}").stdout
    files = []
    for line in out.splitlines():
        p = Path(line)
        if p.parent != builders.CROSS_LIBDIR or ".so" not in p.name:
            continue
        if p.is_file() and not p.is_symlink() and p.read_bytes()[:4] != b"\x7fELF":
            continue  # linker scripts like libc.so belong to the SDK, not the root
        files.append(p)
    return files


def _install_deb(package: str, ctx: Context, work: Path, stage: Path) -> None:
    """Unpack an Architecture: all Debian package (its files, not its scripts) into the root."""
    deb = apt.fetch_deb(package, ctx.sources)
    arch = proc.run(["dpkg-deb", "-f", str(deb), "Architecture"],
                    what=f"dpkg-deb -f {deb.name}").stdout.strip()
    if arch != "all":
        raise ImageError(f"Debian package {package} is built for {arch}, not for all "
                         "architectures", "cross-build it with a package recipe instead")
    tree = work / "debs" / package
    tree.mkdir(parents=True)
    proc.run(["dpkg-deb", "-x", str(deb), str(tree)], what=f"dpkg-deb -x {deb.name}")
    drop_matching(tree, packages.DEV_GLOBS)
    merge_tree(tree, stage, package)


def drop_matching(tree: Path, globs: list[str]) -> None:
    """Delete every path under ``tree`` matching one of ``globs`` (relative), then empty dirs."""
    for dirpath, dirs, files in os.walk(tree, topdown=False):
        for name in files + dirs:
            p = Path(dirpath) / name
            if any(fnmatch.fnmatch(str(p.relative_to(tree)), g) for g in globs):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            elif p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                p.rmdir()


def links_in(tree: Path) -> set[str]:
    """Relative paths of every symlink in ``tree``."""
    found = set()
    for dirpath, dirs, files in os.walk(tree):
        for name in files + dirs:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                found.add(os.path.relpath(p, tree))
    return found


def merge_tree(src: Path, dest: Path, what: str, *, yielding: set[str] | None = None) -> None:
    """Copy ``src`` into ``dest`` (links kept).

    A path already in ``dest`` is an error, unless it is one of ``yielding`` (relative paths of
    busybox applet links), which a real program replaces.
    """
    yielding = yielding or set()
    for dirpath, dirs, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            s = Path(dirpath) / name
            d = dest / rel / name
            if os.path.lexists(d):
                if stat.S_ISDIR(os.lstat(d).st_mode) and not s.is_symlink():
                    continue
                if str(rel / name) not in yielding:
                    raise ImageError(f"{what} ships /{rel / name}, which the root already has")
                d.unlink()
            if s.is_symlink():
                d.symlink_to(os.readlink(s))
            else:
                shutil.copy2(s, d)


def write_tarball(tree: Path, out: Path) -> None:
    """A reproducible gzip'd tar of ``tree``: sorted, owned by 0:0, every mtime fixed."""

    def norm(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = MTIME
        return ti

    with open(out, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=MTIME) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for dirpath, dirs, files in os.walk(tree):
            dirs.sort()
            base = Path(dirpath)
            rel = base.relative_to(tree)
            if rel != Path("."):
                tar.add(base, arcname=str(rel), recursive=False, filter=norm)
            for name in sorted(files + [d for d in dirs if (base / d).is_symlink()]):
                tar.add(base / name, arcname=str(rel / name), recursive=False, filter=norm)
