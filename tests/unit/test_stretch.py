"""Domains across hosts (issue 16, item 3), proved host-side with two kh fabrics on one machine
joined by an underlay (tests/unit/twohost.py), raw frames written into taps opened directly
(tests/unit/tapdev.py, fwframes.py) and what arrives counted. Needs root, /dev/net/tun and nft.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import NetNS

from kh.allocation import host_address
from kh.hw import firewall, stretch
from kh.hw import netns as nsutil
from kh.hw.fabric import bridge_mac
from kh.hw.stretch import Peer, StretchError
from kh.model import PUBLIC
from kh.service.qemunode import mac
from tests.unit import fwframes as fx
from tests.unit.tapdev import BROADCAST, Tap, eth, mac_bytes
from tests.unit.twohost import STRANGER, Host, two_hosts

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("nft") is None,
    reason="needs root, /dev/net/tun and nft (two fabrics, taps, firewalls)")

D, OTHER, LOCAL = 3, 4, 5  # a stretched domain, another stretched one, one on each host alone
WAIT = 1.0  # s to collect what arrives after the last frame sent
MTU = 1450  # the stretched domains' MTU over the 1500-byte underlay of two_hosts


@contextlib.contextmanager
def node(h: Host, number: int, netid: int) -> Iterator[Tap]:
    """Node ``number``'s first NIC in domain ``netid`` on host ``h``, its tap opened."""
    h.fabric.ensure_domain(netid)
    h.fabric.ensure_tap(number, 0)
    h.fabric.attach(number, 0, netid)
    with fx.opened(h.cfg.netns, h.cfg.tap(number, 0), forwarding=h.fabric.ns) as tap:
        yield tap


def stretch_both(a: Host, b: Host, netid: int) -> None:
    stretch.ensure(a.fabric, a.underlay, netid, [b.peer], a.name)
    stretch.ensure(b.fabric, b.underlay, netid, [a.peer], b.name)


def marked(frames: list[bytes], marker: bytes) -> int:
    return sum(marker in f for f in frames)


def mtu_of(h: Host, ifname: str) -> int:
    with h.fabric.ns() as ns:
        return int(ns.get_links(ns.link_lookup(ifname=ifname)[0])[0].get_attr("IFLA_MTU"))


def test_a_stretched_domain_carries_frames_between_hosts_and_nothing_else() -> None:
    """Node 1 (host a) and node 2 (host b) share domain 3, stretched: broadcasts and unicasts
    cross both ways (the bridges learn the remote MACs). Domain 4 is stretched too (another
    VNI) and domain 5 exists on each host alone: none of their nodes, on either host, sees a
    frame of domain 3, and domain 4's frames reach only domain 4."""
    with two_hosts("vxa") as (a, b):
        for netid in (D, OTHER):
            stretch_both(a, b, netid)
        with node(a, 1, D) as n1, node(b, 2, D) as n2, node(a, 3, OTHER) as n3, \
                node(b, 4, OTHER) as n4, node(a, 5, LOCAL) as n5, node(b, 6, LOCAL) as n6:
            fx.wait_bridged(n1, n2, mac(1, 0))
            fx.wait_bridged(n2, n1, mac(2, 0))
            fx.wait_bridged(n3, n4, mac(3, 0))
            for f in (n1, n2, n3, n4, n5, n6):
                fx.collect(f, 0.2)  # the probes
            n1.send(eth(BROADCAST, mac(1, 0), fx.ETH_PROBE, b"d3-broadcast"))
            n1.send(eth(mac(2, 0), mac(1, 0), fx.ETH_PROBE, b"d3-unicast"))
            n2.send(eth(mac(1, 0), mac(2, 0), fx.ETH_PROBE, b"d3-back"))
            n4.send(eth(BROADCAST, mac(4, 0), fx.ETH_PROBE, b"d4-broadcast"))
            got = {i: fx.collect(t, WAIT if i == 1 else 0.2)
                   for i, t in enumerate((n1, n2, n3, n4, n5, n6), start=1)}
        assert marked(got[2], b"d3-broadcast") == 1 and marked(got[2], b"d3-unicast") == 1
        assert marked(got[1], b"d3-back") == 1
        assert marked(got[3], b"d4-broadcast") == 1
        for i in (3, 4, 5, 6):
            assert marked(got[i], b"d3-") == 0, f"node {i} saw domain 3's frames"
        for i in (1, 2, 5, 6):
            assert marked(got[i], b"d4-") == 0, f"node {i} saw domain 4's frames"


