"""khd and khget with real nodes: principals, domains and their isolation, restarts, clean.

One khd (with its own name prefix, state dir and port) serves the whole module; every test
uses its own principals and releases what it took.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kh import proc, textobj
from kh.hw import netns as nsutil
from kh.hw.fabric import Fabric
from kh.service import control
from kh.service.config import ServiceConfig
from tests.integration.conftest import (
    NODES,
    allocate,
    credfile,
    free_port,
    kh,
    khget,
    kill_khd,
    ps,
    release,
    shell,
    wait_free,
)

pytestmark = pytest.mark.guest


def test_khget_text_object_and_boot_into_private_domain(khd, artifacts):
    alloc, nodes, lines = allocate(khd, "-c", credfile("alicecred"), "alice", "2")
    assert lines[1] == "protocol: uboot"
    assert lines[2] == "network 3 : eth0" or lines[2].startswith("network ")
    netid = textobj.parse("\n".join(lines) + "\n").domains[0].netid
    assert len(nodes) == 2
    a, _b = (shell(khd, n, artifacts) for n in nodes)
    out, _ = a.run("ip -4 -o addr show eth0")
    assert f"10.{netid}.0.{nodes[0]}/16" in out
    out, status = a.run(f"ping -c 2 -W 2 10.{netid}.0.{nodes[1]}")
    assert status == 0, out
    release(khd, "alice", "alicecred", alloc)
    wait_free(khd, NODES)


def test_private_domains_are_isolated_public_is_shared(khd, artifacts):
    wait_free(khd, 2)
    a_alloc, (a_node,), a_lines = allocate(khd, "-c", credfile("c1"), "carol", "-i")
    b_alloc, (b_node,), b_lines = allocate(khd, "-c", credfile("d1"), "dave", "-i")
    assert a_lines[2] == "network Internal : eth0" and b_lines[2] == "network Internal : eth0"
    a_net = int(a_lines[3].split()[1])
    b_net = int(b_lines[3].split()[1])
    assert a_net != b_net
    a, b = shell(khd, a_node, artifacts), shell(khd, b_node, artifacts)
    # Public domain (eth0): different principals can talk.
    out, status = a.run(f"ping -c 2 -W 2 10.1.0.{b_node}")
    assert status == 0, out
    # Private domains (eth1): give dave's node an address in carol's subnet; carol's node
    # must still not reach it at all, not even by ARP broadcast.
    out, status = b.run(f"ip addr add 10.{a_net}.0.200/16 dev eth1")
    assert status == 0, out
    out, status = a.run(f"arping -c 2 -w 3 -I eth1 10.{a_net}.0.200")
    assert status != 0 and "Received 0 response" in out, out
    out, status = a.run(f"ping -c 2 -W 2 10.{a_net}.0.200")
    assert status != 0, out
    release(khd, "carol", "c1", a_alloc)
    release(khd, "dave", "d1", b_alloc)


def test_nodes_sharing_a_domain_exchange_broadcast_and_arp(khd, artifacts):
    wait_free(khd, 2)
    alloc, nodes, lines = allocate(khd, "-c", credfile("e1"), "erin", "-p", "1", "2")
    netid = int(lines[2].split()[1])
    a, _b = (shell(khd, n, artifacts) for n in nodes)
    out, status = a.run(f"arping -c 2 -w 3 -I eth0 10.{netid}.0.{nodes[1]}")
    assert status == 0 and "Received 2 response" in out, out
    release(khd, "erin", "e1", alloc)


def test_external_domain_reaches_the_outside_server(khd, outside, artifacts, tmp_path):
    (tmp_path / "hello.txt").write_text("hello from outside\n")
    server = nsutil.enter_argv(outside) + [sys.executable, "-m", "http.server", "--bind",
                                           "10.254.255.2", "8000", "--directory", str(tmp_path)]
    wait_free(khd, 1)
    alloc, (node,), lines = allocate(khd, "-c", credfile("f1"), "frank", "-x")
    assert lines[2] == "network External : eth0"
    with proc.spawn(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        n = shell(khd, node, artifacts)
        out, status = "", 1
        for _ in range(20):  # the server may still be starting
            out, status = n.run("wget -q -T 3 -O - http://10.254.255.2:8000/hello.txt")
            if status == 0:
                break
            time.sleep(0.5)
        assert status == 0 and "hello from outside" in out, out
    release(khd, "frank", "f1", alloc)


def test_khget_from_inside_a_node(khd, artifacts):
    """The paper's disk server calls khget from a node: the in-node client over the public
    domain, with busybox wget."""
    wait_free(khd, 2)
    alloc, (node,), _ = allocate(khd, "-c", credfile("m1"), "mia", "-i")
    n = shell(khd, node, artifacts)
    out, status = n.run("khget -c m1 mia 1")
    assert status == 0, out
    lines = out.strip().splitlines()
    assert lines[0].startswith("con") and lines[1] == "protocol: uboot"
    inner = textobj.parse(out).id
    out, status = n.run("khget -c wrong mia 1")
    assert status == 1 and "refused" in out, out
    release(khd, "mia", "m1", inner)
    release(khd, "mia", "m1", alloc)


def test_bad_input_is_refused_and_changes_nothing(khd):
    wait_free(khd, NODES)
    assert khget(khd, "-c", credfile("g1"), "gina").returncode == 0  # registers gina
    before = ps(khd)
    cases = [
        (["--bogus", "gina"], 2, "No such option"),
        (["-c", credfile("g1"), "gina", "0"], 2, "between 1 and 65000"),
        (["-c", credfile("g1"), "gina", "--", "-3"], 2, "between 1 and 65000"),
        (["-c", credfile("g1"), "gina", str(NODES + 5)], 1, "free"),
        (["-c", credfile("g1"), "-n", "200", "gina"], 1, "has no private domain 200"),
        (["-c", credfile("g1"), "-n", "1", "gina"], 2, "not private"),
        (["-c", credfile("wrong"), "gina"], 3, "credential refused"),
        (["-c", "g1", "gina"], 2, "no credential file"),  # a secret is not a -c FILE
        (["gina"], 3, "needs its credential"),
        (["-c", credfile("h1"), "-n", "abc", "hank"], 2, "bad domain list"),
        (["-c", credfile("x"), "Bad User"], 2, "bad principal name"),
    ]
    for args, code, msg in cases:
        r = khget(khd, *args)
        assert r.returncode == code, (args, r.stderr)
        assert msg in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) <= 3, r.stderr
    gina_domain = next(d for d in ps(khd)["domains"] if d["owner"] == "gina")["netid"]
    r = khget(khd, "-c", credfile("i1"), "ivan", "-n", str(gina_domain))
    # another's domain looks like one that does not exist
    assert r.returncode == 1 and f"has no private domain {gina_domain}" in r.stderr
    after = ps(khd)
    assert [a["id"] for a in after["allocations"]] == [a["id"] for a in before["allocations"]]
    assert after["domains"] == before["domains"]
    # a refused first use must not register the principal
    assert khget(khd, "-c", credfile("other"), "ivan").returncode == 0
    for a in ps(khd)["allocations"]:
        user = a["principal"]
        release(khd, user, {"gina": "g1", "ivan": "other"}[user], a["id"])


def test_malformed_and_oversized_api_requests(khd):
    def post(body: bytes, ctype: str = "application/json") -> tuple[int, bytes]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(khd.socket))
        s.sendall(b"POST /v1/allocations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: " + ctype.encode() + b"\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        data = b""
        while True:  # the whole answer: khd closes the connection after it
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:  # closed with the refused body unread: the answer
                break  # came first
            if not chunk:
                break
            data += chunk
        s.close()
        return int(data.split()[1]), data

    before = ps(khd)
    assert post(b"{not json")[0] == 400
    assert post(b"[1, 2]")[0] == 400
    assert post(json.dumps({"user": "x", "credential": "y", "count": "many"}).encode())[0] == 400
    assert post(b"x" * (70 * 1024))[0] == 413
    assert post(b"user=x&credential=y", "application/x-www-form-urlencoded")[0] == 415
    assert post(json.dumps({"credential": "y"}).encode())[0] == 400
    assert post(json.dumps({"user": "x\n", "credential": "y"}).encode())[0] == 400
    # a credential is the secret, never a path khd would read (as root) for the caller
    alloc, _, _ = allocate(khd, "-c", credfile("pathcred"), "paula")  # registers paula
    release(khd, "paula", "pathcred", alloc)
    status, text = post(json.dumps({"user": "paula", "credential": credfile("pathcred")}
                                   ).encode())
    assert status == 403 and b"credential refused" in text, text
    assert ps(khd)["allocations"] == before["allocations"]
    r = kh(khd, "service", "status")
    assert r.returncode == 0 and "khd running" in r.stdout


def test_a_used_private_domain_is_removed_and_its_id_comes_back(khd):
    """Issue 10, finding 7: after release, `kh domain rm` removes the domain (state, then
    bridge); the next plain khget makes a fresh one, with a bridge; a domain in use is 409."""
    wait_free(khd, 1)
    alloc, _, lines = allocate(khd, "-c", credfile("r1"), "rosa")
    netid = int(lines[2].split()[1])
    r = kh(khd, "domain", "rm", "-u", "rosa", "-c", credfile("r1"), str(netid))
    assert r.returncode == 1 and "still has allocated nodes" in r.stderr, r.stderr
    release(khd, "rosa", "r1", alloc)
    r = kh(khd, "domain", "rm", "-u", "rosa", "-c", credfile("r1"), str(netid))
    assert r.returncode == 0 and r.stdout == f"domain {netid} removed\n", r.stderr
    assert netid not in [d["netid"] for d in ps(khd)["domains"]]
    fabric = Fabric(khd.fabric)
    assert netid not in fabric.domain_bridges()
    wait_free(khd, 1)
    alloc, _, lines = allocate(khd, "-c", credfile("r1"), "rosa")  # the bridge is there
    assert int(lines[2].split()[1]) == netid  # the lowest free id: the one just freed
    assert netid in fabric.domain_bridges()
    release(khd, "rosa", "r1", alloc)


def test_state_logs_and_sockets_are_the_operators_alone(khd):
    """No other local user reads khd's database, host key, or consoles (which can hold boot
    keys): everything under the state dir is closed to others, secrets to the group too."""
    assert ps(khd)["nodes"], "the pool has nodes, so node logs exist"
    open_to_others = []
    for p in [khd.state_dir, *khd.state_dir.rglob("*")]:
        mode = p.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        if mode & 0o007:
            open_to_others.append(f"{p} {stat.filemode(mode)}")
    assert not open_to_others, open_to_others
    secrets = [khd.db, khd.state_dir / "ssh_host_rsa_key", khd.logs / "khd.log",
               *khd.logs.glob("node*.log")]
    loose = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in secrets
             if p.exists() and p.stat().st_mode & 0o077]
    assert not loose, loose


def test_concurrent_khget_never_shares_a_node(khd):
    wait_free(khd, NODES)
    results: list[subprocess.CompletedProcess[str]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = khget(khd, "-c", credfile("jcred"), "judy", "1")
        with lock:
            results.append(r)

    assert khget(khd, "-c", credfile("jcred"), "judy", "1").returncode == 0  # register first
    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snapshot = ps(khd)
    for a in snapshot["allocations"]:  # give everything back before judging, for later tests
        release(khd, "judy", "jcred", a["id"])
    ok = [r for r in results if r.returncode == 0]
    refused = [r.stderr for r in results if r.returncode != 0]
    assert len(ok) == NODES - 1, refused
    assert all("free" in e for e in refused), refused
    taken = [n["node"] for n in snapshot["nodes"] if n["state"] == "allocated"]
    assert len(taken) == len(set(taken)) == NODES
    allocs = snapshot["allocations"]
    assert sorted(n for a in allocs for n in a["nodes"]) == sorted(taken)


def test_khd_sigkill_and_restart_keeps_allocations_and_consoles(khd, artifacts):
    wait_free(khd, 1)
    alloc, (node,), _ = allocate(khd, "-c", credfile("k1"), "kate")
    before = ps(khd)
    kill_khd(khd)
    control.start(khd)
    after = ps(khd)
    assert after["allocations"] == before["allocations"]
    # every node that ran is adopted as it was, the free ones too (the same settings: the
    # same QEMUs; one still starting when khd was killed is started again)
    ran = {n["node"]: n["pid"] for n in before["nodes"] if n["state"] in ("free", "allocated")}
    assert {n["node"]: n["pid"] for n in after["nodes"] if n["node"] in ran} == ran
    n = shell(khd, node, artifacts)  # the console is reattached: the node boots through it
    out, status = n.run("hostname")
    assert (out.strip(), status) == (f"node{node}", 0)
    release(khd, "kate", "k1", alloc)


def test_kh_clean_leaves_the_host_as_found(kh_paths, tmp_path, outside):
    def host_state() -> tuple[list[str], list[int]]:
        netns_dir = Path("/run/netns")
        names = sorted(os.listdir(netns_dir)) if netns_dir.exists() else []
        return names, control.kh_qemu_pids("kc")

    before = host_state()
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=kh_paths.out, nodes=2,
                        api_port=free_port(), ssh_port=free_port(), prefix="kc",
                        uplink_netns=None)
    control.start(cfg)
    assert khget(cfg, "-c", credfile("l1"), "leo", "-i").returncode == 0
    assert host_state() != before
    done = control.clean(cfg)
    assert any("network namespace" in d for d in done)
    assert host_state() == before
    assert not cfg.state_dir.exists()
