"""Communication domains across hosts (issue 16, item 3; docs/multihost.md): a domain with
nodes on several hosts is stretched over VXLAN between those hosts' fabrics.

On each such host kh's fabric namespace holds a vxlan device ``<prefix>vx<netid>`` with VNI
``vni(netid)`` in the domain's bridge, learning nothing, with one all-zero FDB entry per peer
host (head-end replication: no multicast in the underlay). The underlay is an interface inside
kh's namespace (``Underlay``), so kh's firewall (kh.hw.firewall) sees it: VXLAN only from the
peers, read back from the kernel (``tunnels``), also where no khd runs (`kh fabric`). Every hop
(device, bridge, taps, nodes' ``kh.mtuN``) has MTU ``guest_mtu``; outer packets carry DF.

This module makes, removes and reads back the devices; the rules without a kernel (VNI, MTU,
what a request may hold, the remote command) are kh.hw.stretchrules, whose names it also
offers.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pyroute2 import NetNS
from pyroute2.netlink.exceptions import NetlinkError

from kh.errors import KhError
from kh.hw import arp
from kh.hw import netns as nsutil
from kh.hw.stretchrules import (
    IFNAME,
    MAX_PEERS,
    VNI_BASE,
    Made,
    Peer,
    Stretch,
    StretchError,
    Tunnel,
    Underlay,
    _address,
    check,
    guest_mtu,
    kh_underlay,
    remote_argv,
    vni,
)
from kh.hw.tags import FabricConfig

if TYPE_CHECKING:
    from kh.hw.fabric import Fabric

log = logging.getLogger("kh.stretch")

DEFAULT_MTU = 1500  # what a bridge and its taps go back to when the stretch goes
ANY_MAC = "00:00:00:00:00:00"  # an FDB entry for every destination: head-end replication
VXLAN_DF_SET = 1  # IFLA_VXLAN_DF: outer packets never fragmented
# kh.hw.stretchrules' names, which callers take from here as well
__all__ = [
    "IFNAME",
    "MAX_PEERS",
    "VNI_BASE",
    "Made",
    "Peer",
    "Stretch",
    "StretchError",
    "Tunnel",
    "Underlay",
    "_address",
    "check",
    "ensure",
    "guest_mtu",
    "kernel_says",
    "remote_argv",
    "remove",
    "stretched",
    "tunnels",
    "vni",
]


def kernel_says(e: Exception) -> str:
    """The kernel's words for a netlink or OS error ``e`` (its errno's text)."""
    code = e.code if isinstance(e, NetlinkError) else getattr(e, "errno", None)
    return os.strerror(code) if code else str(e)


def _underlay_link(ns: NetNS, cfg: FabricConfig, underlay: Underlay, host: str
                   ) -> tuple[int, int]:
    """(index, MTU) of the underlay interface; StretchError unless it is there, up and holds
    the underlay address."""
    idx = ns.link_lookup(ifname=underlay.ifname)
    if not idx:
        raise StretchError(f"host {host}: underlay interface {underlay.ifname} is not in "
                           f"{cfg.netns}", "kh fabric underlay DEV ADDRESS/LEN moves it there")
    link = ns.get_links(idx[0])[0]
    if not link["flags"] & 1:  # IFF_UP
        raise StretchError(f"host {host}: underlay interface {underlay.ifname} is down")
    addrs = {a.get_attr("IFA_ADDRESS") for a in ns.get_addr(index=idx[0],
                                                            family=socket.AF_INET)}
    if underlay.address not in addrs:
        raise StretchError(f"host {host}: underlay interface {underlay.ifname} does not hold "
                           f"{underlay.address}", f"it holds {', '.join(sorted(addrs)) or 'none'}")
    return idx[0], int(link.get_attr("IFLA_MTU"))


def _check_route(ns: NetNS, peer: Peer, ul_index: int, underlay: Underlay, host: str) -> str:
    """The peer is reached through the underlay interface (a route lookup: a peer behind
    another interface, or behind none, is refused); the next hop there (the peer itself, or
    the gateway it is routed through)."""
    try:
        routes = ns.route("get", dst=peer.address)
    except NetlinkError as e:
        raise StretchError(f"host {host}: peer {peer.host} ({peer.address}) is unreachable: "
                           f"{kernel_says(e)}", f"route it through {underlay.ifname}") from None
    oif = routes[0].get_attr("RTA_OIF") if routes else None
    if oif != ul_index:
        raise StretchError(f"host {host}: peer {peer.host} ({peer.address}) is not reached "
                           f"through the underlay {underlay.ifname}",
                           f"route it through {underlay.ifname}")
    return str(routes[0].get_attr("RTA_GATEWAY") or peer.address)


def _check_alive(cfg: FabricConfig, underlay: Underlay, peers: Sequence[Peer],
                 hops: Sequence[str], host: str) -> None:
    """Each peer's next hop answers ARP on the underlay (a host that is down, or an address
    no host holds, is refused before anything is made)."""
    for peer, hop in zip(peers, hops, strict=True):
        if not arp.arp_answers(cfg.netns, underlay.ifname, underlay.address, hop):
            via = "" if hop == peer.address else f" (its gateway {hop})"
            raise StretchError(f"host {host}: peer {peer.host} ({peer.address}) is unreachable: "
                               f"no ARP answer{via} on {underlay.ifname}",
                               "is that host up, and its underlay address right?")


def _vxlan_attrs(link: Any) -> tuple[int, str, int, int] | None:
    """(vni, local, port, underlay index) of a vxlan link; None for another kind."""
    get = link.get_nested
    if get("IFLA_LINKINFO", "IFLA_INFO_KIND") != "vxlan":
        return None

    def data(key: str) -> Any:
        return get("IFLA_LINKINFO", "IFLA_INFO_DATA", key)

    return (int(data("IFLA_VXLAN_ID") or 0), str(data("IFLA_VXLAN_LOCAL") or ""),
            int(data("IFLA_VXLAN_PORT") or 0), int(data("IFLA_VXLAN_LINK") or 0))


def _fdb_peers(ns: NetNS, index: int) -> set[str]:
    """Destinations of the device's all-zero FDB entries (its head-end replication list)."""
    out = set()
    for e in ns.fdb("dump", ifindex=index):
        if e["ifindex"] == index and e.get_attr("NDA_LLADDR") == ANY_MAC:
            dst = e.get_attr("NDA_DST")
            if dst:
                out.add(str(dst))
    return out