def test_mtu_is_set_at_every_hop_and_a_bigger_frame_never_crosses() -> None:
    """Underlay 1500: the vxlan device, the bridge and the taps take 1450 on both hosts; a
    1450-byte payload crosses whole, a 1451-byte one arrives in no form (not fragmented in the
    underlay, where it would fit in two packets)."""
    with two_hosts("vxb") as (a, b):
        stretch_both(a, b, D)
        with node(a, 1, D) as n1, node(b, 2, D) as n2:
            for h, tap in ((a, 1), (b, 2)):
                assert {mtu_of(h, n) for n in (h.cfg.vxlan(D), h.cfg.bridge(D),
                                               h.cfg.tap(tap, 0))} == {MTU}
            fx.wait_bridged(n1, n2, mac(1, 0))
            fx.collect(n2, 0.2)
            full = eth(mac(2, 0), mac(1, 0), fx.ETH_PROBE, b"full".ljust(MTU, b"."))
            over = eth(mac(2, 0), mac(1, 0), fx.ETH_PROBE, b"over".ljust(MTU + 1, b"."))
            big = eth(mac(2, 0), mac(1, 0), fx.ETH_PROBE, b"big".ljust(1500, b"."))
            for frame in (full, over, big):
                n1.send(frame)
            got = fx.collect(n2, WAIT)
        assert [len(f) for f in got if b"full" in f] == [14 + MTU]
        assert [f for f in got if b"over" in f or b"big" in f] == []


def test_a_stretched_public_domain_is_served_by_khds_host_alone() -> None:
    """The public domain stretched from khd's host a to host b: b's public bridge holds no
    address and a MAC of its own; node 2 on b asking for the service's address gets exactly
    one answer, from a's bridge, and its SYN to the API port reaches a's kernel (a reset: no
    listener here). With the same address or MAC on b, b would answer or swallow them."""
    pub, api = str(host_address(PUBLIC).ip), 7480
    with two_hosts("vxh") as (a, b):
        stretch_both(a, b, PUBLIC)
        with b.fabric.ns() as ns:
            assert ns.get_addr(index=ns.link_lookup(ifname=b.cfg.bridge(PUBLIC))[0]) == ()
        a_mac = bridge_mac(a.cfg.prefix, PUBLIC)
        assert mac_of(b, b.cfg.bridge(PUBLIC)) != a_mac
        with node(a, 1, PUBLIC) as n1, node(b, 2, PUBLIC) as n2:
            fx.wait_bridged(n2, n1, mac(2, 0))
            fx.collect(n2, 0.3)
            n2.send(fx.arp_request(mac(2, 0), "10.1.0.2", pub))
            replies = fx.collect(n2, WAIT)
            assert [(r[6:12], r[28:32]) for r in replies] == [
                (mac_bytes(a_mac), bytes([10, 1, 255, 254]))]
            n2.send(fx.tcp_syn(mac(2, 0), a_mac, "10.1.0.2", pub, 40000, api))
            rst = fx.collect(n2, WAIT)
            assert len(rst) == 1 and rst[0][6:12] == mac_bytes(a_mac) and rst[0][23] == 6


def mac_of(h: Host, ifname: str) -> str:
    with h.fabric.ns() as ns:
        return str(ns.get_links(ns.link_lookup(ifname=ifname)[0])[0].get_attr("IFLA_ADDRESS"))


def vxlan_packet(vni: int, inner: bytes) -> bytes:
    """A VXLAN header (flags: VNI valid) and the inner frame: the UDP payload."""
    return struct.pack("!II", 0x08000000, vni << 8) + inner


