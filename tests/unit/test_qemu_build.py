"""kh's own QEMU for its nodes (images/recipes/qemu.toml): its recipe, how it is published,
and which QEMU the direct backend's nodes run."""

import inspect
import os
from pathlib import Path

from kh.images import build, qemubuild, recipe
from kh.service.config import QEMU_PROGRAM as KH_QEMU
from kh.service.config import ServiceConfig

REPO = Path(__file__).resolve().parents[2]


def shipped() -> dict[str, recipe.Recipe]:
    return recipe.load_all(REPO / "images" / "recipes")


def test_qemu_recipe_key_covers_device_config_and_patches():
    r = shipped()["qemu"]
    files = [f.relative_to(REPO).as_posix() for f in r.input_files(REPO)]
    assert "images/qemu/ppc-softmmu.mak" in files
    assert any(f.startswith("images/patches/qemu/") and f.endswith(".patch") for f in files)
    argv = qemubuild.configure_argv(r, Path("/src"))
    assert argv[0] == "/src/configure"
    assert {"--target-list=ppc-softmmu", "--without-default-devices",
            "--without-default-features", "--enable-seccomp", "--enable-malloc-trim",
            "--with-devices-ppc=kh"} <= set(argv)
    devices = (REPO / "images/qemu/ppc-softmmu.mak").read_text()
    for needed in ("CONFIG_E500PLAT=y", "CONFIG_VIRTIO_NET=y", "CONFIG_VIRTIO_BALLOON=y"):
        assert needed in devices


def test_other_recipes_keys_do_not_take_the_qemu_builder():
    # Adding kh's QEMU must not rebuild the kernel, U-Boot, the root or its packages.
    code = inspect.getsource(qemubuild).encode()
    for r in shipped().values():
        assert (code in build._builder_code(r)) == (r.builder == "qemu"), r.name


def test_publish_keeps_a_programs_mode(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.write_bytes(b"\x7fELF program")
    src.chmod(0o755)
    build._publish_file(src, dest)
    assert os.access(dest, os.X_OK) and dest.read_bytes() == src.read_bytes()
    dest.chmod(0o644)  # same bytes, lost its mode: published again
    build._publish_file(src, dest)
    assert dest.stat().st_mode & 0o777 == 0o755


def test_khs_qemu_is_the_default(tmp_path):
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path)
    assert cfg.node_qemu == str(tmp_path / KH_QEMU) and cfg.runs_khs_qemu  # default: kh's own
    assert tmp_path / KH_QEMU in cfg.images_needed  # preflight: `kh images build` when missing
    debian = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path, qemu=KH_QEMU)
    assert debian.node_qemu == KH_QEMU and not debian.runs_khs_qemu  # Debian's, on PATH
    assert tmp_path / KH_QEMU not in debian.images_needed
    own = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path,
                        qemu=str(tmp_path / KH_QEMU))
    assert own.node_qemu == str(tmp_path / KH_QEMU) and own.runs_khs_qemu
    libvirt = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path, backend="libvirt",
                            qemu=str(tmp_path / KH_QEMU))
    assert not libvirt.runs_khs_qemu  # its nodes run the libvirt host's QEMU
    other = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path, qemu="/x/qemu")
    assert other.node_qemu == "/x/qemu" and not other.runs_khs_qemu
