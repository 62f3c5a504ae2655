"""How each kind of recipe is built, from Debian's packages only.

Every builder gets a fresh work directory and writes into ``dest``: ``artifacts/`` (files
published to images/out) and ``stage/`` (a tree the root recipe merges). Nothing here touches
the cache or images/out directly; build.py commits a finished ``dest`` atomically.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kh import proc
from kh.errors import ImageError, ProcessError
from kh.images import apt, kconfig
from kh.images.recipe import Recipe
from kh.progress import Progress

CROSS = "powerpc-linux-gnu-"
CROSS_LIBDIR = Path("/usr/powerpc-linux-gnu/lib")
TARGET_LIBDIR = "lib/powerpc-linux-gnu"
# Fixed build stamps so rebuilding the same inputs gives the same bytes where the tools allow.
REPRO_ENV = {"SOURCE_DATE_EPOCH": "1700000000", "KBUILD_BUILD_TIMESTAMP": "2023-11-14",
             "KBUILD_BUILD_USER": "kh", "KBUILD_BUILD_HOST": "kh", "LC_ALL": "C",
             "DEB_BUILD_OPTIONS": "nocheck"}
# Rough count of build-output lines, for the progress bar until a real count is cached.
LINE_ESTIMATES = {"u-boot": 900, "linux": 1400, "busybox": 1100}


@dataclass
class Context:
    repo: Path
    sources: Path  # cache of downloaded Debian source packages
    jobs: int
    log: Path
    deps: dict[str, Path] = field(default_factory=dict)  # recipe name → finished build dir
    progress: Callable[[str, float], Progress] = lambda label, total: Progress(label, total)
    line_estimate: dict[str, int] = field(default_factory=dict)

    def make(self, recipe: Recipe, argv: list[str], cwd: Path, *, label: str,
             input: bytes | None = None, env: dict[str, str] | None = None) -> int:
        """Run a build command with a progress bar over its output lines; return line count."""
        bar = self.progress(label, self.line_estimate.get(recipe.name,
                                                           LINE_ESTIMATES.get(recipe.name, 500)))
        count = 0

        def on_line(line: str) -> None:
            nonlocal count
            count += 1
            bar.advance(1, line.strip()[:60])

        try:
            proc.run(argv, cwd=cwd, env={**REPRO_ENV, **(env or {})}, input=input,
                     on_line=on_line, log_file=self.log, capture=False,
                     what=f"{recipe.name}: {' '.join(argv[:3])}")
        except ProcessError as e:
            bar.finish("failed")
            raise ImageError(f"recipe {recipe.name} failed to build ({e.message})",
                             f"log: {self.log}; last lines:\n{e.output_tail}") from None
        bar.finish("done")
        return count


# --- facts: the versions a build takes from Debian --------------------------------------

def package_version(package: str) -> str:
    try:
        out = proc.run(["dpkg-query", "-W", "-f=${Version}", package],
                       what=f"dpkg-query {package}").stdout
    except ProcessError:
        raise ImageError(f"Debian package {package} is not installed",
                         "`make setup` installs kh's build dependencies") from None
    return f"{package} {out.strip()}"


def facts(recipe: Recipe) -> list[str]:
    p = recipe.params
    out = [package_version("gcc-powerpc-linux-gnu")]
    if "source" in p:
        out.append(apt.source_version(p["source"], None))
    if "package" in p:
        out.append(package_version(p["package"]))
    for pkg in p.get("runtime", []):
        out.append(package_version(pkg))
    return out


# --- helpers ---------------------------------------------------------------------------

def apply_patches(recipe: Recipe, ctx: Context, src: Path) -> None:
    if "patches" not in recipe.params:
        return
    for patch in sorted(recipe.repo_file("patches", ctx.repo).glob("*.patch")):
        proc.run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)], cwd=src,
                 what=f"patch {patch.name}")


def configure(recipe: Recipe, ctx: Context, src: Path, base_argv: list[str] | None,
              base_file: Path | None, olddefconfig: list[str], input: bytes | None = None
              ) -> None:
    """Base config, fragment on top, let Kconfig settle, then check every option landed."""
    fragment = kconfig.parse(recipe.repo_file("fragment", ctx.repo).read_text())
    if base_argv:
        proc.run(base_argv, cwd=src, env=REPRO_ENV, what=f"{recipe.name}: {base_argv[-1]}")
    if base_file:
        shutil.copyfile(base_file, src / ".config")
    kconfig.merge(src / ".config", fragment)
    proc.run(olddefconfig, cwd=src, env=REPRO_ENV, input=input,
             what=f"{recipe.name}: {olddefconfig[-1]}")
    kconfig.check(src / ".config", fragment, f"recipe {recipe.name}")


def copy_artifact(src: Path, dest: Path, name: str) -> None:
    if not src.exists():
        raise ImageError(f"the build did not produce {src.name}")
    (dest / "artifacts").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest / "artifacts" / name)


# --- builders -------------------------------------------------------------------------

def build_uboot(recipe: Recipe, ctx: Context, work: Path, dest: Path) -> None:
    src = apt.fetch_source(recipe.params["source"], None, ctx.sources, work)
    apply_patches(recipe, ctx, src)
    mk = ["make", f"CROSS_COMPILE={CROSS}"]
    configure(recipe, ctx, src, mk + [recipe.params["defconfig"]], None, mk + ["olddefconfig"])
    ctx.make(recipe, mk + [f"-j{ctx.jobs}"], src, label=recipe.name)
    copy_artifact(src / "u-boot", dest, recipe.params.get("artifact", "u-boot.elf"))
    shutil.copyfile(src / ".config", dest / "u-boot.config")


def build_linux(recipe: Recipe, ctx: Context, work: Path, dest: Path) -> None:
    tarball = Path(recipe.params["tarball"])
    if not tarball.exists():
        raise ImageError(f"{tarball} is missing", f"apt-get install {recipe.params['package']}")
    proc.run(["tar", "-xf", str(tarball), "-C", str(work)], what=f"unpack {tarball.name}")
    trees = [p for p in work.iterdir() if p.is_dir()]
    if len(trees) != 1:
        raise ImageError(f"{tarball} did not unpack to one source tree")
    src = trees[0]
    mk = ["make", "ARCH=powerpc", f"CROSS_COMPILE={CROSS}"]
    configure(recipe, ctx, src, mk + [recipe.params["base"]], None, mk + ["olddefconfig"])
    target = recipe.params.get("target", "uImage")
    ctx.make(recipe, mk + [f"-j{ctx.jobs}", target], src, label=recipe.name)
    copy_artifact(src / "arch/powerpc/boot" / target, dest,
                  recipe.params.get("artifact", "uImage"))
    shutil.copyfile(src / ".config", dest / "linux.config")


def build_busybox(recipe: Recipe, ctx: Context, work: Path, dest: Path) -> None:
    src = apt.fetch_source(recipe.params["source"], None, ctx.sources, work)
    mk = ["make", f"CROSS_COMPILE={CROSS}"]
    configure(recipe, ctx, src, None, src / recipe.params["base"], mk + ["oldconfig"],
              input=b"\n" * 20000)
    ctx.make(recipe, mk + [f"-j{ctx.jobs}"], src, label=recipe.name)
    stage = dest / "stage"
    proc.run(mk + [f"CONFIG_PREFIX={stage}", "install"], cwd=src, env=REPRO_ENV,
             what="busybox install")
    shutil.copyfile(src / ".config", dest / "busybox.config")


BUILD: dict[str, Callable[[Recipe, Context, Path, Path], None]] = {
    "u-boot": build_uboot,
    "linux": build_linux,
    "busybox": build_busybox,
}
