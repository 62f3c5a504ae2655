import os
import shutil
import subprocess

import pytest

from kh.appliance import uimage
from kh.errors import ImageError

mkimage = shutil.which("mkimage")


@pytest.mark.skipif(mkimage is None, reason="u-boot-tools not installed")
def test_header_matches_mkimage_byte_for_byte(tmp_path):
    payload = os.urandom(5000)
    src = tmp_path / "rd.cpio.gz"
    src.write_bytes(payload)
    ref = tmp_path / "ref.uimg"
    subprocess.run([mkimage, "-A", "powerpc", "-O", "linux", "-T", "ramdisk", "-C", "none",
                    "-n", "kh shell", "-d", str(src), str(ref)], check=True,
                   capture_output=True, env={**os.environ, "SOURCE_DATE_EPOCH": "0"})
    ours = uimage.wrap(payload, name="kh shell", type="ramdisk", time=0)
    assert ours == ref.read_bytes()


@pytest.mark.skipif(mkimage is None, reason="u-boot-tools not installed")
def test_mkimage_lists_our_image(tmp_path):
    img = tmp_path / "x.uimg"
    img.write_bytes(uimage.wrap(b"hello" * 1000, name="kh test", type="ramdisk"))
    out = subprocess.run([mkimage, "-l", str(img)], capture_output=True, text=True,
                         check=True).stdout
    assert "kh test" in out
    assert "PowerPC Linux RAMDisk Image (uncompressed)" in out
    assert "5000 Bytes" in out


def test_parse_roundtrip():
    h = uimage.parse(uimage.wrap(b"abc", name="n", type="kernel", comp="gzip", load=0x10,
                                 entry=0x20))
    assert (h.name, h.type, h.comp, h.size, h.load, h.entry) == ("n", "kernel", "gzip", 3,
                                                                  0x10, 0x20)


def test_corruption_detected():
    good = uimage.wrap(b"payload" * 100, name="n")
    with pytest.raises(ImageError, match="data CRC"):
        uimage.parse(good[:-1] + b"X")
    with pytest.raises(ImageError, match="header"):
        uimage.parse(good[:20] + b"\xff" + good[21:])
    with pytest.raises(ImageError, match="truncated"):
        uimage.parse(good[:100])
    with pytest.raises(ImageError, match="not a U-Boot image"):
        uimage.parse(b"\0" * 100)


def test_check_file_names_file_and_kind(tmp_path):
    p = tmp_path / "rd"
    p.write_bytes(uimage.wrap(b"x", name="r", type="ramdisk"))
    with pytest.raises(ImageError, match=r"kernel .*/rd is a U-Boot ramdisk image"):
        uimage.check_file(p, type="kernel", what="kernel")
    with pytest.raises(ImageError, match="does not exist"):
        uimage.check_file(tmp_path / "nope", type="kernel", what="kernel")
