"""A reproducible newc cpio writer.

Entries are sorted, owned by uid/gid 0, stamped with one fixed mtime and numbered in order, so
the same tree always gives the same bytes. Device nodes are written from their numbers, so no
root privileges and no real ``mknod`` are needed.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member; ``path`` is relative (no leading slash)."""

    path: str
    mode: int  # full st_mode, type bits included
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @staticmethod
    def directory(path: str, perm: int = 0o755) -> Entry:
        return Entry(path, stat.S_IFDIR | perm)

    @staticmethod
    def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
        return Entry(path, stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(path: str, target: str) -> Entry:
        return Entry(path, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def chardev(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))

    @staticmethod
    def blockdev(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return Entry(path, stat.S_IFBLK | perm, rdev=(major, minor))


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _header(ino: int, e: Entry, name: bytes, mtime: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(e.mode) else 1
    fields = (ino, e.mode, 0, 0, nlink, mtime, len(e.data), 0, 0, e.rdev[0], e.rdev[1],
              len(name) + 1, 0)
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def normalise(path: str) -> str:
    p = path.strip("/")
    if not p or any(part in ("", ".", "..") for part in p.split("/")):
        raise ValueError(f"bad archive path: {path!r}")
    return p


def with_parents(entries: Iterable[Entry]) -> list[Entry]:
    """Add a 0755 directory for every parent a member needs; sort by path; refuse duplicates."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        p = normalise(e.path)
        if p in by_path and by_path[p] != Entry(p, e.mode, e.data, e.rdev):
            raise ValueError(f"two different archive members for /{p}")
        by_path[p] = Entry(p, e.mode, e.data, e.rdev)
    for p in list(by_path):
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            by_path.setdefault(d, Entry.directory(d))
    return [by_path[p] for p in sorted(by_path)]


def write(out: BinaryIO, entries: Iterable[Entry], mtime: int = 0) -> int:
    """Write a newc archive of ``entries`` (parents added, sorted); return bytes written."""
    n = 0
    for ino, e in enumerate(with_parents(entries), start=1):
        name = e.path.encode()
        hdr = _header(ino, e, name, mtime)
        chunk = hdr + name + b"\0"
        chunk += _pad(len(chunk)) + e.data + _pad(len(e.data))
        out.write(chunk)
        n += len(chunk)
    trailer_name = TRAILER.encode()
    hdr = MAGIC + b"".join(b"%08X" % f for f in (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0,
                                                 len(trailer_name) + 1, 0))
    chunk = hdr + trailer_name + b"\0"
    chunk += _pad(len(chunk))
    out.write(chunk)
    return n + len(chunk)


def read(data: bytes) -> list[Entry]:
    """Parse a newc archive (used by tests and ``kh appliance show``)."""
    entries: list[Entry] = []
    off = 0
    while True:
        if data[off:off + 6] != MAGIC:
            raise ValueError(f"not a newc cpio member at offset {off}")
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        off += 110
        name = data[off:off + namesize - 1].decode()
        off += namesize
        off += (4 - off % 4) % 4
        body = data[off:off + size]
        off += size
        off += (4 - off % 4) % 4
        if name == TRAILER:
            return entries
        entries.append(Entry(name, mode, body, (rmaj, rmin)))
