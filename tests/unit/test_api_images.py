"""Image downloads (`GET /v1/images/NAME`, how nodes fetch appliances): streamed from the file as
the client reads, never read into khd's memory; only regular files of the images directory,
never through a link (issue 10, least privilege: "images served by name follow symlinks")."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from kh.service import api
from kh.service.request import Caller
from tests.unit.fake_khd import exchange, get, make_service, serving, text_of


@pytest.fixture
def svc(tmp_path, monkeypatch):
    s = make_service(tmp_path, monkeypatch, nodes=1)
    (tmp_path / "big.uimg").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (tmp_path / "secret").write_text("root's\n")
    (tmp_path / "link.uimg").symlink_to(tmp_path / "secret")
    yield s
    s.store.close()


def test_an_image_arrives_whole(svc, tmp_path):
    with serving(svc, svc.cfg.socket) as sock:
        status, resp = exchange(sock, b"GET /v1/images/big.uimg HTTP/1.1\r\nHost: khd\r\n\r\n")
        assert status == 200
        got = resp.partition(b"\r\n\r\n")[2]
        assert hashlib.sha256(got).digest() == \
            hashlib.sha256((tmp_path / "big.uimg").read_bytes()).digest()


def test_an_image_is_handed_to_the_server_as_a_file_not_bytes(svc):
    """The application returns the server's file wrapper around the open file: waitress's
    loop sends it as the socket takes it, a block at a time."""
    wrapped = []

    def wrapper(f: io.BufferedReader, block: int) -> list[bytes]:
        wrapped.append((f, block))
        return []

    environ = {"REQUEST_METHOD": "GET", "REQUEST_URI": "/v1/images/big.uimg",
               "wsgi.file_wrapper": wrapper, "kh.caller": Caller("10.1.0.4", False),
               "kh.tcp": True, "HTTP_HOST": "10.1.255.254:7480"}
    headers = []
    api.App(svc)(environ, lambda status, h: headers.append((status, h)))
    (f, block), = wrapped
    assert f.tell() == 0 and block <= 1 << 16  # nothing read yet
    assert headers[0][0] == "200 OK"
    assert ("Content-Length", str(3 * 1024 * 1024 + 17)) in headers[0][1]
    f.close()


@pytest.mark.parametrize("name", ["link.uimg", "secret.json", ".hidden", "nothing"])
def test_only_regular_files_are_images(svc, tmp_path, name):
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / "secret.json").write_text("{}")
    with serving(svc, svc.cfg.socket) as sock:
        status, resp = get(sock, f"/v1/images/{name}")
        assert status == 404, resp
        assert "root's" not in text_of(resp)
        status, resp = get(sock, "/v1/images")
        assert "link.uimg" not in text_of(resp) and "big.uimg" in text_of(resp)
