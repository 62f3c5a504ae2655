"""examples/intranet/run.sh (Figure 3 with growth) against a khd of the test's own, as a user
runs it: every check passes and every file written before, during and after the growth reads
back; a kept intranet is not touched by a second run and goes with --down; Ctrl-C and a disk
node killed mid-run leave nothing of the intranet behind, and another principal's nodes are
never touched. A failing run keeps its report and every console log under tests/artifacts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kh.service.config import ServiceConfig
from tests.integration.conftest import (
    ARTIFACTS,
    allocate,
    credfile,
    env,
    keep_dir,
    kh,
    ps,
    release,
    uplinked_khd,
    wait_free,
)

pytestmark = [pytest.mark.guest, pytest.mark.scenario]
RUN = Path(__file__).resolve().parents[2] / "examples" / "intranet" / "run.sh"
NODES = 14  # the intranet's 12 at its peak, a bystander's, one spare
RUN_TIMEOUT = 3600  # seconds for one whole run on a loaded 2-core host (not a speed claim)


khd = uplinked_khd("intranet-khd-logs", "ki", nodes=NODES, node_quota=NODES)


@pytest.fixture
def workdir(request: pytest.FixtureRequest, tmp_path: Path, khd: ServiceConfig
            ) -> Iterator[Path]:
    """run.sh's --dir; copied to tests/artifacts when the test fails (report, console logs).
    Afterwards the operator removes corp1 and corp2 (the next test's run registers them with
    credentials of its own directory)."""
    d = tmp_path / "intranet"
    yield d
    for user in ("corp1", "corp2"):
        kh(khd, "principal", "rm", user)
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        keep = ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.nodeid)
        shutil.rmtree(keep, ignore_errors=True)
        keep_dir(d, keep)
        print(f"\nintranet report and console logs kept in {keep}")


def run_env(cfg: ServiceConfig) -> dict[str, str]:
    e = env(cfg)
    assert cfg.uplink_netns
    e["KHDO_NETNS"] = cfg.uplink_netns  # the outside world's web server goes there
    return e


def intranet(cfg: ServiceConfig, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RUN), "--dir", str(workdir), *args], env=run_env(cfg),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)


def start(cfg: ServiceConfig, workdir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(RUN), "--dir", str(workdir), *args], env=run_env(cfg),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(p: subprocess.Popen[str], pattern: str, seen: list[str]) -> None:
    """Lines of ``p`` until one matches ``pattern`` (all kept in ``seen``)."""
    assert p.stdout is not None
    for line in p.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return
    raise AssertionError(f"run.sh ended without {pattern!r}:\n{''.join(seen)[-3000:]}")


NOTHING = {"allocations": [], "domains": [], "tokens corp1": [], "tokens corp2": []}


def left_of(cfg: ServiceConfig, workdir: Path, *users: str) -> dict[str, Any]:
    """What the principals (credentials in ``workdir``) hold in khd's state: allocations,
    private domains, active tokens."""
    view = ps(cfg)
    out: dict[str, Any] = {
        "allocations": [a for a in view["allocations"] if a["principal"] in users],
        "domains": [d for d in view["domains"] if d["owner"] in users]}
    for u in users:
        r = kh(cfg, "token", "list", "-u", u, "-c", str(workdir / f"{u}cred"), "--json")
        out[f"tokens {u}"] = [] if r.returncode else \
            [t for t in json.loads(r.stdout) if t.get("state") == "active"]
    return out


@pytest.fixture
def bystander(khd: ServiceConfig) -> Iterator[tuple[int, list[int]]]:
    """Another principal's allocation that lives through the test: never touched."""
    wait_free(khd, 1)
    alloc, nodes, _ = allocate(khd, "-i", "-c", credfile("bystandercred"), "bystander", "1")
    yield alloc, nodes
    release(khd, "bystander", "bystandercred", alloc)


def untouched(cfg: ServiceConfig, bystander: tuple[int, list[int]]) -> None:
    alloc, nodes = bystander
    view = ps(cfg)
    assert [a["nodes"] for a in view["allocations"] if a["id"] == alloc] == [nodes], view
    assert all(n["state"] == "allocated" for n in view["nodes"] if n["node"] in nodes), view


