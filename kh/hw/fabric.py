"""The communication fabric: kh's network namespace, one bridge per domain, one tap per node
interface, and the external domain's NAT uplink, built with pyroute2.

Isolation is the host's job: every private domain is a bridge with no address, so nothing can
route into or out of it; the external and public bridges carry kh's own address (gateway,
service listener) and the FORWARD policy drops everything but traffic between the external
domain and its uplink.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator

from pyroute2 import NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from kh import proc
from kh.allocation import host_address, subnet
from kh.errors import KhError
from kh.hw import netns as nsutil
from kh.hw.antispoof import AntiSpoof
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


class Fabric:
    def __init__(self, cfg: FabricConfig) -> None:
        self.cfg = cfg
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
        """Create the namespace with loopback up, forwarding off between domains."""
        name = self.cfg.netns
        if not nsutil.exists(name):
            try:
                netns.create(name)
            except OSError as e:
                raise FabricError(f"cannot create network namespace {name}: {e.strerror}",
                                  "kh's fabric needs root") from None
        with self.ns() as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        # Bridged frames must not pass through iptables (br_netfilter): domains are L2.
        for key in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
                    "net.bridge.bridge-nf-call-arptables"):
            nsutil.sysctl(name, key, "0")
        self.antispoof.rebuild()  # afresh, for the taps' wiring now (a khd start)

    def destroy(self) -> bool:
        """Remove the namespace and with it every bridge, tap and veth end inside."""
        if not nsutil.exists(self.cfg.netns):
            return False
        with contextlib.suppress(NetlinkError, OSError):
            self._remove_outside_end()
        netns.remove(self.cfg.netns)
        return True

    def links(self) -> list[str]:
        with self.ns() as ns:
            return sorted(str(link.get_attr("IFLA_IFNAME")) for link in ns.get_links())

    # -- domains ----------------------------------------------------------------------------
    def ensure_domain(self, netid: int) -> str:
        """The bridge of domain ``netid``; kh's own address only on external and public."""
        name = self.cfg.bridge(netid)
        with self.ns() as ns:
            idx = ns.link_lookup(ifname=name)
            if not idx:
                add_link(ns, "bridge", name, br_stp_state=0, br_forward_delay=0)
                idx = ns.link_lookup(ifname=name)
            ns.link("set", index=idx[0], state="up")
            if netid in (EXTERNAL, PUBLIC):
                addr = host_address(netid)
                have = [a.get_attr("IFA_ADDRESS") for a in ns.get_addr(index=idx[0])]
                if str(addr.ip) not in have:
                    ns.addr("add", index=idx[0], address=str(addr.ip),
                            prefixlen=addr.network.prefixlen)
        if netid == EXTERNAL:
            self._ensure_nat()
        return name

    def domain_bridges(self) -> list[int]:
        """The netids whose bridges exist now (found by their names)."""
        prefix = self.cfg.bridge(0)[:-1]
        return sorted(int(n[len(prefix):]) for n in self.links()
                      if n.startswith(prefix) and n[len(prefix):].isdigit()
                      and n[len(prefix):].isascii())

    def remove_domain(self, netid: int) -> None:
        """Delete the domain's bridge, if it is there (so removal can be done again)."""
        with self.ns() as ns:
            idx = ns.link_lookup(ifname=self.cfg.bridge(netid))
            if idx:
                ns.link("del", index=idx[0])

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
            br = ns.link_lookup(ifname=self.cfg.bridge(netid))
            if not br:
                raise FabricError(f"domain {netid} has no bridge")
            ns.link("set", index=tap[0], master=br[0])

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
    def _ensure_nat(self) -> None:
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
        nsutil.sysctl(cfg.netns, "net.ipv4.ip_forward", "1")
        ext = str(subnet(EXTERNAL))
        rules = [
            ["-P", "FORWARD", "DROP"],
            ["-A", "FORWARD", "-i", cfg.bridge(EXTERNAL), "-o", cfg.uplink, "-s", ext,
             "-j", "ACCEPT"],
            ["-A", "FORWARD", "-i", cfg.uplink, "-o", cfg.bridge(EXTERNAL), "-d", ext,
             "-j", "ACCEPT"],
            ["-A", "FORWARD", "-i", cfg.uplink, "-o", cfg.bridge(EXTERNAL), "-m", "conntrack",
             "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-t", "nat", "-A", "POSTROUTING", "-s", ext, "-o", cfg.uplink, "-j", "MASQUERADE"],
        ]
        ipt = nsutil.enter_argv(cfg.netns) + ["iptables", "-w"]
        for rule in rules:
            check = [("-C" if r == "-A" else r) for r in rule]
            if rule[0] == "-P" or proc.run(ipt + check, check=False).returncode != 0:
                proc.run(ipt + rule, what="iptables")

    def _remove_outside_end(self) -> None:
        if self.cfg.uplink_netns and nsutil.exists(self.cfg.uplink_netns):
            with contextlib.closing(NetNS(self.cfg.uplink_netns)) as out:
                idx = out.link_lookup(ifname=self.cfg.outside)
                if idx:
                    out.link("del", index=idx[0])
