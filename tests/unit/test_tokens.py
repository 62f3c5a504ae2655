"""Tokens (kh.service.tokens, issue 11): a token allocates only on its domains and within its
node budget, releases and drives only the allocations it made, does nothing else (403), and
once expired or revoked is refused exactly as a wrong credential is, counted by the same
limiter. The real Service and API (tests/unit/fake_khd), over TCP where callers are
principals."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from kh.service import tokens
from kh.service.access import Grant, ServiceAccess
from tests.unit.fake_khd import (
    api_fixture,
    post,
    service_fixture,
    text_of,
)

svc = service_fixture(nodes=8)
khd = api_fixture(tcp=True)


def call(addr, path: str, **body: object) -> tuple[int, str]:
    status, resp = post(addr, path, json.dumps(body).encode())
    return status, text_of(resp)


def as_json(addr, path: str, **body: object) -> tuple[int, object]:
    status, text = call(addr, path + "?format=json", **body)
    return status, json.loads(text)


def alice(addr, path: str, **body: object) -> tuple[int, str]:
    return call(addr, path, **{"user": "alice", "credential": "apw", **body})


@pytest.fixture
def world(svc, khd):
    """alice holds private domains 3 and 4 (one node in each) and bob domain 5."""
    for user, cred in (("alice", "apw"), ("alice", "apw"), ("bob", "bpw")):
        status, text = call(khd, "/v1/allocations", user=user, credential=cred, p=1)
        assert status == 201, text
    assert svc.store.private_owners() == {3: "alice", 4: "alice", 5: "bob"}
    return khd


def make_token(addr, **body: object) -> dict:
    status, data = as_json(addr, "/v1/tokens", user="alice", credential="apw", **body)
    assert status == 201, data
    assert isinstance(data, dict) and tokens.looks_like(data["token"])
    return data


def test_a_token_allocates_only_on_its_domains(world):
    tok = make_token(world, allocate_on=[1, 3])["token"]
    status, text = call(world, "/v1/allocations", user="alice", token=tok, n=[3], i=True)
    assert status == 201 and "network 3 : eth1" in text, text
    for asked, refused in (({"n": [4]}, "domain 4"), ({"x": True}, "domain 0"),
                           ({"n": [3, 4]}, "domain 4"), ({"p": 1}, "new private domains")):
        status, text = call(world, "/v1/allocations", user="alice", token=tok, **asked)
        assert status == 403 and refused in text and text.count("\n") == 1, (asked, text)
    # another principal's domain, named in a token, is refused when the token is made
    status, text = alice(world, "/v1/tokens", allocate_on=[5])
    assert status == 404 and "no private domain 5" in text


def test_a_token_holds_at_most_its_budget(svc, world):
    tok = make_token(world, allocate_on=[3], max_nodes=2)["token"]
    status, first = as_json(world, "/v1/allocations", user="alice", token=tok, n=[3])
    assert status == 201
    status, text = call(world, "/v1/allocations", user="alice", token=tok, n=[3], count=2)
    assert status == 409 and "budget of 2" in text and "holds 1 node" in text, text
    # the principal's own allocations do not count against the token's budget
    assert alice(world, "/v1/allocations", n=[3], count=2)[0] == 201
    status, text = call(world, f"/v1/allocations/{first['id']}/release", user="alice",
                        token=tok)
    assert status == 200, text
    assert call(world, "/v1/allocations", user="alice", token=tok, n=[3], count=2)[0] == 201


def test_a_token_releases_only_what_it_made(svc, world):
    tok = make_token(world, allocate_on=[3])["token"]
    other = make_token(world, allocate_on=[3])["token"]
    status, mine = as_json(world, "/v1/allocations", user="alice", token=tok, n=[3])
    assert status == 201
    # alice's allocation 1 (by credential), one of another token's and none at all: alike
    status, theirs = as_json(world, "/v1/allocations", user="alice", token=other, n=[3])
    answers = {a: call(world, f"/v1/allocations/{a}/release", user="alice", token=tok)
               for a in (1, theirs["id"], 999)}
    for a, (status, text) in answers.items():
        assert status == 404 and text == f"kh: principal alice has no active allocation {a}\n"
    assert svc.store.allocation(1).released is None
    assert svc.store.allocation(theirs["id"]).released is None
    status, text = call(world, f"/v1/allocations/{mine['id']}/release", user="alice", token=tok)
    assert status == 200 and svc.store.allocation(mine["id"]).released is not None


@pytest.mark.parametrize("path", ["/v1/keys", "/v1/keys/list", "/v1/keys/1/remove",
                                  "/v1/tokens", "/v1/tokens/list", "/v1/tokens/1/remove",
                                  "/v1/domains/3/remove", "/v1/nodes/1/reset", "/v1/ps"])
def test_a_token_does_nothing_else(svc, world, path):
    tok = make_token(world, allocate_on=[3])["token"]
    status, text = call(world, path, user="alice", token=tok, key="ssh-ed25519 AAAA x")
    assert status == 403 and text.startswith("kh: a token may not do") and \
        text.count("\n") == 1, text
    assert svc.store.private_owners()[3] == "alice" and len(svc.store.tokens("alice")) == 1


def test_expired_revoked_and_wrong_tokens_are_refused_as_a_wrong_credential(svc, world):
    made = make_token(world, allocate_on=[3])
    tok, tid = made["token"], made["id"]
    expired = make_token(world, allocate_on=[3], expires_in=3600)
    with svc.store.tx() as db:  # its hour has passed
        db.execute("UPDATE tokens SET expires=? WHERE id=?", (time.time() - 1,
                                                              expired["id"]))
    wrong_cred = alice(world, "/v1/allocations", credential="nope", n=[3])
    assert wrong_cred == (403, "kh: credential refused for principal alice (check -c FILE "
                               "or KH_CREDENTIAL; a new principal registers with khget)\n")
    status, text = alice(world, f"/v1/tokens/{tid}/remove")
    assert status == 200, text
    for secret in (tok, expired["token"], tokens.new_secret(), "not-a-token"):
        got = call(world, "/v1/allocations", user="alice", token=secret, n=[3])
        assert got == wrong_cred, secret
    # bob cannot use alice's token, whoever he says he is
    live = make_token(world, allocate_on=[3])["token"]
    assert call(world, "/v1/allocations", user="bob", token=live)[0] == 403
    listed = as_json(world, "/v1/tokens/list", user="alice", credential="apw")[1]
    assert [t["state"] for t in listed] == ["revoked", "expired", "active"]
    assert not any("token" in t for t in listed)  # the secret is shown once only


def test_refused_tokens_are_rate_limited_with_refused_credentials(svc, world):
    """Refused tokens and refused credentials spend one budget: PER_SOURCE's burst of 10,
    then 429 before any look."""
    for i in range(10):
        got = (alice(world, "/v1/allocations", credential="nope") if i % 2 else
               call(world, "/v1/allocations", user="alice", token=tokens.new_secret()))
        assert got[0] == 403
    status, text = call(world, "/v1/allocations", user="alice", token=tokens.new_secret())
    assert status == 429 and "too many refused credentials" in text


def test_the_state_keeps_only_a_hash(svc, world):
    secret = make_token(world, allocate_on=[3])["token"]
    raw = svc.store.path.read_bytes() + b"".join(
        p.read_bytes() for p in svc.store.path.parent.glob("*-wal"))
    assert secret.encode() not in raw
    assert tokens.digest(secret) in raw


# -- the control channel -------------------------------------------------------------------
def test_a_token_drives_only_the_channels_of_what_it_made(svc, world):
    tok = make_token(world, allocate_on=[3])
    status, mine = as_json(world, "/v1/allocations", user="alice", token=tok["token"], n=[3])
    assert status == 201
    acc = ServiceAccess(svc)
    g = acc.login_password(mine["id"], None, tok["token"], "10.1.0.7")
    assert g == Grant("alice", mine["id"], None, None, tok["id"])
    assert acc.standing([g])[g].reason is None
    assert acc.login_password(1, None, tok["token"], "10.1.0.7") is None  # alice's own
    assert acc.login_password(3, None, tok["token"], "10.1.0.7") is None  # bob's
    # the credential still opens the token's allocation too
    assert acc.login_password(mine["id"], None, "apw", "10.1.0.7") is not None
    assert alice(world, f"/v1/tokens/{tok['id']}/remove")[0] == 200
    assert acc.standing([g])[g].reason == f"token {tok['id']} was revoked"
    assert acc.login_password(mine["id"], None, tok["token"], "10.1.0.7") is None


def test_an_expired_token_loses_its_channels(svc, world):
    tok = make_token(world, allocate_on=[3], expires_in=3600)
    status, mine = as_json(world, "/v1/allocations", user="alice", token=tok["token"], n=[3])
    assert status == 201
    acc = ServiceAccess(svc)
    g = acc.login_password(mine["id"], None, tok["token"], "10.1.0.7")
    assert g is not None
    with svc.store.tx() as db:
        db.execute("UPDATE tokens SET expires=? WHERE id=?", (time.time() - 1, tok["id"]))
    assert acc.standing([g])[g].reason == f"token {tok['id']} expired"


def test_a_revocation_ends_the_sessions_the_token_opened(svc, world):
    """Through the real ssh server (kh.cc.sshd) and its watcher."""
    from tests.unit.sshd_fakes import FakeConsole, FakeWriter, connect, serve, wait_until
    from tests.unit.test_sshd import ended, new_channel_refused, open_raw

    tok = make_token(world, allocate_on=[3])
    status, mine = as_json(world, "/v1/allocations", user="alice", token=tok["token"], n=[3])
    assert status == 201
    (node,) = [n["node"] for n in mine["nodes"]]
    svc.nodes.running[node] = SimpleNamespace(console=FakeConsole(), writer=FakeWriter())
    with serve(ServiceAccess(svc)) as srv:  # type: ignore[arg-type]
        by_token = connect(srv.port, f"con{mine['id']}", tok["token"])
        by_cred = connect(srv.port, f"con{mine['id']}", "apw")
        try:
            ch, ch_cred = open_raw(by_token), open_raw(by_cred)
            wait_until(lambda: len(svc.nodes.running[node].console.subs) == 2)
            assert alice(world, f"/v1/tokens/{tok['id']}/remove")[0] == 200
            status, err = ended(ch)
            assert status == 1 and \
                err == f"kh: token {tok['id']} was revoked; this session ends\n".encode()
            assert new_channel_refused(by_token)
            assert not ch_cred.closed and not new_channel_refused(by_cred)
        finally:
            by_token.close()
            by_cred.close()


def test_a_version_4_state_gains_tokens(tmp_path):
    """Schema 5: an older state keeps its allocations (made with no token) and takes tokens;
    a principal's removal takes its tokens with it."""
    import sqlite3

    from kh.store import MIGRATIONS, SCHEMA, Store

    db = tmp_path / "kh.db"
    con = sqlite3.connect(db)
    for statement in (SCHEMA + MIGRATIONS[2] + MIGRATIONS[3] + MIGRATIONS[4]).split(";"):
        if statement.strip():
            con.execute(statement)
    con.execute("INSERT INTO meta VALUES ('schema', '4')")
    con.execute("INSERT INTO meta VALUES ('next_uid', '5')")
    con.execute("INSERT INTO principals (name, salt, hash, created) VALUES "
                "('alice', x'00', x'00', 1.0)")
    con.execute("INSERT INTO allocations (principal, created) VALUES ('alice', 1.0)")
    con.commit()
    con.close()
    st = Store(db)
    assert st.allocation(1).token is None  # type: ignore[union-attr]
    tid = st.add_token("alice", tokens.digest("kht_x"), (3, 1), 2, None)
    assert st.token_by_hash(tokens.digest("kht_x")).netids == (1, 3)  # type: ignore[union-attr]
    a = st.add_allocation("alice", (), tid)
    assert st.allocation(a).token == tid  # type: ignore[union-attr]
    st.forget_principal("alice")
    assert st.tokens("alice") == [] and st.token(tid) is None
    st.close()


