"""The underlay of domains across hosts (kh.hw.stretch) on a real host: the NIC on the network
between kh's hosts, moved into kh's fabric namespace so that kh's firewall sees it and its
address lives in kh's namespace (`kh fabric underlay DEV A.B.C.D/LEN`)."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from kh.hw import netns as nsutil
from kh.hw import stretch
from kh.hw.stretch import IFNAME, Peer, StretchError, Underlay, kernel_says
from kh.hw.tags import FabricConfig


def move_underlay(cfg: FabricConfig, dev: str, interface: str) -> Underlay:
    """Move host interface ``dev`` (the host's own namespace) into kh's fabric namespace as
    ``<prefix>ulN`` (the first free N; its alias keeps the old name) with ``interface``
    (A.B.C.D/LEN), up: a real host's underlay. Done again, it finds it there. It stays until
    `kh clean` removes the namespace (a physical NIC then goes back to the host). StretchError
    when there is no such interface or the kernel refuses."""
    try:
        if "/" not in interface:
            raise ValueError(interface)
        iface = ipaddress.IPv4Interface(interface)
    except ValueError:
        raise StretchError(f"underlay address {interface!r} is not A.B.C.D/LEN") from None
    if not IFNAME.fullmatch(dev):
        raise StretchError(f"interface name {dev!r} is malformed")
    if not nsutil.exists(cfg.netns):
        raise StretchError(f"kh's fabric {cfg.netns} does not exist",
                           "kh service start makes it")
    alias = f"kh underlay, was {dev}"
    with IPRoute() as host:
        idx = host.link_lookup(ifname=dev)
        if idx:
            try:
                host.link("set", index=idx[0], state="down")
                host.link("set", index=idx[0], ifalias=alias)
                host.link("set", index=idx[0], net_ns_fd=nsutil.path(cfg.netns))
            except NetlinkError as e:
                raise StretchError(f"cannot move {dev} into {cfg.netns}: "
                                   f"{kernel_says(e)}") from None
    with contextlib.closing(NetNS(cfg.netns)) as ns:
        links = {str(link.get_attr("IFLA_IFNAME")): link for link in ns.get_links()}
        found = [n for n, link in links.items()
                 if n == dev or link.get_attr("IFLA_IFALIAS") == alias]
        if not found:
            raise StretchError(f"there is no interface {dev} on this host")
        name, idx = found[0], int(links[found[0]]["index"])
        if name == dev:  # just moved in: kh's name for it
            name = next(cfg.underlay(n) for n in range(1000) if cfg.underlay(n) not in links)
            ns.link("set", index=idx, ifname=name)
        have = {a.get_attr("IFA_ADDRESS") for a in ns.get_addr(index=idx)}
        if str(iface.ip) not in have:
            ns.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        ns.link("set", index=idx, state="up")
    return Underlay(name, str(iface.ip))


@dataclass(frozen=True)
class Found:
    """An underlay interface in kh's fabric namespace: ``<prefix>ulN``, up, with an IPv4
    ``address`` (no prefix length) and its ``mtu`` (bytes)."""

    ifname: str
    address: str
    mtu: int

    def as_json(self) -> dict[str, object]:
        return {"ifname": self.ifname, "address": self.address, "mtu": self.mtu}


def underlays(cfg: FabricConfig) -> list[Found]:
    """This host's underlay interfaces in kh's fabric namespace, by name: each ``<prefix>ulN``
    that is up, with each of its IPv4 addresses (`kh fabric underlay` made them). Empty when
    there is no fabric or no underlay."""
    if not nsutil.exists(cfg.netns):
        return []
    pattern = re.compile(re.escape(cfg.underlay(0)[:-1]) + r"\d{1,3}")
    out = []
    with contextlib.closing(NetNS(cfg.netns)) as ns:
        for link in ns.get_links():
            name = str(link.get_attr("IFLA_IFNAME"))
            if not pattern.fullmatch(name) or not link["flags"] & 1:  # IFF_UP
                continue
            for a in ns.get_addr(index=link["index"], family=socket.AF_INET):
                out.append(Found(name, str(a.get_attr("IFA_ADDRESS")),
                                 int(link.get_attr("IFLA_MTU"))))
    return sorted(out, key=lambda f: (f.ifname, ipaddress.IPv4Address(f.address)))


def check_reaches(cfg: FabricConfig, local: Underlay, peer: Peer, host: str) -> int:
    """``peer`` (another host's underlay address) is routed through this host's underlay
    ``local`` and answers ARP there (what a stretch to it needs; nothing is made). This
    underlay's MTU. StretchError naming ``host`` (this host's kh name) and what is wrong."""
    stretch.check(local, 0, [peer], host)
    with contextlib.closing(NetNS(cfg.netns)) as ns:
        index, mtu = stretch._underlay_link(ns, cfg, local, host)
        hop = stretch._check_route(ns, peer, index, local, host)
    stretch._check_alive(cfg, local, [peer], [hop], host)
    return mtu
