"""Cross-building Debian source packages for the PPC root, one small recipe per package.

A ``package`` recipe names a Debian source package (unpacked with Debian's patches applied)
and how to configure, build and install it for powerpc-linux-gnu. Each build leaves two trees:

- ``sysroot/``: the package's whole install (headers, .so links, pkg-config files), which the
  packages that depend on it compile and link against;
- ``stage/``: only what runs on a node (stripped programs and shared objects, config and data),
  which the root recipe merges.

Dependencies are other package recipes; their sysroots are merged into one directory that the
build sees through the usual variables (CPPFLAGS, LDFLAGS, PKG_CONFIG_*), so a recipe only says
what is particular to its package.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path
from typing import Any

from kh import proc
from kh.errors import ImageError, SpecError
from kh.images import apt, builders
from kh.images.recipe import Recipe

HOST = "powerpc-linux-gnu"
# configure options every autotools package gets (unknown ones only draw a warning).
AUTOTOOLS_ARGS = [f"--host={HOST}", "--build=x86_64-linux-gnu", "--prefix=/usr",
                  "--libdir=/usr/lib", "--sysconfdir=/etc", "--localstatedir=/var",
                  "--runstatedir=/run", "--disable-static", "--disable-nls",
                  "--disable-dependency-tracking"]
# What never goes on a node: development files and documentation.
DEV_GLOBS = ["usr/include/*", "usr/share/man/*", "usr/share/doc/*", "usr/share/info/*",
             "usr/share/locale/*", "usr/share/aclocal/*", "usr/share/pkgconfig/*",
             "usr/lib/pkgconfig/*", "usr/share/gtk-doc/*", "usr/share/bash-completion/*",
             "*.a", "*.la", "*.o", "usr/lib/*.cmake", "usr/lib/cmake/*", "usr/share/zsh/*",
             "lib/systemd/*", "usr/lib/systemd/*", "usr/lib/udev/*", "lib/udev/*",
             "usr/share/apport/*", "usr/share/lintian/*"]
STYLES = ("autotools", "make")


def autotools_args(configure_script: str) -> list[str]:
    """AUTOTOOLS_ARGS minus --runstatedir where configure predates autoconf 2.70 (tar,
    findutils): those scripts refuse options they do not know."""
    if "--runstatedir" in configure_script:
        return list(AUTOTOOLS_ARGS)
    return [a for a in AUTOTOOLS_ARGS if not a.startswith("--runstatedir=")]


def _strlist(recipe: Recipe, key: str) -> list[str]:
    v = recipe.params.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise SpecError(f"recipe {recipe.name}: `{key}` must be a list of strings")
    return list(v)


def _commands(recipe: Recipe, key: str) -> list[list[str]]:
    v = recipe.params.get(key, [])
    if not isinstance(v, list) or not all(
            isinstance(c, list) and c and all(isinstance(x, str) for x in c) for c in v):
        raise SpecError(f"recipe {recipe.name}: `{key}` must be a list of argument lists")
    return [list(c) for c in v]


def validate(recipe: Recipe) -> None:
    """Refuse a malformed package recipe by key before anything is fetched."""
    style = recipe.params.get("style", "autotools")
    if style not in STYLES:
        raise SpecError(f"recipe {recipe.name}: unknown style {style!r}",
                        f"known: {', '.join(STYLES)}")
    for k in ("configure", "make", "install", "keep", "drop"):
        _strlist(recipe, k)
    for k in ("pre", "post"):
        _commands(recipe, k)
    env = recipe.params.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise SpecError(f"recipe {recipe.name}: `env` must be a table of strings")


def merge_sysroots(deps: dict[str, Path], into: Path) -> None:
    """One directory holding every dependency's install, for compiling and linking against."""
    into.mkdir(parents=True, exist_ok=True)
    for name in sorted(deps):
        tree = deps[name] / "sysroot"
        if tree.is_dir():
            shutil.copytree(tree, into, symlinks=True, dirs_exist_ok=True)


