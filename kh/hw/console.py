"""One node's serial console: a unix socket QEMU listens on.

A reader thread drains the socket all the time, so nothing the node prints is lost while kh is
busy; everything read is kept in a buffer (for ``expect``), appended to a log file, and handed
to whoever subscribed (an attached terminal).
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kh.errors import BootError, KhTimeout
from kh.hw import unixsock


class ConsoleLog:
    """A node's console log: one line per console line, each stamped with the time it ended
    (UTC), size-bounded: past ``max_bytes`` the file moves to ``.1`` (and ``.1`` to ``.2``)."""

    def __init__(self, path: Path, max_bytes: int = 4 << 20, keep: int = 2) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.partial = b""
        self.f = open(path, "ab")

    def write(self, data: bytes) -> None:
        *lines, self.partial = (self.partial + data).split(b"\n")
        if not lines:
            if len(self.partial) > 4096:  # a line that never ends is still logged
                lines, self.partial = [self.partial], b""
            else:
                return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()).encode()
        frac = b".%03dZ " % (int(time.time() * 1000) % 1000)
        self.f.write(b"".join(stamp + frac + ln.rstrip(b"\r") + b"\n" for ln in lines))
        self.f.flush()
        if self.f.tell() > self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self.f.close()
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self.f = open(self.path, "ab")

    def close(self) -> None:
        if self.partial:
            self.write(b"\n")
        self.f.close()


class Console:
    def __init__(self, path: Path, log: Path | None = None, *, name: str = "node",
                 closed_reason: Callable[[], str | None] | None = None) -> None:
        """``closed_reason`` says why the console closed (the node's QEMU exited, and what it
        said), for the error that reports it; None when it cannot tell."""
        self.path = path
        self.name = name
        self.log_path = log
        self.closed_reason = closed_reason
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._pos = 0  # expect() consumed everything before this offset
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._log = ConsoleLog(log) if log else None
        self._subscribers: list[Callable[[bytes], None]] = []

    # -- connection ---------------------------------------------------------------
    def connect(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Connect to QEMU's socket, retrying while it is being created."""
        try:
            s = unixsock.connect(self.path, timeout, alive)
        except unixsock.NotUp as e:
            if e.reason == "exited":
                raise BootError(f"{self.name}: QEMU exited before its console was up",
                                "see the console log / run with --debug") from None
            raise KhTimeout(f"{self.name}: console socket {self.path} did not appear "
                            f"in {timeout:.0f} s") from None
        self._sock = s
        self._thread = threading.Thread(target=self._reader, name=f"console-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            if self._log:
                self._log.write(data)
            with self._cond:
                self._buf += data
                self._cond.notify_all()
            for sub in list(self._subscribers):
                sub(data)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- I/O ----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._sock is None:
            raise BootError(f"{self.name}: console not connected")
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise BootError(f"{self.name}: console closed while writing ({e.strerror})") from None

    def unsent(self) -> int:
        """Bytes written to the node that QEMU has not taken yet (the UART is slow)."""
        if self._sock is None:
            return 0
        try:
            buf = fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return 0
        return int(struct.unpack("i", buf)[0])

    def wait_sent(self, timeout: float) -> bool:
        """Wait until QEMU has taken everything written (or ``timeout``); True when it has."""
        deadline = time.monotonic() + timeout
        while self.unsent() and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.unsent()

    def subscribe(self, fn: Callable[[bytes], None]) -> Callable[[], None]:
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    @property
    def closed(self) -> bool:
        return self._closed

    def mark(self) -> int:
        """Offset of everything read so far; ``expect(start=mark)`` ignores older output."""
        with self._cond:
            return len(self._buf)

    def text(self, start: int = 0) -> bytes:
        with self._cond:
            return bytes(self._buf[start:])

    def wait_past(self, offset: int, timeout: float | None) -> bool:
        """Wait until more than ``offset`` bytes have been read, the console closed or
        ``timeout`` seconds (None: no limit) passed; True if there is more to read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._buf) <= offset and not self._closed:
                if deadline is None:
                    self._cond.wait()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return len(self._buf) > offset

    def log_hint(self) -> str:
        return f"console log: {self.log_path}" if self.log_path else "run with --debug"

    def closed_error(self, what: str) -> BootError:
        """The error for a console that closed ``what`` (e.g. "while waiting for X"): with
        QEMU's own reason when it exited."""
        why = self.closed_reason() if self.closed_reason else None
        return BootError(f"{self.name}: console closed {what}" + (f": {why}" if why else ""),
                         self.log_hint())

    def tail(self, lines: int = 15) -> str:
        text = self.text().decode("utf-8", "replace").replace("\r", "")
        return "\n".join(text.splitlines()[-lines:])

    def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float | None, *, stage: str,
               start: int | None = None) -> re.Match[bytes]:
        """Wait until ``pattern`` appears after ``start`` (default: the last match).

        ``timeout`` in seconds; None waits as long as the console is open. Raises KhTimeout, or
        BootError when the console closes first.
        """
        rx = re.compile(pattern) if isinstance(pattern, bytes) else pattern
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            pos = self._pos if start is None else start
            while True:
                m = rx.search(self._buf, pos)
                if m:
                    self._pos = m.end()
                    return m
                if self._closed:
                    break
                if deadline is None:
                    self._cond.wait()  # a signal handler's exception still gets through
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KhTimeout(f"{self.name}: no {stage} within {timeout:g} s",
                                    self.log_hint())
                self._cond.wait(left)
        raise self.closed_error(f"while waiting for {stage}")

