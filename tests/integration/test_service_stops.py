"""Issue 9 and 10: `kh clean` leaves the host exactly as it found it after a khd that was
stopped (SIGTERM) or killed (SIGKILL) while its pool was still starting or restarting nodes, or
in the middle of a khget; a signal stops `kh service start` and what it started; a QEMU a killed
khd had started is stopped by the next one.

Each test runs its own khd through the real CLI and kh.service.control, with its own name
prefix, state directory and ports (tests/integration/faultkhd.py); a QEMU that never brings its
console up is a script, the real-QEMU tests need the images.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from kh.service import control
from kh.service.config import ServiceConfig
from tests.integration.conftest import credfile, kh, khget, ps
from tests.integration.faultkhd import (
    NODES,
    fake_images,
    hanging_qemu,
    script,
    setup,
    wait_for,
)


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces, bridges, taps)")


def stop_mid_start(cfg: ServiceConfig, sig: int) -> None:
    """Start khd, wait until node QEMUs run but the pool is not ready, then stop khd."""
    started = control.start(cfg, wait=False)
    wait_for("node QEMUs", lambda: control.kh_qemu_pids(cfg.prefix))
    pool = ps(cfg)["pool"]
    assert not pool["ready"], pool  # really still starting
    os.kill(started.pid, sig)
    wait_for("khd to exit", lambda: control.pid_of(cfg) is None, timeout=90)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_clean_after_khd_stopped_while_restarting_nodes(tmp_path, sig):
    s = setup(tmp_path, "h", fake_images(tmp_path / "img"), None)
    qemu = hanging_qemu(tmp_path / "qemu-hangs", s.cfg.prefix)
    cfg = s.cfg = ServiceConfig(**{**vars(s.cfg), "qemu": str(qemu)})
    before = s.snapshot()
    try:
        stop_mid_start(cfg, sig)
        if sig == signal.SIGTERM:  # khd ended the starts under way, helpers and all
            assert not [p for p in s.snapshot()["pids"] if "helper-of" in p]
        r = kh(cfg, "clean")
        assert r.returncode == 0, r.stderr
        assert s.snapshot() == before
    finally:
        control.clean(cfg)


@pytest.mark.guest
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_clean_after_khd_stopped_while_its_pool_starts(kh_paths, tmp_path, sig):
    s = setup(tmp_path, "s", kh_paths.out, None, nodes=6)
    # Nodes 1-5 are real QEMUs; node 6 never brings its console up, so the pool is still
    # starting when khd is stopped (six real nodes reached their prompts before `kh ps`
    # answered in a fresh root, and the test saw a ready pool).
    qemu = script(tmp_path / "qemu-node6-hangs",
                  f'case "$*" in *"process={s.cfg.prefix}-node6 "*) '
                  f"python3 -c 'import time; time.sleep(600)' helper-of-{s.cfg.prefix} &\n"
                  "wait; exit;; esac\nexec qemu-system-ppc \"$@\"\n")
    cfg = s.cfg = ServiceConfig(**{**vars(s.cfg), "qemu": str(qemu)})
    before = s.snapshot()
    try:
        stop_mid_start(cfg, sig)
        r = kh(s.cfg, "clean")
        assert r.returncode == 0, r.stderr
        assert s.snapshot() == before
    finally:
        control.clean(s.cfg)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_stops_kh_service_start_and_what_it_started(tmp_path, sig):
    """`timeout -s TERM` and Ctrl-C take one path: khd and its node QEMUs are stopped, only
    the logs stay, and kh says so in one line with 128+signal."""
    s = setup(tmp_path, "g", fake_images(tmp_path / "img"), None)
    qemu = hanging_qemu(tmp_path / "qemu-hangs", s.cfg.prefix)
    cfg = s.cfg = ServiceConfig(**{**vars(s.cfg), "qemu": str(qemu)})
    from tests.integration.conftest import env
    try:
        p = subprocess.Popen([sys.executable, "-m", "kh.cli.main", "service", "start"],
                             env=env(cfg), stderr=subprocess.PIPE, text=True)
        wait_for("node QEMUs", lambda: control.kh_qemu_pids(cfg.prefix))
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        assert (p.returncode, err.splitlines()[-1]) == (128 + sig, f"kh: stopped by "
                                                                   f"{sig.name}")
        assert control.pid_of(cfg) is None and control.kh_qemu_pids(cfg.prefix) == []
        assert not cfg.run.exists() and cfg.khd_log.exists()
    finally:
        control.clean(cfg)


def db_rows(cfg: ServiceConfig, sql: str) -> list[tuple]:
    """A read of khd's state as it is on disk (a second reader; khd may be writing)."""
    con = sqlite3.connect(f"file:{cfg.db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.guest
def test_khd_killed_mid_khget_leaves_no_half_allocation(kh_paths, tmp_path):
    """Issue 10, item 5: khd is SIGKILLed while a khget configures its node (made slow by
    stopping the node's QEMU). After a restart nothing of the khget is left: no allocation, no
    principal, no private domain or bridge; the node's QEMU, which may hold the principal's
    khargs, is gone, and a fresh node takes its number in the pool, without khargs."""
    s = setup(tmp_path, "he", kh_paths.out, None, nodes=1)
    cfg = s.cfg
    qemu_pid = 0
    try:
        control.start(cfg)
        (node,) = ps(cfg)["nodes"]
        assert (node["node"], node["state"]) == (1, "free")
        qemu_pid = node["pid"]
        os.kill(qemu_pid, signal.SIGSTOP)  # its QMP and console stop answering
        from tests.integration.conftest import env
        getter = subprocess.Popen([sys.executable, "-m", "kh.cli.khget", "-c",
                                   credfile("ecred"), "erin"], env=env(cfg),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # under way: its node being configured (or, as before issue 10, erin already stored)
        wait_for("the khget to configure node 1", lambda: db_rows(
            cfg, "SELECT state FROM nodes WHERE number=1") == [("configuring",)] or db_rows(
            cfg, "SELECT name FROM principals"), timeout=60)
        khd = control.pid_of(cfg)
        assert khd
        os.kill(khd, signal.SIGKILL)
        wait_for("khd to die", lambda: control.pid_of(cfg) is None, timeout=30)
        os.kill(qemu_pid, signal.SIGCONT)  # a live QEMU, half configured for erin
        getter.communicate(timeout=60)
        assert getter.returncode != 0
        assert db_rows(cfg, "SELECT COUNT(*) FROM principals") == [(0,)]

        control.start(cfg)
        after = ps(cfg)
        assert after["allocations"] == [] and [d["netid"] for d in after["domains"]] == [0, 1]
        assert any(r.startswith("node 1: was being configured for a khget") for r in
                   after["repairs"]), after["repairs"]
        assert not alive(qemu_pid)
        assert db_rows(cfg, "SELECT COUNT(*) FROM principals") == [(0,)]
        assert db_rows(cfg, "SELECT COUNT(*) FROM allocations") == [(0,)]
        from kh.hw.fabric import Fabric
        assert Fabric(cfg.fabric).domain_bridges() == [0, 1]
        fresh = wait_for("a fresh node 1", lambda: [
            n for n in ps(cfg)["nodes"] if n["state"] == "free"])
        assert fresh[0]["node"] == 1 and fresh[0]["pid"] != qemu_pid
        from kh.hw import uboot
        from kh.hw.console import Console
        con = Console(cfg.node_dir(1) / "console.sock", name="node1")
        con.connect(5)
        try:
            said = uboot.uboot_command(con, "printenv khargs")
        finally:
            con.close()
        assert "kh.node=" not in said and "not defined" in said, said
        # and the machine goes on: erin's first khget registers her now
        r = khget(cfg, "-c", credfile("ecred2"), "erin")
        assert r.returncode == 0, r.stderr
        mine = json.loads(kh(cfg, "ps", "-u", "erin", "-c", credfile("ecred2"), "--json").stdout)
        assert [n["node"] for n in mine["nodes"]] == [1] and mine["nodes"][0]["pid"] is None
        listed = json.loads(kh(cfg, "principal", "list", "--json").stdout)
        assert [(p["name"], p["nodes"]) for p in listed] == [("erin", 1)]
        r = kh(cfg, "principal", "rm", "erin")
        assert r.returncode == 0 and "principal erin removed" in r.stdout, r.stderr
        assert ps(cfg)["allocations"] == [] and db_rows(cfg, "SELECT * FROM principals") == []
        wait_for("node 1 back in the pool", lambda: [
            n for n in ps(cfg)["nodes"] if n["state"] == "free"])
    finally:
        if qemu_pid and alive(qemu_pid):
            os.kill(qemu_pid, signal.SIGCONT)
        control.clean(cfg)


def test_a_qemu_a_dead_khd_started_is_stopped_when_khd_starts(tmp_path):
    """Issue 10: a QEMU started for the pool while khd was SIGKILLed (before its PID reached
    the state) survived the restart unknown to khd. The next khd stops every process that
    carries its tag and is no node of its state, and says so in its repairs."""
    s = setup(tmp_path, "o", fake_images(tmp_path / "img"), None)
    qemu = hanging_qemu(tmp_path / "qemu-hangs", s.cfg.prefix)
    cfg = s.cfg = ServiceConfig(**{**vars(s.cfg), "qemu": str(qemu)})
    before = s.snapshot()
    tag = f"{cfg.prefix}-node2"
    # what the killed khd left: node 2's QEMU, in a session of its own, known to no state
    orphan = subprocess.Popen([str(qemu), "-name", f"{tag},process={tag}"],
                              start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        wait_for("the orphan", lambda: orphan.pid in control.kh_qemu_pids(cfg.prefix))
        control.start(cfg, wait=False)
        wait_for("the orphan to be stopped", lambda: orphan.poll() is not None, timeout=60)
        assert orphan.returncode == -signal.SIGTERM
        repairs = ps(cfg)["repairs"]
        assert [r for r in repairs if f"stopped QEMU PID {orphan.pid} ({tag}, " in r and
                r.endswith("): the state did not know it")], repairs
        # its helper went with it (its process group); khd's own node 2 runs
        wait_for("khd's own nodes", lambda: len(control.kh_qemu_pids(cfg.prefix)) == NODES)
        r = kh(cfg, "clean")
        assert r.returncode == 0, r.stderr
        assert s.snapshot() == before
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait()
        control.clean(cfg)
