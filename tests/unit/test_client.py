"""The CLI's connection to khd: a full unix-socket backlog is waited out, then named."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from kh import client


def _full_listener(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A listener nobody accepts on, with its backlog filled by parked connections."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(0)
    parked = []
    while True:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(str(path))
        except BlockingIOError:
            c.close()
            return srv, parked
        parked.append(c)


def test_full_backlog_is_named_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "khd.sock"
    srv, parked = _full_listener(path)
    monkeypatch.setattr(client, "BUSY_WAIT", 0.2)
    try:
        with pytest.raises(client.Busy, match="too busy"):
            client.Client(path, timeout=5).call("GET", "/v1/ps")
    finally:
        for c in parked:
            c.close()
        srv.close()


def test_full_backlog_is_retried_until_accepted(tmp_path: Path) -> None:
    path = tmp_path / "khd.sock"
    srv, parked = _full_listener(path)

    def drain_then_answer() -> None:
        # Free the backlog after the client has been refused at least once, then serve it.
        threading.Event().wait(0.3)
        conns = [srv.accept()[0] for _ in parked]
        for c in parked:
            c.close()
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.close()
        for c in conns:
            c.close()

    t = threading.Thread(target=drain_then_answer)
    t.start()
    try:
        assert client.Client(path, timeout=5).call("GET", "/v1/ps") == "ok"
    finally:
        t.join()
        srv.close()
