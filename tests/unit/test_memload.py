import os

import pytest

from kh.hw import memload


def test_write_lands_at_the_address_and_nothing_else_changes(tmp_path):
    ram = tmp_path / "ram"
    ram.write_bytes(b"\xaa" * (1 << 20))
    data = bytes(range(256)) * 40  # unaligned address and length
    memload.write(ram, 0x12345, data)
    assert memload.read(ram, 0x12345, len(data)) == data
    whole = ram.read_bytes()
    assert whole[:0x12345] == b"\xaa" * 0x12345
    assert whole[0x12345 + len(data):] == b"\xaa" * (len(whole) - 0x12345 - len(data))


def test_write_beyond_the_ram_is_refused(tmp_path):
    ram = tmp_path / "ram"
    ram.write_bytes(b"\0" * 4096)
    with pytest.raises(memload.LoadError, match="outside"):
        memload.write(ram, 4000, b"x" * 200)


def test_ram_file_is_found_among_qemus_fds(tmp_path):
    fd = tmp_path / "42" / "fd"
    fd.mkdir(parents=True)
    os.symlink("/dev/null", fd / "0")
    os.symlink("socket:[123]", fd / "3")
    os.symlink("/memfd:memory-backend-memfd (deleted)", fd / "11")
    assert memload.ram_file(42, proc=tmp_path) == fd / "11"


def test_ram_file_missing_or_process_gone(tmp_path):
    (tmp_path / "7" / "fd").mkdir(parents=True)
    with pytest.raises(memload.LoadError, match="not shared"):
        memload.ram_file(7, proc=tmp_path)
    with pytest.raises(memload.LoadError, match="gone"):
        memload.ram_file(8, proc=tmp_path)


def test_load_files_puts_each_file_at_its_address(tmp_path, monkeypatch):
    from kh.hw.board import Load

    ram = tmp_path / "ram"
    ram.write_bytes(b"\0" * (1 << 20))
    monkeypatch.setattr(memload, "ram_file", lambda pid: ram)
    (tmp_path / "k").write_bytes(b"kernel" * 100)
    (tmp_path / "r").write_bytes(b"ramdisk" * 100)
    memload.load_files(42, (Load(tmp_path / "k", 0x1000), Load(tmp_path / "r", 0x80000)))
    assert memload.read(ram, 0x1000, 600) == b"kernel" * 100
    assert memload.read(ram, 0x80000, 700) == b"ramdisk" * 100
    with pytest.raises(memload.LoadError, match=r"cannot read .*missing"):
        memload.load_files(42, (Load(tmp_path / "missing", 0),))


def test_khd_nodes_hold_no_copy_of_their_images(tmp_path):
    """Issue 13: QEMU's -device loader kept a copy of the kernel and the appliance for resets,
    6.2 MiB in every node's QEMU for as long as it ran; khd writes them itself."""
    from kh.hw import board
    from kh.service import qemunode
    from kh.service.config import ServiceConfig

    cfg = ServiceConfig(state_dir=tmp_path, images=tmp_path, prefix="kb")
    argv = board.qemu_argv(qemunode.node_spec(cfg, 3))
    assert not [a for a in argv if a.startswith("loader,")]
    b = board.BOARDS["ppce500"]
    assert qemunode.default_loads(cfg) == (
        board.Load(tmp_path / "uImage", b.loadaddr),
        board.Load(tmp_path / f"{cfg.appliance}.cpio.gz.uimg", b.ramfsaddr))
