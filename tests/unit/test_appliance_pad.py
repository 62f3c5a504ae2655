"""Appliance ramdisks end clear of the top of U-Boot's boot map, where U-Boot writes the kernel
command line over whatever is there (kh.appliance.builder.pad_below_top): the gateway appliance
once ended 93 bytes below it and every node it booted panicked (Initramfs unpacking failed)."""

from __future__ import annotations

import gzip

import pytest

from kh.appliance import builder, uimage
from kh.settings import paths


@pytest.mark.parametrize("size", [1, 2048, 3071, 3072, 3073, 4003, 4095, 4096, 4097, 8191, 8192])
def test_padding_leaves_top_clear_with_zero_bytes_only(size):
    payload = b"\x1f" * size
    out = builder.pad_below_top(payload)
    assert out.startswith(payload) and set(out[size:]) <= {0}
    assert -len(out) % 4096 >= builder.TOP_CLEAR, (size, len(out))
    assert len(out) - size <= builder.TOP_CLEAR
    if -size % 4096 >= builder.TOP_CLEAR:
        assert out == payload  # already clear: unchanged


def test_zero_bytes_after_the_gzip_member_are_skipped():
    """What the kernel does with them (init/initramfs.c skips zero bytes between archives);
    Python's gzip does the same."""
    data = bytes(range(256)) * 64
    gz = gzip.compress(data, mtime=0)
    for n in (1, 500, builder.TOP_CLEAR):
        assert gzip.decompress(gz + bytes(n)) == data


def test_built_appliances_end_clear_of_the_top():
    out = paths().out
    images = sorted(out.glob("*.cpio.gz.uimg")) if out.is_dir() else []
    if not images:
        pytest.skip("no appliance built in images/out")
    for path in images:
        size = uimage.parse(path.read_bytes(), verify_data=False).size
        assert -size % 4096 >= builder.TOP_CLEAR, (path.name, size)
