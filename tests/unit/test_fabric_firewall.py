"""The fabric namespace answers only what it serves, where it serves it (issue 11, findings 1,
2, 3 and 6), proved host-side: kh's real namespace, bridges and taps, with raw frames written
into taps opened directly (tests/unit/fx.py) and what comes back counted. Needs root,
/dev/net/tun and nft; skipped otherwise."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
from collections.abc import Iterator

import pytest
from pyroute2 import netns

from kh import proc
from kh.allocation import host_address
from kh.hw import firewall
from kh.hw import netns as nsutil
from kh.hw.fabric import Fabric, bridge_mac
from kh.hw.tags import FabricConfig
from kh.model import EXTERNAL, PUBLIC
from kh.service.qemunode import mac
from tests.unit import fwframes as fx
from tests.unit.tapdev import BROADCAST, ETH_ARP, Tap, mac_bytes

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("nft") is None,
    reason="needs root, /dev/net/tun and nft (the fabric's namespace, taps, firewall)")

API, SSH = 7480, 7422
PRIVATE = 3
NODE_MAC, OTHER_MAC = mac(1, 0), mac(2, 0)  # nodes 1 and 2's first NICs (anti-spoofing checks)
PUB, GW = str(host_address(PUBLIC).ip), str(host_address(EXTERNAL).ip)
WAIT = 1.0  # s to collect answers after the last frame sent


def own(prefix: str) -> str:
    """This run's prefix: unit tests may run in two processes at once on this machine."""
    return f"{prefix}{os.getpid() % 10000}"


@contextlib.contextmanager
def fabric(prefix: str, *, uplink: bool = False) -> Iterator[Fabric]:
    """A fabric of its own (prefix ``prefix`` and this process's number), with the outside
    world's namespace when ``uplink``; everything removed afterwards."""
    prefix = own(prefix)
    out = f"{prefix}-outside" if uplink else None
    cfg = FabricConfig(prefix=prefix, uplink_netns=out)
    f = Fabric(cfg, ports=(API, SSH))
    try:
        if out:
            netns.create(out)
        f.ensure()
        yield f
    finally:
        f.destroy()
        if out and nsutil.exists(out):
            netns.remove(out)


def wired(f: Fabric, node: int, netid: int) -> contextlib.AbstractContextManager[Tap]:
    """Node ``node``'s first interface in domain ``netid``, its tap opened as QEMU would."""
    f.ensure_domain(netid)
    f.ensure_tap(node, 0)
    f.attach(node, 0, netid)
    return fx.opened(f.cfg.netns, f.cfg.tap(node, 0), forwarding=f.ns)


def probes(node_ip: str, bridge_mac_: str, to: list[str]) -> list[bytes]:
    """Everything a node could ask the host for: ARP for each address, ICMP echo and TCP SYN
    to the API and ssh ports at each (to the bridge's MAC and to broadcast), IPv6 ND for the
    bridge's link-local address and an ICMPv6 echo to all nodes."""
    frames = []
    for addr in to:
        frames.append(fx.arp_request(NODE_MAC, node_ip, addr))
        for dst_mac in (bridge_mac_, BROADCAST):
            frames.append(fx.icmp_echo(NODE_MAC, dst_mac, node_ip, addr))
            frames += [fx.tcp_syn(NODE_MAC, dst_mac, node_ip, addr, 40000 + port, port)
                       for port in (API, SSH, 22)]
    frames.append(fx.neighbor_solicit(NODE_MAC, fx.link_local(bridge_mac_)))
    frames.append(fx.echo6_all_nodes(NODE_MAC))
    return frames


def not_from(frames: list[bytes], mac: str) -> list[bytes]:
    return [f for f in frames if f[6:12] != mac_bytes(mac)]


def test_private_domain_gets_no_answer_from_the_host() -> None:
    """Finding 1: from a private domain, nothing the host has answers: not ARP for either of
    its addresses, not ND, ICMP or TCP; and the probes did cross the bridge (a second node's
    tap saw them), so the silence is the host's."""
    with fabric("fwa") as f:
        f.ensure_domain(PUBLIC)
        f.ensure_domain(EXTERNAL)
        with wired(f, 1, PRIVATE) as node, wired(f, 2, PRIVATE) as other:
            fx.wait_bridged(node, other, NODE_MAC)
            for frame in probes("10.3.0.1", bridge_mac(f.cfg.prefix, PRIVATE), [PUB, GW]):
                node.send(frame)
            answers = fx.collect(node, WAIT)
            seen = fx.collect(other, 0.2)
        assert answers == [], f"the host answered in a private domain: {answers[:3]}"
        assert not_from(seen, NODE_MAC) == []
        assert any(f[12:14] == struct.pack("!H", ETH_ARP) for f in seen)


