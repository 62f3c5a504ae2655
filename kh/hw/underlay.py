"""The underlay of domains across hosts (kh.hw.stretch) on a real host: the NIC on the network
between kh's hosts, moved into kh's fabric namespace so that kh's firewall sees it and its
address lives in kh's namespace (`kh fabric underlay DEV A.B.C.D/LEN`)."""

from __future__ import annotations

import contextlib
import ipaddress

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from kh.hw import netns as nsutil
from kh.hw.stretch import IFNAME, StretchError, Underlay, kernel_says
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