def _set_mtu(ns: NetNS, bridge: int, mtu: int) -> None:
    """The bridge and every port of it (taps, the vxlan device) at ``mtu``."""
    for link in ns.get_links():
        if link.get_attr("IFLA_MASTER") == bridge and link.get_attr("IFLA_MTU") != mtu:
            ns.link("set", index=link["index"], mtu=mtu)
    ns.link("set", index=bridge, mtu=mtu)


def ensure(fabric: Fabric, underlay: Underlay, netid: int, peers: Sequence[Peer],
           host: str = "this host") -> Made:
    """Stretch domain ``netid`` from this host (its fabric and underlay end) to ``peers``:
    the domain's bridge, its vxlan device with exactly these peers' FDB entries, the MTU of
    every hop, the firewall reloaded. Checked first (the request, the underlay there, up and
    addressed, its MTU, each peer routed through it); a taken port shows when the device comes
    up. On any fault one StretchError naming ``host``, and nothing this call made is left.
    Idempotent; a device made otherwise (other VNI, port, address or underlay) is made again.
    What was new (``Made``: true when the device was)."""
    want = check(underlay, netid, peers, host)
    cfg = fabric.cfg
    kh_underlay(cfg, underlay, host)
    name = cfg.vxlan(netid)
    attrs = (vni(netid), underlay.address, underlay.port)
    with fabric.ns() as ns:
        ul_index, ul_mtu = _underlay_link(ns, cfg, underlay, host)
        mtu = guest_mtu(ul_mtu, host, underlay.ifname)
        hops = [_check_route(ns, p, ul_index, underlay, host) for p in peers]
        old = ns.link_lookup(ifname=name)
        stale = bool(old) and _vxlan_attrs(ns.get_links(old[0])[0]) != (*attrs, ul_index)
    _check_alive(cfg, underlay, peers, hops, host)
    new_bridge = netid not in fabric.domain_bridges()
    fabric.ensure_domain(netid)
    made = False
    try:
        with fabric.ns() as ns:
            idx = ns.link_lookup(ifname=name)
            if idx and stale:
                log.info("%s: %s was made otherwise; making it again", host, name)
                ns.link("del", index=idx[0])
                idx = []
            if not idx:
                try:
                    ns.link("add", ifname=name, kind="vxlan", vxlan_id=attrs[0],
                            vxlan_local=underlay.address, vxlan_port=underlay.port,
                            vxlan_link=ul_index, vxlan_learning=0, vxlan_ttl=64,
                            vxlan_df=VXLAN_DF_SET, mtu=mtu)
                except NetlinkError as e:
                    hint = ("load the vxlan module: `modprobe vxlan`"
                            if e.code in (errno.EOPNOTSUPP, errno.ENODEV) else None)
                    raise StretchError(f"host {host}: cannot create vxlan device {name}: "
                                       f"{kernel_says(e)}", hint) from None
                made = True
                idx = ns.link_lookup(ifname=name)
            bridge = ns.link_lookup(ifname=cfg.bridge(netid))[0]
            ns.link("set", index=idx[0], master=bridge)
            _set_mtu(ns, bridge, mtu)
            try:
                ns.link("set", index=idx[0], state="up")
            except NetlinkError as e:
                if e.code == errno.EADDRINUSE:
                    raise StretchError(f"host {host}: VXLAN port {underlay.port} is taken in "
                                       f"{cfg.netns} (another socket holds it)",
                                       "free it, or give kh another port") from None
                raise StretchError(f"host {host}: cannot bring {name} up: "
                                   f"{kernel_says(e)}") from None
            have = _fdb_peers(ns, idx[0])
            for addr in sorted(set(want) - have):
                ns.fdb("append", ifindex=idx[0], lladdr=ANY_MAC, dst=addr)
            for addr in sorted(have - set(want)):
                ns.fdb("del", ifindex=idx[0], lladdr=ANY_MAC, dst=addr)
        fabric.apply_firewall()
    except BaseException:
        with contextlib.suppress(KhError, NetlinkError, OSError):
            if made:
                with fabric.ns() as ns:
                    for i in ns.link_lookup(ifname=name):
                        ns.link("del", index=i)
            if new_bridge:
                fabric.remove_domain(netid)
            elif made:
                fabric.apply_firewall()
        raise
    log.info("%s: domain %d stretched (VNI %d, MTU %d) to %s", host, netid, attrs[0], mtu,
             ", ".join(want) or "no peer yet")
    return Made(made, new_bridge)


