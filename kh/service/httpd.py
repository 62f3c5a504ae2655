"""khd's HTTP server: waitress (the Pylons project's WSGI server) with kh's bounds.

waitress reads every request with non-blocking I/O in one loop thread and hands only complete
requests (headers and body, both bounded) to a fixed pool of worker threads, so an idle or slow
client costs a socket and a few KiB, never a thread. kh adds, in small subclasses of waitress's
own parts: a deadline for receiving a whole request (waitress's own timeout only measures
silence, which a client trickling a byte at a time never keeps), a per-source connection limit,
refusal of ``Transfer-Encoding`` and of HTTP versions other than 1.0/1.1 before any body is
read, khd's one-line ``kh: ...`` error bodies for what waitress refuses itself, and the caller
(the unix socket's peer credentials, or the TCP peer's address) in each request's environment.
docs/service.md ("The HTTP server") says why waitress, and each bound's reason. What a request
must be to reach the application, and waitress's refusals in khd's form, are
kh.service.httpparse's.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer, UnixWSGIServer
from waitress.task import ThreadedTaskDispatcher, WSGITask

from kh.admission import source_of_peer
from kh.errors import KhError
from kh.peer import unix_peer_uid
from kh.service.httpparse import Parser, Refusal
from kh.service.request import MAX_BODY, Caller

log = logging.getLogger("kh.httpd")

# -- the bounds (each one's reason; docs/service.md has the table) ------------------------------
# Request line and headers, bytes (431 past it). kh's clients send about 200; 8 KiB is what
# common servers allow (nginx's large_client_header_buffers, Apache's LimitRequestFieldSize).
MAX_HEADER = 8 * 1024
# A request, from its first byte to its last, seconds: a client that trickles its headers or
# body (slowloris) is cut off then. A whole request is at most MAX_HEADER + MAX_BODY bytes,
# which any real client, even a TCG node's busybox wget, sends in well under a second.
REQUEST_TIMEOUT = 10
# A connection with no request in progress and nothing sent or received, seconds (a keep-alive
# client between requests, or one that stopped reading its answer): closed then.
IDLE_TIMEOUT = 30
# Connections held open per listener; past it khd stops accepting and new connections wait in
# the kernel's backlog (BACKLOG deep; then refused) until one closes, at the latest after the
# timeouts above. Each costs at most a socket and MAX_HEADER + MAX_BODY bytes.
MAX_CONNECTIONS = 100
# Connections per source on a TCP listener (admission.source_of_peer, as for ssh: a fabric
# address, or on loopback the local user owning the connecting socket); the next is answered
# 429 and closed, so one node or local user cannot take all of MAX_CONNECTIONS.
PER_SOURCE = 16
BACKLOG = 128
# Worker threads: requests served at once. The TCP listeners (loopback and the fabric) share
# WORKERS; the operator's unix socket has its own OPERATOR_WORKERS, so a flood over TCP never
# keeps `kh ps` or `kh service stop` waiting. khd's work per request is short (a scrypt of
# ~15 ms, a database transaction, a few console lines to U-Boot).
WORKERS = 4
OPERATOR_WORKERS = 2
# How often the loop looks for connections past their deadlines, seconds.
SWEEP = 1
# Connections refused for their source's limit, answered and kept until the next sweep so that
# the answer is not lost to a reset; past this many the oldest is closed at once.
LINGER = 64


@dataclass(frozen=True)
class Limits:
    """The bounds of one server; the defaults are the constants above (tests shrink them)."""

    max_header: int = MAX_HEADER
    max_body: int = MAX_BODY
    request_timeout: float = REQUEST_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    per_source: int = PER_SOURCE
    workers: int = WORKERS
    backlog: int = BACKLOG


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def peer_caller(sock: socket.socket) -> Caller:
    """Who is at the other end of a unix socket, from the kernel (SO_PEERCRED): the operator
    when its uid is root's or khd's own (it could read khd's state anyway)."""
    uid = unix_peer_uid(sock)
    return Caller(f"unix:uid={uid}", uid in (0, os.geteuid()))


# -- waitress's parts, bounded --------------------------------------------------------------------
class _Task(WSGITask):  # type: ignore[misc]
    def get_environment(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environment()
        environ["kh.caller"] = self.channel.caller
        environ["kh.tcp"] = self.channel.server.family != socket.AF_UNIX
        environ["kh.public"] = self.channel.server.public
        return environ


class _Channel(HTTPChannel):  # type: ignore[misc]
    parser_class = Parser
    task_class = _Task
    error_task_class = Refusal

    def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Any,
                 map: dict[int, Any] | None = None, source: str = "") -> None:
        self.caller = (peer_caller(sock) if sock.family == socket.AF_UNIX
                       else Caller(source or source_of_peer(sock, addr[0]), False))
        super().__init__(server, sock, addr, adj, map=map)


class _Bounded:
    """What kh adds to a waitress listener: its own connection limit (waitress counts the
    whole socket map, which all of a server's listeners share), a per-source limit on TCP,
    and the deadlines."""

    channel_class = _Channel
    limits: Limits
    public: bool = False  # nodes' listener: its requests may carry no secret (kh.service.api)
    active_channels: dict[int, _Channel]
    accepting: bool
    next_channel_cleanup: float
    family: int

    def readable(self) -> bool:
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + SWEEP
            self.maintenance(now)
        return self.accepting and len(self.active_channels) < self.limits.max_connections

    def linger(self, conn: socket.socket) -> None:
        """Keep a refused connection until the next sweep but one (at most LINGER of them: the
        oldest goes first), so that its answer reaches the client before the close."""
        if not hasattr(self, "lingering"):
            self.lingering: deque[tuple[float, socket.socket]] = deque()
        if len(self.lingering) >= LINGER:
            _drain_and_close(self.lingering.popleft()[1])
        self.lingering.append((time.time(), conn))

    def maintenance(self, now: float) -> None:
        """Close each connection past a deadline, but never one whose request is being
        served (its answer would be lost after the work was done)."""
        lim = self.limits
        while getattr(self, "lingering", None) and self.lingering[0][0] < now - SWEEP:
            _drain_and_close(self.lingering.popleft()[1])
        for ch in list(self.active_channels.values()):
            if ch.requests:
                continue
            req = ch.request
            if req is not None and not req.completed and now - req.started > \
                    lim.request_timeout:
                log.info("%s: request not received within %.0f s; closed",
                         ch.caller.source, lim.request_timeout)
                ch.will_close = True
            elif ch.last_activity < now - lim.idle_timeout:
                ch.will_close = True

    def handle_accept(self) -> None:
        try:
            pair = self.accept()  # type: ignore[attr-defined]
        except OSError:
            return  # e.g. the peer went away before accept: nothing to do
        if pair is None:
            return
        conn, addr = pair
        source = ""
        if self.family != socket.AF_UNIX:
            source = source_of_peer(conn, addr[0])
            held = Counter(ch.caller.source for ch in self.active_channels.values())
            if held[source] >= self.limits.per_source:
                _refuse(conn, f"too many connections from {source} (at most "
                        f"{self.limits.per_source})")
                self.linger(conn)
                return
        else:
            addr = ("unix", None)
        try:
            self.channel_class(self, conn, addr, self.adj,  # type: ignore[attr-defined]
                               map=self._map, source=source)  # type: ignore[attr-defined]
        except OSError:  # the peer is already gone (getsockopt on a dead socket)
            conn.close()


def _refuse(conn: socket.socket, reason: str) -> None:
    """Answer 429 at once (a new connection's send buffer is empty, so this small answer fits)
    and end our side; the socket is closed later (_Bounded.linger), since closing it with the
    client's request unread would reset the connection and could lose the answer."""
    body = f"kh: {reason}\n".encode()
    head = (f"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    try:
        conn.setblocking(False)
        conn.send(head.encode() + body)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _drain_and_close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while conn.recv(65536, socket.MSG_DONTWAIT):
            pass
    conn.close()


class _TcpListener(_Bounded, TcpWSGIServer):  # type: ignore[misc]
    pass


class _UnixListener(_Bounded, UnixWSGIServer):  # type: ignore[misc]
    pass


# -- the server --------------------------------------------------------------------------------
class HttpServer:
    """``app`` (WSGI) served on already-listening ``sockets`` (unix or TCP, any namespace), by
    one loop thread and ``limits.workers`` worker threads, whatever clients do. Requests on the
    sockets in ``public`` (nodes' listener) carry ``kh.public`` True in their environment.

    start() serves in the background; shutdown() stops serving (requests being served get
    up to 5 s to finish); server_close() closes the sockets (and removes a unix socket's
    path). ``server_address`` is the first socket's address."""

    def __init__(self, app: WsgiApp, sockets: list[socket.socket],
                 limits: Limits | None = None, name: str = "api",
                 public: Collection[socket.socket] = ()) -> None:
        self.limits = limits or Limits()
        self.name = name
        self.sockets = sockets
        self.server_address = sockets[0].getsockname()
        self._map: dict[int, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dispatcher = ThreadedTaskDispatcher()
        self._dispatcher.set_thread_count(self.limits.workers)
        adj = Adjustments(
            sockets=sockets, threads=self.limits.workers, backlog=self.limits.backlog,
            # waitress's own connection limit counts the shared map; each listener keeps
            # its own (see _Bounded), so this one is only a ceiling over them all.
            connection_limit=self.limits.max_connections * len(sockets) + 8,
            channel_timeout=max(1, int(self.limits.idle_timeout)), cleanup_interval=SWEEP,
            max_request_header_size=self.limits.max_header,
            # waitress refuses a Content-Length equal to its limit: one more allows exactly
            # max_body bytes
            max_request_body_size=self.limits.max_body + 1,
            ident="khd", asyncore_use_poll=True, asyncore_loop_timeout=SWEEP,
            log_socket_errors=False, clear_untrusted_proxy_headers=False)
        self.listeners: list[_Bounded] = []
        for s in sockets:  # each starts listening here, BACKLOG deep
            kind = _UnixListener if s.family == socket.AF_UNIX else _TcpListener
            lst = kind(app, self._map, True, s, dispatcher=self._dispatcher, adj=adj,
                       bind_socket=False,
                       sockinfo=(s.family, s.type, s.proto, s.getsockname()))
            lst.limits = self.limits
            lst.public = s in public
            self.listeners.append(lst)

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._loop, daemon=True, name=self.name)
        self._thread.start()
        return self._thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            wasyncore.loop(timeout=SWEEP, map=self._map, use_poll=True, count=1)

    def shutdown(self) -> None:
        self._stop.set()
        if self.listeners:
            self.listeners[0].pull_trigger()  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(10)
        self._dispatcher.shutdown(timeout=5)

    def server_close(self) -> None:
        paths = [a for s in self.sockets if s.family == socket.AF_UNIX
                 and isinstance(a := _name(s), str) and a]
        wasyncore.close_all(self._map, ignore_all=True)
        for lst in self.listeners:
            for _, conn in getattr(lst, "lingering", ()):
                conn.close()
        for s in self.sockets:
            s.close()
        for p in paths:
            Path(p).unlink(missing_ok=True)


def _name(s: socket.socket) -> Any:
    try:
        return s.getsockname()
    except OSError:
        return None


def bind_tcp(addr: str, port: int, option: str = "--port") -> socket.socket:
    """A TCP socket bound to ``addr``:``port`` (port 0: any free one), not yet listening;
    a port in use is a KhError naming ``option``, the setting that picks another."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((addr, port))
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise KhError(f"port {port} on {addr} is in use", f"pick another with {option}"
                          ) from None
        raise KhError(f"cannot listen on {addr}:{port}: {e.strerror}",
                      f"pick another port with {option}") from None
    return s


def bind_unix(path: str | Path) -> socket.socket:
    """A unix socket at ``path`` (a stale one there is replaced), not yet listening."""
    Path(path).unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
    except OSError as e:
        s.close()
        raise KhError(f"cannot listen on {path}: {e.strerror}") from None
    return s
