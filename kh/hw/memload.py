"""Bulk loads: write bytes straight into a node's RAM through QEMU's gdbstub.

The emulated UART carries ~20 KB/s, far too slow for kernels and ramdisks. QEMU's gdbstub
writes guest memory from the host side with no guest involvement: khd connects to the node's
gdb socket (never reachable by a principal), switches to physical addresses
(`Qqemu.PhyMemMode`), streams `M` packets pipelined, and detaches, which resumes the node. The
packets depend only on address and data, so they are built once and sent to every node.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from kh.errors import KhError

CHUNK = 0x7E0  # payload bytes per M packet: hex doubles it, QEMU's PacketSize is 0x1000
WINDOW = 32  # packets in flight


class LoadError(KhError):
    """A bulk load into a node failed."""


def packet(body: bytes) -> bytes:
    return b"$" + body + b"#%02x" % (sum(body) & 0xFF)


@dataclass(frozen=True)
class Load:
    """The M packets that put ``size`` bytes at ``addr`` (built once, sent to many nodes)."""

    addr: int
    size: int
    packets: tuple[bytes, ...]


def build(addr: int, data: bytes) -> Load:
    pkts = []
    for off in range(0, len(data), CHUNK):
        part = data[off:off + CHUNK]
        pkts.append(packet(b"M%x,%x:" % (addr + off, len(part)) + part.hex().encode()))
    return Load(addr, len(data), tuple(pkts))


class _Gdb:
    def __init__(self, path: Path, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as e:
            raise LoadError(f"cannot reach the node's memory port ({e.strerror})") from None
        self.buf = bytearray()

    def read_reply(self) -> bytes:
        """Next reply packet (acks skipped); each reply is acknowledged."""
        while True:
            start = self.buf.find(b"$")
            end = self.buf.find(b"#", start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self.buf) >= end + 3:
                body = bytes(self.buf[start + 1:end])
                del self.buf[:end + 3]
                self.sock.sendall(b"+")
                return body
            data = self.sock.recv(65536)
            if not data:
                raise LoadError("the node's memory port closed")
            self.buf += data

    def request(self, body: bytes, want: bytes | None = None, prefix: bytes | None = None
                ) -> bytes:
        self.sock.sendall(packet(body))
        while True:
            r = self.read_reply()
            if (want is not None and r == want) or (prefix is not None and r.startswith(prefix)):
                return r
            if r.startswith(b"E"):
                raise LoadError(f"gdbstub refused {body[:20]!r}: {r.decode()}")
            # a stop notification (T..) from the attach: skip it

    def close(self) -> None:
        self.sock.close()


def write(gdb_socket: Path, load: Load, timeout: float = 60.0) -> None:
    """Put ``load`` into the memory of the node behind ``gdb_socket``; the node is stopped
    while it happens and resumes afterwards."""
    g = _Gdb(gdb_socket, timeout)
    try:
        g.request(b"qSupported:multiprocess+", prefix=b"PacketSize")
        g.request(b"Qqemu.PhyMemMode:1", want=b"OK")
        sent = done = 0
        total = len(load.packets)
        while done < total:
            while sent < total and sent - done < WINDOW:
                g.sock.sendall(load.packets[sent])
                sent += 1
            r = g.read_reply()
            if r != b"OK":
                raise LoadError(f"write at packet {done} refused: {r.decode(errors='replace')}")
            done += 1
        g.request(b"D;1", want=b"OK")
    except TimeoutError:
        raise LoadError("the node's memory port did not answer") from None
    finally:
        g.close()
