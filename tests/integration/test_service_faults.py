"""Issue 9: a pool whose nodes cannot start says why everywhere, `kh service start` fails with
the reason, and `kh clean` leaves the host exactly as it found it, also after a khd that was
stopped (SIGTERM) or killed (SIGKILL) while its pool was still starting or restarting nodes.

Each test runs its own khd through the real CLI and kh.service.control, with its own name
prefix, state directory and ports. The failing "QEMU" is a script named by the `qemu` setting
(KH_QEMU); those tests need no images (placeholder files stand in), the real-QEMU ones do.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kh import textobj
from kh.service import control
from kh.service.config import ServiceConfig
from kh.service.statedir import MARKER
from tests.integration.conftest import credfile, free_port, kh, khget, ps

ROM = ('qemu-system-ppc: -device virtio-net-pci,netdev=d0,mac=52:54:00:00:01:00: '
       'failed to find romfile "efi-virtio.rom"')
NODES = 3


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces, bridges, taps)")


def snapshot(prefix: str, parent: Path) -> dict[str, list[str]]:
    """What kh could leave behind on the host: network namespaces, links of the host's own
    namespace, processes whose command line carries the prefix, files under the state dir's
    parent."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if prefix.encode() in cmd:
                words = cmd.replace(b"\0", b" ").decode(errors="replace")
                pids.append(f"{entry} {words}")
    return {
        # kh names all it makes after the prefix; others' namespaces and links (tests running
        # beside this one) are not this test's business
        "netns": sorted(line.split()[0] for line in netns.stdout.splitlines()
                        if line.strip() and prefix in line.split()[0]),
        "links": sorted(name for name in (line.split(":")[1].strip()
                                          for line in links.stdout.splitlines())
                        if prefix in name),
        "pids": sorted(pids),
        "files": sorted(str(p.relative_to(parent)) for p in parent.rglob("*")),
    }


@dataclass
class Setup:
    cfg: ServiceConfig
    parent: Path

    def snapshot(self) -> dict[str, list[str]]:
        return snapshot(self.cfg.prefix, self.parent)


def fake_images(d: Path) -> Path:
    d.mkdir()
    for name in ("u-boot.elf", "uImage", "shell.cpio.gz.uimg"):
        (d / name).write_bytes(b"placeholder: the fake QEMU never reads it\n")
    return d


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def setup(tmp_path: Path, tag: str, images: Path, qemu: str | None, nodes: int = NODES
          ) -> Setup:
    parent = tmp_path / "host"
    parent.mkdir()
    prefix = f"k{tag}{os.getpid() % 10000}"
    cfg = ServiceConfig(state_dir=parent / "state", images=images, nodes=nodes,
                        api_port=free_port(), ssh_port=free_port(), prefix=prefix,
                        qemu=qemu)
    return Setup(cfg, parent)


@pytest.fixture
def failing(tmp_path: Path) -> Iterator[Setup]:
    """A pool whose QEMU prints QEMU's error for a missing option ROM and exits 1."""
    qemu = script(tmp_path / "qemu-exits", f"echo '{ROM}' >&2\nexit 1\n")
    s = setup(tmp_path, "f", fake_images(tmp_path / "img"), str(qemu))
    yield s
    control.clean(s.cfg)


