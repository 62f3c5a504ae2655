"""kh's own QEMU for its nodes: Debian's qemu source package, built for ppc-softmmu with only
what a ppce500 node needs (images/recipes/qemu.toml).

Debian's qemu-system-ppc is the full build: every PPC machine and device, 13 MB of text and
51 shared libraries, whose clean pages every node's RSS counts (docs/density.md). This build
takes the same source (Debian's patches applied) and configures it
``--target-list=ppc-softmmu --without-default-features --without-default-devices`` with the
recipe's options and device config (its ``fragment``, a configs/devices .mak file), then
publishes the stripped ``qemu-system-ppc`` (mode 0755). Host build tools and libraries
(meson, ninja, glib, pixman, libfdt, libseccomp, zlib: tools/packages) come from apt.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kh import proc
from kh.errors import ImageError, ProcessError
from kh.images import apt, builders
from kh.images.recipe import Recipe

DEVICES_NAME = "kh"  # configs/devices/ppc-softmmu/kh.mak, named by --with-devices-ppc=kh
TARGET = "qemu-system-ppc"
# Output lines of a first build (ninja prints one per step), for the progress bar.
LINE_ESTIMATE = 1200


def facts(recipe: Recipe) -> list[str]:
    """What the build takes from Debian: the qemu source package's version (its .dsc hash).
    The host's compilers and libraries are not part of the key (the same bookworm everywhere,
    and a fresh root must find this machine's build in the shared cache)."""
    return [apt.source_version(recipe.params["source"], None)]


def configure_argv(recipe: Recipe, src: Path) -> list[str]:
    """configure's command line: the recipe's options and kh's device config."""
    options = recipe.params["configure"]
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ImageError(f"recipe {recipe.name}: configure must be a list of options")
    return [str(src / "configure"), *options, f"--with-devices-ppc={DEVICES_NAME}"]


def build_qemu(recipe: Recipe, ctx: builders.Context, work: Path, dest: Path) -> None:
    src = apt.fetch_source(recipe.params["source"], None, ctx.sources, work)
    builders.apply_patches(recipe, ctx, src)
    shutil.copyfile(recipe.repo_file("fragment", ctx.repo),
                    src / "configs" / "devices" / "ppc-softmmu" / f"{DEVICES_NAME}.mak")
    build = work / "build"
    build.mkdir()
    try:
        proc.run(configure_argv(recipe, src), cwd=build, env=builders.REPRO_ENV,
                 log_file=ctx.log, capture=False, what=f"{recipe.name}: configure")
    except ProcessError as e:
        raise ImageError(f"recipe {recipe.name}: QEMU's configure failed ({e.message})",
                         f"log: {ctx.log}; last lines:\n{e.output_tail}") from None
    ctx.line_estimate.setdefault(recipe.name, LINE_ESTIMATE)
    ctx.make(recipe, ["ninja", f"-j{ctx.jobs}", TARGET], build, label=recipe.name)
    binary = build / TARGET
    proc.run(["strip", "--strip-unneeded", str(binary)], what=f"strip {TARGET}")
    name = recipe.params.get("artifact", TARGET)
    builders.copy_artifact(binary, dest, name)
    os.chmod(dest / "artifacts" / name, 0o755)
    (dest / "configure.txt").write_text(" ".join(configure_argv(recipe, Path("."))) + "\n")
