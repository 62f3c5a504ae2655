"""A stand-in for a node's QEMU console socket: what a test sends is the node's output, and
what kh writes to the node can be read (or left unread, as a slow UART would)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kh.hw.console import Console


class FakeNode:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None

    def attach(self, log: Path | None = None, **kw: object) -> Console:
        """A kh Console connected to this node."""
        con = Console(self.path, log, name="node1", **kw)  # type: ignore[arg-type]
        con.connect(5)
        self.conn, _ = self.server.accept()
        return con

    def send(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(data)

    def send_async(self, data: bytes) -> threading.Thread:
        """Send ``data`` from a thread of its own: a console that is not read blocks it."""
        t = threading.Thread(target=self.send, args=(data,), daemon=True)
        t.start()
        return t

    def read(self, count: int, timeout: float = 30) -> bytes:
        """Exactly ``count`` bytes kh wrote to the node (fewer if none come in ``timeout``)."""
        assert self.conn is not None
        self.conn.settimeout(timeout)
        got = bytearray()
        with contextlib.suppress(TimeoutError):
            while len(got) < count:
                chunk = self.conn.recv(min(65536, count - len(got)))
                if not chunk:
                    break
                got += chunk
        return bytes(got)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


def wait_for(cond: Callable[[], bool], timeout: float = 30) -> bool:
    """Poll ``cond`` until true or ``timeout`` seconds passed; its last answer."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return cond()
        time.sleep(0.01)
    return True


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes of numbered lines, each different, so a lost or moved byte shows."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += b"line %d of %d\n" % (i, seed)
        i += 1
    return bytes(out[:size])


class Collector:
    """A sink that keeps what it is handed; ``block()`` makes it wait (a client that stopped
    reading) until ``unblock()``."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lock = threading.Lock()
        self.open = threading.Event()
        self.open.set()

    def __call__(self, data: bytes) -> None:
        self.open.wait()
        with self.lock:
            self.data += data

    def block(self) -> None:
        self.open.clear()

    def unblock(self) -> None:
        self.open.set()

    def bytes(self) -> bytes:
        with self.lock:
            return bytes(self.data)
