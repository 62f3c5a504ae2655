"""A bounded queue of console output for one client that may stop reading.

A node's console reader must never wait for a client: it also feeds the node's log and every
other client. So each client gets a backlog of its own: the reader only appends to it (never
blocking), and a sender thread of the backlog's own hands the bytes on to the client, which may
take as long as it likes. When a client stops reading and its backlog is full, *that client*
loses output: the bytes are counted per source (a node), and once there is room again a note
saying how many were dropped goes into its stream exactly where they are missing.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger("kh.backlog")

LIMIT = 1 << 20  # bytes a client may fall behind before it loses output
# Small pieces are joined into chunks of up to this many bytes. A console's reader gets a 16550's
# output a few bytes at a time (2.3 bytes a recv on average from a node printing under TCG), and
# a queued bytes object costs about 48 bytes besides its data: a full 1 MiB backlog of such
# pieces held 35 MiB.
CHUNK = 16 * 1024


def raw_note(source: str, count: int) -> bytes:
    """The note for a raw byte stream: on a line of its own, whatever the line it cut."""
    return b"\r\n[kh: %d bytes of %s's output dropped: this session did not read]\r\n" % (
        count, source.encode())


class Backlog:
    """Bytes waiting for one client, at most ``limit`` of them (plus the short drop notes).

    ``send(data)`` is called on the backlog's own thread, one chunk at a time, in order; it may
    block for as long as the client does not read. An OSError from it means the client is
    gone: the rest is discarded and later ``put``s are ignored. ``note(source, count)`` makes
    the bytes that mark ``count`` dropped bytes of ``source``'s output.
    """

    def __init__(self, send: Callable[[bytes], None], *, limit: int = LIMIT,
                 name: str = "backlog", note: Callable[[str, int], bytes] = raw_note) -> None:
        self.limit = limit
        self._send = send
        self._note = note
        self._cond = threading.Condition()
        self._q: deque[bytearray] = deque()  # chunks of at most CHUNK bytes, or one put's
        self._queued = 0  # bytes in _q
        self._sending = False  # the sender holds a chunk it took from _q
        self._dropped: dict[str, int] = {}  # not yet noted in the stream
        self.dropped_total: dict[str, int] = {}  # everything ever dropped, by source
        self._closing = False
        self._gone = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def put(self, data: bytes, source: str, size: int | None = None) -> None:
        """Queue ``data`` (part of ``source``'s output) for the client; never blocks. When it
        does not fit, it is dropped and counted as ``size`` bytes (default ``len(data)``: a
        caller that reformats output counts what the node printed)."""
        if not data:
            return
        with self._cond:
            if self._closing or self._gone:
                return
            if self._queued and self._queued + len(data) > self.limit:  # one chunk always fits
                count = len(data) if size is None else size
                self._dropped[source] = self._dropped.get(source, 0) + count
                self.dropped_total[source] = self.dropped_total.get(source, 0) + count
                return
            # Room again after a loss: say so first, where the bytes are missing. The notes
            # are short and few (one per source per loss), so they may pass the limit.
            self._queue_notes()
            self._append(data)
            self._cond.notify_all()

    def _append(self, data: bytes) -> None:
        """Under the lock: ``data`` at the end of the queue, joined to the last chunk while
        that stays within CHUNK bytes (the sender has taken the chunks it holds off the
        queue, so none of them changes under it)."""
        if self._q and len(self._q[-1]) + len(data) <= CHUNK:
            self._q[-1] += data
        else:
            self._q.append(bytearray(data))
        self._queued += len(data)

    def _queue_notes(self) -> None:
        for src, count in self._dropped.items():
            self._append(self._note(src, count))
        self._dropped.clear()

    @property
    def queued(self) -> int:
        """Bytes waiting for the client now."""
        with self._cond:
            return self._queued

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._q and not self._closing:
                    if self._dropped:  # the client read all it had: now tell it of the loss
                        self._queue_notes()
                        break
                    self._cond.wait()
                if not self._q:
                    return
                chunk = self._q.popleft()
                self._sending = True
            try:
                self._send(bytes(chunk))
            except OSError as e:
                log.info("%s: client gone (%s): dropping its backlog", self._thread.name, e)
                with self._cond:
                    self._gone = True
                    self._q.clear()
                    self._queued = 0
            finally:
                with self._cond:
                    self._queued = max(0, self._queued - len(chunk))
                    self._sending = False
                    self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Accept nothing more; let the sender hand on what waits for up to ``timeout``
        seconds (a pending loss gets its note), then discard the rest. True when everything
        reached ``send``. A sender stuck in ``send`` ends when ``send`` returns or raises."""
        with self._cond:
            if not self._closing:
                self._queue_notes()
                self._closing = True
                self._cond.notify_all()
            done = self._cond.wait_for(lambda: not self._q and not self._sending, timeout)
            if not done:
                self._q.clear()
                self._queued = 0
            return done
