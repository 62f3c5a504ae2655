"""The full root's assembly: busybox links give way to real programs, the tarball is stable."""

import gzip
import os
import tarfile
from pathlib import Path

import pytest

from kh.appliance import builder
from kh.appliance.elf import Closure
from kh.errors import ImageError
from kh.images import packages, rootfs
from tests.unit.conftest import needs_cross


def tree(base: Path, files: dict[str, str], links: dict[str, str] | None = None) -> Path:
    for rel, text in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for rel, target in (links or {}).items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(target)
    return base


def test_a_real_program_replaces_a_busybox_link_only(tmp_path):
    root = tmp_path / "root"
    bb = tree(tmp_path / "bb", {"bin/busybox": "bb"},
              {"bin/ls": "busybox", "usr/bin/env": "../../bin/busybox"})
    rootfs.merge_tree(bb, root, "busybox")
    links = rootfs.links_in(bb)
    assert links == {"bin/ls", "usr/bin/env"}
    cu = tree(tmp_path / "cu", {"usr/bin/env": "gnu env", "usr/bin/ls": "gnu ls"})
    rootfs.merge_tree(cu, root, "coreutils", yielding=links)
    env = root / "usr/bin/env"
    assert env.read_text() == "gnu env" and not env.is_symlink()
    assert os.readlink(root / "bin/ls") == "busybox"  # /usr/bin/ls is another path
    other = tree(tmp_path / "other", {"bin/busybox": "mine"})
    with pytest.raises(ImageError, match="other ships /bin/busybox"):
        rootfs.merge_tree(other, root, "other", yielding=links)


def test_drop_matching_removes_docs_and_empty_dirs(tmp_path):
    t = tree(tmp_path / "deb", {"usr/share/doc/x/copyright": "c", "usr/share/man/man1/x.1": "m",
                                "usr/share/zoneinfo/UTC": "z"})
    rootfs.drop_matching(t, packages.DEV_GLOBS)
    assert sorted(str(p.relative_to(t)) for p in t.rglob("*")) == [
        "usr", "usr/share", "usr/share/zoneinfo", "usr/share/zoneinfo/UTC"]


def test_tarball_is_reproducible_and_owned_by_root(tmp_path):
    t = tree(tmp_path / "t", {"etc/passwd": "root:x:0:0::/root:/bin/bash\n", "bin/prog": "x"},
             {"bin/sh": "bash"})
    (t / "bin/prog").chmod(0o755)
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    rootfs.write_tarball(t, a)
    os.utime(t / "etc/passwd", (12345, 12345))
    rootfs.write_tarball(t, b)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["bin", "bin/prog", "bin/sh", "etc", "etc/passwd"]
        assert {(m.uid, m.gid, m.mtime) for m in members} == {(0, 0, 0)}
        assert tar.getmember("bin/sh").issym() and tar.getmember("bin/sh").linkname == "bash"
        assert tar.getmember("bin/prog").mode == 0o755
    assert gzip.open(a).read(1) is not None


def test_listed_applets_come_back_as_links_to_busybox(tmp_path):
    root = tree(tmp_path / "root", {"bin/busybox": "bb", "usr/bin/sort": "gnu sort",
                                    "usr/share/kh/applets/busybox": "/bin/ls\n/usr/bin/sort\n"},
                {"bin/ls": "busybox"})
    cl = Closure(root)
    cl.add("/bin/busybox")
    builder._listed_applets(cl, ("/bin/busybox",))
    assert cl.links["/usr/bin/sort"] == "../../bin/busybox"
    assert cl.links["/bin/ls"] == "busybox"
    # A path the appliance takes as a real file stays one.
    cl2 = Closure(root)
    cl2.add("/bin/busybox")
    cl2.add("/usr/bin/sort")
    builder._listed_applets(cl2, ("/bin/busybox",))
    assert "/usr/bin/sort" not in cl2.links


@needs_cross
def test_a_library_missing_from_the_root_is_named(ppc_root):
    rootfs.check_libraries(ppc_root)
    (ppc_root / "lib/powerpc-linux-gnu/libm.so.6").unlink()
    with pytest.raises(ImageError, match=r"libm.so.6 is not in the PPC root \(needed by /usr/bin"):
        rootfs.check_libraries(ppc_root)
