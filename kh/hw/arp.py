"""Is a host on a link alive? One ARP exchange from a raw packet socket in kh's namespace (the
peers of a stretched domain, kh.hw.stretch)."""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time

from kh.hw import netns as nsutil

ETH_ARP = 0x0806


def arp_answers(netns: str, ifname: str, source: str, target: str, timeout: float = 2.0
                ) -> bool:
    """Whether ``target`` answers an ARP request sent from ``source`` on ``ifname`` (in
    ``netns``) within ``timeout`` seconds (three requests): a peer host's underlay address, or
    the gateway it is routed through, is alive. A raw packet socket, so kh's ARP rules (which
    let the underlay's own address through anyway) play no part."""
    def probe() -> bool:
        want = ipaddress.IPv4Address(target).packed
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_ARP)) as s:
            s.bind((ifname, ETH_ARP))
            mac = s.getsockname()[4]
            request = (b"\xff" * 6 + mac + struct.pack("!H", ETH_ARP)
                       + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac
                       + ipaddress.IPv4Address(source).packed + bytes(6) + want)
            deadline = time.monotonic() + timeout
            for _ in range(3):
                s.send(request)
                until = min(deadline, time.monotonic() + timeout / 3)
                while (left := until - time.monotonic()) > 0:
                    if not select.select([s], [], [], left)[0]:
                        break
                    frame = s.recv(128)
                    # an ARP reply (op 2) whose sender is the target
                    if len(frame) >= 42 and frame[20:22] == b"\x00\x02" and frame[28:32] == want:
                        return True
        return False

    return nsutil.run_in(netns, probe)
