"""TCP forwarding from the host's loopback to external-domain nodes: `kh publish`'s engine
(kh.service.publish decides what is forwarded and who may).

A Forwarder listens on 127.0.0.1 of the host (each listening socket is bound by the caller, in
khd's own network namespace) and relays every connection it accepts to one target (address,
port) over a socket made in the outside world's namespace, the one place from which the
external domain is reachable (the uplink, kh.hw.fabric): its event loop's thread enters that
namespace once, so every socket it makes is made there. Nothing listens anywhere but on the
host's loopback, and nothing is connected to but the target.

One asyncio loop in one thread serves every forward. A connection is two coroutines, each
copying at most ``chunk`` bytes at a time and waiting until they are sent before reading on, so
at most 2 x ``chunk`` bytes are buffered per connection, whatever either side does. Bounds
(Limits): connections per forward and in all (one past either is accepted and closed at once:
the client reads nothing); a connection with no byte moved either way for ``idle`` s is closed
(a peer that stops reading counts as idle too); a connect that takes longer than ``connect`` s
is given up. Before a connection is relayed, the forward's ``allowed`` callback is asked again
(its owner may have lost the node since), so authorization holds on every use.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from kh.allocation import AllocationError
from kh.errors import KhError
from kh.hw import netns as nsutil

log = logging.getLogger("kh.forward")
T = TypeVar("T")
BACKLOG = 16  # connections the kernel holds for a listener before the loop accepts them
WAIT = 10.0  # seconds a caller waits for the loop to take a forward in or out


@dataclass(frozen=True)
class Limits:
    per_forward: int = 32  # connections at once through one forward
    total: int = 128  # connections at once through all of them
    idle: float = 300.0  # s without a byte either way before a connection is closed
    connect: float = 10.0  # s for the target to accept
    chunk: int = 16 * 1024  # bytes read (and buffered) at a time, per direction


class _Conn:
    """One relayed connection: its task and when a byte last moved (loop time)."""

    def __init__(self, now: float) -> None:
        self.last = now
        self.task: asyncio.Task[None] | None = None


class _Forward:
    """A listener and the connections it relays (touched only in the loop's thread)."""

    def __init__(self, port: int, sock: socket.socket, target: tuple[str, int],
                 allowed: Callable[[int], bool]) -> None:
        self.port = port
        self.sock = sock
        self.target = target
        self.allowed = allowed
        self.conns: set[_Conn] = set()
        self.accepting: asyncio.Task[None] | None = None


def _forget(conns: set[_Conn], conn: _Conn, _task: object) -> None:
    conns.discard(conn)


class Forwarder:
    """Forwards by host port. ``netns``: the namespace connections to targets are made in
    (None: the caller's own, for tests). ``tick``, if given, is called every ``tick_every``
    s from a thread of its own in the caller's namespace (kh.service.publish's sweep)."""

    def __init__(self, netns: str | None, limits: Limits | None = None,
                 tick: Callable[[], None] | None = None, tick_every: float = 5.0) -> None:
        self.netns = netns
        self.limits = limits or Limits()
        self._tick = tick
        self._tick_every = tick_every
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._forwards: dict[int, _Forward] = {}  # by host port; the loop's own

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop's thread (in ``netns``) and the ticker. KhError (or OSError: no such
        namespace) if the thread cannot enter the namespace."""
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                if self.netns:
                    nsutil.enter(self.netns)
                loop = asyncio.new_event_loop()
            except BaseException as e:  # handed to start's caller
                failed.append(e)
                ready.set()
                return
            self._loop = loop
            loop.call_soon(self._sweep)
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="forward", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]
        if self._tick is not None:
            self._ticker = threading.Thread(target=self._ticking, name="forward-tick",
                                            daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        """Close every forward and its connections, then end the loop."""
        self._stopping.set()
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError, TimeoutError):
            self._call(self._close_all())
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(WAIT)
        if self._ticker is not None:
            self._ticker.join(WAIT)
        self._loop = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    def _ticking(self) -> None:
        assert self._tick is not None
        while not self._stopping.wait(self._tick_every):
            try:
                self._tick()
            except Exception:  # the sweep must outlive one bad turn
                log.exception("checking the published ports")

    def _call(self, coro: Any) -> Any:
        """Run ``coro`` on the loop from another thread and wait for its result."""
        if self._loop is None:
            coro.close()
            raise KhError("khd's forwarder is not running")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("Forwarder's own thread cannot wait on itself")
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(WAIT)

    # -- forwards -----------------------------------------------------------------------------
    def open(self, host_port: int, target: tuple[str, int], allowed: Callable[[int], bool]
             ) -> int:
        """Listen on 127.0.0.1:``host_port`` (0: a free port the kernel picks) and relay every
        connection to ``target`` while ``allowed(port)``; returns the port. The socket is bound
        here, in the caller's namespace. AllocationError (409) when the port is taken."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", host_port))
            s.listen(BACKLOG)
            s.setblocking(False)
            port = int(s.getsockname()[1])
            self._call(self._add(port, _Forward(port, s, target, allowed)))
        except OSError as e:
            s.close()
            if e.errno == errno.EADDRINUSE:
                raise AllocationError(f"port {host_port} on 127.0.0.1 is in use",
                                      "pick another, or leave it out for a free one") from None
            raise AllocationError(f"cannot listen on 127.0.0.1:{host_port}: "
                                  f"{os.strerror(e.errno or 0)}") from None
        except BaseException:
            s.close()
            raise
        return port

    def close(self, host_port: int) -> bool:
        """Stop listening on ``host_port`` and cut its connections; False if it was not open."""
        if self._loop is None:
            return False
        return bool(self._call(self._remove(host_port)))

    def ports(self) -> dict[int, int]:
        """Each open forward's host port and its connections now."""
        if self._loop is None:
            return {}
        return dict(self._call(self._counts()))

    # -- in the loop's thread -----------------------------------------------------------------
    async def _add(self, port: int, fw: _Forward) -> None:
        if port in self._forwards:  # SO_REUSEADDR never lets two listeners share a port
            raise OSError(errno.EADDRINUSE, "in use")
        self._forwards[port] = fw
        fw.accepting = asyncio.get_running_loop().create_task(self._accept(fw))

    async def _remove(self, port: int) -> bool:
        fw = self._forwards.pop(port, None)
        if fw is None:
            return False
        if fw.accepting is not None:
            fw.accepting.cancel()
        fw.sock.close()
        tasks = [c.task for c in fw.conns if c.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return True

    async def _close_all(self) -> None:
        for port in list(self._forwards):
            await self._remove(port)

    async def _counts(self) -> dict[int, int]:
        return {port: len(fw.conns) for port, fw in self._forwards.items()}

    def _total(self) -> int:
        return sum(len(fw.conns) for fw in self._forwards.values())

    async def _accept(self, fw: _Forward) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(fw.sock)
            except OSError as e:  # EMFILE and the like: wait rather than spin
                log.warning("forward to %s:%d cannot accept: %s", *fw.target, e)
                await asyncio.sleep(1.0)
                continue
            client.setblocking(False)
            lim = self.limits
            try:
                ok = len(fw.conns) < lim.per_forward and self._total() < lim.total \
                    and fw.allowed(fw.port)
            except Exception:
                log.exception("forward to %s:%d: checking the caller", *fw.target)
                ok = False
            if not ok:
                client.close()
                continue
            conn = _Conn(loop.time())
            fw.conns.add(conn)
            conn.task = loop.create_task(self._relay(fw, conn, client))
            conn.task.add_done_callback(functools.partial(_forget, fw.conns, conn))

    async def _relay(self, fw: _Forward, conn: _Conn, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # in the loop's netns
        upstream.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(upstream, fw.target),
                                   self.limits.connect)
        except (OSError, TimeoutError):  # refused, unreachable: the client sees it closed
            client.close()
            upstream.close()
            return
        pipes = [loop.create_task(self._pipe(client, upstream, conn)),
                 loop.create_task(self._pipe(upstream, client, conn))]
        try:
            # both ways until both end; a reset either way ends the connection
            await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in pipes:
                t.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            client.close()
            upstream.close()

    async def _pipe(self, src: socket.socket, dst: socket.socket, conn: _Conn) -> None:
        """Copy src to dst until src ends, then end dst's sending side (a half-close)."""
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(src, self.limits.chunk)
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            conn.last = loop.time()
            await loop.sock_sendall(dst, data)
            conn.last = loop.time()

    def _sweep(self) -> None:
        """Every few seconds: cancel connections idle longer than the limit."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for fw in self._forwards.values():
            for c in fw.conns:
                if c.task is not None and now - c.last > self.limits.idle:
                    c.task.cancel()
        loop.call_later(min(self.limits.idle / 4, 5.0), self._sweep)