def test_figure3_checks_grows_and_leaves_nothing(khd, workdir, bystander):
    wait_free(khd, 12, timeout=300)
    r = intranet(khd, workdir, "--json", "--keep")
    rep = json.loads(r.stdout) if r.stdout.startswith("{") else {}
    assert r.returncode == 0 and rep.get("ok"), f"{r.stderr[-4000:]}\n{r.stdout[-2000:]}"
    assert all(c["ok"] for c in rep["checks"]) and len(rep["checks"]) >= 11, rep["checks"]
    g = rep["growth"]
    assert g["disks"] == [2, 4] and g["size_mb"][1] > g["size_mb"][0], g
    w = g["writer"]
    assert w["errors"] == 0 and all(w["files"][p] > 0 for p in ("before", "during", "after")), w
    assert g["mismatched"] == [] and g["verified"] >= sum(w["files"].values()) + 8, g
    assert (workdir / "report.txt").read_text().startswith("intranet (Figure 3): PASSED")
    assert not (workdir / "corp1cred").stat().st_mode & 0o077
    kept = left_of(khd, workdir, "corp1", "corp2")
    assert len(kept["allocations"]) == 8, kept  # GW, FS, DS, workers x2, disks x2, corp2 1
    # A second run, in the same directory or another, touches none of it.
    again = intranet(khd, workdir, "--no-growth")
    assert again.returncode != 0 and "--down" in again.stderr, again
    other_dir = intranet(khd, workdir.parent / "elsewhere", "--no-growth")
    assert other_dir.returncode != 0, other_dir
    assert left_of(khd, workdir, "corp1", "corp2") == kept
    untouched(khd, bystander)
    down = intranet(khd, workdir, "--down")
    assert down.returncode == 0, down.stderr
    assert left_of(khd, workdir, "corp1", "corp2") == NOTHING
    untouched(khd, bystander)


def test_ctrl_c_leaves_nothing_behind(khd, workdir, bystander):
    wait_free(khd, 8, timeout=300)
    p = start(khd, workdir, "--no-growth")
    seen: list[str] = []
    try:
        read_until(p, r"^\$ ds=\$\(khget ", seen)  # GW and FS are allocated, DS is next
    finally:
        p.send_signal(signal.SIGINT)
        out = p.communicate(timeout=600)[0]
    assert p.returncode == 130, "".join(seen) + out
    assert "kh: stopped by SIGINT" in out, out
    assert left_of(khd, workdir, "corp1", "corp2") == NOTHING
    untouched(khd, bystander)
    rep = json.loads((workdir / "report.json").read_text())
    assert rep["ok"] is False and "SIGINT" in (rep["error"] or ""), rep


def test_a_disk_node_killed_mid_run_is_reported_not_waited_for(khd, workdir, bystander):
    wait_free(khd, 12, timeout=300)
    p = start(khd, workdir)
    seen: list[str] = []
    try:
        read_until(p, r"khwrite start ", seen)  # the writer runs; the growth comes next
        view = ps(khd)
        ours = {a["id"] for a in view["allocations"] if a["principal"] == "corp1"}
        named = {int(m) for m in re.findall(r"^    con(\d+): ", "".join(seen), re.M)}
        disk_alloc = min(ours - named)  # made by khgetdisk inside DS
        disk = next(n for n in view["nodes"] if n["allocation"] == disk_alloc)
        os.kill(disk["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        out = p.communicate(timeout=RUN_TIMEOUT)[0]
    finally:
        if p.poll() is None:
            p.kill()
    seen.append(out)
    text = "".join(seen)
    assert p.returncode == 1, text[-4000:]
    rep = json.loads((workdir / "report.json").read_text())
    assert any(f.startswith(f"disk node {disk['node']} ") and "died" in f
               for f in rep["faults"]), rep["faults"]
    assert any("file server" in f and "MISSING" in f for f in rep["faults"]), rep["faults"]
    print(f"run.sh ended {time.monotonic() - t0:.0f} s after the kill")
    assert left_of(khd, workdir, "corp1", "corp2") == NOTHING
    untouched(khd, bystander)
