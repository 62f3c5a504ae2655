"""`kh publish` (issue 12, item 1): a node's port on the host's 127.0.0.1, for the node's owner
only, listed by `kh ps`, gone with the node (release, reset, a principal's removal), restored
by a restarted khd. A real Service and API (tests/unit/fake_khd) and a real Forwarder in this
namespace; the node's external address is stood in by 127.0.0.1, where an echo server plays
the node's service."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kh.service import publish
from kh.service.core import Service
from kh.service.forward import Forwarder
from tests.unit.fake_khd import api_fixture, get, make_service, post, serving, text_of


class Echo:
    """A TCP server on 127.0.0.1 answering each connection with what it sent, upper-cased."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    @staticmethod
    def _one(c: socket.socket) -> None:
        with c:
            while data := c.recv(4096):
                c.sendall(data.upper())

    def close(self) -> None:
        self.sock.close()


def with_forwarder(svc: Service) -> Service:
    svc.forwards = Forwarder(None)  # this namespace: the tests need no root
    svc.forwards.start()
    return svc


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.close()


@pytest.fixture
def svc(tmp_path, monkeypatch, echo):
    monkeypatch.setattr(publish.Published, "address", property(lambda self: "127.0.0.1"))
    s = with_forwarder(make_service(tmp_path, monkeypatch, nodes=6))
    yield s
    s.forwards.stop()
    s.store.close()


khd = api_fixture()


def call(sock, path: str, user: str, **kw: Any) -> tuple[int, Any]:
    status, resp = post(sock, path + "?format=json", json.dumps(
        {"user": user, "credential": user + "-cred", **kw}).encode())
    return status, json.loads(text_of(resp))


def take(sock, user: str, count: int = 1, **kw: Any) -> tuple[int, list[int]]:
    status, a = call(sock, "/v1/allocations", user, count=count, **kw)
    assert status == 201, a
    return a["id"], [n["node"] for n in a["nodes"]]


def pub(sock, user: str, node: int, port: int, **kw: Any) -> tuple[int, Any]:
    return call(sock, f"/v1/nodes/{node}/publish", user, port=port, **kw)


def fetch(port: int, data: bytes = b"hello") -> bytes:
    """Send ``data`` to 127.0.0.1:``port`` and read the answer to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    return out


def cut(port: int) -> bool:
    """A connection to 127.0.0.1:``port`` is accepted and closed at once, nothing sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(10) == b""


def closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_publish_forwards_the_host_port_to_the_node_and_ps_lists_it(khd, echo):
    _, (n,) = take(khd, "alice", x=True)
    status, p = pub(khd, "alice", n, echo.port)
    assert status == 201, p
    assert p["host"] == "127.0.0.1" and p["node"] == n and p["port"] == echo.port
    assert p["host_port"] >= 1024 and p["principal"] == "alice"
    assert fetch(p["host_port"]) == b"HELLO"
    # the operator's kh ps and alice's own list it; bob's does not
    status, resp = get(khd, "/v1/ps?format=json")
    assert [(x["host_port"], x["node"]) for x in json.loads(text_of(resp))["publishes"]] == \
        [(p["host_port"], n)]
    status, resp = get(khd, "/v1/ps")
    assert f"127.0.0.1:{p['host_port']}" in text_of(resp)
    assert [x["host_port"] for x in call(khd, "/v1/ps", "alice")[1]["publishes"]] == \
        [p["host_port"]]
    take(khd, "bob")
    assert call(khd, "/v1/ps", "bob")[1]["publishes"] == []
    # a port of one's choice
    want = p["host_port"] + 1 if p["host_port"] < 65535 else 40000
    status, q = pub(khd, "alice", n, echo.port, host_port=want)
    assert status == 201 and q["host_port"] == want, q
    assert fetch(want, b"abc") == b"ABC"


