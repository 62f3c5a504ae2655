"""khd's API reads a request one way only (HARDEN, item 1): the host an absolute-form target
names is checked as a Host header is; HTTP/1.1 needs one Host; a parameter no route takes is a
400 naming it; a JSON body is UTF-8 (a declared charset other than utf-8 is a 415); a list
with an empty item is a 400. Against the real server and handler (tests/unit/fake_khd.py)."""

from __future__ import annotations

import json

import pytest

from kh.service import api
from kh.service import request as rq
from tests.unit import test_api_input as base
from tests.unit.fake_khd import exchange, post

body, one_line = base.body, base.one_line
svc, khd, khd_tcp = base.svc, base.khd, base.khd_tcp  # the same fixtures, this module's own


# -- the request target and Host -------------------------------------------------------------
@pytest.mark.parametrize("target,host,code", [
    (b"http://evil.example/v1/status", b"Host: 127.0.0.1\r\n", 421),  # the target's host wins
    (b"http://evil.example:80/v1/status", b"", 421),
    (b"http://127.0.0.1/v1/status", b"Host: 127.0.0.1\r\n", 200),
    (b"http://127.0.0.1/v1/status", b"Host: evil.example\r\n", 200),  # RFC 9112 §3.2.2
    (b"http://user@127.0.0.1/v1/status", b"Host: 127.0.0.1\r\n", 400),
    (b"https://127.0.0.1/v1/status", b"Host: 127.0.0.1\r\n", 400),
    (b"ftp://127.0.0.1/v1/status", b"Host: 127.0.0.1\r\n", 400),
    (b"//evil.example/v1/status", b"Host: 127.0.0.1\r\n", 404),  # a path, not a host
    (b"/v1/status", b"", 400),  # HTTP/1.1 without Host
    (b"/v1/status", b"Host: 127.0.0.1\r\nHost: 127.0.0.1\r\n", 400),  # two
    (b"/v1/status", b"Host: 127.0.0.1 x\r\n", 400),
    (b"/v1/status", b"Host: 127.0.0.1:7480\r\n", 200),
])
def test_tcp_request_targets_and_hosts(khd_tcp, target, host, code):
    status, resp = exchange(khd_tcp, b"GET " + target + b" HTTP/1.1\r\n" + host + b"\r\n")
    assert status == code, resp
    if code != 200:
        one_line(resp)


@pytest.mark.parametrize("request_line,host,code", [
    (b"GET /v1/status HTTP/1.1", b"", 400),
    (b"GET /v1/status HTTP/1.0", b"", 200),  # HTTP/1.0 has no Host
    (b"GET /v1/status HTTP/1.1", b"Host: khd\r\n", 200),
    (b"GET /v1/status HTTP/1.1", b"Host: khd\r\nHost: other\r\n", 400),
])
def test_unix_socket_needs_one_host_in_http_1_1(khd, request_line, host, code):
    status, resp = exchange(khd, request_line + b"\r\n" + host + b"\r\n")
    assert status == code, resp


def test_request_path_reads_the_target_as_sent():
    assert rq.request_path("/v1/ps?format=json") == "/v1/ps"
    assert rq.request_path("//evil/v1/ps") == "//evil/v1/ps"
    assert rq.request_path("http://127.0.0.1:7480/v1/%33/x?y") == "/v1/%33/x"


# -- parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("path,payload,name", [
    ("/v1/allocations", body(user="alice", credential="s3cret", cout=2), "cout"),
    ("/v1/allocations/1/release", body(user="alice", credential="s3cret", node=[1]), "node"),
    ("/v1/keys/list", body(user="alice", credential="s3cret", all=True), "all"),
    ("/v1/ps", body(user="alice", credential="s3cret", principal="bob"), "principal"),
    ("/v1/tokens", body(user="alice", credential="s3cret", max_node=1), "max_node"),
    ("/v1/aoe/addresses/list", body(user="alice", credential="s3cret", net=3), "net"),
    ("/v1/nodes/1/publish", body(user="alice", credential="s3cret", port=80, hostport=8080),
     "hostport"),
    ("/v1/top", body(user="alice", credential="s3cret", node=1), "node"),
    ("/v1/principals/alice/remove", body(force=True), "force"),
])
def test_a_parameter_no_route_takes_is_a_400_naming_it(khd, svc, path, payload, name):
    before = svc.store.allocations()
    status, resp = post(khd, path, payload)
    assert status == 400, resp
    assert f"unknown parameter '{name}'" in one_line(resp)
    assert svc.store.allocations() == before  # refused before the route ran


@pytest.mark.parametrize("query,name", [("verbose=1", "verbose"), ("user=alice", "user")])
def test_a_get_s_unknown_query_parameter_is_a_400(khd, query, name):
    status, resp = exchange(khd, f"GET /v1/status?{query} HTTP/1.1\r\nHost: khd\r\n\r\n"
                            .encode())
    assert status == 400 and f"unknown parameter '{name}'" in one_line(resp), resp
    status, resp = exchange(khd, b"GET /v1/status?format=json HTTP/1.1\r\nHost: khd\r\n\r\n")
    assert status == 200, resp


def test_every_route_declares_its_parameters():
    undeclared = [f"{m} {rx}" for m, rx, fn in api.ROUTES if fn not in rq.FIELDS]
    assert not undeclared, f"routes without @rq.takes(...): {undeclared}"


# -- the body's media type -------------------------------------------------------------------
@pytest.mark.parametrize("ctype,code", [
    ("application/json; charset=latin1", 415),
    ("application/json; charset=iso-8859-1", 415),
    ("application/json; charset=utf-16", 415),
    ("application/json; charset", 415),
    ("application/json; boundary=x", 415),
    ("application/json; charset=utf-8; charset=latin1", 415),
    ("application/json; charset=utf-8", 201),
    ("application/json; charset=\"UTF-8\"", 201),
    ("Application/JSON;charset=utf-8", 201),
    ("application/json", 201),
])
def test_json_bodies_are_utf_8_only(khd, svc, ctype, code):
    from tests.unit.fake_khd import refill
    refill(svc)
    payload = b'{"user": "alice", "credential": "s3cret"}'
    status, resp = post(khd, "/v1/allocations", payload, ctype=ctype)
    assert status == code, resp
    if code == 415:
        one_line(resp)
    else:
        a = json.loads(post(khd, "/v1/ps", payload, extra=b"Accept: application/json\r\n")[1]
                       .partition(b"\r\n\r\n")[2])["allocations"][-1]["id"]
        assert post(khd, f"/v1/allocations/{a}/release", payload)[0] == 200


# -- lists -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [",,", ",", "3,", ",3", "3,,4", "3;4", " , "])
def test_a_list_with_an_empty_item_is_a_400(khd, svc, n):
    before = svc.store.allocations()
    status, resp = post(khd, "/v1/allocations", body(user="alice", credential="s3cret", n=n))
    assert status == 400, resp
    assert "bad `n` list" in one_line(resp)
    assert svc.store.allocations() == before


def test_number_list():
    assert rq.number_list("", "x") == [] and rq.number_list(" ", "x") == []
    assert rq.number_list("3, 4", "x") == [3, 4]
    for bad in (",,", "3,", "+3", "\u0663", "-1", "0x3"):
        with pytest.raises(rq.UsageError):
            rq.number_list(bad, "x")
