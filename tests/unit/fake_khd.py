"""A real Service and its real API server on a temporary unix socket, with only the host parts
stood in (no QEMU, no fabric namespace; no root): nodes are rows that say `free` and a set of
bridge numbers. What the API, admission, allocation and the store do is the real thing."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kh.model import NodeState
from kh.service import api
from kh.service.config import ServiceConfig
from kh.service.core import Service
from kh.store import NodeRow


class FakeFabric:
    """The bridges that exist, by netid; ``fail_remove`` makes the next removal fail."""

    def __init__(self) -> None:
        self.bridges: set[int] = set()
        self.fail_remove = False

    def ensure_domain(self, netid: int) -> str:
        self.bridges.add(netid)
        return f"br{netid}"

    def remove_domain(self, netid: int) -> None:
        if self.fail_remove:
            self.fail_remove = False
            raise OSError("the kernel said no")
        self.bridges.discard(netid)

    def domain_bridges(self) -> list[int]:
        return sorted(self.bridges)


def make_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nodes: int = 4,
                 **settings: Any) -> Service:
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path, nodes=nodes,
                        prefix="ku", **settings)
    svc = Service(cfg)
    fabric = FakeFabric()
    for name in ("ensure_domain", "remove_domain", "domain_bridges"):
        monkeypatch.setattr(svc.fabric, name, getattr(fabric, name))
    monkeypatch.setattr(svc, "_configure", lambda number, domains: None)
    svc.fake_fabric = fabric  # type: ignore[attr-defined]
    refill(svc)
    return svc


def refill(svc: Service) -> None:
    """Every configured node that is not allocated is free again (as the pool would make it)."""
    for n in range(1, svc.cfg.nodes + 1):
        if svc.store.node(n) is None:
            svc.store.put_node(NodeRow(n, svc.store.new_uid(), NodeState.FREE, None, None,
                                       str(svc.cfg.node_dir(n)), time.time(), None))
        svc.nodes.running.setdefault(n, None)  # type: ignore[arg-type]


@contextmanager
def serving(svc: Service, sock: Path) -> Iterator[Path]:
    """khd's API on the unix socket ``sock`` (this test's own uid: the operator)."""
    sock.parent.mkdir(parents=True, exist_ok=True)
    server = api.UnixServer(str(sock), api.handler_for(svc))
    api.serve(server)
    try:
        yield sock
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serving_tcp(svc: Service) -> Iterator[tuple[str, int]]:
    """khd's API on 127.0.0.1 at a free port: every caller there is a principal."""
    server = api.tcp_server("127.0.0.1", 0, api.handler_for(svc))
    api.serve(server)
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()


Address = Path | tuple[str, int]


def service_fixture(**settings: Any):  # type: ignore[no-untyped-def]
    """A module's ``svc`` fixture (``svc = service_fixture(...)``): make_service with
    ``settings`` (nodes, quotas ...), its store closed afterwards."""

    @pytest.fixture(name="svc")
    def fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
        svc = make_service(tmp_path, monkeypatch, **settings)
        yield svc
        svc.store.close()

    return fixture


def api_fixture(name: str = "khd", tcp: bool = False):  # type: ignore[no-untyped-def]
    """A module's fixture ``name`` (``khd = api_fixture()``): the ``svc`` fixture's API served
    on its unix socket (the operator), or with ``tcp`` on 127.0.0.1 (principals); its address."""

    @pytest.fixture(name=name)
    def fixture(svc: Service) -> Iterator[Address]:
        with (serving_tcp(svc) if tcp else serving(svc, svc.cfg.socket)) as address:
            yield address

    return fixture


def exchange(sock: Address, request: bytes, *, close_write: bool = True,
             timeout: float = 20.0) -> tuple[int, bytes]:
    """Send raw bytes to the unix socket ``sock`` (or a TCP address), read the answer:
    (status, whole response); status 0 if khd said nothing and closed. Without
    ``close_write`` the request stays open (no EOF), so an answer proves khd did not wait
    for the body."""
    if isinstance(sock, Path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(sock))
    else:
        s = socket.create_connection(sock, timeout=timeout)
    try:
        s.sendall(request)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    if not data:
        return 0, data
    return int(data.split(b" ", 2)[1]), data


def post(sock: Address, path: str, body: bytes, ctype: str = "application/json",
         extra: bytes = b"") -> tuple[int, bytes]:
    host = "khd" if isinstance(sock, Path) else "127.0.0.1"
    return exchange(sock, f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\n".encode() + extra + b"\r\n" + body)


def get(sock: Address, path: str, extra: bytes = b"") -> tuple[int, bytes]:
    host = b"khd" if isinstance(sock, Path) else b"127.0.0.1"
    return exchange(sock, f"GET {path} HTTP/1.1\r\n".encode() + b"Host: " + host + b"\r\n"
                    + extra + b"\r\n")


def text_of(response: bytes) -> str:
    return response.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")