def remove(fabric: Fabric, netid: int, bridge: bool = False) -> bool:
    """Take domain ``netid``'s vxlan device away (its FDB entries go with it), put the bridge
    and its taps back to DEFAULT_MTU and reload the firewall. The bridge stays (it is the
    domain's), unless ``bridge`` (undoing an ``ensure`` that made it) and no tap is in it.
    True when there was a device."""
    cfg = fabric.cfg
    empty = False
    with fabric.ns() as ns:
        idx = ns.link_lookup(ifname=cfg.vxlan(netid))
        if idx:
            ns.link("del", index=idx[0])
        br = ns.link_lookup(ifname=cfg.bridge(netid))
        if br:
            _set_mtu(ns, br[0], DEFAULT_MTU)
            empty = not any(link.get_attr("IFLA_MASTER") == br[0] for link in ns.get_links())
    if bridge and br and empty:
        fabric.remove_domain(netid)  # reloads the firewall
    elif idx:
        fabric.apply_firewall()
    return bool(idx)


def _is_vxlan_name(cfg: FabricConfig, name: str) -> bool:
    head = cfg.vxlan(0)[:-1]
    tail = name[len(head):]
    return name.startswith(head) and tail.isdigit() and tail.isascii() and \
        name == cfg.vxlan(int(tail))


def stretched(cfg: FabricConfig) -> dict[int, Stretch]:
    """kh's stretched domains in ``cfg``'s namespace now, read from the kernel: {netid:
    Stretch}. Empty when the namespace does not exist."""
    if not nsutil.exists(cfg.netns):
        return {}
    out = {}
    with contextlib.closing(NetNS(cfg.netns)) as ns:
        links = list(ns.get_links())
        names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in links}
        for link in links:
            name = str(link.get_attr("IFLA_IFNAME"))
            attrs = _vxlan_attrs(link)
            if attrs is None or not _is_vxlan_name(cfg, name):
                continue
            netid = int(name[len(cfg.vxlan(0)) - 1:])
            number, local, port, ul = attrs
            peers = tuple(sorted(_fdb_peers(ns, int(link["index"])),
                                 key=ipaddress.IPv4Address))
            out[netid] = Stretch(netid, number, name, Underlay(names.get(ul, ""), local, port),
                                 peers, int(link.get_attr("IFLA_MTU")))
    return out


def tunnels(cfg: FabricConfig, names: Iterable[str]) -> tuple[Tunnel, ...]:
    """What the firewall must let through for the vxlan devices among ``names`` (the
    namespace's link names; nothing is read when none is kh's vxlan device): one Tunnel per
    underlay end, its peers the union of the devices' FDB destinations."""
    if not any(_is_vxlan_name(cfg, n) for n in names):
        return ()
    ends: dict[tuple[str, str, int], set[str]] = {}
    for s in stretched(cfg).values():
        if s.underlay.ifname:
            key = (s.underlay.ifname, s.underlay.address, s.underlay.port)
            ends.setdefault(key, set()).update(s.peers)
    return tuple(Tunnel(i, a, p, tuple(sorted(peers, key=ipaddress.IPv4Address)))
                 for (i, a, p), peers in sorted(ends.items()) if peers)
