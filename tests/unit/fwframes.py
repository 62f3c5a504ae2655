"""Frames a node could send to ask the host something (ARP, ICMP, TCP SYN, IPv6 ND and echo),
with correct checksums so the host would answer them if it listened, and collecting what comes
back on a tap; built on tests/unit/tapdev.py (the tap opened directly)."""

from __future__ import annotations

import contextlib
import ipaddress
import select
import struct
import time
from collections.abc import Callable, Iterator

from pyroute2 import NetNS

from tests.unit.tapdev import (
    BROADCAST,
    ETH_ARP,
    ETH_IP,
    ETH_IP6,
    Tap,
    arp,
    checksum,
    eth,
    mac_bytes,
)

ETH_PROBE = 0x88B5  # IEEE local experimental: the tests' own marker frames


BR_FORWARDING = 3  # a bridge port's state when it passes frames


@contextlib.contextmanager
def opened(netns: str, name: str,
           forwarding: Callable[[], contextlib.AbstractContextManager[NetNS]] | None = None,
           tries: int = 200) -> Iterator[Tap]:
    """The tap opened; with ``forwarding`` (the namespace's NetNS opener) once its bridge port
    passes frames (its carrier reaches the bridge asynchronously)."""
    tap = Tap(netns, name)
    try:
        for _ in range(tries if forwarding else 0):
            with forwarding() as ns:
                link = ns.get_links(ns.link_lookup(ifname=name)[0])[0]
            if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA",
                               "IFLA_BRPORT_STATE") == BR_FORWARDING:
                break
            time.sleep(0.02)
        else:
            if forwarding:
                raise AssertionError(f"bridge port {name} never started forwarding")
        yield tap
    finally:
        tap.close()


def collect(tap: Tap, wait: float) -> list[bytes]:
    """Every frame reaching ``tap`` within ``wait`` seconds."""
    frames: list[bytes] = []
    end = time.monotonic() + wait
    while (left := end - time.monotonic()) > 0:
        if select.select([tap.fd], [], [], left)[0]:
            frames += tap.drain()
    return frames


def wait_bridged(sender: Tap, receiver: Tap, src: str, tries: int = 50) -> None:
    """Probe until a broadcast from ``sender`` reaches ``receiver`` (both bridge ports are
    forwarding); AssertionError if it never does."""
    for _ in range(tries):
        sender.send(eth(BROADCAST, src, ETH_PROBE, b"kh-probe"))
        if any(f[12:14] == struct.pack("!H", ETH_PROBE) for f in collect(receiver, 0.1)):
            collect(receiver, 0.2)  # the probes still on their way
            return
    raise AssertionError(f"no frame from {sender.name} reached {receiver.name}")


def arp_request(src_mac: str, src_ip: str, target: str) -> bytes:
    return eth(BROADCAST, src_mac, ETH_ARP, arp(1, src_mac, src_ip, "00:00:00:00:00:00", target))


def ipv4(src_mac: str, dst_mac: str, src: str, dst: str, proto: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    head = head[:10] + struct.pack("!H", checksum(head)) + head[12:]
    return eth(dst_mac, src_mac, ETH_IP, head + payload)


def _pseudo4(src: str, dst: str, proto: int, length: int) -> bytes:
    return ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + \
        struct.pack("!BBH", 0, proto, length)


def tcp_syn(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int) -> bytes:
    seg = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
    seg = seg[:16] + struct.pack("!H", checksum(_pseudo4(src, dst, 6, len(seg)) + seg)) + \
        seg[18:]
    return ipv4(src_mac, dst_mac, src, dst, 6, seg)


def udp(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int,
        data: bytes) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    seg = seg[:6] + struct.pack("!H", checksum(_pseudo4(src, dst, 17, len(seg)) + seg)) + \
        seg[8:]
    return ipv4(src_mac, dst_mac, src, dst, 17, seg)


def icmp_echo(src_mac: str, dst_mac: str, src: str, dst: str) -> bytes:
    msg = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"kh-ping"
    msg = msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]
    return ipv4(src_mac, dst_mac, src, dst, 1, msg)


def icmp6(src_mac: str, dst_mac: str, src: str, dst: str, msg: bytes) -> bytes:
    """An ICMPv6 message (type, code, zero checksum, body) in IPv6, checksum filled in."""
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    msg = msg[:2] + struct.pack("!H", checksum(s + d + struct.pack("!I3xB", len(msg), 58)
                                               + msg)) + msg[4:]
    head = struct.pack("!IHBB", 6 << 28, len(msg), 58, 255) + s + d
    return eth(dst_mac, src_mac, ETH_IP6, head + msg)


def link_local(mac: str) -> str:
    """The EUI-64 link-local IPv6 address a MAC gives."""
    b = bytearray(mac_bytes(mac))
    b[0] ^= 0x02
    return str(ipaddress.IPv6Address(b"\xfe\x80" + b"\0" * 6 + bytes(b[:3]) + b"\xff\xfe"
                                     + bytes(b[3:])))


def neighbor_solicit(src_mac: str, target: str) -> bytes:
    """ND neighbour solicitation for ``target``, to its solicited-node group."""
    t = ipaddress.IPv6Address(target).packed
    group = ipaddress.IPv6Address(b"\xff\x02" + b"\0" * 9 + b"\x01\xff" + t[13:])
    dst_mac = "33:33:" + ":".join(f"{b:02x}" for b in group.packed[12:])
    msg = struct.pack("!BBHI", 135, 0, 0, 0) + t + b"\x01\x01" + mac_bytes(src_mac)
    return icmp6(src_mac, dst_mac, link_local(src_mac), str(group), msg)


def echo6_all_nodes(src_mac: str) -> bytes:
    """ICMPv6 echo request to ff02::1: every IPv6 host on the link answers it."""
    msg = struct.pack("!BBHHH", 128, 0, 0, 1, 1) + b"kh-ping6"
    return icmp6(src_mac, "33:33:00:00:00:01", link_local(src_mac), "ff02::1", msg)
