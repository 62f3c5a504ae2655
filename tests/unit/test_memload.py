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
