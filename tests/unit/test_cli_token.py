"""`kh token add|list|rm` against the real service's API on a unix socket (tests/unit/fake_khd),
and the duration and domain-list grammar they take."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kh.cli import token as token_cli
from kh.cli.main import main
from kh.client import Client
from kh.errors import UsageError
from kh.service import tokens
from tests.unit.fake_khd import make_service, post, serving


@pytest.fixture
def sock(tmp_path, monkeypatch):
    svc = make_service(tmp_path, monkeypatch)
    with serving(svc, svc.cfg.socket) as path:
        monkeypatch.setattr(token_cli, "client", lambda: Client(path))
        monkeypatch.setenv("KH_CREDENTIAL", "apw")
        status, _ = post(path, "/v1/allocations", b'{"user": "alice", "credential": "apw", '
                         b'"p": 1}')
        assert status == 201
        yield path
    svc.store.close()


def kh(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.output


def test_add_list_rm(sock):
    code, out = kh("token", "add", "-u", "alice", "--allocate-on", "1,3", "--max-nodes", "2",
                   "--expires", "7d")
    assert code == 0, out
    secret, about = out.splitlines()
    assert tokens.looks_like(secret)
    assert "allocates on 1,3, at most 2 nodes at once, expires 20" in about
    code, out = kh("token", "list", "-u", "alice", "--json")
    (row,) = json.loads(out)
    assert row["allocate_on"] == [1, 3] and row["max_nodes"] == 2 and row["state"] == "active"
    assert 7 * 86400 - 60 < row["expires"] - row["created"] <= 7 * 86400
    code, out = kh("token", "rm", "-u", "alice", str(row["id"]))
    assert (code, out) == (0, f"token {row['id']} revoked\n")
    code, out = kh("token", "list", "-u", "alice")
    assert code == 0 and f"{row['id']:>4} revoked  1,3" in out
    code, out = kh("token", "rm", "-u", "alice", "99")
    assert code != 0 and "principal alice has no token 99" in out


def test_add_refuses_anothers_or_unknown_domain(sock):
    code, out = kh("token", "add", "-u", "alice", "--allocate-on", "9")
    assert code != 0 and "no private domain 9" in out


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800),
                                               ("12h", 43200), ("7d", 604800),
                                               ("2w", 1209600)])
def test_durations(text, seconds):
    assert token_cli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5m", "5y", "1.5h", "h", "12 h h"])
def test_bad_durations(text):
    with pytest.raises(UsageError):
        token_cli.parse_duration(text)


def test_netid_lists():
    assert token_cli.parse_netids("1, 3,") == [1, 3]
    assert token_cli.parse_netids("") == []
    with pytest.raises(UsageError):
        token_cli.parse_netids("1;3")
