"""The CLI's connection to khd: a full unix-socket backlog is waited out, then named."""

from __future__ import annotations

import re
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from kh import client
from kh.errors import KhError


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
        _read_request(conn)
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


def _read_request(conn: socket.socket) -> None:
    """Read one whole request: closing with some of it unread would send a reset, and the
    client could lose the answer to it (a 429 test failed 1 run in many so)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while m and len(body) < int(m[1]):
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


def _serve_once(path: Path, answer: Callable[[socket.socket], None]) -> threading.Thread:
    """A fake khd on ``path`` that reads one request and does ``answer`` with the connection."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        try:
            conn, _ = srv.accept()
            with conn:
                _read_request(conn)
                answer(conn)
        finally:
            srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("answer", [
    lambda c: None,                                                     # closes, no answer
    lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart"),  # cut short
    lambda c: c.sendall(b"garbage\r\n\r\n"),                            # no status line
    lambda c: c.sendall(b"HTTP/1.1 2"),                                 # half a status line
    _reset,
], ids=["closed", "incomplete", "bad-status", "half-status", "reset"])
def test_a_khd_that_closes_without_answering_is_one_kh_error(tmp_path: Path, answer) -> None:
    """Issue 10: a khget whose khd was SIGKILLed mid-request exited 70 with
    `internal error: RemoteDisconnected: Remote end closed connection without response`."""
    path = tmp_path / "khd.sock"
    t = _serve_once(path, answer)
    with pytest.raises(client.Disconnected) as e:
        client.Client(path, timeout=20).call("POST", "/v1/allocations", {"user": "alice"})
    t.join(20)
    assert str(e.value) == ("khd closed the connection without answering (it may have "
                            "stopped: `kh service status`)")


def test_a_429_names_the_reason_and_when_to_try_again(tmp_path: Path) -> None:
    path = tmp_path / "khd.sock"
    body = b'{"error": "too many refused credentials for alice", "hint": "try again in 7 s"}'
    t = _serve_once(path, lambda c: c.sendall(
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 42\r\nContent-Type: application/json"
        b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body))
    with pytest.raises(KhError) as e:
        client.Client(path, timeout=20).call("POST", "/v1/keys/list", {"user": "alice"},
                                             as_json=True)
    t.join(20)
    assert e.value.message == "too many refused credentials for alice"
    assert e.value.hint == "try again in 42 s"