def test_only_the_owner_may_publish_and_another_s_node_looks_like_none(khd, echo):
    _, (n,) = take(khd, "alice", x=True)
    take(khd, "bob", x=True)
    theirs = pub(khd, "bob", n, echo.port)
    none = pub(khd, "bob", 99, echo.port)
    assert theirs[0] == none[0] == 404, (theirs, none)
    assert theirs[1]["error"] == f"principal bob has no allocated node {n}"
    assert none[1]["error"] == "principal bob has no allocated node 99"
    status, err = call(khd, f"/v1/nodes/{n}/publish", "alice", port=echo.port,
                       credential="wrong")
    assert status == 403, err
    # and another's published port cannot be removed, nor told from one that does not exist
    status, p = pub(khd, "alice", n, echo.port)
    assert status == 201
    theirs = call(khd, f"/v1/publishes/{p['host_port']}/remove", "bob")
    none = call(khd, "/v1/publishes/65000/remove", "bob")
    assert theirs[0] == none[0] == 404
    assert re.sub(r"\d+$", "N", theirs[1]["error"]) == re.sub(r"\d+$", "N", none[1]["error"])
    assert fetch(p["host_port"]) == b"HELLO"  # still there
    status, gone = call(khd, f"/v1/publishes/{p['host_port']}/remove", "alice")
    assert status == 200 and gone["host_port"] == p["host_port"], gone
    assert closed(p["host_port"])


@pytest.mark.parametrize("body, words", [
    ({}, "`port` is required"),
    ({"port": 0}, "`port` must be between 1 and 65535"),
    ({"port": 65536}, "`port` must be between 1 and 65535"),
    ({"port": "80"}, "`port` must be an integer"),
    ({"port": 80, "host_port": 80}, "`host_port` must be between 1024 and 65535"),
    ({"port": 80, "host_port": 70000}, "`host_port` must be between 1024 and 65535"),
])
def test_bad_ports_are_refused(khd, body, words):
    _, (n,) = take(khd, "alice", x=True)
    status, err = call(khd, f"/v1/nodes/{n}/publish", "alice", **body)
    assert status == 400 and words in err["error"], err


def test_a_node_outside_the_external_domain_or_a_taken_port_is_refused(khd, svc, echo):
    _, (n,) = take(khd, "alice", i=True)  # public domain only
    status, err = pub(khd, "alice", n, echo.port)
    assert status == 409 and err["error"] == f"node {n} is not in the external domain", err
    _, (m,) = take(khd, "alice", x=True)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        status, err = pub(khd, "alice", m, echo.port, host_port=port)
        assert status == 409 and err["error"] == f"port {port} on 127.0.0.1 is in use", err
    status, err = pub(khd, "alice", m, echo.port, host_port=svc.cfg.api_port)
    assert status == 409 and "khd's own" in err["error"], err
    assert call(khd, "/v1/ps", "alice")[1]["publishes"] == []


def test_publishes_per_principal_are_bounded(khd, echo, monkeypatch):
    monkeypatch.setattr(publish, "MAX_PER_PRINCIPAL", 2)
    _, (n,) = take(khd, "alice", x=True)
    assert pub(khd, "alice", n, echo.port)[0] == 201
    assert pub(khd, "alice", n, echo.port)[0] == 201
    status, err = pub(khd, "alice", n, echo.port)
    assert status == 409 and "has 2 published ports, the most one may have" in err["error"]
    _, (m,) = take(khd, "bob", x=True)
    assert pub(khd, "bob", m, echo.port)[0] == 201  # another principal's count is its own


