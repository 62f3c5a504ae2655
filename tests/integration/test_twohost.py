"""Two kh hosts through khd (issue 16, item 4): khd of the test's own (host a, "local") and host
b on this machine (tests/integration/farhost.py: its own namespace, its own kh libvirtd reached
over ``qemu+ssh://`` through an sshd there, kh over that ssh), their fabrics joined by a veth
underlay (tests/unit/twohost.py's Wire; `kh fabric underlay` on each side, MTU 1500, so a
stretched domain's is 1450), b added with `kh host add`. One khd and host pair for the module;
the tests run in file order (the last one removes host b). A failing test keeps khd's log and
every node's console log (tests/artifacts)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kh import boot, textobj
from kh.allocation import node_address
from kh.hw import libvirtd
from kh.hw import netns as nsutil
from kh.hw.antispoof import nic_mac
from kh.service import control
from kh.service.config import ServiceConfig
from tests.integration.conftest import (
    credfile,
    env,
    kh,
    khd_log_mark,
    khget,
    kill_khd,
    ps,
    release,
    running_khd,
    shell,
    wait_khd_log,
)
from tests.integration.farhost import (
    KH,
    FarHost,
    added_far_host,
    daemon_without_ppc,
    require_far_host,
    ssh_client,
)
from tests.unit.twohost import Wire, own

pytestmark = pytest.mark.guest
WEBFARM = Path(__file__).resolve().parents[2] / "examples" / "webfarm.sh"
LOCAL_NODES, B_NODES = 2, 2


def hosts(cfg: ServiceConfig) -> dict[str, dict]:
    r = kh(cfg, "host", "list", "--json")
    assert r.returncode == 0, r.stderr
    return {h["name"]: h for h in json.loads(r.stdout)}


def wait_hosts_free(cfg: ServiceConfig, timeout: float = 180) -> None:
    """Until every node of both hosts is free again (started there, after a release too)."""
    deadline = time.monotonic() + timeout
    want = {"local": LOCAL_NODES, "hostb": B_NODES}
    while {n: hosts(cfg).get(n, {}).get("free") for n in want} != want:
        assert time.monotonic() < deadline, (hosts(cfg), ps(cfg))
        time.sleep(0.5)


def get(cfg: ServiceConfig, user: str, count: int, *opts: str) -> textobj.AllocationInfo:
    """`khget -c CRED OPTS USER COUNT`, read with kh.textobj."""
    r = khget(cfg, "-c", credfile(user + "cred"), *opts, user, str(count))
    assert r.returncode == 0, r.stderr
    return textobj.parse(r.stdout)


def free(cfg: ServiceConfig, user: str, *allocs: textobj.AllocationInfo) -> None:
    for a in allocs:
        release(cfg, user, user + "cred", a.id)


@pytest.fixture(scope="module")
def two(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, kh_paths,
        outside: str):
    """(khd's ServiceConfig, host b): b added to khd with capacity 2, every node free."""
    require_far_host()
    tmp = tmp_path_factory.mktemp("twohost")
    wire = Wire(f"{own('tw')}-wire")
    try:
        with running_khd(request, tmp / "state", kh_paths, keep_as="twohost-logs",
                         nodes=LOCAL_NODES, prefix=own("tw"), uplink_netns=outside) as cfg, \
                added_far_host(cfg, wire, tmp / "b", own("tx"), B_NODES) as far:
            wait_hosts_free(cfg)
            yield cfg, far
    finally:
        wire.close()


def booted(cfg: ServiceConfig, numbers: list[int], artifacts: Path) -> list[boot.BootedNode]:
    """Each node `run kboot` into its preloaded shell appliance, side by side."""
    with ThreadPoolExecutor(len(numbers)) as pool:
        return list(pool.map(lambda n: shell(cfg, n, artifacts), numbers))


def rx(node: boot.BootedNode) -> int:
    out, status = node.run("cat /sys/class/net/eth0/statistics/rx_packets")
    assert status == 0, out
    return int(out)


def test_one_private_domain_across_two_hosts_and_nothing_leaks(two, artifacts):
    """Bob's two nodes, each alone in a private domain of his, pinned one to each host
    (--host); then alice's 2-node allocation in one new private domain, placed one node on
    each host (fill: local's last free node, then hostb's). Alice's nodes have MTU 1450,
    ping and resolve each other by ARP in both directions; bob's nodes receive nothing."""
    cfg, _ = two
    bob_a = get(cfg, "bob", 1, "-p", "1", "--host", "local")
    bob_b = get(cfg, "bob", 1, "-p", "1", "--host", "hostb")
    alice = get(cfg, "alice", 2, "-p", "1")
    try:
        assert [n.host for n in bob_a.nodes + bob_b.nodes] == ["local", "hostb"]
        assert sorted(n.host for n in alice.nodes) == ["hostb", "local"], alice
        netid = next(d.netid for d in alice.domains if d is not None)
        a1, a2 = sorted(alice.nodes, key=lambda n: n.host != "local")  # local first
        n1, n2, b1, b2 = booted(cfg, [a1.number, a2.number, bob_a.nodes[0].number,
                                      bob_b.nodes[0].number], artifacts)
        before = rx(b1), rx(b2)
        for n in (n1, n2):
            assert n.run("cat /sys/class/net/eth0/mtu") == ("1450\n", 0)
        for src, dst in ((n1, a2), (n2, a1)):
            ip = str(node_address(netid, dst.number).ip)
            out, status = src.run(f"ping -c 3 -W 5 {ip}")
            assert status == 0 and "3 packets received" in out, out
            neigh, _ = src.run("ip neigh show dev eth0")
            assert re.search(rf"^{re.escape(ip)} lladdr {nic_mac(dst.number, 0)}", neigh,
                             re.M), neigh
        out, _ = n1.run("arping -c 2 -w 3 -I eth0 10.255.255.254 || true")  # broadcasts
        assert (rx(b1), rx(b2)) == before, "a frame of alice's reached bob's domain"
    finally:
        free(cfg, "alice", alice)
        free(cfg, "bob", bob_a, bob_b)
        wait_hosts_free(cfg)


def test_listing1_across_both_hosts(two, artifacts):
    """examples/webfarm.sh 2 while another principal holds one of local's nodes: one node on
    each host (fill); kernel and apache appliance loaded into each one's RAM (the remote one's
    by volume upload over ssh), booted, both pages fetched from the outside world."""
    cfg, _ = two
    other = get(cfg, "other", 1, "--host", "local")
    try:
        e = {**env(cfg), "USER": "webfarm", "KHDO_NETNS": cfg.uplink_netns or ""}
        r = subprocess.run(["bash", str(WEBFARM), "2", "--keep", "-c", credfile("webfarmcred")],
                           env=e, capture_output=True, text=True, timeout=600)
        (artifacts / "webfarm.out").write_text(f"exit {r.returncode}\n{r.stdout}\n--\n{r.stderr}")
        kept = re.search(r"^kept: (con\d+)", r.stdout, re.M)
        try:
            assert r.returncode == 0, r.stderr + r.stdout
            assert re.search(r"^2/2 pages in \d+\.\d s$", r.stdout, re.M), r.stdout
            assert len(set(re.findall(r"<h1>node(\d+)</h1>", r.stdout))) == 2, r.stdout
            used = {n: h["used"] for n, h in hosts(cfg).items()}
            assert used == {"local": 2, "hostb": 1}, used
        finally:
            if kept:
                release(cfg, "webfarm", "webfarmcred", int(kept[1][3:]))
    finally:
        free(cfg, "other", other)
        wait_hosts_free(cfg)


def test_remote_libvirtd_stopped_and_started_again(two, artifacts):
    """b's libvirtd stopped (SIGTERM) while alice's node runs there: its QEMU runs on; when
    the daemon is back, khd reattaches (console stream again): the node answers on its
    console, is still allocated, and host b is up."""
    cfg, far = two
    alice = get(cfg, "alice", 1, "--host", "hostb")
    try:
        number = alice.nodes[0].number
        (node,) = booted(cfg, [number], artifacts)
        pid = far.libvirtd_pid()
        assert pid is not None
        mark = khd_log_mark(cfg)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while libvirtd.running_pid(far.daemon) is not None:
            assert time.monotonic() < deadline, "b's libvirtd did not stop"
            time.sleep(0.1)
        # khd has seen the connection go and retries it (up to HOST_GRACE, 30 s) ...
        wait_khd_log(cfg, "libvirt host hostb: connection closed", mark, timeout=60)
        mark = khd_log_mark(cfg)
        far.start_libvirtd()
        # ... and reattaches when b's daemon is back
        wait_khd_log(cfg, "libvirt host hostb: reconnected", mark, timeout=60)
        out, status = node.run("echo after-restart", timeout=60)
        assert status == 0 and out == "after-restart\n", out
        state = {n["node"]: n["state"] for n in ps(cfg)["nodes"]}
        assert state[number] == "allocated", state
        assert hosts(cfg)["hostb"]["state"] == "up", hosts(cfg)
    finally:
        free(cfg, "alice", alice)
        wait_hosts_free(cfg)


def test_khd_killed_and_started_again_readopts_both_hosts(two, artifacts):
    """khd SIGKILLed with a node of alice's on each host, in one domain (the second joined
    to the first's with -n, pinned to hostb), and started again: the same allocations, host
    b up with its node in use, the stretch made again: the node on b (MTU 1450) and the one
    here boot and ping each other. (From HOSTS' check of its restart path.)"""
    cfg, _ = two
    a = get(cfg, "alice", 1, "-p", "1", "--host", "local")
    netid = next(d.netid for d in a.domains if d is not None)
    b = get(cfg, "alice", 1, "-n", str(netid), "--host", "hostb")
    try:
        before = ps(cfg)["allocations"]
        kill_khd(cfg)
        control.start(cfg)
        assert ps(cfg)["allocations"] == before
        h = hosts(cfg)
        assert h["hostb"]["state"] == "up" and h["hostb"]["used"] == 1, h
        here, far = a.nodes[0], b.nodes[0]
        n1, n2 = booted(cfg, [here.number, far.number], artifacts)
        assert n2.run("cat /sys/class/net/eth0/mtu") == ("1450\n", 0)
        out, status = n1.run(f"ping -c 2 -W 5 {node_address(netid, far.number).ip}")
        assert status == 0 and "2 packets received" in out, out
    finally:
        free(cfg, "alice", a, b)
        wait_hosts_free(cfg)


def test_bad_hosts_are_one_line_and_nothing_is_recorded(two, tmp_path):
    """An unreachable host (its ssh answers nowhere) and a host whose libvirt has no ppc
    guest (qemu-system-ppc hidden from its daemon): one line each naming the host, and
    neither is recorded; nothing new on host b."""
    cfg, far = two
    taps = far_links(far)
    dead_uri, _ = ssh_client(tmp_path / "dead", far.netns, port=2, host="hostc")
    r = kh(cfg, "host", "add", "hostc", dead_uri, "--capacity", "1", "--prefix", far.prefix,
           "--kh", KH)
    assert r.returncode != 0 and re.fullmatch(r"kh: host hostc: [^\n]+\n", r.stderr), r.stderr
    with daemon_without_ppc(tmp_path / "c", far.cfg.fabric.netns) as d:
        r = kh(cfg, "host", "add", "hostc", d.uri, "--capacity", "1", "--prefix", far.prefix,
               "--kh", KH)
    assert r.returncode != 0, r.stdout
    assert re.fullmatch(r"kh: host hostc: [^\n]*ppc[^\n]*\n", r.stderr), r.stderr
    assert set(hosts(cfg)) == {"local", "hostb"}
    assert far_links(far) == taps


def far_links(far: FarHost) -> list[str]:
    r = subprocess.run([*nsutil.enter_argv(far.cfg.fabric.netns), "ip", "-br", "link"],
                       capture_output=True, text=True, timeout=30)
    return sorted(line.split()[0] for line in r.stdout.splitlines())


def test_host_rm_refused_while_allocated_then_done_when_empty(two):
    """`kh host rm hostb` is refused (one line) while alice holds a node there; once she
    released it, it removes b: no longer listed, its nodes' domains and taps gone there."""
    cfg, far = two
    alice = get(cfg, "alice", 1, "--host", "hostb")
    try:
        r = kh(cfg, "host", "rm", "hostb")
        assert r.returncode != 0 and re.fullmatch(r"kh: [^\n]*hostb[^\n]*allocated[^\n]*\n",
                                                  r.stderr), r.stderr
        assert "hostb" in hosts(cfg)
    finally:
        free(cfg, "alice", alice)
    wait_hosts_free(cfg)
    r = kh(cfg, "host", "rm", "hostb")
    assert r.returncode == 0, r.stderr
    assert set(hosts(cfg)) == {"local"}
    import libvirt
    conn = libvirt.open(far.daemon.uri)
    try:
        assert [d.name() for d in conn.listAllDomains(0)] == []
    finally:
        conn.close()
    assert not [t for t in far_links(far) if re.fullmatch(rf"{far.prefix}\d+s\d+(@\S+)?", t)]

