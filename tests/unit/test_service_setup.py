"""khd's configuration reaches khd whole; its files are listed once (what `kh clean` removes);
its state migrates; the host's missing parts are named before anything is made."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sqlite3
from pathlib import Path

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from kh.errors import KhError
from kh.hw import board
from kh.hw.fabric import link_error
from kh.model import NodeState
from kh.service import config, preflight
from kh.service.config import ServiceConfig
from kh.service.qemunode import node_spec
from kh.store import MIGRATIONS, SCHEMA, SCHEMA_VERSION, Store


def test_khd_gets_every_setting_on_its_command_line(tmp_path, monkeypatch):
    cfg = ServiceConfig(state_dir=tmp_path / "s", images=tmp_path / "img", nodes=3, mem_mib=512,
                        appliance="worker", api_port=1234, ssh_port=2345, server="h.example",
                        prefix="kz", uplink_netns="out", qemu="/opt/q/qemu-system-ppc")
    for var in ("KH_STATE_DIR", "KH_PREFIX", "KH_QEMU", "KH_UPLINK_NETNS"):
        monkeypatch.setenv(var, "not-wanted")  # the options, not khd's environment, count
    monkeypatch.setenv("KH_NODES", "99")
    ap = argparse.ArgumentParser()
    config.add_options(ap)
    assert config.from_options(ap.parse_args(config.to_argv(cfg))) == cfg


def test_qemu_setting_comes_from_the_environment_and_reaches_the_argv(tmp_path, monkeypatch):
    monkeypatch.setenv("KH_QEMU", "/x/fake-qemu")
    cfg = config.from_env(state_dir=tmp_path, images=tmp_path)
    assert cfg.qemu == "/x/fake-qemu"
    assert board.qemu_argv(node_spec(cfg, 1))[0] == "/x/fake-qemu"
    monkeypatch.delenv("KH_QEMU")
    cfg = config.from_env(state_dir=tmp_path, images=tmp_path)
    assert board.qemu_argv(node_spec(cfg, 1))[0] == str(tmp_path / "qemu-system-ppc")  # kh's


def test_every_path_of_khd_under_the_state_dir_is_one_clean_removes(tmp_path):
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path / "img")
    owned = cfg.state_paths

    def covered(p: Path) -> bool:
        return any(p == o or o in p.parents for o in owned)

    props = [getattr(cfg, name) for name, v in vars(ServiceConfig).items()
             if isinstance(v, property)]
    paths = [p for p in props if isinstance(p, Path)]
    paths += [cfg.node_dir(3), cfg.console_log(3), cfg.qemu_log(3)]
    under_state = [p for p in paths if cfg.state_dir in p.parents]
    assert len(under_state) >= 8
    assert all(covered(p) for p in under_state), [p for p in under_state if not covered(p)]
    assert all(cfg.state_dir == p.parent for p in owned)


def test_a_version_2_state_gains_the_failure_columns(tmp_path):
    db = tmp_path / "kh.db"
    con = sqlite3.connect(db)
    for statement in (SCHEMA + MIGRATIONS[2]).split(";"):
        if statement.strip():
            con.execute(statement)
    con.execute("INSERT INTO meta VALUES ('schema', '2')")
    con.execute("INSERT INTO meta VALUES ('next_uid', '5')")
    con.execute("INSERT INTO nodes VALUES (4, 4, 'failed', NULL, NULL, '/w', 1.0, 'old')")
    con.commit()
    con.close()
    store = Store(db)
    (r,) = store.nodes()
    assert (r.number, r.state, r.reason, r.attempts, r.retry_at) == \
        (4, NodeState.FAILED, "old", 0, None)
    store.node_failed(4, "new", attempts=2, retry_at=9.5)
    store.node_starting(4, pid=77)
    r = store.node(4)
    assert r is not None and (r.state, r.pid, r.attempts, r.retry_at, r.reason) == \
        (NodeState.STARTING, 77, 2, None, "new")
    store.node_free(4, 77, 10.0)
    assert store.nodes(NodeState.FREE)[0].reason is None
    store.close()
    assert sqlite3.connect(db).execute("SELECT value FROM meta WHERE key='schema'"
                                       ).fetchone()[0] == str(SCHEMA_VERSION)
    assert Store(db).node(4).resetting is False  # type: ignore[union-attr]


def test_missing_image_is_named_with_the_command_that_builds_it(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    for name in ("u-boot.elf", "shell.cpio.gz.uimg"):
        (img / name).write_bytes(b"x")
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=img)
    with pytest.raises(KhError) as e:
        preflight.check_images(cfg)
    assert str(e.value) == (f"image {img / 'uImage'} is missing (build the images: "
                            "`make images` or `kh images build`)")


def test_kh_service_start_refuses_a_missing_image_before_making_anything(tmp_path):
    from kh.service import control
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path / "nothing-here")
    with pytest.raises(KhError, match=r"u-boot\.elf is missing"):
        control.start(cfg)
    assert list(tmp_path.iterdir()) == []


def test_missing_program_names_its_package(tmp_path, monkeypatch):
    img = tmp_path
    for name in ("u-boot.elf", "uImage", "shell.cpio.gz.uimg"):
        (img / name).write_bytes(b"x")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    own = ServiceConfig(state_dir=tmp_path / "state", images=img)  # kh's QEMU: an image
    with pytest.raises(KhError, match=r"qemu-system-ppc is missing \(build the images: .*"
                       r"kh images build`, or KH_QEMU=qemu-system-ppc for Debian's QEMU\)"):
        preflight.check_images(own)
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=img, qemu="qemu-system-ppc")
    with pytest.raises(KhError) as e:
        preflight.check_programs(cfg)
    assert str(e.value).startswith("qemu-system-ppc is not installed (not on PATH) (it comes "
                                   "with the Debian package qemu-system-ppc")
    nsenter = dataclasses.replace(cfg, qemu="/bin/sh")
    with pytest.raises(KhError, match=r"nsenter is not installed.*util-linux"):
        preflight.check_programs(nsenter)


def test_missing_tun_device_names_the_module(tmp_path):
    with pytest.raises(KhError) as e:
        preflight.check_tun(tmp_path / "tun")
    assert "tun driver" in str(e.value) and "`modprobe tun`" in str(e.value)
    preflight.check_tun(tmp_path)  # a path that exists passes


@pytest.mark.parametrize(("kind", "code", "text"), [
    ("tuntap", errno.ENOENT, "cannot create tap kq1s0: /dev/net/tun is missing (load the tun "
                             "module: `modprobe tun`)"),
    ("bridge", errno.EOPNOTSUPP, "cannot create bridge kqbr3: the kernel has no bridge driver "
                                 "(load the bridge module: `modprobe bridge`)"),
    ("veth", errno.EOPNOTSUPP, "cannot create veth kqup0: the kernel has no veth driver (load "
                               "the veth module: `modprobe veth`)"),
    ("bridge", errno.EEXIST, "cannot create bridge kqbr3: File exists"),
])
def test_a_missing_kernel_driver_is_named(kind, code, text):
    name = {"tuntap": "kq1s0", "bridge": "kqbr3", "veth": "kqup0"}[kind]
    assert str(link_error(kind, name, NetlinkError(code))) == text