def test_a_token_gets_aoe_addresses_for_its_own_nodes_only(svc, world):
    """khgetdisk, given only a token, asks khd for each disk node's AoE address."""
    tok = make_token(world, allocate_on=[3])["token"]
    status, mine = as_json(world, "/v1/allocations", user="alice", token=tok, n=[3])
    assert status == 201
    (node,) = [n["node"] for n in mine["nodes"]]
    status, text = call(world, "/v1/aoe/addresses", user="alice", token=tok, node=node, netid=3)
    assert status == 201 and text == "e1.0\n", text
    # alice's node made with her credential (allocation 1) looks, to the token, like no node
    (other,) = [r.number for r in svc.store.nodes_of(1)]
    status, text = call(world, "/v1/aoe/addresses", user="alice", token=tok, node=other,
                        netid=3)
    assert (status, text) == (404, f"kh: principal alice has no allocated node {other}\n")
    # and the list of addresses stays the credential's
    assert call(world, "/v1/aoe/addresses/list", user="alice", token=tok)[0] == 403


def test_a_principal_holds_a_bounded_number_of_tokens(svc, world, monkeypatch):
    """At most MAX_ACTIVE active tokens (409 past them), and only the newest KEEP_SPENT
    revoked or expired ones are kept, unless a live allocation still names one."""
    monkeypatch.setattr(tokens, "MAX_ACTIVE", 3)
    monkeypatch.setattr(tokens, "KEEP_SPENT", 2)
    made = [make_token(world, allocate_on=[3]) for _ in range(3)]
    status, text = alice(world, "/v1/tokens", allocate_on=[3])
    assert status == 409 and "3 active tokens" in text, text
    status, held = as_json(world, "/v1/allocations", user="alice", token=made[0]["token"],
                           n=[3])
    assert status == 201
    for t in made:
        assert alice(world, f"/v1/tokens/{t['id']}/remove")[0] == 200
    for _ in range(3):  # 2 spent ones kept, and made[0]: its allocation is live
        make_token(world, allocate_on=[3])
    assert len(svc.store.tokens("alice")) == 6
    # releasing that allocation lets it go at the next prune
    assert alice(world, f"/v1/allocations/{held['id']}/release")[0] == 200
    assert alice(world, f"/v1/tokens/{svc.store.tokens('alice')[-1].id}/remove")[0] == 200
    make_token(world, allocate_on=[3])
    spent = [t for t in svc.store.tokens("alice") if t.state() != "active"]
    assert len(spent) == 2 and made[0]["id"] not in [t.id for t in spent]
    assert svc.store.allocation(held["id"]).token is None
