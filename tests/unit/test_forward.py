"""kh.service.forward, `kh publish`'s engine: bytes relayed whole both ways (half-closes
included), connections bounded per forward and in all, idle ones closed, a target that does
not answer given up; listening on 127.0.0.1 only. In this namespace (no root)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from kh.allocation import AllocationError
from kh.service.forward import Forwarder, Limits


def target() -> tuple[socket.socket, int]:
    s = socket.create_server(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def serve(srv: socket.socket, handle) -> None:  # type: ignore[no-untyped-def]
    def loop() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()


def sha_back(c: socket.socket) -> None:
    """Read to EOF, answer the SHA-256 of what came and a 1 MiB blob, then close."""
    with c:
        h = hashlib.sha256()
        while data := c.recv(65536):
            h.update(data)
        c.sendall(h.hexdigest().encode() + b"\n" + b"z" * (1 << 20))


def hold(c: socket.socket) -> None:
    with c:
        while c.recv(100):
            pass


@pytest.fixture
def fwd() -> Iterator[Forwarder]:
    f = Forwarder(None, Limits(per_forward=2, total=3, idle=0.6, connect=2.0))
    f.start()
    yield f
    f.stop()


def read_all(s: socket.socket) -> bytes:
    out = bytearray()
    while chunk := s.recv(65536):
        out += chunk
    return bytes(out)


def test_bytes_go_both_ways_whole_through_a_half_close(fwd):
    srv, port = target()
    serve(srv, sha_back)
    hp = fwd.open(0, ("127.0.0.1", port), lambda p: True)
    blob = bytes(range(256)) * 20000  # 5 MB, far past every buffer
    with socket.create_connection(("127.0.0.1", hp), timeout=20) as s:
        s.sendall(blob)
        s.shutdown(socket.SHUT_WR)  # the request ends; the answer still comes
        answer = read_all(s)
    digest, _, rest = answer.partition(b"\n")
    assert digest.decode() == hashlib.sha256(blob).hexdigest()
    assert rest == b"z" * (1 << 20)
    srv.close()


def listeners(port: int) -> list[str]:
    """The local addresses of TCP sockets listening at ``port`` (/proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, _, hexport = local.partition(":")
                if state == "0A" and int(hexport, 16) == port:  # 0A: TCP_LISTEN
                    found.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1])
                                 if len(addr) == 8 else addr)
    return found


def test_listens_on_loopback_only_and_a_taken_port_is_refused(fwd):
    srv, port = target()
    hp = fwd.open(0, ("127.0.0.1", port), lambda p: True)
    assert hp in fwd.ports()
    with pytest.raises(AllocationError, match=f"port {hp} on 127.0.0.1 is in use"):
        fwd.open(hp, ("127.0.0.1", port), lambda p: True)
    # what listens at that port is bound to 127.0.0.1 alone, read from the kernel's table
    # (connecting to the host's other addresses would send traffic outside kh's namespaces;
    # and the host's name need not resolve: it does not in a fresh root)
    assert listeners(hp) == ["127.0.0.1"]
    assert fwd.close(hp) and not fwd.close(hp)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", hp), timeout=2)
    srv.close()


def test_connections_are_bounded_per_forward_and_in_all(fwd):
    srv, port = target()
    serve(srv, hold)
    a = fwd.open(0, ("127.0.0.1", port), lambda p: True)
    b = fwd.open(0, ("127.0.0.1", port), lambda p: True)
    held = [socket.create_connection(("127.0.0.1", a), timeout=5) for _ in range(2)]
    deadline = time.monotonic() + 5
    while fwd.ports()[a] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fwd.ports()[a] == 2
    with socket.create_connection(("127.0.0.1", a), timeout=5) as third:  # past per_forward
        assert third.recv(10) == b""
    held.append(socket.create_connection(("127.0.0.1", b), timeout=5))
    while sum(fwd.ports().values()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    with socket.create_connection(("127.0.0.1", b), timeout=5) as fourth:  # past total
        assert fourth.recv(10) == b""
    for s in held:
        s.close()
    srv.close()


def test_an_idle_connection_is_closed_and_a_busy_one_is_not(fwd):
    srv, port = target()

    def echo(c: socket.socket) -> None:
        with c:
            while data := c.recv(100):
                c.sendall(data)
    serve(srv, echo)
    hp = fwd.open(0, ("127.0.0.1", port), lambda p: True)
    with socket.create_connection(("127.0.0.1", hp), timeout=10) as busy, \
            socket.create_connection(("127.0.0.1", hp), timeout=10) as idle:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:  # longer than idle, but talking
            busy.sendall(b"x")
            assert busy.recv(10) == b"x"
            time.sleep(0.1)
        assert idle.recv(10) == b""  # cut meanwhile
        busy.sendall(b"y")
        assert busy.recv(10) == b"y"
    srv.close()


def test_a_target_that_refuses_or_is_not_allowed_closes_the_client(fwd):
    srv, port = target()
    srv.close()  # nothing listens there now
    hp = fwd.open(0, ("127.0.0.1", port), lambda p: True)
    with socket.create_connection(("127.0.0.1", hp), timeout=10) as s:
        assert s.recv(10) == b""
    srv, port = target()
    asked: list[int] = []
    no = fwd.open(0, ("127.0.0.1", port), lambda p: asked.append(p) or False)
    with socket.create_connection(("127.0.0.1", no), timeout=10) as s:
        assert s.recv(10) == b""
    assert asked == [no]
    assert fwd.ports()[no] == 0
    srv.close()
