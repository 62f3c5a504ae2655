"""The paper's general-purpose servers (issue 12, item 4), run as a user runs them:
examples/servers/nfsroot.sh and aoeroot.sh against the test's khd. A failing run keeps its
output, every node's console log and the scenario's report under tests/artifacts/."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from kh.scenario import ScenarioError
from tests.integration.conftest import credfile, env, principal, ps, scenario, wait_free

pytestmark = [pytest.mark.guest, pytest.mark.scenario]
REPO = Path(__file__).resolve().parents[2]
USER, CRED = "srv1", "srv1cred"


def run_script(cfg, artifacts: Path, name: str, *args: str, timeout: float = 2400
               ) -> tuple[subprocess.CompletedProcess[str], dict]:
    """examples/servers/NAME.sh as the principal, its report (--json) and its output kept in
    ``artifacts``."""
    r = subprocess.run([str(REPO / "examples" / "servers" / f"{name}.sh"), "-u", USER,
                        "-c", credfile(CRED), "--logs", str(artifacts / name), "--json", *args],
                       env=env(cfg), capture_output=True, text=True, timeout=timeout)
    (artifacts / f"{name}.output.log").write_text(f"exit {r.returncode}\n--- stdout\n{r.stdout}"
                                                  f"\n--- stderr\n{r.stderr}")
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    return r, report


def drop_domains(cfg, sc) -> None:
    """The private domains a test's own khget -p made (the scripts remove theirs)."""
    for d in ps(cfg)["domains"]:
        if d["owner"] == USER:
            sc.cli("main", "domain", "rm", "-u", USER, "-c", credfile(CRED), str(d["netid"]))


def nothing_held(cfg) -> None:
    """Nothing of the principal's is left: no allocation, no private domain, no publish."""
    now = ps(cfg)
    mine = [a for a in now["allocations"] if a["principal"] == USER]
    assert mine == [], mine
    domains = [d for d in now["domains"] if d["owner"] == USER]
    assert domains == [], domains
    assert now["publishes"] == [], now["publishes"]


def test_nfsroot_server_gives_an_ssh_login_and_serves_a_worker(khd, artifacts):
    wait_free(khd, 5)
    r, rep = run_script(khd, artifacts, "nfsroot")
    assert r.returncode == 0, r.stderr[-3000:]
    assert rep["ok"] and rep["approach"] == "nfsroot", rep
    # the root the principal logged into is the file server's export, over NFS, read-only
    assert rep["root_mount"].startswith("root: ") and ":/export/root nfs ro" in \
        rep["root_mount"], rep
    assert rep["python"].startswith("python 3.11") and " linux ppc" in rep["python"], rep
    # the worker fetched the page the principal made over ssh, with this run's token
    assert rep["page"].startswith(f"hello from node{rep['server']}:") and \
        rep["token"] in rep["page"], rep
    assert "nfsroot: ssh login on node" in r.stderr, r.stderr[-2000:]
    nothing_held(khd)


def test_aoeroot_server_boots_from_a_disk_node_and_serves_a_worker(khd, artifacts):
    wait_free(khd, 3)
    r, rep = run_script(khd, artifacts, "aoeroot")
    assert r.returncode == 0, r.stderr[-3000:]
    assert rep["ok"] and rep["approach"] == "aoeroot", rep
    # read-write on the AoE disk e1.0: ext3's layout, mounted by the ext4 driver (which alone
    # knows the multi-mount protection that keeps a second server off it)
    assert rep["root_mount"].startswith("root: /dev/etherd/e1.0 ext4 rw"), rep
    assert rep["python"].startswith("python 3.11") and " linux ppc" in rep["python"], rep
    assert rep["page"].startswith(f"hello from node{rep['server']}:") and \
        rep["token"] in rep["page"], rep
    # what the server wrote is in the disk node's RAM
    assert re.search(r"the page's bytes are in block \d+ of /disk/root.img", r.stderr), \
        r.stderr[-2000:]
    nothing_held(khd)