def cross_env(sysroot: Path, extra: dict[str, str]) -> dict[str, str]:
    inc = sysroot / "usr/include"
    lib = sysroot / "usr/lib"
    env = {
        "CC": f"{HOST}-gcc", "CXX": f"{HOST}-g++", "CPP": f"{HOST}-gcc -E",
        "AR": f"{HOST}-ar", "RANLIB": f"{HOST}-ranlib", "STRIP": f"{HOST}-strip",
        "LD": f"{HOST}-ld", "NM": f"{HOST}-nm", "OBJDUMP": f"{HOST}-objdump",
        "CC_FOR_BUILD": "gcc", "BUILD_CC": "gcc",
        "CFLAGS": "-Os -pipe", "CXXFLAGS": "-Os -pipe",
        # Info manuals never reach a node; a Debian patch touching a .texi must not need texinfo.
        "MAKEINFO": "true",
        "CPPFLAGS": f"-I{inc}",
        # 4 KiB pages, as the node kernel uses: powerpc's default 64 KiB alignment pads every
        # small ELF file by up to 60 KiB.
        "LDFLAGS": f"-L{lib} -Wl,-rpath-link,{lib} -L{sysroot}/lib -Wl,-rpath-link,{sysroot}/lib"
                   " -Wl,-z,max-page-size=0x1000",
        "PKG_CONFIG_LIBDIR": f"{lib}/pkgconfig:{sysroot}/usr/share/pkgconfig",
        "PKG_CONFIG_SYSROOT_DIR": str(sysroot),
        "PKG_CONFIG_PATH": "",
    }
    for k, v in extra.items():
        env[k] = v
    return env


def _subst(s: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        s = s.replace("{" + k + "}", v)
    return s


def _apt_config(recipe: Recipe, cache: Path) -> Path | None:
    suite = recipe.params.get("suite")
    return apt.config(cache, suite) if suite else None


def facts(recipe: Recipe, cache: Path) -> list[str]:
    """The versions a package build takes from Debian (part of its key)."""
    return [builders.package_version("gcc-powerpc-linux-gnu"),
            apt.source_version(recipe.params["source"], _apt_config(recipe, cache))]


def build_package(recipe: Recipe, ctx: builders.Context, work: Path, dest: Path) -> None:
    validate(recipe)
    p = recipe.params
    src = apt.fetch_source(p["source"], _apt_config(recipe, ctx.sources.parent), ctx.sources,
                           work)
    builders.apply_patches(recipe, ctx, src)
    sysroot = work / "deps"
    merge_sysroots(ctx.deps, sysroot)
    install = work / "install"
    install.mkdir()
    values = {"sysroot": str(sysroot), "destdir": str(install), "jobs": str(ctx.jobs),
              "host": HOST, "src": str(src)}
    env = cross_env(sysroot, {k: _subst(v, values) for k, v in p.get("env", {}).items()})
    cwd = src / p.get("subdir", ".")

    def run(argv: list[str], label: str) -> None:
        ctx.make(recipe, [_subst(a, values) for a in argv], cwd, label=label, env=env)

    for cmd in _commands(recipe, "pre"):
        run(cmd, f"{recipe.name} {cmd[0]}")
    style = p.get("style", "autotools")
    if style == "autotools":
        run(["./configure", *autotools_args((cwd / "configure").read_text(errors="replace")),
             *_strlist(recipe, "configure")], f"{recipe.name} configure")
    run(["make", f"-j{ctx.jobs}", *_strlist(recipe, "make")], recipe.name)
    run(["make", f"DESTDIR={install}", *(_strlist(recipe, "install") or ["install"])],
        f"{recipe.name} install")
    for cmd in _commands(recipe, "post"):
        run(cmd, f"{recipe.name} {cmd[0]}")
    _finish(recipe, install, dest)


def _matches(rel: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(rel, g.rstrip("/*"))
               for g in globs)


def _finish(recipe: Recipe, install: Path, dest: Path) -> None:
    """sysroot = the whole install (minus libtool archives); stage = what runs, stripped."""
    files = [f for f in install.rglob("*") if not f.is_dir() or f.is_symlink()]
    if not files:
        raise ImageError(f"recipe {recipe.name} installed nothing")
    keep = _strlist(recipe, "keep")
    drop = DEV_GLOBS + _strlist(recipe, "drop")
    sysroot = dest / "sysroot"
    stage = dest / "stage"
    for f in sorted(files):
        rel = f.relative_to(install).as_posix()
        if not rel.endswith(".la"):
            _copy(f, sysroot / rel)
        if _matches(rel, drop) or (keep and not _matches(rel, keep)):
            continue
        _copy(f, stage / rel)
        out = stage / rel
        if not out.is_symlink() and out.is_file() and _is_elf(out):
            out.chmod(out.stat().st_mode | 0o200)
            proc.run([f"{HOST}-strip", "--strip-unneeded", str(out)],
                     what=f"strip {rel}")
    stage.mkdir(parents=True, exist_ok=True)
    sysroot.mkdir(parents=True, exist_ok=True)


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        dst.symlink_to(os.readlink(src))
    else:
        shutil.copy2(src, dst)


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def describe(params: dict[str, Any]) -> str:
    return f"{params.get('source')} ({params.get('style', 'autotools')})"
