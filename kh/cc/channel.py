"""Broadcast over an allocation's consoles.

What a principal writes goes to every node in the same order (one writer queue per node, fed
under one lock per allocation), and every node's output comes back merged, raw or tagged by
node. Writes to different nodes proceed in parallel, so a 64 KiB `mrw` load takes as long for
sixteen nodes as for one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from kh.errors import BootError
from kh.hw.console import Console

Sink = Callable[[bytes], None]


PIECE = 1024  # bytes handed to QEMU at a time
BACKLOG = 2048  # at most this much may wait inside QEMU's socket: the rest stays flushable


class NodeWriter:
    """Feeds one console from a queue, so a slow UART holds up nobody else.

    Only a little is ever pushed into QEMU's socket at once; the backlog stays here, where a
    reset can throw it away (what sits in the kernel's socket buffer cannot be taken back)."""

    def __init__(self, number: int, console: Console) -> None:
        self.number = number
        self.console = console
        self.q: queue.Queue[bytes | None] = queue.Queue()
        self.failed: str | None = None
        self._flushing = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"writer-{number}")
        self.thread.start()

    def _run(self) -> None:
        while True:
            data = self.q.get()
            try:
                if data is None:
                    return
                for off in range(0, len(data), PIECE):
                    while self.console.unsent() > BACKLOG and not self._flushing.is_set():
                        time.sleep(0.002)
                    if self._flushing.is_set():
                        break
                    self.console.write(data[off:off + PIECE])
            except BootError as e:
                self.failed = str(e)
            finally:
                self.q.task_done()

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued has reached the node (or ``timeout``)."""
        done = threading.Event()

        def wait() -> None:
            self.q.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        started = time.monotonic()
        if not done.wait(timeout):
            return False
        return self.console.wait_sent(max(0.0, timeout - (time.monotonic() - started)))

    def flush(self) -> None:
        """Drop everything not yet handed to QEMU (a reset must not replay old input)."""
        self._flushing.set()
        try:
            while True:
                self.q.get_nowait()
                self.q.task_done()
        except queue.Empty:
            pass
        self.drain(5)
        self._flushing.clear()

    def stop(self) -> None:
        self.q.put(None)


class Hub:
    """The channel of one allocation: shared by all its sessions."""

    def __init__(self, alloc: int, writers: dict[int, NodeWriter]) -> None:
        self.alloc = alloc
        self.lock = threading.Lock()
        self.writers = dict(sorted(writers.items()))

    def write(self, data: bytes, nodes: list[int] | None = None) -> None:
        with self.lock:
            for n, w in self.writers.items():
                if nodes is None or n in nodes:
                    w.q.put(data)



class Output:
    """One session's merged view of its nodes' output."""

    def __init__(self, consoles: dict[int, Console], sink: Sink, *, tagged: bool) -> None:
        self.sink = sink
        self.tagged = tagged
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.partial: dict[int, bytes] = {}
        self._unsubs = [c.subscribe(self._feed(n)) for n, c in consoles.items()]
        self._stop = threading.Event()
        if tagged:
            threading.Thread(target=self._flusher, daemon=True).start()

    def _feed(self, node: int) -> Sink:
        def feed(data: bytes) -> None:
            with self.lock:
                self.last = time.monotonic()
                if not self.tagged:
                    self.sink(data)
                    return
                buf = self.partial.get(node, b"") + data.replace(b"\r\n", b"\n")
                *lines, rest = buf.split(b"\n")
                self.partial[node] = rest
                if lines:
                    self.sink(b"".join(b"node%d: %s\r\n" % (node, ln) for ln in lines))
        return feed

    def _flusher(self) -> None:
        """Tagged mode: a partial line (a prompt) is shown once its node has been quiet."""
        while not self._stop.wait(0.2):
            with self.lock:
                if time.monotonic() - self.last < 0.2:
                    continue
                for node, rest in list(self.partial.items()):
                    if rest:
                        self.sink(b"node%d: %s\r\n" % (node, rest))
                        self.partial[node] = b""

    def quiet_for(self) -> float:
        return time.monotonic() - self.last

    def close(self) -> None:
        self._stop.set()
        for unsub in self._unsubs:
            unsub()
