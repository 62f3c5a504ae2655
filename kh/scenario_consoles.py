"""A scenario's nodes' consoles over the control channel (kh.scenario): one ``tagged`` session
on con<ID> per allocation, split into each node's read-only Console (Watch: its log, its ready
line), and the command consoles con<ID>.<N> (Shells: at most MAX_SHELLS open at once, the least
recently used closed, and opened again when used). khd lets a principal hold 16 ssh
connections: a scenario's watches and shells share them.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from kh.cc.client import ChannelClient
from kh.hw.console import Console

if TYPE_CHECKING:
    from kh.scenario import Allocation

MAX_SHELLS = 6  # command consoles (con<ID>.<N>) open at once
TAGGED = re.compile(rb"^node(\d+): (.*?)\r?$")


class _Feed:
    """A read-only stream for Console.adopt: what the tagged session says of one node."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._cond = threading.Condition()

    def put(self, data: bytes) -> None:
        with self._cond:
            self._chunks.append(data)
            self._cond.notify()

    def recv(self, size: int) -> bytes:
        """Everything said so far, at once; b"" once the session ended."""
        with self._cond:
            while not self._chunks:
                self._cond.wait()
            if not self._chunks[0]:
                return b""
            end = self._chunks.index(b"") if b"" in self._chunks else len(self._chunks)
            data = b"".join(self._chunks[:end])
            del self._chunks[:end]
            return data

    def sendall(self, data: bytes) -> None:
        raise OSError(30, "this view of the console is read-only (write with khdo)")

    def shutdown(self, how: int) -> None:
        self.put(b"")

    def close(self) -> None:
        self.put(b"")

    def fileno(self) -> int:
        return -1


class Watch:
    """One ``tagged`` session on con<ID> (as the principal whose ``secret`` it is, on the
    channel's ``port``): each node's console as a read-only Console in ``consoles``, logged to
    ``logs``/node<N>.console.log. ChannelError if the session does not open."""

    def __init__(self, alloc: Allocation, port: int, secret: str, logs: Path) -> None:
        self.client = ChannelClient(f"con{alloc.id}", alloc.info.server, port, password=secret)
        try:
            self.chan = self.client.open("tagged")
        except BaseException:
            self.client.close()
            raise
        self.feeds = {n: _Feed() for n in alloc.nodes}
        self.consoles: dict[int, Console] = {}
        for n, feed in self.feeds.items():
            con = Console(Path(f"con{alloc.id}"), logs / f"node{n}.console.log", name=f"node{n}")
            con.adopt(feed)
            self.consoles[n] = con
        self.thread = threading.Thread(target=self._demux, daemon=True, name=f"watch-{alloc.id}")
        self.thread.start()

    def _demux(self) -> None:
        rest = b""
        while True:
            try:
                data = self.chan.recv(65536)
            except (OSError, EOFError):
                data = b""
            if not data:
                break
            *lines, rest = (rest + data).split(b"\n")
            for line in lines:
                m = TAGGED.match(line)
                if m and int(m[1]) in self.feeds:
                    self.feeds[int(m[1])].put(m[2] + b"\r\n")
        for feed in self.feeds.values():
            feed.put(b"")

    def close(self) -> None:
        self.chan.close()
        self.client.close()
        self.thread.join(5)
        for con in self.consoles.values():
            con.close()


class Shells:
    """The command consoles con<ID>.<N> open at once, by (allocation id, node); each logged to
    ``logs``/node<N>.shell.log."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self._open: OrderedDict[tuple[int, int], tuple[ChannelClient, Console]] = OrderedDict()

    def get(self, alloc: Allocation, node: int, port: int, secret: str) -> Console:
        """The node's command console, opened (a ``raw`` session on the channel's ``port``,
        as the principal whose ``secret`` it is) unless it is; ChannelError if it cannot be."""
        key = (alloc.id, node)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key][1]
        while len(self._open) >= MAX_SHELLS:
            self._close(next(iter(self._open)))
        client = ChannelClient(f"con{alloc.id}.{node}", alloc.info.server, port,
                               password=secret)
        try:
            con = Console(Path(f"con{alloc.id}.{node}"), self.logs / f"node{node}.shell.log",
                          name=f"node{node}")
            con.adopt(client.open("raw"))
        except BaseException:
            client.close()
            raise
        self._open[key] = (client, con)
        return con

    def close(self, aid: int) -> None:
        """Close allocation ``aid``'s command consoles."""
        for key in [k for k in self._open if k[0] == aid]:
            self._close(key)

    def _close(self, key: tuple[int, int]) -> None:
        client, con = self._open.pop(key)
        con.close()
        client.close()
