"""Connecting to a unix socket QEMU serves (console, QMP): it may not be there yet.

QEMU creates such a socket during start-up and binds it a moment before it listens, so a
connect can find no file or be refused for a short while; both mean "try again".
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path


class NotUp(Exception):
    """The socket did not accept a connection in time, or its owner exited first."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def connect(path: Path, timeout: float, alive: Callable[[], bool] = lambda: True
            ) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            if not alive():
                raise NotUp("exited") from None
            if time.monotonic() > deadline:
                raise NotUp(e.strerror or "no answer") from None
            time.sleep(0.005)
