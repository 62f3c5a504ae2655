"""Two kh "hosts" on one machine, for tests of domains across hosts (kh.hw.stretch): each host
is a kh fabric of its own prefix (its own namespace, firewall, anti-spoofing), and the underlay
between them is a "wire": a namespace of the test's own holding a bridge, with a veth from it
into each fabric, named ``<prefix>ul0`` there (kh's name for an underlay: its firewall lets ARP
through on it) and addressed 172.31.254.N/24. The wire namespace is the network between the
hosts: a test may give it an address and send from it (a stranger on the underlay). Needs root.

Reuse: ``two_hosts(tag)`` for two fabrics joined; ``Wire(name, mtu)`` and ``Wire.plug`` to join
namespaces of your own (e.g. a fabric whose namespace a test's libvirtd runs in); ``Wire.cable``
for a bare NIC on the wire that `kh fabric underlay` takes (tests/integration/farhost.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import NetNS, netns

from kh.hw import netns as nsutil
from kh.hw.fabric import Fabric
from kh.hw.stretch import Peer, Underlay
from kh.hw.tags import FabricConfig

NET = "172.31.254"  # the underlay's /24 (only inside the test's namespaces)
STRANGER = f"{NET}.9"  # an address the wire itself may take: no kh host's


def own(tag: str) -> str:
    """A prefix of this process's own (unit tests may run in two processes at once)."""
    return f"{tag}{os.getpid() % 10000}"


class Wire:
    """The underlay: a bridge in namespace ``name`` (made here, removed by ``close``); every
    link on it has MTU ``mtu``."""

    def __init__(self, name: str, mtu: int = 1500) -> None:
        self.name, self.mtu = name, mtu
        netns.create(name)
        with contextlib.closing(NetNS(name)) as ns:
            ns.link("add", ifname="wire", kind="bridge", br_stp_state=0, br_forward_delay=0)
            idx = ns.link_lookup(ifname="wire")[0]
            ns.link("set", index=idx, mtu=mtu, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        nsutil.sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1")

    def cable(self, target_ns: str, ifname: str) -> None:
        """A veth from the wire into ``target_ns`` (the wire's own namespace: left there, off
        the bridge), named ``ifname`` there, MTU ``mtu``, down and without an address: a host's
        NIC on the underlay, for `kh fabric underlay` to take (tests/integration/farhost.py)."""
        here = f"w{abs(hash((target_ns, ifname))) % 10**8}"
        with contextlib.closing(NetNS(self.name)) as ns:
            ns.link("add", ifname=here, kind="veth", peer=ifname)
            ns.link("set", index=ns.link_lookup(ifname=ifname)[0], mtu=self.mtu)
            if target_ns != self.name:
                ns.link("set", index=ns.link_lookup(ifname=ifname)[0],
                        net_ns_fd=nsutil.path(target_ns))
            idx = ns.link_lookup(ifname=here)[0]
            ns.link("set", index=idx, mtu=self.mtu,
                    master=ns.link_lookup(ifname="wire")[0], state="up")

    def plug(self, target_ns: str, ifname: str, address: str, plen: int = 24) -> None:
        """A veth from the wire into ``target_ns``, named ``ifname`` there, holding
        ``address``/``plen``, up, MTU ``mtu``."""
        self.cable(target_ns, ifname)
        with contextlib.closing(NetNS(target_ns)) as ns:
            idx = ns.link_lookup(ifname=ifname)[0]
            ns.addr("add", index=idx, address=address, prefixlen=plen)
            ns.link("set", index=idx, mtu=self.mtu, state="up")

    def take(self, address: str, plen: int = 24) -> None:
        """Give the wire itself an address: a host on the underlay that is no kh host."""
        with contextlib.closing(NetNS(self.name)) as ns:
            ns.addr("add", index=ns.link_lookup(ifname="wire")[0], address=address,
                    prefixlen=plen)

    def close(self) -> None:
        if nsutil.exists(self.name):
            netns.remove(self.name)


@dataclass(frozen=True)
class Host:
    """One simulated host: its fabric, its end of the underlay, and how others name it."""

    name: str
    fabric: Fabric
    underlay: Underlay
    wire: Wire  # the underlay both hosts are on

    @property
    def peer(self) -> Peer:
        return Peer(self.name, self.underlay.address)

    @property
    def cfg(self) -> FabricConfig:
        return self.fabric.cfg


@contextlib.contextmanager
def two_hosts(tag: str, mtu: int = 1500) -> Iterator[tuple[Host, Host]]:
    """Hosts "a" (172.31.254.1; khd's, serving ports 7480 and 7422) and "b" (.2; another
    host's side, ``Fabric.remote``): fabrics of prefixes own(tag + "a"|"b") joined by a wire
    of MTU ``mtu`` (their stretched domains' MTU is ``mtu`` - 50). Everything is
    removed afterwards, whatever happened."""
    wire = Wire(f"{own(tag)}-wire", mtu)
    fabrics: list[Fabric] = []
    try:
        hosts = []
        for i, side in enumerate("ab", start=1):
            # a: khd's host (serves the API on the public domain); b: another host's side
            f = Fabric(FabricConfig(prefix=own(tag + side)), ports=(7480, 7422) if side == "a"
                       else (), remote=None if side == "a" else side)
            fabrics.append(f)
            f.ensure()
            ifname = f.cfg.underlay(0)  # <prefix>ul0: kh's name for an underlay
            wire.plug(f.cfg.netns, ifname, f"{NET}.{i}")
            hosts.append(Host(side, f, Underlay(ifname, f"{NET}.{i}"), wire))
        yield hosts[0], hosts[1]
    finally:
        for f in fabrics:
            f.destroy()
        wire.close()
