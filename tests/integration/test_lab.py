"""Labs (issue 15) against a khd of the test's own, as a user runs them: examples/webfarm.yaml
up with 2 nodes, grown to 4 by `kh up` on the changed file (the first 2 untouched: same node
ids, console logs unbroken), checked, down, and the service as before; bad input allocates
nothing; an interrupted `kh up` leaves what `kh down` removes; examples/intranet.yaml passes
its checks. A failing test keeps khd's and the nodes' console logs (tests/artifacts)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kh.hw import uboot
from kh.service.config import ServiceConfig
from tests.integration.conftest import env, keep_dir, kh, ps, uplinked_khd, wait_free

pytestmark = [pytest.mark.guest, pytest.mark.scenario]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NODES = 8  # the intranet: 6 nodes and DS's 2 disks
TIMEOUT = 1800  # seconds for one kh up on a loaded 2-core host (not a speed claim)


khd = uplinked_khd("lab-khd-logs", "kl", nodes=NODES, node_quota=NODES)


def lab_env(cfg: ServiceConfig, labs: Path) -> dict[str, str]:
    assert cfg.uplink_netns
    return {**env(cfg), "KHDO_NETNS": cfg.uplink_netns, "KH_LAB_DIR": str(labs)}


def khlab(cfg: ServiceConfig, labs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "kh.cli.main", *args], env=lab_env(cfg, labs),
                       capture_output=True, text=True, timeout=TIMEOUT)
    with (labs / "commands.log").open("a") as f:
        f.write(f"$ kh {' '.join(args)}\nexit {r.returncode}\n{r.stdout}--\n{r.stderr}\n")
    return r


def copy_lab(name: str, d: Path, *users: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLES / f"{name}.yaml", d)
    for u in users:
        (d / f"{u}cred").write_text(f"lab-test-{u}-{os.getpid()}\n")
        (d / f"{u}cred").chmod(0o600)
    return d / f"{name}.yaml"


def holdings(cfg: ServiceConfig) -> tuple[list[int], list[int]]:
    view = ps(cfg)
    return (sorted(a["id"] for a in view["allocations"]),
            sorted(d["netid"] for d in view["domains"] if d["kind"] == "private"))


def state(labs: Path, name: str) -> dict:
    return json.loads((labs / f"{name}.json").read_text())


@pytest.fixture
def labs(tmp_path: Path, artifacts: Path, khd: ServiceConfig) -> Iterator[Path]:
    """KH_LAB_DIR: the labs' state and console logs, kept in artifacts when the test fails;
    whatever a failed test left up goes."""
    d = tmp_path / "labs"
    d.mkdir()
    yield d
    for f in d.glob("*.json"):
        khlab(khd, d, "down", f.stem)
    keep_dir(d, artifacts / "labs")


def test_webfarm_grows_by_the_difference_checks_and_goes(khd, labs, tmp_path):
    wait_free(khd, 4)
    before = holdings(khd)
    f = copy_lab("webfarm", tmp_path / "w", "webfarm")
    text = f.read_text()
    # bad input: more nodes than the machine has; one error naming the line, nothing made
    f.write_text(text.replace("count: 2", "count: 100"))
    r = khlab(khd, labs, "up", str(f))
    assert r.returncode != 0 and f"{f}:12: key groups.web.count: the lab needs 100 more nodes" \
        in r.stderr, r
    assert holdings(khd) == before and not (labs / "webfarm.json").exists()

    f.write_text(text)
    r = khlab(khd, labs, "up", str(f))
    assert r.returncode == 0, r
    first = state(labs, "webfarm")["groups"]["web"]
    assert len(first["allocations"]) == 1 and len(first["allocations"][0]["nodes"]) == 2
    nodes = first["allocations"][0]["nodes"]
    logs = {n: khd.console_log(n).read_bytes() for n in nodes}
    assert all(len(uboot.READY.findall(b)) == 1 for b in logs.values()), logs

    f.write_text(text.replace("count: 2", "count: 4"))
    r = khlab(khd, labs, "up", "--dry-run", str(f))
    assert r.returncode == 0 and "web_2=$(khget -c " in r.stdout and " -x webfarm 2)" in r.stdout
    r = khlab(khd, labs, "up", str(f))
    assert r.returncode == 0, r
    assert f"web: 2 -> 4 nodes: 2 added in a new allocation; nodes {nodes[0]} {nodes[1]} " \
           "untouched" in r.stdout, r.stdout
    grown = state(labs, "webfarm")["groups"]["web"]
    assert grown["allocations"][0] == first["allocations"][0]  # same allocation, same nodes
    assert len(grown["allocations"]) == 2 and len(grown["allocations"][1]["nodes"]) == 2
    for n, old in logs.items():  # unbroken: what was logged is still there, no new boot
        now = khd.console_log(n).read_bytes()
        assert now.startswith(old) and len(uboot.READY.findall(now)) == 1, n

    r = khlab(khd, labs, "check", "webfarm")
    assert r.returncode == 0 and "ok   every web server serves its page" in r.stdout, r
    assert "1/1 checks passed" in r.stdout
    f.write_text(text.replace("count: 2", "count: 4").replace(
        'expect: "pages {{', 'expect: "pages 9{{'))
    r = khlab(khd, labs, "check", str(f))
    assert r.returncode == 1 and "FAIL every web server" in r.stdout, r
    r = khlab(khd, labs, "status", "webfarm")
    assert r.returncode == 0 and " ready " in r.stdout, r

    # one node re-booted; the others untouched
    last = grown["allocations"][1]["nodes"][1]
    r = khlab(khd, labs, "restart", "webfarm", "web[3]")
    assert r.returncode == 0 and f"web[3]: node {last} ready" in r.stdout, r
    assert len(uboot.READY.findall(khd.console_log(last).read_bytes())) == 2
    assert all(len(uboot.READY.findall(khd.console_log(n).read_bytes())) == 1 for n in nodes)

    # 4 -> 3 nodes and new keys: the newest node released, the other 3 re-booted
    f.write_text(text.replace("count: 2", "count: 3").replace(
        "    appliance: apache\n", "    appliance: apache\n    keys: kh.lab={{ lab }}\n"))
    r = khlab(khd, labs, "up", str(f))
    assert r.returncode == 0, r
    assert f"web: 4 -> 3 nodes: {last} released" in r.stdout, r.stdout
    assert "web: re-booted: keys '' -> 'kh.lab={{ lab }}'" in r.stdout, r.stdout
    assert [len(uboot.READY.findall(khd.console_log(n).read_bytes())) for n in nodes] == [2, 2]
    assert "kh.lab=webfarm" in khd.console_log(nodes[0]).read_text(errors="replace")
    r = khlab(khd, labs, "check", str(f))
    assert r.returncode == 0 and "1/1 checks passed" in r.stdout, r

    # an allocation released behind the lab's back: status says so, kh up makes it again
    second = grown["allocations"][1]["id"]
    assert kh(khd, "release", "-u", "webfarm", "-c", str(f.parent / "webfarmcred"),
              str(second)).returncode == 0
    r = khlab(khd, labs, "status", "webfarm")
    assert r.returncode == 0 and " GONE " in r.stdout, r
    r = khlab(khd, labs, "up", str(f))
    assert r.returncode == 0 and f"web: con{second} gone from the service" in r.stdout, r
    assert "web: 2 -> 3 nodes: 1 added" in r.stdout, r
    r = khlab(khd, labs, "check", str(f))
    assert r.returncode == 0 and "1/1 checks passed" in r.stdout, r

    f.unlink()  # down works from the remembered state
    r = khlab(khd, labs, "down", "webfarm")
    assert r.returncode == 0, r
    assert holdings(khd) == before and not (labs / "webfarm.json").exists()


def test_interrupted_up_leaves_what_down_removes(khd, labs, tmp_path):
    wait_free(khd, 1)
    before = holdings(khd)
    f = copy_lab("webfarm", tmp_path / "w", "webfarm")
    f.write_text(f.read_text().replace("count: 2", "count: 1"))
    p = subprocess.Popen([sys.executable, "-m", "kh.cli.main", "up", str(f)],
                         env=lab_env(khd, labs), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # stopped once its allocation is recorded
            st = labs / "webfarm.json"
            if st.exists() and state(labs, "webfarm")["groups"].get("web", {}).get(
                    "allocations"):
                break
            assert p.poll() is None, p.communicate()
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0, (out, err)
    assert holdings(khd) != before  # the interrupted lab holds its allocation and domain
    r = khlab(khd, labs, "down", "webfarm")
    assert r.returncode == 0, r
    assert holdings(khd) == before and not (labs / "webfarm.json").exists()


def test_intranet_passes_its_checks(khd, labs, tmp_path):
    wait_free(khd, NODES)
    before = holdings(khd)
    f = copy_lab("intranet", tmp_path / "i", "corp1", "corp2")
    try:
        r = khlab(khd, labs, "up", str(f))
        assert r.returncode == 0, r
        r = khlab(khd, labs, "check", "intranet")
        assert r.returncode == 0 and "12/12 checks passed" in r.stdout, r
    finally:
        r = khlab(khd, labs, "down", "intranet")
        for user in ("corp1", "corp2"):
            kh(khd, "principal", "rm", user)
    assert r.returncode == 0, r
    assert holdings(khd) == before