def wait_for(what: str, check, timeout: float = 180.0):  # type: ignore[no-untyped-def]
    """Poll ``check`` until it returns something true (a guard against hanging, not a time
    the test asserts)."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)
    return result


def test_kh_service_start_fails_with_the_reason_and_clean_restores_the_host(failing):
    cfg = failing.cfg
    before = failing.snapshot()
    r = kh(cfg, "service", "start")
    assert r.returncode == 1, r.stderr
    *progress, last = r.stderr.splitlines()
    assert last == (f"kh: no node of the pool could start: node 1: {ROM} (khd stopped, nothing "
                    f"of it left running; logs in {cfg.logs})")
    assert all(line.startswith("kh: starting the pool: ") for line in progress), progress
    # khd stopped and its things removed at once; only its logs stay, to be read
    after = failing.snapshot()
    assert after["netns"] == before["netns"] and after["links"] == before["links"]
    assert after["pids"] == [] and control.pid_of(cfg) is None
    assert {f.split("/")[1] for f in after["files"] if f.count("/") >= 1} == {"logs", MARKER}
    assert ROM in cfg.qemu_log(1).read_text()
    r = kh(cfg, "service", "status")
    assert r.returncode == 1 and "khd is not running" in r.stderr
    r = kh(cfg, "clean")
    assert r.returncode == 0, r.stderr
    assert failing.snapshot() == before


def test_a_failing_pool_says_why_in_ps_status_and_khget(failing):
    cfg = failing.cfg
    before = failing.snapshot()
    r = kh(cfg, "service", "start", "--no-wait")
    assert r.returncode == 0, r.stderr
    pool = wait_for("the pool to settle", lambda: (p := ps(cfg)["pool"])["ready"] and p)
    assert (pool["free"], pool["failed"]) == (0, NODES)
    nodes = ps(cfg)["nodes"]
    assert [(n["state"], n["reason"], n["attempts"], n["retry_at"]) for n in nodes] == \
        [("failed", ROM, 5, None)] * NODES
    table = kh(cfg, "ps").stdout
    assert table.count(f"start failed 5 times, given up: {ROM}") == NODES, table

    status = kh(cfg, "service", "status")
    assert status.returncode == 0
    assert status.stdout.splitlines() == [
        f"khd running: {NODES} nodes, 0 free, 0 allocated, {NODES} failed to start",
        *(f"node {n}: start failed 5 times, given up: {ROM}" for n in range(1, NODES + 1)),
        f"outside world: network namespace {cfg.prefix}-outside (kh's; `kh outside CMD` runs "
        "there)"]

    r = khget(cfg, "-c", credfile("acred"), "alice", "2")
    assert r.returncode == 1
    assert r.stderr == (f"kh: 2 nodes asked for, 0 free: {NODES} nodes failed to start "
                        f"(node 1: {ROM}) (kh ps shows them)\n")

    # bounded: each node was started exactly 5 times, and nothing of them runs
    log = cfg.khd_log.read_text()
    assert log.count("node 1 failed to start") == 5, log
    assert control.kh_qemu_pids(cfg.prefix) == []

    r = kh(cfg, "clean")
    assert r.returncode == 0, r.stderr
    assert failing.snapshot() == before


def test_a_missing_image_is_refused_before_anything_is_made(tmp_path):
    images = fake_images(tmp_path / "img")
    (images / "uImage").unlink()
    s = setup(tmp_path, "i", images, None)
    before = s.snapshot()
    r = kh(s.cfg, "service", "start")
    assert r.returncode == 1
    assert r.stderr == (f"kh: image {images / 'uImage'} is missing (build the images: "
                        "`make images` or `kh images build`)\n")
    assert s.snapshot() == before


def test_khd_failing_at_start_leaves_nothing_half_made(failing):
    """khd has made its namespace and bridges when it finds its port taken: `kh service start`
    says so in khd's own words and removes all of it."""
    cfg = failing.cfg
    before = failing.snapshot()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", cfg.api_port))
        taken.listen()
        r = kh(cfg, "service", "start")
    assert r.returncode == 1
    assert r.stderr == (f"kh: port {cfg.api_port} on 127.0.0.1 is in use (pick another with "
                        "--port)\n")
    after = failing.snapshot()
    assert {k: v for k, v in after.items() if k != "files"} == \
        {k: v for k, v in before.items() if k != "files"}
    assert {f.split("/")[1] for f in after["files"] if "/" in f} == {"logs", MARKER}


def hanging_qemu(path: Path, prefix: str) -> Path:
    """A QEMU that never brings its console up, with a helper process of its own that does
    not carry the node tag (its command line carries the prefix, so snapshots see it)."""
    return script(path, f"python3 -c 'import time; time.sleep(600)' helper-of-{prefix} &\n"
                        "wait\n")


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


@pytest.mark.guest
def test_a_pool_with_one_failing_node_starts_and_says_so(kh_paths, tmp_path):
    """Node 2's QEMU cannot start, the others are real: khd runs, `kh service start` says
    which node failed and why, and khget hands out the others."""
    s = setup(tmp_path, "p", kh_paths.out, None)
    qemu = script(tmp_path / "qemu-but-node2",
                  f'case "$*" in *"process={s.cfg.prefix}-node2 "*) echo \'{ROM}\' >&2; '
                  'exit 1;; esac\nexec qemu-system-ppc "$@"\n')
    cfg = ServiceConfig(**{**vars(s.cfg), "qemu": str(qemu)})
    before = s.snapshot()
    try:
        r = kh(cfg, "service", "start")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().endswith(
            f"2 of {NODES} nodes ready; 1 node failed to start (node 2: {ROM}) "
            "(kh ps shows them)"), r.stdout
        r = khget(cfg, "-c", credfile("bcred"), "bob", "2")
        assert r.returncode == 0, r.stderr
        assert [n.number for n in textobj.parse(r.stdout).nodes] == [1, 3]
        r = khget(cfg, "-c", credfile("bcred"), "bob", "1")
        assert r.returncode == 1 and f"1 node failed to start (node 2: {ROM})" in r.stderr
        assert json.loads(kh(cfg, "ps", "--json").stdout)["nodes"][1]["reason"] == ROM
        assert kh(cfg, "clean").returncode == 0
        assert s.snapshot() == before
    finally:
        control.clean(cfg)


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
