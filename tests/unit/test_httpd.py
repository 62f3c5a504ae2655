"""Issue 10, items 3-4 (HTTP): khd's HTTP server (kh.service.httpd, waitress) is bounded
whatever clients do: idle connections cost no thread, a client trickling its headers is cut
off, connections are limited in all and per source, oversized headers are refused. Against the
real server with a small WSGI application (the API's own cases are in test_api_input.py);
the limits are shrunk so that the tests are short, never timed."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kh import admission
from kh.service import httpd
from kh.service.request import Caller
from tests.unit.as_user import NOBODY, connect_as, needs_root


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    caller: Caller = environ["kh.caller"]
    body = f"{caller.source} {caller.operator} {environ['kh.tcp']}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


@contextlib.contextmanager
def server(**limits: Any) -> Iterator[tuple[str, int]]:
    srv = httpd.HttpServer(app, [httpd.bind_tcp("127.0.0.1", 0)], httpd.Limits(**limits))
    srv.start()
    try:
        yield srv.server_address
    finally:
        srv.shutdown()
        srv.server_close()


GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def ask(s: socket.socket, request: bytes = GET) -> bytes:
    """One request on an open connection; its whole answer (Content-Length framed)."""
    s.sendall(request)
    data = b""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            n = [int(x.split(b":")[1]) for x in head.split(b"\r\n")
                 if x.lower().startswith(b"content-length:")]
            if n and len(rest) >= n[0]:
                return data
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def closed_by_server(s: socket.socket, rounds: int, every: float = 0.1,
                     send: bytes = b"") -> bool:
    """Whether khd closes ``s`` within ``rounds`` waits of ``every`` s (sending ``send``
    before each: a trickle)."""
    s.setblocking(False)
    for _ in range(rounds):
        try:
            if send:
                s.send(send)
            if select.select([s], [], [], every)[0] and not s.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def connect(addr: tuple[str, int]) -> socket.socket:
    return socket.create_connection(addr, timeout=20)


def test_idle_connections_cost_no_thread():
    """Issue 10, finding 4: 150 idle HTTP connections took khd from 28 to 218 threads."""
    with server(max_connections=200, per_source=200) as addr:
        before = threading.active_count()
        conns = [connect(addr) for _ in range(150)]
        try:
            for c in conns:  # each is accepted and served, then stays open, idle
                assert ask(c).startswith(b"HTTP/1.1 200")
            assert threading.active_count() == before
        finally:
            for c in conns:
                c.close()


def test_threads_are_the_loop_and_the_workers():
    before = threading.active_count()
    with server(workers=3):
        assert threading.active_count() == before + 1 + 3
    assert threading.active_count() == before


def test_a_client_trickling_its_headers_is_cut_off():
    """A slowloris keeps each read short (waitress's idle timeout never fires): the request
    as a whole has a deadline. 60 header bytes over the test, far under the header limit."""
    with server(request_timeout=1) as addr, connect(addr) as s:
        s.sendall(b"GET / HTTP/1.1\r\n")
        assert closed_by_server(s, rounds=200, send=b"X:y\r\n")


def test_a_client_trickling_its_body_is_cut_off():
    with server(request_timeout=1) as addr, connect(addr) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 60000\r\n\r\n")
        assert closed_by_server(s, rounds=200, send=b"{")


def test_an_idle_connection_is_closed():
    with server(idle_timeout=1) as addr, connect(addr) as s:
        assert ask(s).startswith(b"HTTP/1.1 200")
        assert closed_by_server(s, rounds=200)


def test_a_served_connection_stays_while_it_is_used():
    """The deadlines cut off only what is slow or silent: requests in a row are served."""
    with server(request_timeout=1, idle_timeout=1) as addr, connect(addr) as s:
        for _ in range(15):
            assert ask(s).startswith(b"HTTP/1.1 200")
            time.sleep(0.2)


def test_past_the_connection_limit_new_connections_wait_unaccepted():
    """At the limit khd accepts nothing more (no channel, no memory): a new connection waits in
    the kernel's backlog and is served once one of the others closes."""
    with server(max_connections=4, per_source=10) as addr:
        held = [connect(addr) for _ in range(4)]
        for c in held:
            assert ask(c).startswith(b"HTTP/1.1 200")
        extra = connect(addr)  # the kernel completes it; khd does not accept it
        extra.sendall(GET)
        assert select.select([extra], [], [], 1.5)[0] == []
        held.pop().close()
        extra.setblocking(True)
        assert ask(extra, b"").startswith(b"HTTP/1.1 200")
        for c in [*held, extra]:
            c.close()


def test_past_the_per_source_limit_a_connection_is_refused_with_429():
    me = f"loopback:uid={os.geteuid()}"
    with server(per_source=3) as addr:
        held = [connect(addr) for _ in range(3)]
        for c in held:
            assert ask(c).startswith(b"HTTP/1.1 200")
        with connect(addr) as extra:
            answer = ask(extra)
            assert answer.startswith(b"HTTP/1.1 429"), answer
            assert answer.endswith(f"kh: too many connections from {me} (at most 3)\n".encode())
            assert extra.recv(10) == b""  # and closed
        held.pop().close()
        time.sleep(0.2)  # the close reaches khd's loop
        with connect(addr) as again:
            assert ask(again).startswith(b"HTTP/1.1 200")
        for c in held:
            c.close()


def test_one_local_user_holding_its_connections_leaves_others_theirs():
    """All of loopback was one source: 16 idle connections from one local user answered 429
    to every other local user's requests for up to 30 s."""
    needs_root()
    with server(per_source=3) as addr:
        held = [connect_as(NOBODY, addr) for _ in range(3)]
        for c in held:
            assert ask(c).startswith(b"HTTP/1.1 200")
        with connect_as(NOBODY, addr, "127.0.0.7") as extra:
            assert ask(extra).endswith(
                f"kh: too many connections from loopback:uid={NOBODY} (at most 3)\n".encode())
        with connect(addr) as mine:
            assert ask(mine).startswith(b"HTTP/1.1 200")
        for c in held:
            c.close()


@pytest.mark.parametrize("extra", [b"X: " + b"a" * 9000 + b"\r\n",
                                   b"".join(b"X%d: y\r\n" % i for i in range(2000))])
def test_oversized_request_line_and_headers_are_431(extra):
    with server() as addr, connect(addr) as s:
        answer = ask(s, b"GET / HTTP/1.1\r\n" + extra + b"\r\n")
        assert answer.split(b" ", 2)[1] == b"431", answer[:200]
        assert answer.endswith(b"kh: request line and headers are over 8192 bytes\n")


@pytest.mark.parametrize("request_bytes,code", [
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 65537\r\n\r\n", 413),
    (b"GET / HTTP/2.0\r\n\r\n", 400),
    (b"get / HTTP/1.1\r\n\r\n", 400),
])
def test_bad_framing_is_refused_before_the_body_in_one_line(request_bytes, code):
    """The body never comes and the connection stays open on the client's side: khd answers
    from the headers alone, in khd's one-line form, and closes."""
    with server() as addr, connect(addr) as s:
        answer = ask(s, request_bytes)
        assert answer.startswith(b"HTTP/1.1 %d" % code) or \
            answer.startswith(b"HTTP/1.0 %d" % code), answer
        body = answer.partition(b"\r\n\r\n")[2]
        assert body.startswith(b"kh: ") and body.count(b"\n") == 1, body
        assert b"waitress" not in answer
        assert s.recv(10) == b""


def test_a_body_of_exactly_the_limit_is_read():
    with server() as addr, connect(addr) as s:
        n = httpd.MAX_BODY
        answer = ask(s, b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % n
                     + b"x" * n)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_the_caller_comes_from_the_transport(tmp_path):
    with server() as addr, connect(addr) as s:
        assert ask(s).endswith(f"\r\n\r\nloopback:uid={os.geteuid()} False True\n".encode())
    sock = tmp_path / "khd.sock"
    srv = httpd.HttpServer(app, [httpd.bind_unix(sock)])
    srv.start()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            # the kernel's word for the peer (this test's own uid): khd's own user or root
            assert ask(s).endswith(f"\r\n\r\nunix:uid={os.geteuid()} True False\n".encode())
    finally:
        srv.shutdown()
        srv.server_close()
    assert not sock.exists()


def test_peer_credentials_say_who_is_the_operator(monkeypatch):
    a, b = socket.socketpair()
    with a, b:
        me = os.geteuid()
        assert httpd.peer_caller(a) == Caller(f"unix:uid={me}", True)
        monkeypatch.setattr(httpd.os, "geteuid", lambda: 4242)  # khd as another user
        assert httpd.peer_caller(a).operator is (me == 0)  # root is still the operator


@pytest.mark.parametrize("address,source", [
    ("127.0.0.1", "loopback"), ("127.3.4.5", "loopback"), ("::1", "loopback"),
    ("10.1.0.4", "10.1.0.4"), ("::ffff:10.1.0.4", "10.1.0.4"),
    ("::ffff:127.0.0.2", "loopback")])
def test_sources(address, source):
    assert admission.source_of(address) == source
    assert admission.source_of(source) == source  # a source is its own source
