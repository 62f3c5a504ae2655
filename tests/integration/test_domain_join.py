"""Domains change while nodes run (issue 11, item 4), on real ppce500 nodes: a running node
joins another private domain of its principal's, configures the address kh gives it and pings
a node there; it leaves, and no frame of that domain reaches its interface any more (counted
on its tap in kh's namespace while the other node broadcasts); another principal's join of
that node is refused as for a node that does not exist."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from kh.hw.fabric import Fabric
from kh.service.config import ServiceConfig
from tests.integration.conftest import allocate, credfile, kh, ps, release, running_khd, shell

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def khd3(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         kh_paths) -> Iterator[ServiceConfig]:  # type: ignore[no-untyped-def]
    with running_khd(request, tmp_path_factory.mktemp("khd") / "state", kh_paths,
                     keep_as="khd-join-logs", nodes=3,
                     prefix=f"kj{os.getpid() % 1000}") as cfg:
        yield cfg


def domain(cfg: ServiceConfig, verb: str, user: str, cred: str, node: int, netid: int
           ) -> tuple[int, str]:
    r = kh(cfg, "domain", verb, "-u", user, "-c", credfile(cred), "--json", str(node),
           str(netid))
    return r.returncode, r.stdout if r.returncode == 0 else r.stderr


def carrier(node, dev: str, want: str, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out, _ = node.run(f"cat /sys/class/net/{dev}/carrier")
        if out.strip() == want:
            return
        time.sleep(0.5)
    raise AssertionError(f"{dev} carrier is {out.strip()!r}, not {want}")


def test_a_running_node_joins_and_leaves_a_private_domain(khd3, artifacts):
    cfg = khd3
    fabric = Fabric(cfg.fabric)
    held: list[tuple[str, str, int]] = []
    try:
        a1, (n1,), lines1 = allocate(cfg, "-c", credfile("lj-a"), "lalice", "-p", "1")
        held.append(("lalice", "lj-a", a1))
        a2, (n2,), lines2 = allocate(cfg, "-c", credfile("lj-a"), "lalice", "-p", "1")
        held.append(("lalice", "lj-a", a2))
        d1, d2 = int(lines1[2].split()[1]), int(lines2[2].split()[1])
        assert d1 != d2
        b, (_nb,), linesb = allocate(cfg, "-c", credfile("lj-b"), "lbob", "-p", "1")
        held.append(("lbob", "lj-b", b))
        db = int(linesb[2].split()[1])

        one, two = shell(cfg, n1, artifacts), shell(cfg, n2, artifacts)
        out, status = one.run("ip link set eth1 up")
        assert status == 0, out
        carrier(one, "eth1", "0")  # a free interface: no link
        target = f"10.{d2}.0.{n2}"
        out, status = one.run(f"ping -c 1 -W 2 {target}")
        assert status != 0, out

        # another principal cannot put lalice's node anywhere, nor lalice hers in lbob's
        status, err = domain(cfg, "join", "lbob", "lj-b", n1, db)
        assert status != 0 and f"principal lbob has no allocated node {n1}" in err, err
        status, err = domain(cfg, "join", "lalice", "lj-a", n1, db)
        assert status != 0 and f"principal lalice has no private domain {db}" in err, err

        status, out = domain(cfg, "join", "lalice", "lj-a", n1, d2)
        assert status == 0, out
        joined = json.loads(out)
        assert joined["interface"] == "eth1" and joined["netids"] == [d1, d2]
        address = joined["address"]
        assert address == f"10.{d2}.0.{n1}/16"
        carrier(one, "eth1", "1")  # the node sees the link come up, no reboot
        out, status = one.run(f"ip addr add {address} dev eth1")
        assert status == 0, out
        out, status = one.run(f"ping -c 3 -W 3 {target}")
        assert status == 0, out
        node_ps = next(n for n in ps(cfg)["nodes"] if n["node"] == n1)
        assert node_ps["netids"] == [d1, d2]
        r = kh(cfg, "ps", "-u", "lalice", "-c", credfile("lj-a"))
        assert r.returncode == 0 and f"{d1},{d2}" in r.stdout, r.stdout + r.stderr
        # a positive control for the count below: n2's broadcasts reach n1's tap now
        before = fabric.tap_counters(n1, 1)[1]
        two.run(f"arping -b -c 3 -w 4 -I eth0 10.{d2}.0.250")
        assert fabric.tap_counters(n1, 1)[1] > before

        status, out = domain(cfg, "leave", "lalice", "lj-a", n1, d2)
        assert status == 0, out
        assert json.loads(out)["netids"] == [d1]
        carrier(one, "eth1", "0")
        status, err = domain(cfg, "leave", "lalice", "lj-a", n1, d2)
        assert status != 0 and f"node {n1} is not in domain {d2}" in err, err
        # nothing of d2 reaches n1's interface any more while n2 broadcasts there
        before = fabric.tap_counters(n1, 1)[1]
        out, _ = two.run(f"arping -b -c 5 -w 6 -I eth0 10.{d2}.0.250")
        out, _ = two.run(f"ping -c 3 -W 2 10.{d2}.0.{n1}")
        assert fabric.tap_counters(n1, 1)[1] == before
        out, status = one.run(f"ping -c 2 -W 2 {target}")
        assert status != 0, out
        # its own domain is as it was
        out, status = one.run("ip -4 -o addr show eth0")
        assert f"10.{d1}.0.{n1}/16" in out, out
    finally:
        for user, cred, alloc in reversed(held):
            release(cfg, user, cred, alloc)
