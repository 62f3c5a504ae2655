"""The service's API over the control channel (kh.service.chanapi, issue 11): an ``api+USER``
ssh login with a token or the credential asks what the in-node khget and khgetdisk asked over
clear HTTP, and gets the HTTP route's own answer, scope, limits and one-line reasons. The real
Service (tests/unit/fake_khd), ServiceAccess and ssh server (kh.cc.sshd), a paramiko client."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import paramiko
import pytest

from kh import textobj
from kh.service import api, httpd, tokens
from kh.service.access import ServiceAccess
from kh.service.chanapi import MAX_COMMAND
from tests.unit.fake_khd import api_fixture, get, service_fixture
from tests.unit.sshd_fakes import Running, connect, serve, wait_until
from tests.unit.test_tokens import call, make_token

svc = service_fixture(nodes=8)
khd = api_fixture(tcp=True)


@pytest.fixture
def srv(svc) -> Iterator[Running]:
    with serve(ServiceAccess(svc)) as running:  # type: ignore[arg-type]
        yield running


@pytest.fixture
def world(svc, khd):
    """alice holds private domains 3 and 4 (one node in each), bob domain 5."""
    for user, cred in (("alice", "apw"), ("alice", "apw"), ("bob", "bpw")):
        status, text = call(khd, "/v1/allocations", user=user, credential=cred, p=1)
        assert status == 201, text
    return khd


def run(client: paramiko.SSHClient, command: str) -> tuple[int, str, str]:
    """One exec on the login: (exit status, stdout, stderr)."""
    _, out, err = client.exec_command(command, timeout=30)
    o, e = out.read().decode(), err.read().decode()
    return out.channel.recv_exit_status(), o, e


def refused(port: int, user: str, password: str) -> bool:
    try:
        connect(port, user, password).close()
    except paramiko.AuthenticationException:
        return True
    return False


def test_a_token_allocates_over_the_channel_as_over_http(svc, world, srv):
    tok = make_token(world, allocate_on=[1, 3], max_nodes=2)
    c = connect(srv.port, "api+alice", tok["token"])
    try:
        status, out, err = run(c, "khget -n 3 -i 1")
        assert (status, err) == (0, ""), err
        lines = out.splitlines()
        assert lines[0].startswith("con") and lines[1] == "protocol: uboot", out
        assert "network Internal : eth0" in out and "network 3 : eth1" in out, out
        alloc = textobj.parse(out).id
        assert svc.store.allocation(alloc).token == tok["id"]
        # out of its scope, over its budget: the API's reasons, one line each
        for asked, code, says in (("khget -n 4", 3, "domain 4"), ("khget -x -n 3", 3, "domain 0"),
                                  ("khget -p 1", 3, "new private domains"),
                                  ("khget -n 3 2", 1, "budget of 2")):
            status, out, err = run(c, asked)
            assert status == code and out == "" and says in err, (asked, err)
            assert err.startswith("kh: ") and err.count("\n") == 1, err
        # it releases only what it made (alice's own allocation 1 looks like none)
        status, _, err = run(c, "release 1")
        assert status == 4 and "has no active allocation 1" in err, err
        nodes = " ".join(str(r.number) for r in svc.store.nodes_of(alloc))
        assert run(c, f"release {alloc}") == (0, f"released {nodes}\n", "")
    finally:
        c.close()


def test_the_credential_logs_in_and_no_one_else(svc, world, srv):
    c = connect(srv.port, "api+alice", "apw")
    try:
        status, out, err = run(c, "khget -n 4 1")
        assert status == 0 and out.startswith("con"), err
    finally:
        c.close()
    tok = make_token(world, allocate_on=[3])["token"]
    for user, password in (("api+alice", "bpw"), ("api+bob", "apw"), ("api+bob", tok),
                           ("api+carol", "cpw"), ("api+Alice", "apw"), ("api+", "apw"),
                           ("api", tok), ("api+alice+x", "apw"), ("con1", tok)):
        assert refused(srv.port, user, password), (user, password)


def test_an_aoe_address_over_the_channel(svc, world, srv):
    tok = make_token(world, allocate_on=[3])["token"]
    c = connect(srv.port, "api+alice", tok)
    try:
        status, out, err = run(c, "khget -n 3 2")
        assert status == 0, err
        nodes = [n.number for n in textobj.parse(out).nodes]
        assert run(c, f"aoe-address -a 0,2 {nodes[0]} 3") == (0, "e1.1\n", "")
        assert run(c, f"aoe-address -s 1 {nodes[1]} 3") == (0, "e1.0\n", "")
        status, _, err = run(c, f"aoe-address {nodes[0]} 4")
        assert status == 1 and "is not in domain 4" in err, err
        status, _, err = run(c, "aoe-address 1 3")  # alice's own node, not the token's
        assert status == 4 and "has no allocated node 1" in err, err
    finally:
        c.close()


@pytest.mark.parametrize(("command", "says"), [
    ("", "takes one of these commands"), ("ls /", "unknown API command 'ls'"),
    ("khget -q", "option -q not recognized"), ("khget -p x", "bad -p 'x'"),
    ("khget -n 3;4", "bad -n"), ("khget 1 2", "too many arguments"),
    ("khget 99999999", "between 1 and"), ("aoe-address 3", "takes NODE and NETID"),
    ("release", "release takes ALLOC"), ("khget " + "1" * MAX_COMMAND, "too long")])
def test_malformed_commands_get_one_line(svc, world, srv, command, says):
    c = connect(srv.port, "api+alice", "apw")
    try:
        status, out, err = run(c, command)
    finally:
        c.close()
    assert status == 2 and out == "" and says in err and err.count("\n") == 1, err
    assert len(svc.store.allocations()) == 3  # nothing was allocated


def test_a_shell_request_is_answered_with_the_usage(svc, world, srv):
    c = connect(srv.port, "api+alice", "apw")
    try:
        ch = c.get_transport().open_session()  # type: ignore[union-attr]
        ch.invoke_shell()
        wait_until(ch.exit_status_ready)
        assert ch.recv_exit_status() == 2 and b"khget [-p N]" in ch.recv_stderr(4096)
    finally:
        c.close()


def test_a_revoked_token_ends_its_api_login(svc, world, srv):
    tok = make_token(world, allocate_on=[3])
    c = connect(srv.port, "api+alice", tok["token"])
    by_cred = connect(srv.port, "api+alice", "apw")
    try:
        assert run(c, "khget -n 3 1")[0] == 0
        assert call(world, f"/v1/tokens/{tok['id']}/remove", user="alice",
                    credential="apw")[0] == 200
        wait_until(lambda: not c.get_transport().is_active())  # type: ignore[union-attr]
        assert refused(srv.port, "api+alice", tok["token"])
        assert run(by_cred, "khget -n 3 1")[0] == 0  # the credential's login stays
    finally:
        c.close()
        by_cred.close()


def test_a_removed_principal_ends_its_api_login(svc, world, srv):
    c = connect(srv.port, "api+bob", "bpw")
    try:
        svc.remove_principal("bob")
        wait_until(lambda: not c.get_transport().is_active())  # type: ignore[union-attr]
    finally:
        c.close()


def test_refused_logins_spend_the_apis_budget_for_that_source(svc, world, srv):
    """ssh and HTTP from one source share the limiter: 10 refused api+alice logins (one
    connection tries 6), then the API answers 429 to that source (the loopback user)."""
    for _ in range(10):
        assert refused(srv.port, "api+alice", "nope")
    status, text = call(world, "/v1/allocations", user="alice", credential="apw")
    assert status == 429 and "too many refused credentials" in text, text
    assert refused(srv.port, "api+alice", "apw")  # the right one too, for now


def test_nodes_listener_takes_no_secret(svc, tmp_path):
    """khd's listener on the public domain (HttpServer's ``public``) answers GETs and refuses
    every POST (each carries a credential or token) with one line naming the channel; the
    loopback listener beside it is unchanged."""
    (tmp_path / "uImage").write_bytes(b"kernel")
    socks = [httpd.bind_tcp("127.0.0.1", 0), httpd.bind_tcp("127.0.0.1", 0)]
    server = httpd.HttpServer(api.App(svc), socks, public=socks[1:])
    server.start()
    try:
        loop, public = (s.getsockname()[:2] for s in socks)
        body = {"user": "alice", "credential": "apw"}
        status, text = call(public, "/v1/allocations", **body)
        assert status == 403 and text.count("\n") == 1, text
        assert "takes no credential or token" in text and \
            f"ssh api+USER@10.1.255.254 -p {svc.cfg.ssh_port}" in text, text
        assert call(public, "/v1/tokens", token=tokens.new_secret())[0] == 403
        assert svc.store.principal("alice") is None  # nothing was done
        assert get(public, "/v1/images")[0] == 200 and get(public, "/v1/status")[0] == 200
        status, text = call(loop, "/v1/allocations", **body)
        assert status == 201, text
    finally:
        server.shutdown()
        server.server_close()
        for s in socks:
            s.close()


def test_the_command_is_bounded_before_anything_is_asked(svc, world, srv):
    c = connect(srv.port, "api+alice", "apw")
    try:
        status, _, err = run(c, "khget " + "-i " * 5000)
        assert status == 2 and "too long" in err
    finally:
        c.close()
    with socket.create_connection(("127.0.0.1", srv.port)) as s:  # still serving
        assert s.recv(8).startswith(b"SSH-")
