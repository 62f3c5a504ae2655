"""Broadcast over an allocation's consoles.

What a principal writes goes to every node in the same order (one writer queue per node, fed
under one lock per allocation), and every node's output comes back merged, raw or tagged by
node. Writes to different nodes proceed in parallel, so a 64 KiB `mrw` load takes as long for
sixteen nodes as for one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from kh.errors import BootError
from kh.hw.backlog import Backlog, raw_note
from kh.hw.console import Console

Sink = Callable[[bytes], None]


PIECE = 1024  # bytes handed to QEMU at a time
BACKLOG = 2048  # at most this much may wait inside QEMU's socket: the rest stays flushable
QUEUE_LIMIT = 256 * 1024  # bytes of input that may wait for one node before writers wait
SESSION_BACKLOG = 1 << 20  # bytes of output a session may fall behind before it loses some
QUIET = 0.2  # tagged: a node's partial line is shown once the node has been quiet this long
LONG_LINE = 64 * 1024  # tagged: a line that never ends is shown in pieces of this size


class NodeWriter:
    """Feeds one console from a queue of at most ``limit`` bytes, so a slow UART holds up
    nobody else until that much waits for it; then writers wait (``put`` blocks), which is
    backpressure to the client, not memory in khd.

    Only a little is ever pushed into QEMU's socket at once; the backlog stays here, where a
    reset can throw it away (what sits in the kernel's socket buffer cannot be taken back)."""

    def __init__(self, number: int, console: Console, limit: int = QUEUE_LIMIT) -> None:
        self.number = number
        self.console = console
        self.limit = limit
        self.failed: str | None = None
        self._cond = threading.Condition()
        self._q: deque[bytes] = deque()  # pieces of at most PIECE bytes
        self._queued = 0  # bytes in _q
        self._busy = False  # the thread holds a piece it took from _q
        self._generation = 0  # counts flushes: a writer waiting across one drops its data
        self._stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"writer-{number}")
        self.thread.start()

    @property
    def queued(self) -> int:
        """Bytes waiting for the node (at most ``limit``)."""
        with self._cond:
            return self._queued

    def put(self, data: bytes) -> bool:
        """Queue ``data`` for the node, waiting while ``limit`` bytes wait already. Returns
        False when a flush (a reset) or stop came first: the part not yet queued was written
        before the reset and is dropped with the rest."""
        with self._cond:
            generation = self._generation
        for off in range(0, len(data), PIECE):
            piece = data[off:off + PIECE]
            with self._cond:
                while self._queued + len(piece) > self.limit and self._queued and \
                        self._generation == generation and not self._stopped:
                    self._cond.wait()
                if self._generation != generation or self._stopped:
                    return False
                if self._q and len(self._q[-1]) + len(piece) <= PIECE:
                    self._q[-1] += piece  # keystrokes: one object per piece, not per byte
                else:
                    self._q.append(piece)
                self._queued += len(piece)
                self._cond.notify_all()
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._q and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                piece = self._q.popleft()
                self._queued -= len(piece)
                self._busy = True
                generation = self._generation
                self._cond.notify_all()
            try:
                while self.console.unsent() > BACKLOG and self._current(generation):
                    time.sleep(0.002)
                if self._current(generation):
                    self.console.write(piece)
            except BootError as e:
                self.failed = str(e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _current(self, generation: int) -> bool:
        with self._cond:
            return self._generation == generation and not self._stopped

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued has reached the node (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self._cond.wait_for(lambda: not self._q and not self._busy, timeout):
                return False
        return self.console.wait_sent(max(0.0, deadline - time.monotonic()))

    def flush(self) -> None:
        """Drop everything not yet handed to QEMU (a reset must not replay old input), also
        what writers waiting for room still hold."""
        with self._cond:
            self._generation += 1
            self._q.clear()
            self._queued = 0
            self._cond.notify_all()
        self.drain(5)

    def stop(self) -> None:
        """End the thread; what waits is dropped (the node is going away)."""
        with self._cond:
            self._stopped = True
            self._q.clear()
            self._queued = 0
            self._cond.notify_all()


class Hub:
    """The channel of one allocation: shared by all its sessions."""

    def __init__(self, alloc: int, writers: dict[int, NodeWriter]) -> None:
        self.alloc = alloc
        self.lock = threading.Lock()
        self.writers = dict(sorted(writers.items()))

    def write(self, data: bytes, nodes: list[int] | None = None) -> None:
        """``data`` to every node (or those in ``nodes``), in the same order for all: under
        one lock, so this waits while any of them has a full queue (the writing session
        then stops reading its client)."""
        with self.lock:
            for n, w in self.writers.items():
                if nodes is None or n in nodes:
                    w.put(data)


class Output:
    """One session's merged view of its nodes' output.

    The consoles' readers only queue into the session's backlog (``backlog`` bytes), never
    waiting; the backlog's own thread hands it to ``sink``, which may block while the client
    does not read. A client that falls ``backlog`` bytes behind loses its own output, with a
    note in its stream saying how many bytes of which node's output it lost (see
    kh.hw.backlog). Tagged: each line prefixed ``node<N>: ``; a node's partial line (a prompt)
    is shown once that node has been quiet for ``quiet`` seconds, and at ``close``.
    """

    def __init__(self, consoles: dict[int, Console], sink: Sink, *, tagged: bool,
                 backlog: int = SESSION_BACKLOG, quiet: float = QUIET) -> None:
        self.tagged = tagged
        self.quiet = quiet
        self.last = time.monotonic()  # any node's last output
        self.heard: dict[int, float] = {}  # each node's last output
        self.lock = threading.Lock()
        self.partial: dict[int, bytes] = {}
        self.backlog = Backlog(sink, limit=backlog, name="session-output",
                               note=_tagged_note if tagged else raw_note)
        self._stop = threading.Event()
        self._flusher_thread: threading.Thread | None = None
        if tagged:
            self._flusher_thread = threading.Thread(target=self._flusher, daemon=True,
                                                    name="session-tagged")
            self._flusher_thread.start()
        self._unsubs = [c.subscribe(self._feed(n), direct=True) for n, c in consoles.items()]

    def _feed(self, node: int) -> Sink:
        source = f"node {node}"

        def feed(data: bytes) -> None:  # on the console's reader thread: must not block
            with self.lock:
                self.last = self.heard[node] = time.monotonic()
                if not self.tagged:
                    self.backlog.put(data, source)
                    return
                buf = self.partial.get(node, b"") + data.replace(b"\r\n", b"\n")
                *lines, rest = buf.split(b"\n")
                while len(rest) > LONG_LINE:  # a line that never ends: shown in pieces
                    lines.append(rest[:LONG_LINE])
                    rest = rest[LONG_LINE:]
                self.partial[node] = rest
                if lines:
                    self.backlog.put(b"".join(b"node%d: %s\r\n" % (node, ln) for ln in lines),
                                     source, size=sum(len(ln) + 1 for ln in lines))
        return feed

    def _flush_partial(self, node: int) -> None:
        rest = self.partial.pop(node, b"")
        if rest:
            self.backlog.put(b"node%d: %s\r\n" % (node, rest), f"node {node}", size=len(rest))

    def _flusher(self) -> None:
        """Tagged: a node's partial line is shown once *that* node has been quiet."""
        while not self._stop.wait(self.quiet / 4):
            with self.lock:
                now = time.monotonic()
                for node in [n for n, rest in self.partial.items()
                             if rest and now - self.heard.get(n, 0.0) >= self.quiet]:
                    self._flush_partial(node)

    def quiet_for(self) -> float:
        """Seconds since any node last printed."""
        return time.monotonic() - self.last

    def close(self, timeout: float = 5.0) -> bool:
        """Stop listening; every partial line is shown, then what waits in the backlog is
        handed to the sink for up to ``timeout`` seconds. True when all of it was. Closing
        again only waits for the backlog again."""
        if self._stop.is_set():
            return self.backlog.close(timeout)
        for unsub in self._unsubs:
            unsub()
        self._stop.set()
        if self._flusher_thread is not None:
            self._flusher_thread.join()
        with self.lock:
            for node in list(self.partial):
                self._flush_partial(node)
        return self.backlog.close(timeout)


def _tagged_note(source: str, count: int) -> bytes:
    return b"[kh: %d bytes of %s's output dropped: this session did not read]\r\n" % (
        count, source.encode())