def test_external_domain_reaches_only_its_gateway() -> None:
    """Finding 6: an external-only node gets the gateway's ARP answer (it needs it to reach
    the uplink) and nothing else: no TCP to the API or ssh at either address, no ICMP, no
    ARP for the public address, no IPv6."""
    with fabric("fwb") as f:
        f.ensure_domain(PUBLIC)
        with wired(f, 1, EXTERNAL) as node:
            mac = bridge_mac(f.cfg.prefix, EXTERNAL)
            node.send(fx.arp_request(NODE_MAC, "10.0.0.1", GW))
            gateway = fx.collect(node, WAIT)
            assert [(g[6:12], g[28:32]) for g in gateway] == [
                (mac_bytes(mac), bytes([10, 0, 255, 254]))]
            for frame in probes("10.0.0.1", mac, [GW, PUB]):
                if frame[12:14] == struct.pack("!H", ETH_ARP) and frame[38:42] == \
                        bytes([10, 0, 255, 254]):
                    continue  # the gateway's ARP, answered above
                node.send(frame)
            answers = fx.collect(node, WAIT)
        assert answers == [], f"the host answered on the external domain: {answers[:3]}"


def test_public_domain_answers_arp_and_only_the_service_ports() -> None:
    """Where the host serves, it answers: ARP for 10.1.255.254 once, with the bridge's fixed
    MAC; a SYN to the API port gets the kernel's answer (no listener here: a reset); a SYN to
    port 22 and a ping get nothing; ARP for the gateway's address is not answered here."""
    with fabric("fwc") as f:
        f.ensure_domain(EXTERNAL)
        mac = bridge_mac(f.cfg.prefix, PUBLIC)
        with wired(f, 1, PUBLIC) as node:
            node.send(fx.arp_request(NODE_MAC, "10.1.0.1", PUB))
            replies = fx.collect(node, WAIT)
            assert [(r[6:12], r[20:22], r[28:32]) for r in replies] == [
                (mac_bytes(mac), b"\x00\x02", bytes([10, 1, 255, 254]))]
            node.send(fx.tcp_syn(NODE_MAC, mac, "10.1.0.1", PUB, 40000, API))
            syn = fx.collect(node, WAIT)
            assert len(syn) == 1 and syn[0][23] == 6 and syn[0][26:30] == bytes([10, 1, 255, 254])
            node.send(fx.tcp_syn(NODE_MAC, mac, "10.1.0.1", PUB, 40001, 22))
            node.send(fx.icmp_echo(NODE_MAC, mac, "10.1.0.1", PUB))
            node.send(fx.arp_request(NODE_MAC, "10.1.0.1", GW))
            node.send(fx.neighbor_solicit(NODE_MAC, fx.link_local(mac)))
            assert fx.collect(node, WAIT) == []


def test_bridge_mac_is_fixed_as_nodes_come_and_go() -> None:
    """Finding 2: the public bridge keeps kh's MAC while 10 taps join and leave (it used to
    take a port's MAC, then 00:00:00:00:00:00)."""
    with fabric("fwd") as f:
        f.ensure_domain(PUBLIC)
        want = bridge_mac(f.cfg.prefix, PUBLIC)
        seen = [mac_of(f, f.cfg.bridge(PUBLIC))]
        for node in range(1, 11):
            f.ensure_tap(node, 0)
            f.attach(node, 0, PUBLIC)
            seen.append(mac_of(f, f.cfg.bridge(PUBLIC)))
        for node in range(1, 11):
            f.attach(node, 0, None)
            f.remove_taps(node, 1)
            seen.append(mac_of(f, f.cfg.bridge(PUBLIC)))
        assert set(seen) == {want}
        with f.ns() as ns:  # a bridge an older kh made gets kh's MAC back
            ns.link("set", index=ns.link_lookup(ifname=f.cfg.bridge(PUBLIC))[0],
                    address="02:00:00:00:00:99")
        f.ensure_domain(PUBLIC)
        assert mac_of(f, f.cfg.bridge(PUBLIC)) == want
        assert int(want.split(":")[0], 16) & 0x03 == 0x02  # locally administered, unicast


