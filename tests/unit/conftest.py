"""Shared fixtures of the unit tests: a small real PPC root from the cross toolchain."""

import shutil
import subprocess
from pathlib import Path

import pytest

CROSS_GCC = shutil.which("powerpc-linux-gnu-gcc")
CROSS_LIB = Path("/usr/powerpc-linux-gnu/lib")

needs_cross = pytest.mark.skipif(CROSS_GCC is None or not CROSS_LIB.is_dir(),
                                 reason="powerpc cross toolchain not installed (make setup)")


@pytest.fixture
def ppc_root(tmp_path):
    """A small real PPC root: Debian's cross glibc in multiarch layout + a compiled program."""
    root = tmp_path / "root"
    lib = root / "lib/powerpc-linux-gnu"
    lib.mkdir(parents=True)
    for name in ("ld.so.1", "libc.so.6", "libm.so.6"):
        shutil.copy(CROSS_LIB / name, lib / name)
    (root / "lib/ld.so.1").symlink_to("powerpc-linux-gnu/ld.so.1")
    (root / "usr/bin").mkdir(parents=True)
    src = tmp_path / "hello.c"
    src.write_text('#include <math.h>\n#include <stdio.h>\n'
                   'int main(int c, char **v) { printf("%f\\n", sqrt(c)); return 0; }\n')
    subprocess.run([CROSS_GCC, "-O2", "-o", str(root / "usr/bin/hello"), str(src), "-lm"],
                   check=True)
    (root / "bin").mkdir()
    (root / "bin/hi").symlink_to("../usr/bin/hello")
    return root
