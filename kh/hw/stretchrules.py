"""The rules of a stretched domain (docs/multihost.md), with no kernel in them: a domain's
VNI, its hops' MTU, what a stretch request may hold, and the `kh fabric stretch` command that
makes another host's side. kh.hw.stretch makes and reads the devices.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from kh.allocation import MAX_NETID
from kh.errors import KhError
from kh.hw.tags import FabricConfig

VNI_BASE = 1 << 20  # domain netid's VNI is VNI_BASE + netid
VXLAN_PORT = 4789  # IANA's VXLAN port
OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 bytes
MIN_GUEST_MTU = 1280  # IPv6's minimum: a public-domain node may speak IPv6 link-local
MAX_PEERS = 64  # other hosts a domain may span (each broadcast is sent once to each)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,14}")


class StretchError(KhError):
    """A domain cannot be stretched to (or on) a host; the message names the host."""


@dataclass(frozen=True)
class Underlay:
    """This host's end of the underlay: an interface in kh's fabric namespace, its IPv4
    address (no prefix length) and the VXLAN UDP port."""

    ifname: str
    address: str
    port: int = VXLAN_PORT


@dataclass(frozen=True)
class Peer:
    """Another host of the installation: its kh name (errors name it) and underlay address."""

    host: str
    address: str


@dataclass(frozen=True)
class Stretch:
    """What one host has of a stretched domain, as read back from the kernel."""

    netid: int
    vni: int
    device: str
    underlay: Underlay
    peers: tuple[str, ...]  # the other hosts' underlay addresses, sorted
    mtu: int  # the vxlan device's (= the guests')

    def as_json(self) -> dict[str, object]:
        return {"netid": self.netid, "vni": self.vni, "device": self.device,
                "underlay": self.underlay.ifname, "local": self.underlay.address,
                "port": self.underlay.port, "peers": list(self.peers), "mtu": self.mtu}


@dataclass(frozen=True)
class Made:
    """What ``ensure`` made new: the vxlan device, the domain's bridge. True when the device
    was new (a domain newly stretched from this host)."""

    device: bool
    bridge: bool

    def __bool__(self) -> bool:
        return self.device


@dataclass(frozen=True)
class Tunnel:
    """What the firewall lets through for one underlay end: VXLAN from ``peers`` to
    ``address``:``port`` arriving on ``ifname``, and back."""

    ifname: str
    address: str
    port: int
    peers: tuple[str, ...]


def vni(netid: int) -> int:
    """Domain ``netid``'s VXLAN network identifier: fixed by the netid (stable for the
    domain's life, unique in the installation because netids are)."""
    if not 0 <= netid <= MAX_NETID:
        raise StretchError(f"domain {netid} does not exist (netids are 0-{MAX_NETID})")
    return VNI_BASE + netid


def guest_mtu(underlay_mtu: int, host: str = "this host", ifname: str = "the underlay") -> int:
    """The MTU of a stretched domain's hops (vxlan device, bridge, taps, nodes' NICs): the
    underlay's less OVERHEAD. StretchError when that is below MIN_GUEST_MTU."""
    mtu = underlay_mtu - OVERHEAD
    if mtu < MIN_GUEST_MTU:
        raise StretchError(
            f"host {host}: underlay {ifname} has MTU {underlay_mtu}, too small for a stretched "
            f"domain (needs {MIN_GUEST_MTU + OVERHEAD}: nodes' {MIN_GUEST_MTU} + {OVERHEAD} of "
            "VXLAN)", "raise the underlay's MTU")
    return mtu


def _address(value: str, what: str, host: str) -> str:
    try:
        a = ipaddress.IPv4Address(value)
    except ValueError:
        raise StretchError(f"host {host}: {what} {value!r} is not an IPv4 address") from None
    if a.is_unspecified or a.is_multicast or a.is_loopback or a == ipaddress.IPv4Address(
            "255.255.255.255"):
        raise StretchError(f"host {host}: {what} {value} cannot be a host's underlay address")
    return str(a)


def check(underlay: Underlay, netid: int, peers: Sequence[Peer], host: str) -> tuple[str, ...]:
    """Validate a stretch request (everything in it may come from elsewhere); the peers'
    addresses, sorted. StretchError naming the host and what is wrong."""
    if not _NAME.fullmatch(host):
        raise StretchError(f"host name {host!r} is malformed (letters, digits, '.', '_', '-')")
    if not IFNAME.fullmatch(underlay.ifname):
        raise StretchError(f"host {host}: underlay interface {underlay.ifname!r} is malformed")
    if not 1 <= underlay.port <= 65535:
        raise StretchError(f"host {host}: VXLAN port {underlay.port} is not a UDP port")
    vni(netid)
    local = _address(underlay.address, "underlay address", host)
    if len(peers) > MAX_PEERS:
        raise StretchError(f"host {host}: domain {netid} would span {len(peers) + 1} hosts",
                           f"at most {MAX_PEERS + 1}")
    seen: dict[str, str] = {}
    for p in peers:
        if not _NAME.fullmatch(p.host):
            raise StretchError(f"host {host}: peer name {p.host!r} is malformed")
        addr = _address(p.address, f"peer {p.host}'s underlay address", host)
        if addr == local:
            raise StretchError(f"host {host}: peer {p.host} has this host's own underlay "
                               f"address {addr}")
        if addr in seen:
            raise StretchError(f"host {host}: peers {seen[addr]} and {p.host} share underlay "
                               f"address {addr}")
        seen[addr] = p.host
    return tuple(sorted(seen, key=ipaddress.IPv4Address))


def remote_argv(prefix: str, underlay: Underlay, netid: int, peers: Sequence[Peer], host: str,
                kh: str = "kh") -> list[str]:
    """The `kh fabric stretch` command that makes host ``host``'s side (``underlay`` is that
    host's), for ssh to run there: every value is checked first, so the words need no quoting
    (ssh joins them with spaces)."""
    check(underlay, netid, peers, host)
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
        raise StretchError(f"host {host}: kh prefix {prefix!r} is malformed")
    kh_underlay(FabricConfig(prefix=prefix), underlay, host)
    argv = [kh, "fabric", "stretch", "--prefix", prefix, "--host", host,
            "--underlay", underlay.ifname, "--local", underlay.address,
            "--port", str(underlay.port)]
    for p in peers:
        argv += ["--peer", f"{p.host}={p.address}"]
    return argv + [str(netid)]


def kh_underlay(cfg: FabricConfig, underlay: Underlay, host: str) -> None:
    """The underlay carries kh's name (``<prefix>ulN``): kh's firewall answers ARP there."""
    if not re.fullmatch(re.escape(cfg.underlay(0)[:-1]) + r"\d{1,3}", underlay.ifname):
        raise StretchError(f"host {host}: underlay interface {underlay.ifname} is not named "
                           f"{cfg.underlay(0)[:-1]}N", "kh fabric underlay DEV A.B.C.D/LEN "
                           "moves a NIC in and names it")