def test_release_reset_and_principal_removal_close_the_port(khd, svc, echo, monkeypatch):
    monkeypatch.setattr(svc.nodes, "reset", lambda number: None)
    alloc, (a, b) = take(khd, "alice", 2, x=True)
    ports = [pub(khd, "alice", n, echo.port)[1]["host_port"] for n in (a, b)]
    assert [fetch(p) for p in ports] == [b"HELLO"] * 2
    # a connection open through the port is cut too
    held = socket.create_connection(("127.0.0.1", ports[0]), timeout=10)
    held.sendall(b"x")
    assert held.recv(10) == b"X"
    status, _ = call(khd, f"/v1/allocations/{alloc}/release", "alice", nodes=[a])
    assert status == 200
    assert closed(ports[0]) and held.recv(10) == b""
    held.close()
    assert fetch(ports[1]) == b"HELLO"  # the other node's stays
    status, _ = call(khd, f"/v1/nodes/{b}/reset", "alice")
    assert status == 200
    assert closed(ports[1])
    assert call(khd, "/v1/ps", "alice")[1]["publishes"] == []
    _, (c,) = take(khd, "carol", x=True)
    port = pub(khd, "carol", c, echo.port)[1]["host_port"]
    status, resp = post(khd, "/v1/principals/carol/remove", b"{}")
    assert status == 200, resp
    assert closed(port)


def test_a_node_that_left_the_external_domain_is_not_forwarded(khd, svc, echo, monkeypatch):
    monkeypatch.setattr(svc.nodes, "set_links", lambda *a, **k: None)
    monkeypatch.setattr(svc.fabric, "attach", lambda *a, **k: None)
    monkeypatch.setattr(svc.nodes, "set_link", lambda *a, **k: None, raising=False)
    _, (n,) = take(khd, "alice", x=True)
    port = pub(khd, "alice", n, echo.port)[1]["host_port"]
    status, resp = call(khd, f"/v1/nodes/{n}/leave", "alice", netid=0)
    assert status == 200, resp
    assert closed(port)


def test_each_connection_is_checked_against_the_state(khd, svc, echo):
    """A publish whose node is gone refuses connections even before a sync closes it."""
    _, (n,) = take(khd, "alice", x=True)
    port = pub(khd, "alice", n, echo.port)[1]["host_port"]
    with svc.store.tx() as db:  # as if the node had died and been dropped behind its back
        db.execute("UPDATE nodes SET state='failed' WHERE number=?", (n,))
    assert cut(port)
    publish.sync(svc)
    assert closed(port)


def test_a_restarted_khd_opens_the_publishes_again_or_drops_them(tmp_path, monkeypatch,
                                                                   echo):
    monkeypatch.setattr(publish.Published, "address", property(lambda self: "127.0.0.1"))
    first = with_forwarder(make_service(tmp_path, monkeypatch, nodes=4))
    with serving(first, first.cfg.socket) as sock:
        _, (a, b) = take(sock, "alice", 2, x=True)
        pa = pub(sock, "alice", a, echo.port)[1]["host_port"]
        pb = pub(sock, "alice", b, echo.port)[1]["host_port"]
    first.forwards.stop()  # khd stopped: its ports close with it
    first.store.close()
    assert closed(pa) and closed(pb)
    with socket.create_server(("127.0.0.1", pb)):  # someone took b's port meanwhile
        second = with_forwarder(make_service(tmp_path, monkeypatch, nodes=4))
        try:
            repairs = publish.restore(second)
            assert repairs == [f"dropped the publish of 127.0.0.1:{pb} -> node {b} port "
                               f"{echo.port} (127.0.0.1): port {pb} on 127.0.0.1 is in use"]
            assert fetch(pa) == b"HELLO"
            assert [p["host_port"] for p in publish.listing(second)] == [pa]
        finally:
            second.forwards.stop()
            second.store.close()


def test_without_an_outside_world_publish_says_so(tmp_path, monkeypatch):
    svc = make_service(tmp_path, monkeypatch, outside=False)
    try:
        with serving(svc, svc.cfg.socket) as sock:
            _, (n,) = take(sock, "alice", x=True)
            status, err = pub(sock, "alice", n, 80)
            assert status == 409 and "khd runs without an outside world (--no-outside)" in \
                err["error"], err
    finally:
        svc.store.close()
