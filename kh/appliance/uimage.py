"""U-Boot legacy image headers (what ``mkimage -T ramdisk`` writes and ``bootm`` checks).

kh writes ramdisk headers itself so the builder needs no U-Boot tools, and reads headers to
refuse a missing, truncated or corrupt kernel or ramdisk before a node ever sees it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from kh.errors import ImageError

MAGIC = 0x27051956
HEADER = struct.Struct(">IIIIIIIBBBB32s")
OS_LINUX = 5
ARCH_PPC = 7
TYPES = {"kernel": 2, "ramdisk": 3, "multi": 4, "script": 6}
TYPE_NAMES = {v: k for k, v in TYPES.items()}
COMP = {"none": 0, "gzip": 1, "bzip2": 2, "lzma": 3, "lzo": 4, "lz4": 5, "zstd": 6}
COMP_NAMES = {v: k for k, v in COMP.items()}


@dataclass(frozen=True)
class Header:
    name: str
    type: str
    comp: str
    arch: int
    os: int
    size: int
    load: int
    entry: int
    time: int
    dcrc: int


def wrap(payload: bytes, *, name: str, type: str = "ramdisk", comp: str = "none",
         load: int = 0, entry: int = 0, time: int = 0) -> bytes:
    """Return ``payload`` with a legacy image header in front (PowerPC, Linux)."""
    raw_name = name.encode()[:31]
    dcrc = zlib.crc32(payload) & 0xFFFFFFFF
    fields = [MAGIC, 0, time, len(payload), load, entry, dcrc, OS_LINUX, ARCH_PPC,
              TYPES[type], COMP[comp], raw_name]
    hcrc = zlib.crc32(HEADER.pack(*fields)) & 0xFFFFFFFF
    fields[1] = hcrc
    return HEADER.pack(*fields) + payload


def parse(data: bytes, *, what: str = "image", verify_data: bool = True) -> Header:
    """Check magic, header CRC and (optionally) data CRC; raise ImageError naming ``what``."""
    if len(data) < HEADER.size:
        raise ImageError(f"{what} is too short to be a U-Boot image ({len(data)} bytes)",
                         "rebuild it with `kh images build`")
    f = list(HEADER.unpack_from(data))
    if f[0] != MAGIC:
        raise ImageError(f"{what} is not a U-Boot image (bad magic 0x{f[0]:08x})",
                         "kernels must be uImages, ramdisks wrapped with `mkimage -T ramdisk`")
    hcrc = f[1]
    f[1] = 0
    if zlib.crc32(HEADER.pack(*f)) & 0xFFFFFFFF != hcrc:
        raise ImageError(f"{what} has a corrupt U-Boot header (header CRC mismatch)",
                         "rebuild it with `kh images build`")
    size = f[3]
    body = data[HEADER.size:HEADER.size + size]
    if len(body) != size:
        raise ImageError(f"{what} is truncated: header says {size} bytes, file has {len(body)}",
                         "rebuild it with `kh images build`")
    if verify_data and zlib.crc32(body) & 0xFFFFFFFF != f[6]:
        raise ImageError(f"{what} is corrupt (data CRC mismatch)",
                         "rebuild it with `kh images build`")
    return Header(name=f[11].rstrip(b"\0").decode("latin-1"),
                  type=TYPE_NAMES.get(f[9], str(f[9])), comp=COMP_NAMES.get(f[10], str(f[10])),
                  arch=f[8], os=f[7], size=size, load=f[4], entry=f[5], time=f[2], dcrc=f[6])


def check_file(path: Path, *, type: str, what: str) -> Header:
    """Validate a kernel or ramdisk file before it is handed to a node."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{what} {path} does not exist",
                         "build images with `kh images build` or pass an existing file") from None
    except OSError as e:
        raise ImageError(f"cannot read {what} {path}: {e.strerror}") from None
    hdr = parse(data, what=f"{what} {path}")
    if hdr.arch != ARCH_PPC:
        raise ImageError(f"{what} {path} is not a PowerPC image (arch {hdr.arch})")
    if hdr.type != type and not (type == "kernel" and hdr.type == "multi"):
        raise ImageError(f"{what} {path} is a U-Boot {hdr.type} image, expected {type}")
    return hdr
