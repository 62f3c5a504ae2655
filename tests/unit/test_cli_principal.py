"""`kh ps` (the operator's view, or with -u a principal's own), `kh principal list|rm` and
`kh service start --node-quota`: what each asks khd (khd answers with the text)."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from kh.cli import principal as principal_cli
from kh.cli import service as service_cli
from kh.cli.main import main
from kh.errors import KhError


class Recorder:
    def __init__(self, answer: str = "the answer\n") -> None:
        self.calls: list[tuple[str, str, Any, bool]] = []
        self.answer = answer

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             *, as_json: bool = False) -> str:
        self.calls.append((method, path, body, as_json))
        return self.answer


@pytest.fixture
def khd(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(service_cli, "client", lambda: rec)
    monkeypatch.setattr(principal_cli, "client", lambda: rec)
    monkeypatch.delenv("KH_CREDENTIAL", raising=False)
    return rec


def kh(*args: str, **kw: Any):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kw)


def test_ps_without_a_user_is_the_operators_view(khd):
    r = kh("ps", "--json")
    assert r.exit_code == 0 and r.output == "the answer\n"
    assert khd.calls == [("GET", "/v1/ps", None, True)]


def test_ps_of_a_principal_posts_its_credential(khd, tmp_path, monkeypatch):
    cred = tmp_path / "alice.cred"
    cred.write_text("s3cret\n")
    assert kh("ps", "-u", "alice", "-c", str(cred)).exit_code == 0
    monkeypatch.setenv("KH_CREDENTIAL", "from-env")
    assert kh("ps", "--user", "alice", "--json").exit_code == 0
    assert khd.calls == [("POST", "/v1/ps", {"user": "alice", "credential": "s3cret"}, False),
                         ("POST", "/v1/ps", {"user": "alice", "credential": "from-env"}, True)]


def test_ps_with_a_credential_but_no_user_is_refused(khd, tmp_path):
    cred = tmp_path / "c"
    cred.write_text("x")
    r = CliRunner().invoke(main, ["ps", "-c", str(cred)])
    assert r.exit_code == 2 and "-c goes with -u USER" in r.stderr and khd.calls == []


def test_principal_list(khd):
    r = kh("principal", "list")
    assert r.exit_code == 0 and r.output == "the answer\n"
    assert kh("principal", "list", "--json").exit_code == 0
    assert khd.calls == [("GET", "/v1/principals", None, False),
                         ("GET", "/v1/principals", None, True)]


def test_principal_rm(khd):
    r = kh("principal", "rm", "alice")
    assert r.exit_code == 0 and r.output == "the answer\n"
    assert khd.calls == [("POST", "/v1/principals/alice/remove", {}, False)]


@pytest.mark.parametrize("name", ["../ps", "Alice", "a/b", "alice\n"])
def test_principal_rm_refuses_a_bad_name_before_asking(khd, name):
    r = CliRunner().invoke(main, ["principal", "rm", name])
    assert r.exit_code == 2 and "bad principal name" in r.stderr and khd.calls == []


def test_service_start_takes_the_node_quota(monkeypatch):
    from kh.service import control
    seen: list[Any] = []

    def start(cfg: Any, **kw: Any) -> None:
        seen.append(cfg)
        raise KhError("not starting a khd in a unit test")

    monkeypatch.setattr(control, "start", start)
    r = CliRunner().invoke(main, ["service", "start", "--node-quota", "5"])
    assert r.exit_code == 1 and seen and seen[0].node_quota == 5
    r = CliRunner().invoke(main, ["service", "start", "--node-quota", "0"])
    assert r.exit_code == 2 and "--node-quota must be 1 to 1024, not 0" in r.stderr