def mac_of(f: Fabric, ifname: str) -> str:
    with f.ns() as ns:
        return str(ns.get_links(ns.link_lookup(ifname=ifname)[0])[0].get_attr("IFLA_ADDRESS"))


def test_no_address_of_any_family_on_private_bridges_and_taps() -> None:
    with fabric("fwe") as f:
        f.ensure_domain(PUBLIC)
        f.ensure_domain(PRIVATE)
        f.ensure_tap(1, 0)
        f.attach(1, 0, PRIVATE)
        with f.ns() as ns:
            for name in (f.cfg.bridge(PRIVATE), f.cfg.tap(1, 0)):
                assert ns.get_addr(index=ns.link_lookup(ifname=name)[0]) == ()
            public = ns.get_addr(index=ns.link_lookup(ifname=f.cfg.bridge(PUBLIC))[0])
            assert [a.get_attr("IFA_ADDRESS") for a in public] == [PUB]


def test_bridged_traffic_passes_when_br_netfilter_is_turned_on_later(
        caplog: pytest.LogCaptureFixture) -> None:
    """Finding 3: with the uplink in place (forwarding on, forward policy drop) and
    bridge-nf-call-iptables turned on after the fabric is up, as container engines do, two
    nodes of a private domain still reach each other; khd's watch turns the switch off again.
    The sysctl exists once br_netfilter is loaded (`modprobe br_netfilter`; built in here)."""
    with fabric("fwf", uplink=True) as f:
        key = firewall.BRIDGE_NF[0]
        if key not in firewall.read_sysctls(f.cfg.netns, [key]):
            pytest.skip("br_netfilter is not loaded (modprobe br_netfilter)")
        f.ensure_domain(EXTERNAL)  # the uplink in place, as khd has it
        with wired(f, 1, PRIVATE) as a, wired(f, 2, PRIVATE) as b:
            firewall.write_sysctls(f.cfg.netns, [(k, "1") for k in firewall.BRIDGE_NF])
            fx.wait_bridged(a, b, NODE_MAC)
            frame = fx.udp(NODE_MAC, OTHER_MAC, "10.3.0.1", "10.3.0.2", 5000, 5001,
                               b"through one bridge")
            for _ in range(3):
                a.send(frame)
            got = [g for g in fx.collect(b, WAIT) if b"through one bridge" in g]
            assert len(got) == 3
            caplog.clear()
            assert f.watch() == list(firewall.BRIDGE_NF)
            assert firewall.bridge_nf_on(f.cfg.netns) == []
            assert f.watch() == []
            said = [r.getMessage() for r in caplog.records if r.name == "kh.fabric"]
            assert len(said) == 1 and "bridge-nf-call-iptables" in said[0], said


def test_forwarding_only_between_external_and_uplink() -> None:
    """With an uplink: a packet from an external node to the outside world is forwarded (and
    masqueraded), one from a public node to the outside world or to an external node is not;
    IPv4 forwarding is on and IPv6 forwarding off."""
    with fabric("fwg", uplink=True) as f:
        f.ensure_domain(EXTERNAL)
        with wired(f, 1, EXTERNAL) as ext, wired(f, 2, PUBLIC) as pub, \
                Outside(f.cfg.uplink_netns or "") as world:
            gw_mac = bridge_mac(f.cfg.prefix, EXTERNAL)
            ext.send(fx.arp_request(NODE_MAC, "10.0.0.1", GW))
            fx.collect(ext, WAIT)  # the host now knows the node (its request taught it)
            ext.send(fx.udp(NODE_MAC, gw_mac, "10.0.0.1", world.ip, 5000, 6000, b"ext"))
            pub_mac = bridge_mac(f.cfg.prefix, PUBLIC)
            pub.send(fx.udp(OTHER_MAC, pub_mac, "10.1.0.2", world.ip, 5000, 6000, b"pub"))
            pub.send(fx.udp(OTHER_MAC, pub_mac, "10.1.0.2", "10.0.0.1", 5000, 6000,
                                b"pub-to-ext"))
            got = world.received(WAIT)
            assert [d for d, _ in got] == [b"ext"]
            assert got[0][1][0] == "10.254.255.1"  # masqueraded behind the uplink
            assert all(b"pub-to-ext" not in g for g in fx.collect(ext, 0.3))
        values = firewall.read_sysctls(f.cfg.netns, ["net.ipv4.ip_forward",
                                                     "net.ipv6.conf.all.forwarding"])
        assert values == {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "0"}