def test_a_root_disk_is_not_served_on_the_public_domain(khd, artifacts):
    """Any node of the public domain could mount (and write) a root disk served there."""
    wait_free(khd, 1)
    with scenario(khd, principal(USER, CRED), artifacts, "rootdisk-public") as sc:
        rd = sc.khget("-i", "-p", "1")
        with pytest.raises(ScenarioError, match=r"rootdisk node\d+: eth0 is on the public "
                                                r"domain \(kh.server is there\)"):
            sc.boot(rd, "rootdisk", keys="kh.aoe=1.0 kh.aoeif=eth0")
    drop_domains(khd, sc)
    nothing_held(khd)


def test_aoeroot_refuses_a_root_disk_two_nodes_answer(khd, artifacts):
    """Two disks on the root's address would look like two paths to one disk, and the root's
    writes would be spread over both: the server names them and does not boot."""
    wait_free(khd, 3)
    with scenario(khd, principal(USER, CRED), artifacts, "aoeroot-duplicate") as sc:
        disks = sc.khget("-p", "1", count=2)
        first, second = disks.nodes
        sc.boot(disks, "vblade", node_keys={first: "kh.aoe=1.0 kh.disksize=16M",
                                            second: "kh.aoe=1.1 kh.disksize=16M"})
        # the second node serves e1.0 as well, by hand: two MACs answer it now
        sc.check(disks, second, "setsid vblade 1 0 eth0 /disk/ram.img >/tmp/v.log 2>&1 & "
                                "for i in $(seq 50); do grep -q sectors /tmp/v.log && break; "
                                "sleep 0.2; done; grep -c sectors /tmp/v.log")
        srv = sc.khget("-n", str(disks.netid(0)))
        with pytest.raises(ScenarioError, match=rf"aoeroot node{srv.nodes[0]}: AoE address "
                                                r"e1\.0 is answered by 2 disks, MACs "
                                                r"(52:54:[0-9a-f:]{11}, ){1}52:54:[0-9a-f:]{11}; "
                                                r"not booted"):
            sc.boot(srv, "aoeroot", keys="kh.aoeroot=1.0 kh.aoeif=eth0", timeout=180)
    drop_domains(khd, sc)
    nothing_held(khd)


def test_a_root_disk_is_mounted_by_one_server_at_a_time(khd, artifacts):
    """AoE has no arbiter: a second server booting a root disk another has mounted would write
    it behind the first one's back. The rootdisk turns on ext4's multi-mount protection, so the
    second one's mount is refused, naming why; once the first is gone (released: its node
    killed with the disk mounted), a new server boots from the disk again."""
    wait_free(khd, 3)
    with scenario(khd, principal(USER, CRED), artifacts, "aoeroot-one-writer") as sc:
        rd = sc.khget("-i", "-p", "1")
        disknet = rd.netid(1)
        sc.boot(rd, "rootdisk", keys="kh.aoe=1.0 kh.aoeif=eth1", timeout=600)
        keys = "kh.aoeroot=1.0 kh.aoeif=eth0"
        first = sc.khget("-n", str(disknet))
        ready = sc.boot(first, "aoeroot", keys=keys, timeout=300)
        assert "root=e1.0" in ready[first.nodes[0]], ready
        second = sc.khget("-n", str(disknet))
        with pytest.raises(ScenarioError, match=rf"aoeroot node{second.nodes[0]}: AoE disk e1\.0 "
                                                r"is mounted by another node( \([^)]*\))?: one "
                                                r"writer per disk"):
            sc.boot(second, "aoeroot", keys=keys, timeout=300)
        sc.release(second)
        sc.release(first)  # its node dies with the disk mounted: the disk is free again
        third = sc.khget("-n", str(disknet))
        ready = sc.boot(third, "aoeroot", keys=keys, timeout=300)
        assert "root=e1.0" in ready[third.nodes[0]], ready
    drop_domains(khd, sc)
    nothing_held(khd)