def test_vxlan_only_from_peer_hosts() -> None:
    """A stranger on the underlay sends well-formed VXLAN of domain 3 to host b: nothing
    reaches b's node. Made a peer of b's domain, the same packet arrives (so it was the
    firewall); dropped from the peers again, it stops again."""
    with two_hosts("vxc") as (a, b):
        stretch_both(a, b, D)
        a.wire.take(STRANGER)
        wire_ns = a.wire.name
        sock = nsutil.run_in(wire_ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        try:
            sock.bind((STRANGER, 0))
            packet = vxlan_packet(stretch.vni(D), eth(BROADCAST, "02:00:00:00:00:09",
                                                      fx.ETH_PROBE, b"stranger"))

            def arrivals(tap: Tap) -> int:
                for _ in range(3):
                    sock.sendto(packet, (b.underlay.address, b.underlay.port))
                return marked(fx.collect(tap, WAIT), b"stranger")

            with node(b, 2, D) as n2:
                assert arrivals(n2) == 0
                stretch.ensure(b.fabric, b.underlay, D, [a.peer, Peer("stranger", STRANGER)],
                               b.name)
                assert arrivals(n2) == 3
                stretch.ensure(b.fabric, b.underlay, D, [a.peer], b.name)
                assert arrivals(n2) == 0
        finally:
            sock.close()


def fdb_of(h: Host, netid: int) -> list[str]:
    with h.fabric.ns() as ns:
        idx = ns.link_lookup(ifname=h.cfg.vxlan(netid))
        return sorted(str(e.get_attr("NDA_DST")) for e in ns.fdb("dump", ifindex=idx[0])
                      if e.get_attr("NDA_DST")) if idx else []


def udp_rules(netns: str) -> list[dict]:
    """kh's firewall rules that let UDP (VXLAN) through."""
    return [o for o in firewall.listed(netns) if "rule" in o and "'udp'" in str(o)]


def test_stretch_is_read_back_and_removing_it_takes_everything_away() -> None:
    """ensure is idempotent, sets exactly the peers given and makes a device made otherwise
    (another port) again; remove takes the device and its FDB entries away, the bridge and
    taps back to 1500, the firewall's VXLAN rules gone, and frames no longer cross."""
    with two_hosts("vxd") as (a, b):
        stretch_both(a, b, D)
        assert stretch.ensure(a.fabric, a.underlay, D, [b.peer], a.name) == stretch.Made(
            device=False, bridge=False)
        s = stretch.stretched(a.cfg)[D]
        assert (s.vni, s.device, s.underlay, s.peers, s.mtu) == (
            stretch.vni(D), a.cfg.vxlan(D), a.underlay, (b.underlay.address,), MTU)
        assert fdb_of(a, D) == [b.underlay.address]
        assert udp_rules(a.cfg.netns) != []
        moved = stretch.Underlay(a.underlay.ifname, a.underlay.address, 4790)
        assert stretch.ensure(a.fabric, moved, D, [b.peer], a.name).device  # made again
        assert stretch.stretched(a.cfg)[D].underlay.port == 4790
        stretch.ensure(a.fabric, a.underlay, D, [b.peer], a.name)
        with node(a, 1, D) as n1, node(b, 2, D) as n2:
            fx.wait_bridged(n1, n2, mac(1, 0))
            assert stretch.remove(a.fabric, D) is True
            assert stretch.remove(a.fabric, D) is False
            fx.collect(n2, 0.3)
            n1.send(eth(BROADCAST, mac(1, 0), fx.ETH_PROBE, b"after"))
            assert marked(fx.collect(n2, WAIT), b"after") == 0
            assert {mtu_of(a, a.cfg.bridge(D)), mtu_of(a, a.cfg.tap(1, 0))} == {1500}
        assert stretch.stretched(a.cfg) == {} and fdb_of(a, D) == []
        assert a.cfg.vxlan(D) not in a.fabric.links()
        assert a.cfg.bridge(D) in a.fabric.links()  # the domain's own
        assert udp_rules(a.cfg.netns) == []
        assert udp_rules(b.cfg.netns) != []  # b's side is b's


def nothing_made(h: Host, netid: int) -> None:
    links = h.fabric.links()
    assert h.cfg.vxlan(netid) not in links and h.cfg.bridge(netid) not in links, links
    assert udp_rules(h.cfg.netns) == []


def test_faults_are_one_line_naming_the_host_and_leave_nothing() -> None:
    """A taken VXLAN port, an underlay MTU too small, a peer with no route, a peer on the
    underlay that does not answer (down), a missing underlay: one StretchError naming the host
    and what is wrong; no device, no bridge, no firewall rule left behind."""
    with two_hosts("vxe") as (a, b):
        sock = nsutil.run_in(a.cfg.netns, lambda: socket.socket(socket.AF_INET,
                                                                 socket.SOCK_DGRAM))
        try:
            sock.bind(("0.0.0.0", a.underlay.port))
            with pytest.raises(StretchError, match=r"^host a: VXLAN port 4789 is taken"):
                stretch.ensure(a.fabric, a.underlay, D, [b.peer], "a")
        finally:
            sock.close()
        nothing_made(a, D)
        with pytest.raises(StretchError, match=r"^host a: peer far \(192\.0\.2\.7\) is "
                                               r"unreachable"):
            stretch.ensure(a.fabric, a.underlay, D, [Peer("far", "192.0.2.7")], "a")
        nothing_made(a, D)
        with pytest.raises(StretchError, match=r"^host a: peer dead \(172\.31\.254\.7\) is "
                                               r"unreachable: no ARP answer on "):
            stretch.ensure(a.fabric, a.underlay, D, [b.peer, Peer("dead", "172.31.254.7")], "a")
        nothing_made(a, D)
        with pytest.raises(StretchError, match=r"^host a: underlay interface \w+ul7 is not in"):
            stretch.ensure(a.fabric, stretch.Underlay(a.cfg.underlay(7), a.underlay.address), D,
                           [b.peer], "a")
        with a.fabric.ns() as ns:
            ns.link("set", index=ns.link_lookup(ifname=a.underlay.ifname)[0], mtu=1300)
        with pytest.raises(StretchError, match=r"^host a: underlay .* has MTU 1300, too small"):
            stretch.ensure(a.fabric, a.underlay, D, [b.peer], "a")
        nothing_made(a, D)


def test_firewall_keeps_the_ports_a_khd_serves() -> None:
    """`kh fabric stretch` reloads the firewall of a namespace a khd may serve from: it reads
    the served ports back (firewall.served_ports) and keeps them."""
    from kh.hw.fabric import Fabric
    with two_hosts("vxf") as (a, b):
        Fabric(a.cfg, ports=(7480, 7422)).apply_firewall()
        assert firewall.served_ports(a.cfg.netns) == (7422, 7480)
        again = Fabric(a.cfg, ports=firewall.served_ports(a.cfg.netns))
        stretch.ensure(again, a.underlay, D, [b.peer], "a")
        assert firewall.served_ports(a.cfg.netns) == (7422, 7480)
        assert udp_rules(a.cfg.netns) != []


KH = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "kh"


@pytest.mark.skipif(not KH.exists(), reason="kh is not installed in .venv (make venv)")
def test_the_remote_side_through_kh_fabric() -> None:
    """What khd runs on another host over ssh (stretch.remote_argv): `kh fabric stretch`
    makes b's side, `kh fabric show --json` reads it, a malformed peer is one line and exit 2,
    `kh fabric unstretch` takes it away."""
    with two_hosts("vxg") as (a, b):
        argv = stretch.remote_argv(b.cfg.prefix, b.underlay, D, [a.peer], b.name, kh=str(KH))
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        made = json.loads(r.stdout)
        assert made.pop("made") == {"device": True, "bridge": True}
        assert (made["vni"], made["peers"], made["mtu"]) == (stretch.vni(D),
                                                             [a.underlay.address], MTU)
        show = subprocess.run([str(KH), "fabric", "show", "--prefix", b.cfg.prefix, "--json"],
                              capture_output=True, text=True, timeout=60)
        assert json.loads(show.stdout) == [made]
        bad = subprocess.run(argv[:-3] + ["--peer", "a", str(D)], capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "NAME=ADDRESS" in bad.stderr
        r = subprocess.run([str(KH), "fabric", "unstretch", "--prefix", b.cfg.prefix, str(D)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and stretch.stretched(b.cfg) == {}


def test_kh_fabric_underlay_moves_a_nic_into_khs_namespace() -> None:
    """`kh fabric underlay DEV A/LEN` on a real host: DEV leaves the host's namespace (here a
    scratch namespace standing for it) for kh's fabric as <prefix>ul0, addressed and up (done
    again, it is found there); a missing DEV, a malformed address and an underlay without kh's
    name are one line each."""
    from pyroute2 import netns

    from kh.hw.fabric import Fabric
    from kh.hw.tags import FabricConfig
    from kh.hw.underlay import move_underlay
    from tests.unit.twohost import own
    scratch = f"{own('vxu')}-host"
    fabric = Fabric(FabricConfig(prefix=own("vxu")))
    netns.create(scratch)
    try:
        fabric.ensure()
        with contextlib.closing(NetNS(scratch)) as ns:
            ns.link("add", ifname="vxunic0", kind="veth", peer="vxunic1")
        u = nsutil.run_in(scratch, lambda: move_underlay(fabric.cfg, "vxunic0",
                                                         "192.0.2.1/24"))
        assert u == stretch.Underlay(fabric.cfg.underlay(0), "192.0.2.1")
        with fabric.ns() as ns:
            link = ns.get_links(ns.link_lookup(ifname=u.ifname)[0])[0]
            assert link["flags"] & 1 and link.get_attr("IFLA_IFALIAS") == "kh underlay, was vxunic0"
            assert [a.get_attr("IFA_ADDRESS") for a in ns.get_addr(index=link["index"])] == [
                "192.0.2.1"]
        with contextlib.closing(NetNS(scratch)) as ns:
            assert ns.link_lookup(ifname="vxunic0") == []
        again = nsutil.run_in(scratch, lambda: move_underlay(fabric.cfg, "vxunic0",
                                                             "192.0.2.1/24"))
        assert again == u
        with pytest.raises(StretchError, match=r"^host a: underlay interface eth9 is not named "):
            stretch.ensure(fabric, stretch.Underlay("eth9", "192.0.2.1"), D, [], "a")
        with pytest.raises(StretchError, match=r"^there is no interface nope on this host$"):
            nsutil.run_in(scratch, lambda: move_underlay(fabric.cfg, "nope", "192.0.2.1/24"))
        with pytest.raises(StretchError, match=r"is not A\.B\.C\.D/LEN"):
            move_underlay(fabric.cfg, "vxunic0", "192.0.2.1")
    finally:
        fabric.destroy()
        netns.remove(scratch)


@pytest.mark.skipif(not KH.exists(), reason="kh is not installed in .venv (make venv)")
def test_kh_fabric_on_a_host_without_a_fabric_makes_nothing_half() -> None:
    """On a host where kh has no fabric: `kh fabric stretch` refuses, naming the command that
    makes it, and makes no namespace; `kh fabric underlay` with a missing NIC fails and takes
    away the fabric it had just made."""
    from tests.unit.twohost import own
    prefix = own("vxn")
    ns = f"{prefix}-fabric"
    r = subprocess.run([str(KH), "fabric", "stretch", "--prefix", prefix, "--host", "c",
                        "--underlay", f"{prefix}ul0", "--local", "192.0.2.3", str(D)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr == (
        f"kh: host c: kh's fabric {ns} does not exist here (kh fabric underlay DEV "
        "A.B.C.D/LEN makes it with its underlay)\n")
    assert not nsutil.exists(ns)
    r = subprocess.run([str(KH), "fabric", "underlay", "--prefix", prefix, "nosuchnic0",
                        "192.0.2.3/24"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "there is no interface nosuchnic0" in r.stderr
    assert not nsutil.exists(ns)
