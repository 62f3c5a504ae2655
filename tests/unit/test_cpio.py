import io
import re
import shutil
import stat
import subprocess

import pytest

from kh.appliance import cpio

ENTRIES = [
    cpio.Entry.file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755),
    cpio.Entry.symlink("bin/sh", "busybox"),
    cpio.Entry.file("init", b"#!/bin/sh\necho hi\n", 0o755),
    cpio.Entry.directory("tmp", 0o1777),
    cpio.Entry.chardev("dev/console", 5, 1, 0o600),
    cpio.Entry.blockdev("dev/ram0", 1, 0, 0o660),
    cpio.Entry.file("etc/empty", b"", 0o644),
]


def archive(entries=ENTRIES, mtime=0) -> bytes:
    buf = io.BytesIO()
    cpio.write(buf, entries, mtime=mtime)
    return buf.getvalue()


def test_roundtrip_through_our_reader():
    got = {e.path: e for e in cpio.read(archive())}
    for e in ENTRIES:
        assert got[e.path].mode == e.mode
        assert got[e.path].data == e.data
        assert got[e.path].rdev == e.rdev
    # parents were added as directories
    assert stat.S_ISDIR(got["bin"].mode) and stat.S_ISDIR(got["dev"].mode)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_lists_same_entries_modes_and_sizes():
    out = subprocess.run(["cpio", "-itv", "--quiet"], input=archive(), capture_output=True,
                         check=True).stdout.decode()
    line_re = re.compile(r"^(\S+)\s+\d+\s+(\S+)\s+(\S+)\s+(\d+,\s+\d+|\d+)\s+\w+\s+\d+\s+"
                         r"\d+\s+(\S+)(?: -> (\S+))?$")
    listed = {}
    for line in out.splitlines():
        m = line_re.match(line)
        assert m, line
        listed[m[5]] = m
    for e in ENTRIES:
        m = listed[e.path]
        assert m[1] == stat.filemode(e.mode), e.path
        assert m[2] == "root" and m[3] == "root"
        if stat.S_ISREG(e.mode):
            assert int(m[4]) == len(e.data)
        if stat.S_ISCHR(e.mode) or stat.S_ISBLK(e.mode):
            assert m[4].replace(" ", "") == f"{e.rdev[0]},{e.rdev[1]}"
        if stat.S_ISLNK(e.mode):
            assert m[6] == e.data.decode()
    assert len(listed) == len(cpio.with_parents(ENTRIES))


def test_sorted_and_reproducible():
    a = archive()
    b = archive(list(reversed(ENTRIES)))
    assert a == b
    names = [e.path for e in cpio.read(a)]
    assert names == sorted(names)


def test_fixed_owner_and_mtime():
    data = archive(mtime=1234)
    for e_off in range(0, 1):
        assert data[e_off:6] == b"070701"
    # uid, gid fields are zero and mtime is the fixed one in every header
    off = 0
    while True:
        hdr = data[off:off + 110]
        fields = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        namesize, size = fields[11], fields[6]
        name = data[off + 110: off + 110 + namesize - 1]
        if name == b"TRAILER!!!":
            break
        assert fields[2] == 0 and fields[3] == 0 and fields[5] == 1234
        off += 110 + namesize
        off += (4 - off % 4) % 4
        off += size + (4 - size % 4) % 4


def test_conflicting_duplicates_refused():
    with pytest.raises(ValueError, match="two different"):
        archive([cpio.Entry.file("a", b"1"), cpio.Entry.file("a", b"2")])


@pytest.mark.parametrize("bad", ["", "/", "a/../b", "./x"])
def test_bad_paths_refused(bad):
    with pytest.raises(ValueError):
        archive([cpio.Entry.file(bad, b"")])
