"""One node's serial console: a unix socket QEMU listens on.

A reader thread drains the socket all the time, so nothing the node prints is lost while kh is
busy; everything read is appended to a log file (the node's history), its last ``history``
bytes are kept in memory (for ``expect``), and it is handed to whoever subscribed (an attached
terminal, a channel session). Nothing a subscriber does can hold the reader up: see
``Console.subscribe``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kh.errors import BootError, KhTimeout
from kh.hw import unixsock
from kh.hw.backlog import LIMIT as BACKLOG_LIMIT
from kh.hw.backlog import Backlog
from kh.hw.redact import redact

HISTORY = 1 << 20  # bytes of output kept in memory per console; the log file has the rest
# After a short read the reader waits this long before reading again, so that a node printing
# fast is read in pieces of a KiB or two: QEMU's 16550 sends every byte by itself and a reader
# that keeps up got 2.3 bytes a read, each taking khd's log, history, every session's backlog
# and an ssh packet per reading client (0.15 of a host core per node printing at U-Boot). What
# a read returns is handed on before the wait, so a lone keystroke's echo is never delayed.
READ_PAUSE = 0.005  # seconds
SHORT_READ = 4096  # bytes
SETTLE_QUIET, SETTLE_WAIT = 0.05, 5.0  # seconds: Console.settle's quiet time, and its bound


def utc_stamp(t: float) -> str:
    """``t`` (seconds since the epoch) as the logs write it: 2024-05-01T10:00:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class ConsoleLog:
    """A node's console log: one line per console line, each stamped with the time it ended
    (UTC), size-bounded: past ``max_bytes`` the file moves to ``.1`` (and ``.1`` to ``.2``)."""

    def __init__(self, path: Path, max_bytes: int = 4 << 20, keep: int = 2) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.partial = b""
        try:  # when the previous reader of this console last wrote, or stopped (see close)
            self.last_read: float | None = path.stat().st_mtime
        except FileNotFoundError:
            self.last_read = None
        self.f = open(path, "ab")

    def write(self, data: bytes) -> None:
        *lines, self.partial = (self.partial + data).split(b"\n")
        if not lines:
            if len(self.partial) > 4096:  # a line that never ends is still logged
                lines, self.partial = [self.partial], b""
            else:
                return
        stamp = utc_stamp(time.time()).encode() + b" "
        # boot keys that carry secrets are cut short (kh.hw.redact): `kh logs` replays this
        self.f.write(b"".join(stamp + redact(ln.rstrip(b"\r")) + b"\n" for ln in lines))
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

    def note(self, text: str) -> None:
        """A line of kh's own (``[kh: text]``), stamped like the node's; a partial line of the
        node's is ended first, so the note never splits one."""
        if self.partial:
            self.write(b"\n")
        self.write(f"[kh: {text}]\n".encode())

    def gap(self, why: str) -> None:
        """Say in the log that the console went unread from the previous reader's last write
        (or clean stop) until now, ``why`` (e.g. "khd was not running")."""
        now = utc_stamp(time.time())
        if self.last_read is None:
            self.note(f"console not read until {now} ({why}); output before then may be lost")
        else:
            self.note(f"console not read from {utc_stamp(self.last_read)} to {now} ({why}); "
                      "output in that time may be lost")

    def close(self, read: bool = True) -> None:
        """``read``: the console was read until now (not so for one that never connected)."""
        if self.partial:
            self.write(b"\n")
        self.f.close()
        # The file's time says until when the console was read: a later reader's gap note
        # starts there (after a crash it is the last line's time, all kh can know).
        if read:
            with contextlib.suppress(OSError):
                os.utime(self.path)


class ConsoleOverrun(BootError):
    """Output asked for by offset is older than what a console keeps in memory."""


