"""A node's console offered on a unix socket (``<state>/run/node<N>/console.sock``): what
`kh console N` attaches to."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

from kh.errors import BootError
from kh.hw.console import Console


class Mux:
    """A node's console offered on a unix socket: every client sees the output, and what any
    client writes goes to the node."""

    def __init__(self, console: Console, path: Path) -> None:
        self.console = console
        self.path = path
        path.unlink(missing_ok=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        os.chmod(path, 0o600)
        self.server.listen(8)
        self._closed = False
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._threads = [threading.Thread(target=self._accept, daemon=True,
                                          name=f"mux-{path.name}")]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    client.close()
                    return
                self._clients.add(client)
                t = threading.Thread(target=self._serve, args=(client,), daemon=True,
                                     name=f"mux-client-{self.path.name}")
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, client: socket.socket) -> None:
        def out(data: bytes) -> None:
            try:
                client.sendall(data)
            except OSError:
                pass

        unsub = self.console.subscribe(out)
        try:
            while True:
                data = client.recv(4096)
                if not data:
                    break
                self.console.write(data)
        except (OSError, BootError):
            pass
        finally:
            unsub()
            with self._lock:
                self._clients.discard(client)
            client.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop offering the console: the listener and every attached client are shut down
        and their threads end (a close() alone wakes no thread blocked in accept() or recv():
        each stopped node left one behind)."""
        with self._lock:
            self._closed = True
            socks = [self.server, *self._clients]
            threads = list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout)
        with contextlib.suppress(OSError):
            self.server.close()
        self.path.unlink(missing_ok=True)
