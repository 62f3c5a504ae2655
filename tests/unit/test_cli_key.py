"""`kh key add FILE` (HARDEN, item 2): the file is read and checked on the client, and only one
OpenSSH public key line is ever sent to khd; a private key (or anything else) is refused
there, one line, and khd is never asked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from kh.cli import service as service_cli
from kh.cli.main import main


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             *, as_json: bool = False) -> str:
        self.calls.append((method, path, body))
        return "key 1 added\n"


@pytest.fixture
def khd(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(service_cli, "client", lambda: rec)
    monkeypatch.delenv("KH_CREDENTIAL", raising=False)
    return rec


def _private(kind: str) -> bytes:
    if kind == "openssh":
        return ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption())
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    fmt = {"pem": serialization.PrivateFormat.TraditionalOpenSSL,
           "pkcs8": serialization.PrivateFormat.PKCS8}[kind]
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _public() -> str:
    return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def add(path: Path):  # type: ignore[no-untyped-def]
    cred = path.parent / "cred"
    cred.write_text("s3cret\n")
    return CliRunner().invoke(main, ["key", "add", "-u", "alice", "-c", str(cred), str(path)])


@pytest.mark.parametrize("kind", ["openssh", "pem", "pkcs8"])
def test_a_private_key_never_leaves_the_client(tmp_path, khd, kind):
    path = tmp_path / "id"
    path.write_bytes(_private(kind))
    r = add(path)
    assert r.exit_code == 2, r.output
    assert khd.calls == []  # khd was not asked: the key was not sent
    assert r.output.startswith("kh: ") and r.output.count("\n") == 1, r.output
    assert "private key" in r.output and f"{path}.pub" in r.output
    assert "PRIVATE" not in r.output and "AAAA" not in r.output


@pytest.mark.parametrize("content", [b"", b"hello\n", b"ssh-ed25519 !!!\n", b"x" * 70000,
                                     b"\xff\xfe\n"])
def test_what_is_not_one_public_key_line_is_refused_locally(tmp_path, khd, content):
    path = tmp_path / "k.pub"
    path.write_bytes(content)
    r = add(path)
    assert r.exit_code == 2 and khd.calls == [], r.output
    assert r.output.startswith("kh: ") and r.output.count("\n") == 1, r.output


def test_a_public_key_is_sent_as_its_one_line(tmp_path, khd):
    line = _public()
    path = tmp_path / "k.pub"
    path.write_text(f"\n{line} me@host\n\n")
    r = add(path)
    assert r.exit_code == 0, r.output
    assert khd.calls == [("POST", "/v1/keys", {"user": "alice", "credential": "s3cret",
                                               "key": f"{line} me@host", "allocation": None})]


def test_a_fifo_is_read_once_and_bounded(tmp_path, khd):
    path = tmp_path / "k.pub"
    os.mkfifo(path)
    line = _public()
    pid = os.fork()
    if pid == 0:  # the writer: the public key, then more than any key, then EOF
        try:
            with open(path, "wb") as f:
                f.write(line.encode() + b"\n")
        finally:
            os._exit(0)
    r = add(path)
    os.waitpid(pid, 0)
    assert r.exit_code == 0 and khd.calls[0][2]["key"] == line, r.output
