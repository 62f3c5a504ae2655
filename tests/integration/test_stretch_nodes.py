"""Domains across hosts with real nodes (issue 16, item 3): two kh fabrics on this machine joined
by an underlay (tests/unit/twohost.py), domain 3 stretched between them, ppce500 nodes booted
into the shell appliance on each (tests/integration/stretchnodes.py: each QEMU in its host's
namespace, on a tap there). The frame-level proofs are tests/unit/test_stretch.py; this one
shows guests using it: MTU from the boot key, ARP, ping and HTTP across, and a node of another
domain unreachable even with an address in domain 3's subnet."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from kh.allocation import node_address
from kh.hw import stretch
from kh.hw.antispoof import nic_mac
from kh.settings import Paths
from tests.integration.stretchnodes import node_in
from tests.unit.twohost import two_hosts

pytestmark = [pytest.mark.guest, pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None,
    reason="needs root and nft (two kh fabrics, taps, nodes in them)")]
D, OTHER = 3, 4


def test_nodes_on_two_hosts_share_a_stretched_domain_and_nothing_else(
        kh_paths: Paths, artifacts: Path) -> None:
    """Node 1 on host a and node 2 on host b, domain 3 stretched: both NICs at MTU 1450 (boot
    key kh.mtu0), node 1 resolves node 2 by ARP (node 2's MAC), pings it and fetches its page;
    node 3 on host b is in domain 4 with node 3's address of domain 3's subnet: node 1 gets no
    ARP answer and no ping reply from it."""
    with two_hosts("sn") as (a, b):
        stretch.ensure(a.fabric, a.underlay, D, [b.peer], a.name)
        stretch.ensure(b.fabric, b.underlay, D, [a.peer], b.name)
        with node_in(a, 1, D, artifacts) as n1, node_in(b, 2, D, artifacts) as n2, \
                node_in(b, 3, OTHER, artifacts, address_of=D) as n3:
            for n in (n1, n2, n3):
                assert n.run("cat /sys/class/net/eth0/mtu") == ("1450\n", 0)
            two, three = (str(node_address(D, i).ip) for i in (2, 3))
            out, status = n1.run(f"ping -c 3 -W 5 {two}")
            assert status == 0 and "3 packets received" in out, out
            neigh, _ = n1.run("ip neigh show dev eth0")
            assert re.search(rf"^{re.escape(two)} lladdr {nic_mac(2, 0)}", neigh, re.M), neigh
            page, status = n1.run(f"wget -q -O - http://{two}/")
            assert status == 0 and "<h1>node2</h1>" in page, page
            out, status = n1.run(f"ping -c 2 -W 2 {three}")
            assert status != 0 and "0 packets received" in out, out
            neigh, _ = n1.run("ip neigh show dev eth0")
            assert nic_mac(3, 0) not in neigh, neigh
            out, _ = n3.run("cat /sys/class/net/eth0/statistics/rx_packets")
            assert int(out) == 0, out  # nothing at all reached node 3
