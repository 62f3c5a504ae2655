"""Issue 10, finding 1: khd reads nothing on a caller's behalf. A credential is the secret
itself in every interface; only the CLI reads `-c FILE` (or `-c -`, stdin), and KH_CREDENTIAL
holds the secret itself."""

from __future__ import annotations

import io
import json
import os

import pytest
from click.testing import CliRunner

from kh.admission import MAX_CREDENTIAL
from kh.cli import credential, khget
from kh.errors import UsageError
from tests.unit.fake_khd import make_service, post, serving, text_of


@pytest.fixture
def khd(tmp_path, monkeypatch):
    svc = make_service(tmp_path, monkeypatch)
    with serving(svc, svc.cfg.socket) as sock:
        yield sock
    svc.store.close()


def body(**kw: object) -> bytes:
    return json.dumps(kw).encode()


def test_a_path_is_not_a_credential(khd, tmp_path):
    assert post(khd, "/v1/allocations", body(user="alice", credential="s3cret"))[0] == 201
    cred = tmp_path / "alicecred"  # root-only, holding alice's credential
    cred.write_text("s3cret\n")
    cred.chmod(0o600)
    for sent in (str(cred), "./" + os.path.relpath(cred)):
        status, resp = post(khd, "/v1/keys/list", body(user="alice", credential=sent))
        assert status == 403, resp
    # a path to a file khd cannot decode, or a name too long for the kernel: refused, not 500
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe\x00")
    for sent in (str(binary), "./" + "x" * 300):
        assert post(khd, "/v1/keys/list", body(user="alice", credential=sent))[0] == 403
    assert post(khd, "/v1/keys/list", body(user="alice", credential="s3cret"))[0] == 200


@pytest.mark.parametrize("raw,why", [
    (b'{"user": "alice", "credential": "\\ud800"}', "UTF-8"),
    (body(user="alice", credential="x" * (MAX_CREDENTIAL + 1)), "too long"),
    (body(user="alice", credential="\u00e9" * (MAX_CREDENTIAL // 2 + 1)), "too long"),
    (body(user="alice", credential=""), "empty"),
    (body(user="alice", credential=42), "must be a string"),
    (body(user="alice", credential=["s3cret"]), "must be a string"),
])
def test_a_malformed_credential_is_a_400(khd, raw, why):
    for path in ("/v1/allocations", "/v1/keys/list", "/v1/allocations/1/release"):
        status, resp = post(khd, path, raw)
        assert status == 400 and why in text_of(resp), resp


# -- the CLI's rules ------------------------------------------------------------------------
class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def test_file_stdin_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(credential.ENV, raising=False)
    f = tmp_path / "cred"
    for written, read in ((b"s3cret\n", "s3cret"), (b"s3cret\r\n", "s3cret"),
                          (b"s3cret", "s3cret"), (b"two words \n\n", "two words \n")):
        f.write_bytes(written)
        assert credential.resolve(str(f)) == read
    monkeypatch.setattr("sys.stdin", _Stdin(b"from-stdin\n"))
    assert credential.resolve("-") == "from-stdin"
    assert credential.resolve(None) is None
    monkeypatch.setenv(credential.ENV, "from-env")
    assert credential.resolve(None) == "from-env"
    f.write_bytes(b"from-file\n")
    assert credential.resolve(str(f)) == "from-file"  # -c wins over the environment
    monkeypatch.setenv(credential.ENV, "")
    assert credential.resolve(None) is None


@pytest.mark.parametrize("content,msg", [
    (b"", "empty"), (b"\n", "empty"), (b"\xff\xfe", "not UTF-8"),
    (b"x" * (MAX_CREDENTIAL + 1), "too long"), (b"x" * 100_000, "too long"),
])
def test_bad_credential_files(tmp_path, content, msg):
    f = tmp_path / "cred"
    f.write_bytes(content)
    with pytest.raises(UsageError, match=msg):
        credential.resolve(str(f))


def test_a_secret_on_the_command_line_is_not_taken(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="no credential file 'alicecred'") as e:
        credential.resolve("alicecred")
    assert "KH_CREDENTIAL" in str(e.value)


def test_khdo_cannot_take_the_credential_from_stdin():
    with pytest.raises(UsageError, match="stdin carries khget's text object"):
        credential.resolve("-", stdin_free=False)


def test_khget_reads_stdin_and_the_environment_end_to_end(tmp_path, monkeypatch):
    svc = make_service(tmp_path, monkeypatch)
    monkeypatch.setenv("KH_STATE_DIR", str(svc.cfg.state_dir))
    monkeypatch.delenv(credential.ENV, raising=False)
    runner = CliRunner()
    with serving(svc, svc.cfg.socket):
        r = runner.invoke(khget.main, ["-c", "-", "alice"], input="s3cret\n")
        assert r.exit_code == 0 and r.output.startswith("con"), r.output
        r = runner.invoke(khget.main, ["alice"], env={credential.ENV: "s3cret"})
        assert r.exit_code == 0 and r.output.startswith("con"), r.output
        r = runner.invoke(khget.main, ["alice"], env={credential.ENV: "wrong"})
        assert r.exit_code == 3 and "credential refused" in r.output, r.output
        r = runner.invoke(khget.main, ["-c", "s3cret", "alice"])  # not a file: refused here
        assert r.exit_code == 2 and "no credential file" in r.output, r.output
    svc.store.close()
