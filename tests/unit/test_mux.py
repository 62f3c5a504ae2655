"""A node's console socket (kh.service.mux): closing it ends every thread it started."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kh.service.mux import Mux


class FakeConsole:
    def __init__(self) -> None:
        self.subs: list[Callable[[bytes], None]] = []
        self.got = bytearray()

    def subscribe(self, fn: Callable[[bytes], None], **_: object) -> Callable[[], None]:
        self.subs.append(fn)
        return lambda: self.subs.remove(fn)

    def write(self, data: bytes) -> None:
        self.got += data


def mux_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mux-")]


def test_closing_a_mux_ends_its_threads_with_clients_attached(tmp_path: Path) -> None:
    # Seen: khd kept one more thread for every node it stopped (60 threads idle, 81 after 22
    # khget/release cycles): a listener's close() does not wake its blocked accept().
    before = mux_threads()
    con = FakeConsole()
    mux = Mux(con, tmp_path / "console.sock")  # type: ignore[arg-type]
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp_path / "console.sock"))
    client.sendall(b"hi\n")
    deadline = time.monotonic() + 10
    while con.got != b"hi\n":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        mux.close()
        assert mux_threads() == before
        assert con.subs == []
        assert not (tmp_path / "console.sock").exists()
    finally:
        client.close()
