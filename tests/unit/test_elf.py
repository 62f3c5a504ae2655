import os
import shutil
import sys
from pathlib import Path

import pytest

from kh.appliance import builder, spec
from kh.appliance.elf import Closure, elf_info
from kh.errors import SpecError
from tests.unit.conftest import needs_cross


@needs_cross
def test_closure_of_real_ppc_binary(ppc_root):
    info = elf_info(ppc_root / "usr/bin/hello")
    assert info and info.machine == "EM_PPC" and info.elfclass == 32
    assert info.interp == "/lib/ld.so.1"
    assert set(info.needed) == {"libc.so.6", "libm.so.6"}
    cl = Closure(ppc_root)
    cl.add("/bin/hi")
    assert cl.files == {"/usr/bin/hello", "/lib/powerpc-linux-gnu/ld.so.1",
                        "/lib/powerpc-linux-gnu/libc.so.6", "/lib/powerpc-linux-gnu/libm.so.6"}
    assert cl.links == {"/bin/hi": "../usr/bin/hello", "/lib/ld.so.1": "powerpc-linux-gnu/ld.so.1"}


@needs_cross
def test_missing_library_named(ppc_root):
    (ppc_root / "lib/powerpc-linux-gnu/libm.so.6").unlink()
    with pytest.raises(SpecError,
                       match=r"libm.so.6 is not in the PPC root \(needed by /usr/bin/hello"):
        Closure(ppc_root).add("/usr/bin/hello")


def test_non_ppc_elf_refused(tmp_path):
    (tmp_path / "bin").mkdir()
    shutil.copy(sys.executable if Path(sys.executable).resolve().read_bytes()[:4] == b"\x7fELF"
                else "/bin/true", tmp_path / "bin/prog")
    with pytest.raises(SpecError, match="not a 32-bit PowerPC ELF"):
        Closure(tmp_path).add("/bin/prog")


def test_missing_file_named(tmp_path):
    with pytest.raises(SpecError, match="/usr/bin/httpd is not in the PPC root"):
        Closure(tmp_path).add("/usr/bin/httpd")


def test_symlink_loop_refused(tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(SpecError, match="too many levels"):
        Closure(tmp_path).add("/a")


@needs_cross
def test_appliance_from_root(ppc_root, tmp_path):
    d = tmp_path / "spec"
    d.mkdir()
    (d / "init").write_text("#!/bin/sh\n")
    s = spec.parse('name = "hello"\ninit = "init"\nprograms = ["/bin/hi"]\n'
                   'symlinks_to = ["/usr/bin/hello"]\n'
                   'devices = ["/dev/console c 5 1 0600"]\n', d / "hello.toml")
    out = tmp_path / "out"
    res = builder.build(s, ppc_root, out)
    assert res.path == out / "hello.cpio.gz.uimg" and res.path.exists()
    assert 0 < res.share < 1
    again = builder.build(s, ppc_root, tmp_path / "out2")
    assert again.path.read_bytes() == res.path.read_bytes()  # reproducible
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
