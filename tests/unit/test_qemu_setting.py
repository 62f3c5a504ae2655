"""KH_QEMU that names no runnable program is refused by preflight in one line saying what it
names (no such file, a directory, not executable, not on PATH), not as a missing Debian
package (TRIAL13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kh.errors import KhError
from kh.service import preflight
from kh.service.config import ServiceConfig


def refusal(tmp_path: Path, qemu: str) -> KhError:
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path / "images", qemu=qemu)
    with pytest.raises(KhError) as e:
        preflight.check_programs(cfg)
    return e.value


def test_a_missing_path(tmp_path):
    e = refusal(tmp_path, str(tmp_path / "nope" / "qemu"))
    assert e.message == f"KH_QEMU={tmp_path}/nope/qemu: no such file"
    assert "KH_QEMU=qemu-system-ppc" in (e.hint or "")


def test_a_directory(tmp_path):
    e = refusal(tmp_path, str(tmp_path))
    assert e.message == f"KH_QEMU={tmp_path}: is a directory, not a program"


def test_a_file_that_is_not_executable(tmp_path):
    f = tmp_path / "qemu"
    f.write_text("")
    f.chmod(0o644)
    e = refusal(tmp_path, str(f))
    assert e.message == f"KH_QEMU={f}: not an executable file"


def test_a_name_not_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    e = refusal(tmp_path, "no-such-qemu")
    assert e.message == "KH_QEMU=no-such-qemu: no program of that name on PATH"
    assert "make setup" not in (e.hint or "")


def test_debians_qemu_missing_names_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    e = refusal(tmp_path, "qemu-system-ppc")
    assert "qemu-system-ppc" in e.message and "qemu-system" in (e.hint or "")


def test_an_executable_path_passes(tmp_path, monkeypatch):
    f = tmp_path / "qemu"
    f.write_text("#!/bin/sh\n")
    f.chmod(0o755)
    monkeypatch.setattr(preflight.shutil, "which", lambda p: "/usr/bin/" + p)
    preflight.check_programs(ServiceConfig(state_dir=tmp_path / "s", images=tmp_path / "i",
                                           qemu=str(f)))


def test_khs_own_qemu_among_the_images_must_be_executable(tmp_path):
    """Its nodes failed one start after another ('nsenter: failed to execute ...: Permission
    denied') before `kh service start` gave up; now preflight says so at once."""
    for name in ("u-boot.elf", "uImage", "shell.cpio.gz.uimg", "qemu-system-ppc"):
        (tmp_path / name).write_bytes(b"x")
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path)
    (tmp_path / "qemu-system-ppc").chmod(0o644)
    with pytest.raises(KhError, match=r"qemu-system-ppc is not executable"):
        preflight.check_images(cfg)
    (tmp_path / "qemu-system-ppc").chmod(0o755)
    preflight.check_images(cfg)
