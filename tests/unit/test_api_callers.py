"""Issue 10, items 2-3 (HTTP): who calls is decided by the transport. The operator (root on
khd's unix socket, by its peer credentials) sees everything and manages principals; over TCP
every caller is a principal and sees only its own; a flood of wrong credentials from one source
is answered 429 (Retry-After, no hash computed) and locks out no one elsewhere. Against the real
API on a unix socket and on 127.0.0.1 (tests/unit/fake_khd.py)."""

from __future__ import annotations

import json
import os

import pytest

from kh import admission
from kh.admission import Limiter
from kh.service import httpd
from kh.service.request import Caller
from tests.unit.fake_khd import api_fixture, get, make_service, post, text_of
from tests.unit.test_admission_limits import Clock, count_hashes


def body(**kw: object) -> bytes:
    return json.dumps(kw).encode()


def data_of(resp: bytes) -> object:
    return json.loads(text_of(resp))


@pytest.fixture
def svc(tmp_path, monkeypatch):
    s = make_service(tmp_path, monkeypatch, nodes=4)
    s.limiter = Limiter(clock=Clock())  # time stands still: however slow the hashes here
    yield s
    s.store.close()


unix = api_fixture("unix")
tcp = api_fixture("tcp", tcp=True)


@pytest.fixture
def two(tcp):
    """alice and bob, one node each, allocated over TCP."""
    for user in ("alice", "bob"):
        status, resp = post(tcp, "/v1/allocations", body(user=user, credential=f"{user}-pw"))
        assert status == 201, resp
    return tcp


def test_ps_over_tcp_is_refused_and_names_the_way(two):
    status, resp = get(two, "/v1/ps")
    assert status == 403
    assert text_of(resp) == ("kh: `kh ps` over TCP needs a principal's credential "
                             "(POST /v1/ps)\n")
    status, resp = get(two, "/v1/ps?format=json")
    assert status == 403 and "alice" not in text_of(resp) and "bob" not in text_of(resp)


def test_the_operator_sees_everything_on_the_unix_socket(two, unix):
    status, resp = get(unix, "/v1/ps?format=json")
    assert status == 200, resp
    data = data_of(resp)
    assert sorted(a["principal"] for a in data["allocations"]) == ["alice", "bob"]


def test_a_principal_sees_only_its_own(two):
    status, resp = post(two, "/v1/ps", body(user="alice", credential="alice-pw"),
                        extra=b"Accept: application/json\r\n")
    assert status == 200, resp
    data = data_of(resp)
    assert [a["principal"] for a in data["allocations"]] == ["alice"]
    assert all(n["pid"] is None for n in data["nodes"])
    assert "bob" not in text_of(resp)
    status, resp = post(two, "/v1/ps", body(user="alice", credential="bob-pw"))
    assert status == 403
    status, resp = post(two, "/v1/ps", body(user="alice", credential="alice-pw"))
    assert status == 200 and "bob" not in text_of(resp) and "alice" in text_of(resp)


@pytest.mark.parametrize("request_", [("GET", "/v1/principals"),
                                      ("POST", "/v1/principals/bob/remove")])
def test_principals_are_the_operators_alone(two, svc, request_):
    method, path = request_
    if method == "GET":
        status, resp = get(two, path)
    else:  # removal is the operator's: a principal is refused whatever it sends
        status, resp = post(two, path, body(user="bob", credential="bob-pw"))
        assert status == 403 and b"operator's" in resp, resp
        status, resp = post(two, path, b"{}")
    assert status == 403, resp
    assert text_of(resp).startswith("kh: ") and text_of(resp).count("\n") == 1
    assert svc.store.principal("bob") is not None


def test_the_operator_lists_and_removes_principals(two, unix, svc):
    status, resp = get(unix, "/v1/principals?format=json")
    assert status == 200, resp
    assert [p["name"] for p in data_of(resp)] == ["alice", "bob"]
    status, resp = get(unix, "/v1/principals")
    assert text_of(resp).splitlines()[0].split() == ["PRINCIPAL", "ALLOCS", "NODES",
                                                     "DOMAINS", "KEYS", "CREATED"]
    status, resp = exchange_json(unix, "/v1/principals/bob/remove")
    assert status == 200, resp
    gone = data_of(resp)
    assert gone["removed"] == "bob" and len(gone["nodes"]) == 1
    assert svc.store.principal("bob") is None
    status, resp = get(unix, "/v1/principals?format=json")
    assert [p["name"] for p in data_of(resp)] == ["alice"]
    assert exchange_json(unix, "/v1/principals/bob/remove")[0] == 404
    for bad in ("Bob", "b%20b", "a" * 40):
        status, resp = exchange_json(unix, f"/v1/principals/{bad}/remove")
        assert status == 400, resp


def exchange_json(sock, path: str) -> tuple[int, bytes]:
    return post(sock, path, b"", extra=b"Accept: application/json\r\n")


def test_a_flood_from_one_source_is_429_and_locks_no_one_out_elsewhere(
        two, unix, svc, monkeypatch):
    """30 wrong credentials in a row from one source: the first PER_SOURCE.burst are 403,
    then 429 with Retry-After, without a hash; meanwhile bob's requests and alice's own right
    credential from another source still work."""
    # the unix socket's peer as a non-operator principal of another source
    monkeypatch.setattr(httpd, "peer_caller", lambda sock: Caller("unix:uid=4242", False))
    calls = count_hashes(monkeypatch)
    codes = []
    for _ in range(30):
        status, resp = post(two, "/v1/keys/list", body(user="alice", credential="guess"))
        codes.append(status)
        if status == 429:
            assert b"\r\nRetry-After: 2\r\n" in resp
            assert text_of(resp) == (f"kh: too many refused credentials from "
                                     f"loopback:uid={os.geteuid()} (try again in 2 s)\n")
        status, resp = post(unix, "/v1/keys/list", body(user="bob", credential="bob-pw"))
        assert status == 200, resp  # another principal, another source: unaffected
    status, resp = post(unix, "/v1/allocations", body(user="bob", credential="bob-pw"))
    assert status == 201, resp  # and bob's khget
    burst = admission.PER_SOURCE.burst
    assert codes == [403] * burst + [429] * (30 - burst)
    hashes_for_alice = len(calls) - 31  # bob's requests hashed once each
    assert hashes_for_alice == burst
    status, resp = post(unix, "/v1/keys/list", body(user="alice", credential="alice-pw"))
    assert status == 200, resp  # alice herself, from elsewhere
    # the flooding source is throttled whoever it names, known or not
    for user in ("bob", "nobody"):
        status, resp = post(two, "/v1/keys/list", body(user=user, credential="x"))
        assert status == 429
