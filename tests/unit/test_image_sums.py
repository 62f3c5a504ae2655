"""Images fetched by nodes are checked (issue 11, item 3): `GET /v1/images` lists each image's
sha256, and the in-node fetchers (kh_fetch_image in kh-boot.sh, used by khgetdisk; khrootimage
on the file server) refuse bytes that do not have it, in one line, leaving nothing behind.

The node's scripts run here under the host's shell, wget and sha256sum (the same options as
busybox's), against khd's real API or a server that lies about an image."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kh.service.pins import ImageSums
from tests.unit.fake_khd import get, make_service, serving_tcp, text_of

FILES = Path(__file__).resolve().parents[2] / "appliance-builder" / "files"


@pytest.fixture
def svc(tmp_path, monkeypatch):
    s = make_service(tmp_path, monkeypatch, nodes=1)
    (tmp_path / "vblade.cpio.gz.uimg").write_bytes(os.urandom(300 * 1024 + 5))
    yield s
    s.store.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_listing_gives_each_images_sha256(svc, tmp_path):
    img = tmp_path / "vblade.cpio.gz.uimg"
    with serving_tcp(svc) as addr:
        status, resp = get(addr, "/v1/images")
        assert status == 200
        assert f"vblade.cpio.gz.uimg {img.stat().st_size} {sha(img.read_bytes())}\n" in \
            text_of(resp)
        img.write_bytes(b"a new version\n")  # republished: listed with its new sum
        status, resp = get(addr, "/v1/images?format=json")
        assert {"image": "vblade.cpio.gz.uimg", "size": 14,
                "sha256": sha(b"a new version\n")} in json.loads(text_of(resp))


def test_a_file_rewritten_in_place_is_hashed_again(tmp_path):
    sums = ImageSums()
    p = tmp_path / "img"
    p.write_bytes(b"one")
    assert sums.sha256(p) == sha(b"one")
    with p.open("r+b") as f:  # same inode and size, new contents (and mtime)
        f.write(b"two")
    os.utime(p, ns=(1, 1))
    assert sums.sha256(p) == sha(b"two")


class Liar(http.server.BaseHTTPRequestHandler):
    """Publishes ``listing`` at /v1/images and ``images[name]`` at /v1/images/NAME."""

    listing = ""
    images: dict[str, bytes] = {}  # noqa: RUF012 (set per test, one server at a time)

    def do_GET(self) -> None:
        if self.path == "/v1/images":
            body = self.listing.encode()
        elif (name := self.path.removeprefix("/v1/images/")) in self.images:
            body = self.images[name]
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def liar(listing: str, images: dict[str, bytes]) -> Iterator[str]:
    Liar.listing, Liar.images = listing, images
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Liar)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def fetch(server: str, name: str, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", f'. {FILES / "kh-boot.sh"}; kh_fetch_image "$@"', "sh",
                           server, name, str(dest)], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)


def test_fetch_image_from_khd_arrives_checked(svc, tmp_path):
    dest = tmp_path / "out" / "vblade.cpio.gz.uimg"
    dest.parent.mkdir()
    with serving_tcp(svc) as (host, port):
        r = fetch(f"{host}:{port}", "vblade.cpio.gz.uimg", dest)
    assert r.returncode == 0, r
    assert dest.read_bytes() == (tmp_path / "vblade.cpio.gz.uimg").read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["vblade.cpio.gz.uimg"]


@pytest.mark.parametrize("listed", ["other", "none", "short"])
def test_fetch_image_refuses_bytes_without_the_published_sum(tmp_path, listed):
    good, bad = b"the real vblade appliance\n", b"something else\n"
    line = {"other": f"vblade.cpio.gz.uimg {len(good)} {sha(good)}\n",
            "none": f"vblade.cpio.gz.uimg {len(bad)}\n",  # a khd before issue 11
            "short": f"vblade.cpio.gz.uimg {len(bad)} {sha(bad)[:40]}\n"}[listed]
    dest = tmp_path / "vblade.cpio.gz.uimg"
    with liar(line, {"vblade.cpio.gz.uimg": bad}) as server:
        r = fetch(server, "vblade.cpio.gz.uimg", dest)
    assert r.returncode == 1
    assert len(r.stdout.splitlines()) == 1, r.stdout
    assert ("not the published" if listed == "other" else "lists no sha256") in r.stdout
    assert list(tmp_path.iterdir()) == []  # nothing kept, not even a .part


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def rootimage(server: str, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(FILES / "khrootimage"), server, "root.tar.gz"],
                          env={"PATH": "/usr/bin:/bin", "KH_ROOTIMAGE_DEST": str(dest)},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("honest", [True, False])
def test_the_file_servers_root_is_checked_as_it_streams(tmp_path, honest):
    dest = tmp_path / "export" / "root"
    dest.mkdir(parents=True)
    (dest / "old").write_text("the old root\n")
    # a tail after the archive's end (as a larger record's padding would be) is hashed too
    image = tar_gz({"bin/sh": b"#!shell\n" * 5000, "etc/hostname": b"root\n"}) + bytes(4096)
    listed = image if honest else tar_gz({"bin/sh": b"another\n"})
    with liar(f"root.tar.gz {len(image)} {sha(listed)}\n", {"root.tar.gz": image}) as server:
        r = rootimage(server, dest)
        if honest:
            assert r.returncode == 0, r
            assert (dest / "etc" / "hostname").read_text() == "root\n"
            assert (dest / ".kh-image").read_text() == f"root.tar.gz {sha(image)}\n"
            again = rootimage(server, dest)
            assert "already on" in again.stdout, again
        else:
            assert r.returncode == 1
            assert f"has sha256 {sha(image)}, not the published {sha(listed)}; refused" in \
                r.stdout
            assert sorted(p.name for p in dest.iterdir()) == ["old"]  # the old copy stays
            assert not (tmp_path / "export" / "root.new").exists()
