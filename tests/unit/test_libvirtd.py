"""kh's own libvirtd (kh.hw.libvirtd): how it is started, where its files go, and what counts as
a daemon still running (no daemon is started here; tests/integration/test_libvirt.py does)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from kh.hw import libvirtd


def test_it_runs_in_kh_s_namespaces_with_private_directories(tmp_path: Path) -> None:
    d = libvirtd.Libvirtd(tmp_path / "lv", "kx-fabric")
    argv = libvirtd.argv(d)
    assert argv[:3] == ["nsenter", "--net=/run/netns/kx-fabric", "--"]
    assert argv[3:8] == ["unshare", "--mount", "--propagation", "private", "--"]
    assert argv[9:12] == ["-m", "kh.hw.libvirtd", str(d.root)]
    assert "--pid-file" in argv and str(d.pidfile) in argv
    assert d.uri == f"qemu+unix:///system?socket={tmp_path}/lv/run/libvirt-sock"
    targets = {t for _, t in libvirtd.MOUNTS}
    assert {"/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/run/lock"} <= targets
    libvirtd.prepare(d)
    conf = (d.root / "etc" / "qemu.conf").read_text()
    assert f'memory_backing_dir = "{libvirtd.RAM_DIR}"' in conf
    assert "dynamic_ownership = 0" in conf and 'user = "root"' in conf
    daemon_conf = (d.root / "etc" / "libvirtd.conf").read_text()
    assert "listen_tcp = 0" in daemon_conf and '"0700"' in daemon_conf
    assert (d.root.stat().st_mode & 0o777) == 0o700


def test_a_dead_or_zombie_daemon_is_not_running(tmp_path: Path) -> None:
    d = libvirtd.Libvirtd(tmp_path / "lv", None)
    d.root.mkdir()
    assert libvirtd.running_pid(d) is None  # no pidfile
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    d.pidfile.write_text(f"{child.pid}\n")
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert libvirtd.running_pid(d) is None  # exited, not yet reaped: a zombie
    child.wait()
    d.pidfile.write_text(f"{os.getpid()}\n")
    assert libvirtd.running_pid(d) == os.getpid()
    assert not libvirtd.answers(d)  # no socket: no daemon
