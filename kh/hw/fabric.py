"""The communication fabric: kh's network namespace, one bridge per domain, one tap per node
interface, and the external domain's uplink, built with pyroute2.

Isolation is the host's job: every private domain is a bridge with no address of any family, so
nothing can route into or out of it and the host answers nothing there; the external and public
bridges carry kh's own address (gateway, service listener). What the namespace accepts, answers
and forwards is kh's nftables ruleset (kh.hw.firewall), re-applied whenever the set of bridges
changes; each bridge has a fixed MAC of kh's own (``bridge_mac``), so nodes' ARP entries for the
service never go stale as taps come and go.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Iterable, Iterator

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from kh.allocation import host_address, subnet
from kh.errors import KhError
from kh.hw import firewall, outside, stretch
from kh.hw import netns as nsutil
from kh.hw.antispoof import AntiSpoof, NftContext
from kh.hw.tags import FabricConfig
from kh.model import EXTERNAL, PUBLIC

log = logging.getLogger("kh.fabric")


class FabricError(KhError):
    """The host refused to build a part of the fabric."""


# The kernel module behind each kind of link kh makes (loaded on demand when modprobe can).
DRIVERS = {"bridge": "bridge", "tuntap": "tun", "veth": "veth"}


def link_error(kind: str, name: str, e: Exception) -> FabricError:
    """One line for a link the kernel would not make; a missing driver is named with the
    command that loads it (measured: no /dev/net/tun gives ENOENT, an unknown kind
    EOPNOTSUPP)."""
    code = e.code if isinstance(e, NetlinkError) else getattr(e, "errno", None)
    what = f"{'tap' if kind == 'tuntap' else kind} {name}"
    if code in (errno.EOPNOTSUPP, errno.ENOENT, errno.ENODEV) and kind in DRIVERS:
        module = DRIVERS[kind]
        why = ("/dev/net/tun is missing" if kind == "tuntap"
               else f"the kernel has no {kind} driver")
        return FabricError(f"cannot create {what}: {why}",
                           f"load the {module} module: `modprobe {module}`")
    return FabricError(f"cannot create {what}: {os.strerror(code) if code else e}")


def add_link(ns: NetNS, kind: str, name: str, **kw: object) -> None:
    try:
        ns.link("add", ifname=name, kind=kind, **kw)
    except (NetlinkError, OSError) as e:
        raise link_error(kind, name, e) from None


def bridge_mac(prefix: str, netid: int, remote: str | None = None) -> str:
    """Domain ``netid``'s bridge MAC: locally administered, unicast (02:...), three bytes from
    kh's prefix (two khds with other prefixes differ), the netid in the last two. On another
    host of the installation (``remote``: its kh name) three bytes of its own: a stretched
    domain's bridges must not share a MAC, or frames for the khd host's bridge would stop at
    the first bridge on their way."""
    h = hashlib.sha256(f"kh-bridge:{prefix}".encode() if remote is None
                       else f"kh-bridge:{prefix}:{remote}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, h[0], h[1], h[2], netid >> 8 & 0xff,
                                            netid & 0xff))


class Fabric:
    """kh's namespace and what is in it. ``ports`` are the TCP ports khd serves at the public
    host address (API, ssh): the only input the firewall lets in. ``remote``: this is another
    host's side of an installation whose khd runs elsewhere (its kh name; `kh fabric`, domains
    across hosts): its public and external bridges carry no address of kh's (the service and
    the gateway are the khd host's, reached over the stretched domain) and MACs of their own."""

    def __init__(self, cfg: FabricConfig, ports: Iterable[int] = (),
                 remote: str | None = None) -> None:
        self.cfg = cfg
        self.ports = tuple(ports)
        self.remote = remote
        self._firewall_lock = threading.Lock()
        self._nft: NftContext | None = None  # made in kh's namespace on first use
        self.antispoof = AntiSpoof(cfg)  # what a tap may send on a shared domain

    @contextlib.contextmanager
    def ns(self) -> Iterator[NetNS]:
        ns = NetNS(self.cfg.netns)
        try:
            yield ns
        finally:
            ns.close()

    # -- the namespace ----------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the namespace, set its sysctls (no IPv6, ARP only on the asked interface,
        forwarding on only with an uplink, br_netfilter off), bring loopback up and load the
        firewall for the bridges there are."""
        name = self.cfg.netns
        self._let_go()  # the namespace may be a new one of the same name
        if self.cfg.own_outside:  # before the uplink's veth end is moved there
            outside.ensure(self.cfg.outside_netns)
        if not nsutil.exists(name):
            try:
                netns.create(name)
            except OSError as e:
                raise FabricError(f"cannot create network namespace {name}: {e.strerror}",
                                  "kh's fabric needs root") from None
        firewall.write_sysctls(name, firewall.hardening(self.cfg.uplink_netns is not None))
        with self.ns() as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        self.apply_firewall()
        self.antispoof.rebuild()  # afresh, for the taps' wiring now (a khd start)

    def apply_firewall(self) -> None:
        """(Re)load kh's ruleset for the bridges that exist now (one transaction, through
        libnftables in-process: a few ms on the khget that makes a domain, where nsenter+nft
        took 20-55 ms here). Serialised: two domains made at once must not each load a list
        missing the other's bridge."""
        with self._firewall_lock:
            names = self.links()
            plan = firewall.Plan.of(self.cfg, self.domain_bridges(names), self.ports,
                                    stretch.tunnels(self.cfg, names))
            if self._nft is None:
                self._nft = NftContext(self.cfg.netns)
            firewall.load(self._nft, firewall.ruleset(plan))

    def _let_go(self) -> None:
        """Drop the firewall's libnftables context: its socket keeps the namespace it was made
        in alive (before removal, or when the namespace may be a new one of the same name)."""
        with self._firewall_lock:
            if self._nft is not None:
                self._nft.close()
                self._nft = None

    def watch(self) -> list[str]:
        """Turn br_netfilter's switches off again if something turned them on (container
        engines do, and loading the module later turns them on in every namespace); returns
        the keys reset, logged in one line. The firewall lets bridged frames through anyway;
        this keeps bridged traffic out of the host's IP filtering altogether."""
        if not nsutil.exists(self.cfg.netns):
            return []  # no fabric (yet, or any more): nothing to watch
        on = firewall.bridge_nf_on(self.cfg.netns)
        if on:
            firewall.write_sysctls(self.cfg.netns, [(k, "0") for k in on])
            log.warning("%s was turned on in %s (br_netfilter); kh turned it off again",
                        ", ".join(on), self.cfg.netns)
        return on

    def destroy(self) -> bool:
        """Remove the namespace and with it every bridge, tap and veth end inside (True when
        it was there); ``destroy_outside`` removes kh's outside world."""
        self.antispoof.close()  # its libnftables context would keep the namespace alive
        self._let_go()  # and so would the firewall's
        if not nsutil.exists(self.cfg.netns):
            return False
        with contextlib.suppress(NetlinkError, OSError):
            self._remove_outside_end()
        netns.remove(self.cfg.netns)
        return True

    def destroy_outside(self) -> bool:
        """Remove kh's own outside world (``<prefix>-outside``), whatever the configuration
        says: the name is kh's alone. An operator's `--uplink-netns` is never removed."""
        return outside.remove(self.cfg.outside_netns)

    def links(self) -> list[str]:
        """Names of every link in kh's namespace, sorted. if_nameindex from a thread inside
        the namespace: 0.25 ms, where opening a pyroute2 NetNS took 20-35 ms here (and the
        firewall lists the bridges on each domain's creation)."""
        return sorted(name for _, name in nsutil.run_in(self.cfg.netns, socket.if_nameindex))

    # -- domains ----------------------------------------------------------------------------
    def ensure_domain(self, netid: int) -> str:
        """The bridge of domain ``netid``, with its fixed MAC; kh's own address only on
        external and public (a private bridge keeps none); the firewall reloaded when the
        bridge is new."""
        name = self.cfg.bridge(netid)
        mac = bridge_mac(self.cfg.prefix, netid, self.remote)
        with self.ns() as ns:
            idx = ns.link_lookup(ifname=name)
            new = not idx
            if new:
                # An address given at creation is the bridge's for good: it never takes a
                # port's MAC (the kernel marks it as set, not inherited). Without multicast
                # snooping the bridge joins no group of its own, so the host sends no IGMP
                # report into a domain (snooping joined 224.0.0.106 and reported it).
                add_link(ns, "bridge", name, address=mac, br_stp_state=0, br_forward_delay=0,
                         br_mcast_snooping=0)
                idx = ns.link_lookup(ifname=name)
            else:  # a bridge an older kh made
                ns.link("set", index=idx[0], address=mac, kind="bridge", br_mcast_snooping=0)
            ns.link("set", index=idx[0], state="up")
            have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"], a["family"])
                    for a in ns.get_addr(index=idx[0])}
            want = set()
            if netid in (EXTERNAL, PUBLIC) and self.remote is None:
                addr = host_address(netid)
                want = {(str(addr.ip), addr.network.prefixlen, socket.AF_INET)}
            for a, plen, family in have - want:  # nothing of the host's on a private bridge
                ns.addr("del", index=idx[0], address=a, prefixlen=plen, family=family)
            for a, plen, _ in want - have:
                ns.addr("add", index=idx[0], address=a, prefixlen=plen)
        if netid == EXTERNAL and self.remote is None:
            self._ensure_uplink()
        if new:
            self.apply_firewall()
        return name

    def domain_bridges(self, names: Iterable[str] | None = None) -> list[int]:
        """The netids whose bridges exist now (found by their names, ``names`` when given)."""
        prefix = self.cfg.bridge(0)[:-1]
        return sorted(int(n[len(prefix):]) for n in (self.links() if names is None else names)
                      if n.startswith(prefix) and n[len(prefix):].isdigit()
                      and n[len(prefix):].isascii())

    def remove_domain(self, netid: int) -> None:
        """Delete the domain's bridge, if it is there (so removal can be done again)."""
        with self.ns() as ns:
            idx = ns.link_lookup(ifname=self.cfg.bridge(netid))
            if idx:
                ns.link("del", index=idx[0])
        if idx:
            self.apply_firewall()

    # -- node interfaces --------------------------------------------------------------------
    def ensure_tap(self, node: int, slot: int) -> str:
        name = self.cfg.tap(node, slot)
        with self.ns() as ns:
            if not ns.link_lookup(ifname=name):
                add_link(ns, "tuntap", name, mode="tap")
            ns.link("set", index=ns.link_lookup(ifname=name)[0], state="up")
        return name

    def attach(self, node: int, slot: int, netid: int | None) -> None:
        """Plug a node interface into domain ``netid``'s bridge, or unplug it (None). The
        anti-spoofing table follows the move, so it holds at every instant of it."""
        with self.antispoof.moving(node, slot, netid), self.ns() as ns:
            tap = ns.link_lookup(ifname=self.cfg.tap(node, slot))
            if not tap:
                raise FabricError(f"node {node} has no interface slot {slot}")
            if netid is None:
                ns.link("set", index=tap[0], master=0)
                return
            self.watch()  # a node is being wired: its domain must pass traffic
            br = ns.link_lookup(ifname=self.cfg.bridge(netid))
            if not br:
                raise FabricError(f"domain {netid} has no bridge")
            # the tap takes its bridge's MTU (less than 1500 when the domain spans hosts)
            mtu = ns.get_links(br[0])[0].get_attr("IFLA_MTU")
            ns.link("set", index=tap[0], master=br[0], mtu=mtu)

    def remove_taps(self, node: int, slots: int) -> None:
        with self.ns() as ns:
            for slot in range(slots):
                idx = ns.link_lookup(ifname=self.cfg.tap(node, slot))
                if idx:
                    ns.link("del", index=idx[0])

    def tap_counters(self, node: int, slot: int) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of a node interface, as the host counts them."""
        with self.ns() as ns:
            idx = ns.link_lookup(ifname=self.cfg.tap(node, slot))
            if not idx:
                return (0, 0)
            stats = ns.get_links(idx[0])[0].get_attr("IFLA_STATS64")
            return (int(stats["rx_bytes"]), int(stats["tx_bytes"]))

    # -- the external domain's uplink -------------------------------------------------------
    def _ensure_uplink(self) -> None:
        """The veth from the external bridge's namespace to the outside world's, addressed and
        routed both ways; what crosses it (and the masquerade) is the firewall's."""
        cfg = self.cfg
        if cfg.uplink_netns is None:
            log.info("external domain has no uplink namespace configured")
            return
        if not nsutil.exists(cfg.uplink_netns):
            raise FabricError(f"uplink namespace {cfg.uplink_netns} does not exist")
        up_net = ipaddress.IPv4Interface("10.254.255.1/30")
        out_net = ipaddress.IPv4Interface("10.254.255.2/30")
        with self.ns() as ns:
            if not ns.link_lookup(ifname=cfg.uplink):
                add_link(ns, "veth", cfg.uplink, peer=cfg.outside)
                out_idx = ns.link_lookup(ifname=cfg.outside)[0]
                ns.link("set", index=out_idx, net_ns_fd=nsutil.path(cfg.uplink_netns))
                up_idx = ns.link_lookup(ifname=cfg.uplink)[0]
                ns.addr("add", index=up_idx, address=str(up_net.ip), prefixlen=30)
                ns.link("set", index=up_idx, state="up")
                ns.route("add", dst="default", gateway=str(out_net.ip))
        with contextlib.closing(NetNS(cfg.uplink_netns)) as out:
            idx = out.link_lookup(ifname=cfg.outside)[0]
            if str(out_net.ip) not in [a.get_attr("IFA_ADDRESS") for a in out.get_addr(index=idx)]:
                out.addr("add", index=idx, address=str(out_net.ip), prefixlen=30)
            out.link("set", index=idx, state="up")
            # External-domain nodes are reachable from the outside world, as in the paper
            # (Listing 1 fetches a page from each): route their range through the fabric.
            ext_net = subnet(EXTERNAL)
            have = [r.get_attr("RTA_DST") for r in out.get_routes(family=socket.AF_INET)]
            if str(ext_net.network_address) not in have:
                out.route("add", dst=str(ext_net), gateway=str(up_net.ip))

    def _remove_outside_end(self) -> None:
        """Delete the uplink's end in the outside world's namespace, if it is there. From a
        thread inside that namespace, never a pyroute2 NetNS: that forks a child of the
        caller, which `kh clean` and `kh service start` are (with their signal handlers: the
        SIGTERM NetNS ends its child with made that child print `kh: stopped by SIGTERM`)."""
        if not (self.cfg.uplink_netns and nsutil.exists(self.cfg.uplink_netns)):
            return

        def remove() -> None:
            with IPRoute() as out:
                idx = out.link_lookup(ifname=self.cfg.outside)
                if idx:
                    out.link("del", index=idx[0])

        nsutil.run_in(self.cfg.uplink_netns, remove)