class Outside:
    """A UDP listener in the outside world's namespace, at its end of the uplink."""

    ip = "10.254.255.2"

    def __init__(self, name: str) -> None:
        self.sock = nsutil.run_in(name, lambda: socket.socket(socket.AF_INET,
                                                              socket.SOCK_DGRAM))
        self.sock.bind((self.ip, 6000))

    def received(self, wait: float) -> list[tuple[bytes, tuple[str, int]]]:
        self.sock.settimeout(wait)
        got = []
        with contextlib.suppress(TimeoutError):
            while True:
                got.append(self.sock.recvfrom(2048))
        return got

    def __enter__(self) -> Outside:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_forwarding_is_set_never_inherited() -> None:
    """Without an uplink IPv4 forwarding is off in kh's namespace even when it was on (a new
    namespace may copy the host's), and the ruleset is the same after a second apply."""
    cfg = FabricConfig(prefix=own("fwh"))
    netns.create(cfg.netns)
    try:
        nsutil.sysctl(cfg.netns, "net.ipv4.ip_forward", "1")
        f = Fabric(cfg, ports=(API, SSH))
        f.ensure()
        f.ensure_domain(PUBLIC)
        f.ensure_domain(PRIVATE)
        assert firewall.read_sysctls(cfg.netns, ["net.ipv4.ip_forward"]) == {
            "net.ipv4.ip_forward": "0"}
        first = without_handles(firewall.listed(cfg.netns))
        f.apply_firewall()
        assert without_handles(firewall.listed(cfg.netns)) == first
        assert any("rule" in o for o in first)
    finally:
        Fabric(cfg).destroy()


def without_handles(objs: list[dict]) -> list[dict]:
    return [{k: {kk: vv for kk, vv in v.items() if kk != "handle"} for k, v in o.items()}
            for o in objs]


def test_applying_in_a_namespace_keeps_other_tables() -> None:
    """kh's transaction replaces only its own tables (anti-spoofing's stay), and removes the
    iptables tables an older kh left (their FORWARD DROP would still cut bridged frames)."""
    with fabric("fwi") as f:
        firewall.apply(f.cfg.netns, [
            {"add": {"table": {"family": "bridge", "name": "other"}}},
            {"add": {"table": {"family": "ip", "name": "filter"}}},
            {"add": {"chain": {"family": "ip", "table": "filter", "name": "FORWARD",
                               "type": "filter", "hook": "forward", "prio": 0,
                               "policy": "drop"}}}])
        f.apply_firewall()
        names = {(o["table"]["family"], o["table"]["name"])
                 for o in listed_all(f.cfg.netns) if "table" in o}
        assert {("bridge", "other"), ("inet", "kh_fabric"), ("arp", "kh_fabric")} <= names
        assert ("ip", "filter") not in names


def listed_all(name: str) -> list[dict]:
    out = proc.run(nsutil.enter_argv(name) + ["nft", "-j", "list", "tables"]).stdout
    return list(json.loads(out)["nftables"])



def test_a_refused_ruleset_is_one_line_naming_the_firewall() -> None:
    with fabric("fwj") as f:
        bad = firewall.ruleset(firewall.Plan.of(f.cfg, [1], [API]))
        bad.append({"add": {"rule": {"family": "inet", "table": firewall.TABLE,
                                     "chain": "no-such-chain", "expr": [{"accept": None}]}}})
        assert f._nft is not None
        with pytest.raises(firewall.FirewallError, match="nft refused kh's firewall: ") as e:
            firewall.load(f._nft, bad)
        assert "anti-spoofing" not in str(e.value) and "\n" not in str(e.value)
        assert any("rule" in o for o in firewall.listed(f.cfg.netns))  # the old one stays
