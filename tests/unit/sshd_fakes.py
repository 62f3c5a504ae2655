"""Fakes for the ssh server's unit tests: a ChannelAccess kept in dicts, consoles and writers that
record, a RAM that records its writes, and a running SshServer on a loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

import paramiko

from kh.cc.channel import Hub
from kh.cc.limits import Limits
from kh.cc.sshd import SshServer
from kh.hw import memload
from kh.service.access import Grant, Ram, Reach, Revoked, Standing

HOST_KEY = paramiko.RSAKey.generate(1024)


class FakeConsole:
    def __init__(self) -> None:
        self.subs: list[Callable[[bytes], None]] = []

    def subscribe(self, fn: Callable[[bytes], None], *, direct: bool = False,
                  **_: object) -> Callable[[], None]:
        self.subs.append(fn)
        return lambda: self.subs.remove(fn) if fn in self.subs else None

    def emit(self, data: bytes) -> None:
        for fn in list(self.subs):
            fn(data)


class FakeWriter:
    def __init__(self) -> None:
        self.got = bytearray()
        self.queued = 0
        self.q = self  # a Hub that puts into ``writer.q`` (an older channel.py) works too

    def put(self, data: bytes) -> bool:
        self.got += data
        return True

    def drain(self, timeout: float) -> bool:
        return True


class FakeRam:
    """Records every write: where, how big, and the bytes (into ``mem``)."""

    def __init__(self, size: int) -> None:
        self.mem = bytearray(size)
        self.writes: list[tuple[int, int]] = []
        self.closed = False

    def write(self, offset: int, data: bytes) -> None:
        if offset + len(data) > len(self.mem):
            raise memload.LoadError("outside")
        self.writes.append((offset, len(data)))
        self.mem[offset:offset + len(data)] = data

    def close(self) -> None:
        self.closed = True


@dataclass
class Alloc:
    principal: str
    members: set[int]
    released: bool = False


@dataclass
class FakeAccess:
    """Principals with passwords, allocations with member nodes, keys; change them and the
    next question sees it, as the service's state would."""

    passwords: dict[str, str] = field(default_factory=dict)
    allocs: dict[int, Alloc] = field(default_factory=dict)
    keys: dict[int, tuple[str, int | None, str]] = field(default_factory=dict)
    consoles: dict[int, FakeConsole] = field(default_factory=dict)
    writers: dict[int, FakeWriter] = field(default_factory=dict)
    rams: dict[int, Ram] = field(default_factory=dict)
    limit: int = 64 << 20
    sources: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, principal: str, password: str, alloc: int, nodes: list[int]) -> None:
        self.passwords[principal] = password
        self.allocs[alloc] = Alloc(principal, set(nodes))
        for n in nodes:
            self.consoles.setdefault(n, FakeConsole())
            self.writers.setdefault(n, FakeWriter())

    def _live(self, alloc: int, node: int | None) -> Alloc | None:
        a = self.allocs.get(alloc)
        if a is None or a.released or a.principal not in self.passwords:
            return None
        if node is not None and node not in a.members:
            return None
        return a

    def login_password(self, alloc: int, node: int | None, password: str,
                       source: str) -> Grant | None:
        with self.lock:
            self.sources.append(source)
            a = self._live(alloc, node)
            if a is None or self.passwords[a.principal] != password:
                return None
            return Grant(a.principal, alloc, node, None)

    def login_key(self, alloc: int, node: int | None, key: str) -> Grant | None:
        with self.lock:
            a = self._live(alloc, node)
            if a is None:
                return None
            for kid, (principal, kalloc, blob) in self.keys.items():
                if principal == a.principal and kalloc in (None, alloc) and blob == key:
                    return Grant(a.principal, alloc, node, kid)
            return None

    def _standing(self, g: Grant) -> Standing:
        a = self.allocs.get(g.alloc)
        if g.principal not in self.passwords:
            return Standing(f"principal {g.principal} was removed", frozenset())
        if a is None or a.released:
            return Standing(f"allocation {g.alloc} was released", frozenset())
        if g.key_id is not None and g.key_id not in self.keys:
            return Standing(f"key {g.key_id} was revoked", frozenset())
        if g.node is not None:
            if g.node not in a.members:
                return Standing(f"node {g.node} left allocation {g.alloc}", frozenset())
            return Standing(None, frozenset({g.node}))
        return Standing(None, frozenset(a.members))

    def standing(self, grants: Collection[Grant]) -> dict[Grant, Standing]:
        with self.lock:
            return {g: self._standing(g) for g in grants}

    def reach(self, grant: Grant) -> Reach:
        with self.lock:
            st = self._standing(grant)
            if st.reason:
                raise Revoked(st.reason)
            nodes = sorted(st.nodes)
            hub = Hub(grant.alloc, {n: self.writers[n]  # type: ignore[misc]
                                    for n in self.allocs[grant.alloc].members})
            return Reach(tuple(nodes), tuple(nodes),
                         {n: self.consoles[n] for n in nodes},  # type: ignore[misc]
                         hub)

    def open_ram(self, grant: Grant, node: int) -> Ram:
        with self.lock:
            st = self._standing(grant)
            if st.reason or node not in st.nodes:
                raise Revoked(st.reason or "not a member")
            if node not in self.rams:
                raise memload.LoadError("the node is not running")
            return self.rams[node]

    def mem_limit(self) -> int:
        return self.limit


FAST = Limits(watch_interval=0.1)


@dataclass
class Running:
    server: SshServer
    port: int
    access: FakeAccess


@contextlib.contextmanager
def serve(access: FakeAccess, limits: Limits = FAST,
          key: paramiko.PKey = HOST_KEY) -> Iterator[Running]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    server = SshServer(access, key, limits)
    server.listen(listener)
    try:
        yield Running(server, listener.getsockname()[1], access)
    finally:
        server.close()


def tcp(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to the server from ``source`` (any 127/8 address is loopback)."""
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.settimeout(10)
    return s


def connect(port: int, user: str, password: str | None = None,
            key: paramiko.PKey | None = None, source: str = "127.0.0.1"
            ) -> paramiko.SSHClient:
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        c.connect("127.0.0.1", port=port, username=user, password=password, pkey=key,
                  look_for_keys=False, allow_agent=False, timeout=10, banner_timeout=10,
                  auth_timeout=10, sock=tcp(port, source))
    except BaseException:
        c.close()
        raise
    return c


def wait_until(check: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``check`` until true; fail after ``timeout`` (a bound, never a measured time)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)
