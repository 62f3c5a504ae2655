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
        threading.Thread(target=self._accept, daemon=True, name=f"mux-{path.name}").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

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
            client.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.server.close()
        self.path.unlink(missing_ok=True)
