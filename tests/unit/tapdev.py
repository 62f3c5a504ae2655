"""Host-side stand-ins for a node's NIC: open one of kh's taps directly (as QEMU does), write
raw Ethernet frames into the fabric through it and read what the fabric delivers to it.
Also small builders of the frames the isolation tests send.

A tap opened here is the node's end: what is written is what "the node sends", what is read is
what the bridge forwarded to the node. Needs root (it enters kh's network namespace).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence

from pyroute2 import NetNS

from kh.hw import netns as nsutil

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
BROADCAST = "ff:ff:ff:ff:ff:ff"
BR_STATE_FORWARDING = 3
ETH_IP, ETH_ARP, ETH_IP6, ETH_VLAN, ETH_QINQ = 0x0800, 0x0806, 0x86DD, 0x8100, 0x88A8


class Tap:
    """One tap's queue, opened in namespace ``netns`` (the tap's carrier is up while open)."""

    def __init__(self, netns: str, name: str) -> None:
        def attach() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
            except OSError:
                os.close(fd)
                raise
            return fd

        self.name = name
        # /dev/net/tun binds to the namespace of the thread that opens it
        self.fd = nsutil.run_in(netns, attach)

    def send(self, frame: bytes) -> None:
        os.write(self.fd, frame)

    def drain(self) -> list[bytes]:
        """Every frame waiting now (non-blocking)."""
        out = []
        while True:
            try:
                out.append(os.read(self.fd, 65536))
            except BlockingIOError:
                return out

    def wait_for(self, frame: bytes, timeout: float = 10.0) -> list[bytes]:
        """Frames read until ``frame`` arrives (it included); AssertionError if it does not
        within ``timeout`` seconds (a guard against hanging, not a timing check)."""
        got: list[bytes] = []
        while True:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                raise AssertionError(f"{self.name}: the sentinel frame never arrived")
            for f in self.drain():
                got.append(f)
                if f == frame:
                    return got

    def close(self) -> None:
        os.close(self.fd)


def wait_forwarding(netns: str, names: Iterable[str], timeout: float = 10.0) -> None:
    """Wait until every tap in ``names`` is a forwarding bridge port: a tap's carrier comes up
    when it is opened, and the bridge starts forwarding on it a moment later (linkwatch and
    the forward-delay timer run asynchronously), dropping frames meanwhile."""
    want = set(names)
    deadline = time.monotonic() + timeout
    while True:
        with NetNS(netns) as ns:
            ports = {str(link.get_attr("IFLA_IFNAME")): link.get_attr("IFLA_PROTINFO")
                     for link in ns.get_links(family=socket.AF_BRIDGE)}
        ready = {n for n in want if ports.get(n) is not None
                 and ports[n].get_attr("IFLA_BRPORT_STATE") == BR_STATE_FORWARDING}
        if ready == want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"bridge ports never forwarding: {sorted(want - ready)}")
        time.sleep(0.01)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def eth(dst: str, src: str, ethertype: int, payload: bytes, tags: Sequence[tuple[int, int]] = ()
        ) -> bytes:
    """An Ethernet frame, padded to 60 bytes; ``tags`` are (TPID, VLAN id), outermost first."""
    head = mac_bytes(dst) + mac_bytes(src)
    for tpid, vid in tags:
        head += struct.pack("!HH", tpid, vid & 0xFFF)
    frame = head + struct.pack("!H", ethertype) + payload
    return frame.ljust(60, b"\0")


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    """An ARP payload (op 1 request, 2 reply) for Ethernet/IPv4."""
    ip = ipaddress.IPv4Address
    return (struct.pack("!HHBBH", 1, ETH_IP, 6, 4, op) + mac_bytes(sha) + ip(spa).packed
            + mac_bytes(tha) + ip(tpa).packed)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``, as IPv4, TCP, UDP and ICMP put it."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_udp(src: str, dst: str, payload: bytes, sport: int = 40000, dport: int = 9) -> bytes:
    """An IPv4 packet carrying one UDP datagram (UDP checksum left 0: allowed for IPv4)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + udp


def ipv6_ns(src: str, target: str, lladdr: str) -> bytes:
    """An IPv6 neighbour solicitation for ``target`` (to its solicited-node group)."""
    t = ipaddress.IPv6Address(target)
    dst = ipaddress.IPv6Address("ff02::1:ff00:0").packed[:13] + t.packed[13:]
    body = struct.pack("!BBHI", 135, 0, 0, 0) + t.packed + b"\x01\x01" + mac_bytes(lladdr)
    pseudo = (ipaddress.IPv6Address(src).packed + dst + struct.pack("!I", len(body))
              + b"\0\0\0\x3a")
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    return (struct.pack("!IHBB", 0x60000000, len(body), 58, 255)
            + ipaddress.IPv6Address(src).packed + dst + body)


def solicited_mac(target: str) -> str:
    """The Ethernet group an IPv6 neighbour solicitation for ``target`` goes to."""
    low = ipaddress.IPv6Address(target).packed[13:]
    return "33:33:ff:" + ":".join(f"{b:02x}" for b in low)


def count(frames: Iterable[bytes], marker: bytes) -> int:
    """How many of ``frames`` carry ``marker`` (each test frame carries its kind's marker)."""
    return sum(marker in f for f in frames)