class ConsoleMatch:
    """What ``Console.expect`` found: like ``re.Match``, but at the console's absolute offsets
    (those of ``Console.mark``), and with its groups copied, since the history it was found
    in moves on."""

    def __init__(self, m: re.Match[bytes], base: int) -> None:
        count = m.re.groups + 1
        self._spans = [(a + base, b + base) if a >= 0 else (-1, -1)
                       for a, b in (m.span(i) for i in range(count))]
        self._groups = [None if g is None else bytes(g) for g in m.groups()]
        self._groups.insert(0, bytes(m.group(0)))
        self._index: dict[str, int] = dict(m.re.groupindex)
        self.lastgroup = m.lastgroup
        self.lastindex = m.lastindex

    def _i(self, group: int | str) -> int:
        return self._index[group] if isinstance(group, str) else group

    def group(self, group: int | str = 0) -> bytes | Any:
        return self._groups[self._i(group)]

    def start(self, group: int | str = 0) -> int:
        return self._spans[self._i(group)][0]

    def end(self, group: int | str = 0) -> int:
        return self._spans[self._i(group)][1]

    def span(self, group: int | str = 0) -> tuple[int, int]:
        return self._spans[self._i(group)]


class Console:
    def __init__(self, path: Path, log: Path | None = None, *, name: str = "node",
                 closed_reason: Callable[[], str | None] | None = None,
                 history: int = HISTORY, gap: str | None = None) -> None:
        """``closed_reason`` says why the console closed (the node's QEMU exited, and what it
        said), for the error that reports it; None when it cannot tell. ``history``: bytes of
        output kept in memory (for ``expect``/``text``). ``gap``: why nobody may have read the
        console before this connect (e.g. "khd was not running"): the log then says so."""
        self.path = path
        self.name = name
        self.log_path = log
        self.closed_reason = closed_reason
        self.history = history
        self._gap = gap
        self._sock: socket.socket | None = None
        # Held while the socket is closed and while its descriptor is asked about, so a
        # question never reaches a closed (or by then reused) descriptor.
        self._fd_lock = threading.Lock()
        self._sock_closed = False
        self._buf = bytearray()  # the last ``history`` bytes read
        self._start = 0  # offset (counted from the first byte ever read) of _buf[0]
        self._pos = 0  # expect() consumed everything before this offset
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._log = ConsoleLog(log) if log else None
        self._subscribers: list[Callable[[bytes], None]] = []
        self._in_recv = False  # the reader waits in recv: all it read before is handed on
        self._last_read = 0.0  # time.monotonic() of the reader's last data

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
        self.adopt(s)

    def adopt(self, stream: Any) -> None:
        """Read and write through ``stream``, already connected: a socket, or anything with
        its ``recv``, ``sendall``, ``shutdown``, ``close`` and ``fileno`` (a control-channel
        session: kh.scenario reaches a node's console the way a principal does)."""
        self._sock = stream
        if self._log and self._gap:
            self._log.gap(self._gap)
        self._thread = threading.Thread(target=self._reader, name=f"console-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        assert self._sock is not None
        while True:
            with self._cond:
                self._in_recv = True
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                self._in_recv = False
                self._last_read = time.monotonic()
            if not data:
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            if self._log:
                self._log.write(data)
            with self._cond:
                self._buf += data
                excess = len(self._buf) - self.history
                if excess > 0:  # a bytearray drops its front without copying the rest
                    del self._buf[:excess]
                    self._start += excess
                self._cond.notify_all()
            for sub in list(self._subscribers):
                sub(data)
            if len(data) < SHORT_READ:
                time.sleep(READ_PAUSE)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            with self._fd_lock:
                self._sock_closed = True
                self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._log:
            self._log.close(read=self._thread is not None)
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
        """Bytes written to the node that QEMU has not taken yet (the UART is slow). 0 for a
        console that is not connected or was closed: nothing more can be sent there."""
        with self._fd_lock:
            if self._sock is None or self._sock_closed:
                return 0
            try:
                buf = fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            except (OSError, ValueError):  # ValueError: a descriptor closed under us (-1)
                return 0
        return int(struct.unpack("i", buf)[0])

    def settle(self, quiet: float = SETTLE_QUIET, timeout: float = SETTLE_WAIT) -> bool:
        """For a paused node (printing nothing more): wait until all it printed is read and
        handed on (nothing unread in the socket, the reader waiting in recv) and nothing came
        for ``quiet`` s (bytes on their way through another hop: libvirt's stream), at most
        ``timeout`` s. True when settled (at once for a closed console): a mark taken then
        counts only what the node prints once it runs again (kh.hw.backend.reset_to_prompt)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond, self._fd_lock:
                if self._closed or self._sock is None or self._sock_closed:
                    return True
                idle = self._in_recv and time.monotonic() - self._last_read >= quiet
                try:
                    unread = struct.unpack("i", fcntl.ioctl(
                        self._sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
                except (OSError, ValueError, AttributeError):
                    unread = 0  # not a socket kh can ask: the quiet time alone
            if (idle and not unread) or time.monotonic() >= deadline:
                return idle and not unread
            time.sleep(min(quiet, 0.01))

    def wait_sent(self, timeout: float) -> bool:
        """Wait until QEMU has taken everything written (or ``timeout`` seconds); True when it
        has, and at once for a closed console (what it held is gone with it)."""
        deadline = time.monotonic() + timeout
        while self.unsent() and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.unsent()

    def subscribe(self, fn: Callable[[bytes], None], *, direct: bool = False,
                  backlog: int | None = None) -> Callable[[], None]:
        """Hand everything read from now on to ``fn``; returns the function that stops it.

        By default ``fn`` runs on a thread of its own behind a bounded backlog (``backlog``
        bytes, default kh.hw.backlog.LIMIT): it may block as long as it likes (a client that
        does not read), and when its backlog is full it loses output, with a note where the
        bytes are missing; the log and other subscribers never wait for it. ``direct=True``
        calls ``fn`` on the reader thread itself: only for a ``fn`` that never blocks (one
        that queues into a backlog of its own, as a channel session does). Stopping a
        backlogged ``fn`` gives it up to 1 s to take what waits."""
        if direct:
            self._subscribers.append(fn)
            return lambda: self._unsubscribe(fn)
        b = Backlog(fn, limit=backlog or BACKLOG_LIMIT, name=f"subscriber-{self.name}")

        def put(data: bytes) -> None:
            b.put(data, self.name)

        self._subscribers.append(put)

        def stop() -> None:
            self._unsubscribe(put)
            b.close(1.0)

        return stop

    def _unsubscribe(self, fn: Callable[[bytes], None]) -> None:
        with contextlib.suppress(ValueError):  # stopping twice is no error
            self._subscribers.remove(fn)

    @property
    def closed(self) -> bool:
        return self._closed

    def mark(self) -> int:
        """Offset of everything read so far; ``expect(start=mark)`` ignores older output.
        Offsets count every byte ever read, whether still in memory or not."""
        with self._cond:
            return self._start + len(self._buf)

    def oldest(self) -> int:
        """Offset of the oldest byte still held in memory: ``text`` and ``expect`` see
        nothing before it (the log file has it)."""
        with self._cond:
            return self._floor()

    def _floor(self) -> int:
        # Once the history moved on, its first byte is kept only as context, so that a
        # pattern's ``^`` or ``(?:^|\n)`` does not match mid-line at the cut.
        return self._start + 1 if self._start else 0

    def text(self, start: int | None = None) -> bytes:
        """The output from offset ``start`` on (default: all that is held). Raises
        ConsoleOverrun when ``start`` is older than ``oldest()``: a caller that fell that far
        behind must not take what is left for all of it."""
        with self._cond:
            floor = self._floor()
            if start is not None and start < floor:
                raise ConsoleOverrun(
                    f"{self.name}: console output from byte {start} on is no longer held in "
                    f"memory (only the last {self.history} bytes are)", self.log_hint())
            return bytes(self._buf[(floor if start is None else start) - self._start:])

    def wait_past(self, offset: int, timeout: float | None) -> bool:
        """Wait until more than ``offset`` bytes have been read, the console closed or
        ``timeout`` seconds (None: no limit) passed; True if there is more to read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._start + len(self._buf) <= offset and not self._closed:
                if deadline is None:
                    self._cond.wait()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._start + len(self._buf) > offset

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
               start: int | None = None) -> ConsoleMatch:
        """Wait until ``pattern`` appears after offset ``start`` (default: the last match's
        end; output older than ``oldest()`` is no longer searched).

        ``timeout`` in seconds; None waits as long as the console is open. Raises KhTimeout, or
        BootError when the console closes first.
        """
        rx = re.compile(pattern) if isinstance(pattern, bytes) else pattern
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            pos = self._pos if start is None else start
            while True:
                m = rx.search(self._buf, max(pos, self._floor()) - self._start)
                if m:
                    found = ConsoleMatch(m, self._start)
                    self._pos = found.end()
                    return found
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

