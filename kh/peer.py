"""Who is at the other end of a connection, as the kernel knows it (never as the peer says).

On a unix socket that is ``SO_PEERCRED``. On loopback TCP, every local user can pick any
address of 127.0.0.0/8 and any port, so an address tells local users apart no better than
nothing; but the connecting socket is on this host, in this network namespace, and the kernel
records who created it: ``sock_diag`` (netlink, the interface ``ss -e`` reads) looks that socket
up by its exact 4-tuple and answers its owner's uid. It is the uid of the process that created
the socket (a socket handed to another process keeps its creator's), which a user cannot
choose. A peer that is already gone answers nothing: the caller falls back to the address.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading

from pyroute2 import DiagSocket
from pyroute2.netlink import NLM_F_REQUEST
from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, inet_diag_req

_NO_COOKIE = 0xFFFFFFFFFFFFFFFF  # INET_DIAG_NOCOOKIE: match by address and ports alone
_ALL_STATES = 0xFFF
# Peer states in which a socket still has its owner: connected, or closing its own side. A
# TIME_WAIT remnant (what a closed connection leaves) is not a full socket and reports uid 0.
_OWNED_STATES = frozenset({1, 4, 5, 7, 8})  # ESTABLISHED, FIN_WAIT1/2, CLOSE, CLOSE_WAIT
_local = threading.local()  # one netlink socket per thread (pyroute2's are not shared)


def unix_peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket (SO_PEERCRED)."""
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(uid)


def _words(address: str) -> tuple[int, int, int, int]:
    """An address as inet_diag_sockid wants it: 16 bytes, big-endian words, IPv4 first."""
    packed = ipaddress.ip_address(address).packed.ljust(16, b"\0")
    return struct.unpack(">4I", packed)  # type: ignore[return-value]


def _diag() -> DiagSocket:
    ds = getattr(_local, "diag", None)
    if ds is None:
        ds = DiagSocket()
        ds.bind()
        _local.diag = ds
    return ds


def loopback_peer_uid(sock: socket.socket) -> int | None:
    """The uid owning the socket at the other end of ``sock``, an accepted TCP connection whose
    peer is on this host (loopback); None when the kernel has no such socket (the peer closed
    it already: TIME_WAIT keeps no owner) or the connection is not TCP over IP. One exact
    netlink lookup, ~0.2 ms."""
    try:
        local = sock.getsockname()
        peer = sock.getpeername()
    except OSError:
        return None
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    req = inet_diag_req()
    req["sdiag_family"] = sock.family
    req["sdiag_protocol"] = socket.IPPROTO_TCP
    req["idiag_states"] = _ALL_STATES
    req["idiag_ext"] = 0
    # The peer's socket: its source is the peer's end, its destination ours.
    req["idiag_sport"], req["idiag_dport"] = peer[1], local[1]
    req["idiag_src"], req["idiag_dst"] = _words(peer[0]), _words(local[0])
    req["idiag_if"] = 0
    req["idiag_cookie"] = _NO_COOKIE
    try:
        answers = tuple(_diag().nlm_request(req, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST))
    except Exception:  # netlink errors (ENOENT) when the peer has gone
        return None
    for msg in answers:
        if (msg.get("idiag_sport") == peer[1] and msg.get("idiag_dport") == local[1]
                and msg.get("idiag_state") in _OWNED_STATES):
            return int(msg["idiag_uid"])
    return None
