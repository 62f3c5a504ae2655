"""One writer per AoE disk (HARDEN, item 3): the rootdisk turns on ext4's multi-mount
protection in the root it serves, and aoeroot mounts with the driver that honours it, naming
the node that holds the disk when the mount is refused. kh-aoe.sh's helpers, run by the host's
POSIX shell with stand-ins for tune2fs, mount and dmesg (tests/integration/test_aoe_writer.py
boots the real thing)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.unit.test_root_sh import FILES, sh

MMP_LINES = (
    "[  41.2] EXT4-fs warning (device etherd!e1.0): ext4_multi_mount_protect:324: "
    "Device is already active on another node.\n"
    "[  41.2] EXT4-fs warning (device etherd!e1.0): ext4_multi_mount_protect:324: MMP failure "
    "info: last update time: 1764590000, last update node: node7, last update device: "
    "etherd!e1.0\n")


def fakes(tmp: Path, mount_ok: bool, dmesg_after: str = "") -> Path:
    """Stand-ins: mount (logs its argv; fails unless ``mount_ok``, then dmesg also prints
    ``dmesg_after``), dmesg, tune2fs (logs its argv)."""
    bin_ = tmp / "bin"
    bin_.mkdir(exist_ok=True)
    log = tmp / "argv.log"
    (tmp / "dmesg.out").write_text("[   1.0] Linux version 6.1\n")
    (tmp / "dmesg.after").write_text(dmesg_after)
    scripts = {
        "mount": f'echo "mount $*" >>{log}\n'
                 + ("exit 0\n" if mount_ok else
                    f"cat {tmp / 'dmesg.after'} >>{tmp / 'dmesg.out'}\n"
                    "echo 'mount: mounting /dev/etherd/e1.0 on /newroot failed: Invalid "
                    "argument' >&2\nexit 255\n"),
        "dmesg": f"cat {tmp / 'dmesg.out'}\n",
    }
    for name, body in scripts.items():
        (bin_ / name).write_text("#!/bin/sh\n" + body)
        (bin_ / name).chmod(0o755)
    return log


def test_aoeroot_mounts_read_write_with_the_ext4_driver(tmp_path):
    log = fakes(tmp_path, mount_ok=True)
    r = sh("kh_aoe_mount e1.0 /newroot && echo mounted", tmp_path)
    assert r.stdout.strip() == "mounted", r.stderr
    assert log.read_text() == "mount -t ext4 -o rw /dev/etherd/e1.0 /newroot\n"


def test_a_disk_another_node_has_mounted_is_refused_naming_it(tmp_path):
    fakes(tmp_path, mount_ok=False, dmesg_after=MMP_LINES)
    r = sh('kh_aoe_mount e1.0 /newroot || echo "$KH_WHY"', tmp_path)
    assert r.stdout.strip() == ("AoE disk e1.0 is mounted by another node (node7): one writer "
                                "per disk (ext4 multi-mount protection); not booted"), r.stderr


def test_an_old_mmp_line_is_not_taken_for_this_mount_s(tmp_path):
    fakes(tmp_path, mount_ok=False)
    (tmp_path / "dmesg.out").write_text(MMP_LINES)  # from an earlier mount, not this one
    r = sh('kh_aoe_mount e1.0 /newroot || echo "$KH_WHY"', tmp_path)
    assert r.stdout.strip() == ("cannot mount e1.0: mount: mounting /dev/etherd/e1.0 on "
                                "/newroot failed: Invalid argument"), r.stderr


def test_the_root_disk_turns_multi_mount_protection_on(tmp_path):
    """tune2fs by its full path (busybox's own tune2fs, first in PATH, knows no -O): here a
    copy of kh-aoe.sh calls a stand-in at that place instead."""
    log = tmp_path / "argv.log"
    fake = tmp_path / "tune2fs"
    fake.write_text(f'#!/bin/sh\necho "tune2fs $*" >>{log}\n')
    fake.chmod(0o755)
    copy = tmp_path / "kh-aoe.sh"
    text = (FILES / "kh-aoe.sh").read_text()
    assert text.count("/usr/sbin/tune2fs ") == 1
    copy.write_text(text.replace("/usr/sbin/tune2fs ", f"{fake} "))
    r = subprocess.run(["sh", "-c", f". {FILES / 'kh-boot.sh'}; . {copy}; "
                        "kh_aoe_one_writer /disk/root.img && echo on"],
                       capture_output=True, text=True, timeout=10)
    assert r.stdout.strip() == "on", r.stderr
    assert log.read_text() == "tune2fs -O mmp -E mmp_update_interval=5 /disk/root.img\n"
