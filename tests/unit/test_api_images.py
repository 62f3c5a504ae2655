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
    (tmp_path / "big.cpio.gz.uimg").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (tmp_path / "secret").write_text("root's\n")
    (tmp_path / "link.cpio.gz.uimg").symlink_to(tmp_path / "secret")
    yield s
    s.store.close()


def test_an_image_arrives_whole(svc, tmp_path):
    with serving(svc, svc.cfg.socket) as sock:
        status, resp = exchange(
            sock, b"GET /v1/images/big.cpio.gz.uimg HTTP/1.1\r\nHost: khd\r\n\r\n")
        assert status == 200
        got = resp.partition(b"\r\n\r\n")[2]
        assert hashlib.sha256(got).digest() == \
            hashlib.sha256((tmp_path / "big.cpio.gz.uimg").read_bytes()).digest()


def test_an_image_is_handed_to_the_server_as_a_file_not_bytes(svc):
    """The application returns the server's file wrapper around the open file: waitress's
    loop sends it as the socket takes it, a block at a time."""
    wrapped = []

    def wrapper(f: io.BufferedReader, block: int) -> list[bytes]:
        wrapped.append((f, block))
        return []

    environ = {"REQUEST_METHOD": "GET", "REQUEST_URI": "/v1/images/big.cpio.gz.uimg",
               "wsgi.file_wrapper": wrapper, "kh.caller": Caller("10.1.0.4", False),
               "kh.tcp": True, "HTTP_HOST": "10.1.255.254:7480"}
    headers = []
    api.App(svc)(environ, lambda status, h: headers.append((status, h)))
    (f, block), = wrapped
    assert f.tell() == 0 and block <= 1 << 16  # nothing read yet
    assert headers[0][0] == "200 OK"
    assert ("Content-Length", str(3 * 1024 * 1024 + 17)) in headers[0][1]
    f.close()


@pytest.mark.parametrize("name", ["link.cpio.gz.uimg", "secret.json", ".hidden", "nothing"])
def test_only_regular_files_are_images(svc, tmp_path, name):
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / "secret.json").write_text("{}")
    with serving(svc, svc.cfg.socket) as sock:
        status, resp = get(sock, f"/v1/images/{name}")
        assert status == 404, resp
        assert "root's" not in text_of(resp)
        status, resp = get(sock, "/v1/images")
        assert "link.cpio.gz.uimg" not in text_of(resp) and "big.cpio.gz.uimg" in text_of(resp)


# What a principal needs from the images directory (docs/api.yaml, docs/boot-keys.md): the
# node images (U-Boot, the kernel, the appliances) and root.tar.gz, the full root file
# servers unpack (kh.rootimage). Whatever else lies there (kh's own QEMU, the build records,
# the root's tree, an operator's file) is not published.
PUBLISHED = ["u-boot.elf", "uImage", "root.tar.gz", "shell.cpio.gz.uimg", "vblade.cpio.gz.uimg"]
UNPUBLISHED = ["qemu-system-ppc", "builds.json", "manifest.json", "notes.txt", "uImage.old",
               "root.tar.gz.part", "x.cpio.gz", "cpio.gz.uimg", "-x.cpio.gz.uimg"]


def test_only_node_images_are_published(svc, tmp_path):
    for name in PUBLISHED + UNPUBLISHED:
        (tmp_path / name).write_bytes(b"bytes of " + name.encode())
    with serving(svc, svc.cfg.socket) as sock:
        status, resp = get(sock, "/v1/images")
        listed = {line.split()[0] for line in text_of(resp).splitlines()}
        assert listed == {*PUBLISHED, "big.cpio.gz.uimg"}, listed
        for name in PUBLISHED:
            assert get(sock, f"/v1/images/{name}")[0] == 200, name
        for name in UNPUBLISHED:
            status, resp = get(sock, f"/v1/images/{name}")
            assert status == 404, name
            assert b"bytes of" not in resp


def test_a_published_name_that_is_a_link_out_is_not_served(svc, tmp_path):
    """A link named as an image (say uImage -> /etc/shadow's copy) is neither listed nor
    served, nor is a directory or a link to one."""
    (tmp_path / "uImage").symlink_to(tmp_path / "secret")
    (tmp_path / "root.tar.gz").mkdir()
    (tmp_path / "u-boot.elf").symlink_to(tmp_path / "big.cpio.gz.uimg")
    with serving(svc, svc.cfg.socket) as sock:
        listed = text_of(get(sock, "/v1/images")[1])
        for name in ("uImage", "root.tar.gz", "u-boot.elf"):
            assert get(sock, f"/v1/images/{name}")[0] == 404, name
            assert name not in listed
