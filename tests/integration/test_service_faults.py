"""Issue 9: a pool whose nodes cannot start says why everywhere, `kh service start` fails with
the reason, and `kh clean` leaves the host exactly as it found it (after a khd stopped or killed
mid-work: test_service_stops.py).

Each test runs its own khd through the real CLI and kh.service.control, with its own name
prefix, state directory and ports (tests/integration/faultkhd.py). The failing "QEMU" is a
script named by the `qemu` setting (KH_QEMU); those tests need no images (placeholder files
stand in), the real-QEMU ones do.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kh import textobj
from kh.service import control
from kh.service.config import ServiceConfig
from kh.service.statedir import MARKER
from tests.integration.conftest import credfile, kh, khget, ps
from tests.integration.faultkhd import NODES, ROM, Setup, fake_images, script, setup, wait_for


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces, bridges, taps)")


@pytest.fixture
def failing(tmp_path: Path) -> Iterator[Setup]:
    """A pool whose QEMU prints QEMU's error for a missing option ROM and exits 1."""
    qemu = script(tmp_path / "qemu-exits", f"echo '{ROM}' >&2\nexit 1\n")
    s = setup(tmp_path, "f", fake_images(tmp_path / "img"), str(qemu))
    yield s
    control.clean(s.cfg)


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
        "there)", "live page: off (khd runs without --page-port)"]

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
