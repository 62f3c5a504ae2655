"""kh's own outside world, host-side (issue 12, item 1): made by the fabric, wired to the
external domain as the tests' uplink was (address, route, no IPv6, no forwarding), found again
by a second start, removed by `kh clean`'s steps and only when it is kh's; and a published
port's forwarder connects from it to an external node: the node's tap sees the connection
come from the outside world's address. Needs root, /dev/net/tun and nft; skipped otherwise."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import time

import pytest
from pyroute2 import NetNS, netns

from kh.allocation import host_address
from kh.hw import firewall
from kh.hw import netns as nsutil
from kh.hw.fabric import Fabric, bridge_mac
from kh.hw.tags import FabricConfig
from kh.model import EXTERNAL
from kh.service.forward import Forwarder
from kh.service.qemunode import mac
from tests.unit import fwframes as fx
from tests.unit.tapdev import ETH_ARP, ETH_IP, Tap, arp, eth

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("nft") is None,
    reason="needs root, /dev/net/tun and nft (the fabric's namespace, taps, firewall)")

NODE_MAC = mac(1, 0)
GW = str(host_address(EXTERNAL).ip)


def own_cfg(prefix: str) -> FabricConfig:
    p = f"{prefix}{os.getpid() % 10000}"
    return FabricConfig(prefix=p, uplink_netns=f"{p}-outside", own_outside=True)


@contextlib.contextmanager
def fabric(cfg: FabricConfig):  # type: ignore[no-untyped-def]
    f = Fabric(cfg, ports=(7480, 7422))
    try:
        f.ensure()
        f.ensure_domain(EXTERNAL)
        yield f
    finally:
        f.destroy()
        f.destroy_outside()


def test_kh_makes_its_outside_world_wires_it_and_removes_only_its_own() -> None:
    cfg = own_cfg("kho")
    with fabric(cfg):
        out = cfg.outside_netns
        assert nsutil.exists(out)
        with contextlib.closing(NetNS(out)) as ns:
            links = {link.get_attr("IFLA_IFNAME") for link in ns.get_links()}
            addrs = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ns.get_addr()}
            routes = {(r.get_attr("RTA_DST"), r["dst_len"], r.get_attr("RTA_GATEWAY"))
                      for r in ns.get_routes(family=socket.AF_INET, table=254)}
        assert links == {"lo", cfg.outside}
        assert ("10.254.255.2", 30) in addrs and ("127.0.0.1", 8) in addrs
        assert ("10.0.0.0", 16, "10.254.255.1") in routes
        assert not any(dst is None for dst, _, _ in routes)  # no default route: nothing else
        assert firewall.read_sysctls(out, ["net.ipv4.ip_forward",
                                           "net.ipv6.conf.all.disable_ipv6"]) == {
            "net.ipv4.ip_forward": "0", "net.ipv6.conf.all.disable_ipv6": "1"}
        # a second start (a restarted khd) finds it as it is
        again = Fabric(cfg, ports=(7480, 7422))
        again.ensure()
        again.ensure_domain(EXTERNAL)
        with contextlib.closing(NetNS(out)) as ns:
            assert len(ns.link_lookup(ifname=cfg.outside)) == 1
    assert not nsutil.exists(cfg.outside_netns) and not nsutil.exists(cfg.netns)
    # an operator's namespace is never kh's to remove, whatever the configuration says
    theirs = f"khtheirs{os.getpid() % 10000}"
    netns.create(theirs)
    try:
        other = FabricConfig(prefix=cfg.prefix, uplink_netns=theirs)
        with fabric(other):
            pass
        assert nsutil.exists(theirs) and not nsutil.exists(other.outside_netns)
    finally:
        netns.remove(theirs)


def test_a_forwarded_connection_reaches_an_external_node_from_the_outside_world() -> None:
    cfg = own_cfg("khp")
    with fabric(cfg) as f:
        f.ensure_tap(1, 0)
        f.attach(1, 0, EXTERNAL)
        fwd = Forwarder(cfg.outside_netns)
        fwd.start()
        try:
            hp = fwd.open(0, ("10.0.0.1", 80), lambda p: True)
            with fx.opened(cfg.netns, cfg.tap(1, 0), forwarding=f.ns) as tap, \
                    socket.create_connection(("127.0.0.1", hp), timeout=10):
                syn = wait_syn(tap, bridge_mac(cfg.prefix, EXTERNAL))
        finally:
            fwd.stop()
    src, dst, dport = syn
    assert (src, dst, dport) == ("10.254.255.2", "10.0.0.1", 80)


def wait_syn(tap: Tap, gw_mac: str, timeout: float = 10.0) -> tuple[str, str, int]:
    """Answer the gateway's ARP for 10.0.0.1 as node 1 would, until a TCP SYN to it comes:
    its (source, destination, port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for frame in fx.collect(tap, 0.3):
            kind = struct.unpack("!H", frame[12:14])[0]
            if kind == ETH_ARP and frame[20:22] == b"\x00\x01" and \
                    socket.inet_ntoa(frame[38:42]) == "10.0.0.1":
                tap.send(eth(gw_mac, NODE_MAC, ETH_ARP, arp(2, NODE_MAC, "10.0.0.1", gw_mac,
                                                            GW)))
            elif kind == ETH_IP and frame[23] == 6 and frame[14 + 20 + 13] & 0x02:
                return (socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]),
                        struct.unpack("!H", frame[36:38])[0])
    raise AssertionError("no SYN reached the external node")


def test_removing_the_fabric_forks_no_child(monkeypatch) -> None:
    """`kh clean` and a failed `kh service start` remove the fabric from the CLI's own
    process: a pyroute2 NetNS there forked a copy of the CLI, which NetNS ended with SIGTERM,
    and that copy (with the CLI's signal handlers) printed `kh: stopped by SIGTERM` beside the
    real error, now and then (test_service_faults saw it once in 8 starts). No fork at all."""
    cfg = own_cfg("khf")
    f = Fabric(cfg, ports=(7480, 7422))
    f.ensure()
    f.ensure_domain(EXTERNAL)

    def no_fork() -> int:
        raise AssertionError("forked a child of the caller")
    try:
        with monkeypatch.context() as m:
            m.setattr(os, "fork", no_fork)
            gone = Fabric(cfg, ports=(7480, 7422))
            assert gone.destroy() and gone.destroy_outside()
    finally:
        f.destroy()
        f.destroy_outside()
    assert not nsutil.exists(cfg.netns) and not nsutil.exists(cfg.outside_netns)
