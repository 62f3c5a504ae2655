"""A principal is a name and the allocations made under it (HARDEN, item 4): after `kh principal
rm bob` and a new bob, the operator's bill and usage for bob are the new bob's alone, the
removed bob's are asked for with `removed` (labelled "bob (removed)"), and everyone's usage
keeps the two apart. They were summed under the name."""

from __future__ import annotations

import json

from kh.allocation import Request
from kh.metering import store as mstore
from kh.metering.store import Usage
from tests.unit import test_bill_api as base
from tests.unit.fake_khd import get

H, at, answer = base.H, base.at, base.answer
khd = base.khd  # the same fixture, this module's own: alice 10 node-hours, bob 2 (November)


def new_bob(svc) -> None:
    """bob removed; another bob registered, with 3 node-hours on Nov 20."""
    svc.remove_principal("bob")
    b = svc.khget(Request(user="bob", count=1), "another-bob")
    mstore.write(svc.store, [Usage("bob", at(20, 5), b.nodes[0].number, b.id, 3 * H, 0, 0, 0)],
                 [], [], [], [])


def bill(sock, query: str) -> dict:
    status, data = answer(get(sock, f"/v1/bill?{query}&period=2026-11&format=json"))
    assert status == 200, data
    return data


def test_the_operator_bills_each_bob_apart(khd):
    svc, sock, _ = khd
    new_bob(svc)
    data = bill(sock, "principal=bob")  # the bob of now: 3 x 0.01
    assert data["principal"] == "bob" and data["total"] == "0.03", data
    assert [x["amount"] for x in data["lines"]] == ["10800"], data
    data = bill(sock, "principal=bob&removed=true")  # the removed one: 2 x 0.01
    assert data["principal"] == "bob (removed)" and data["total"] == "0.02", data
    assert bill(sock, "principal=alice")["total"] == "0.12"


def test_the_operator_s_usage_keeps_each_bob_apart(khd):
    svc, sock, _ = khd
    new_bob(svc)
    span = "since=2026-11-01T00:00Z&until=2026-12-01T00:00Z"

    def usage(query: str) -> dict:
        status, data = answer(get(sock, f"/v1/usage?{span}&{query}format=json"))
        assert status == 200, data
        return data
    rows = usage("principal=bob&")["rows"]
    assert [(r["principal"], r["node_seconds"]) for r in rows] == [("bob", "10800")], rows
    rows = usage("principal=bob&removed=1&")["rows"]
    assert [(r["principal"], r["node_seconds"]) for r in rows] == \
        [("bob (removed)", "7200")], rows
    rows = usage("")["rows"]
    assert sorted((r["principal"], r["node_seconds"]) for r in rows) == \
        [("alice", "36000"), ("bob", "10800"), ("bob (removed)", "7200")], rows


def test_a_removed_principal_alone_is_billed_as_removed(khd):
    """No bob now: its usage is the removed one's, asked for without `removed`."""
    svc, sock, _ = khd
    svc.remove_principal("bob")
    data = bill(sock, "principal=bob")
    assert data["principal"] == "bob (removed)" and data["total"] == "0.02", data
    status, data = answer(get(sock, "/v1/bill?principal=bob&removed=maybe&format=json"))
    assert status == 400 and "removed" in json.dumps(data), data


def test_kh_bill_and_kh_usage_ask_for_the_removed(monkeypatch):
    from click.testing import CliRunner

    from kh.cli import bill as bill_cli
    from kh.cli import usage as usage_cli
    from kh.cli.main import main
    asked: list[tuple[str, str, object]] = []

    class Client:
        def call(self, method, path, body=None, *, as_json=False):  # type: ignore[no-untyped-def]
            asked.append((method, path, body))
            return "{}" if as_json else "ok\n"
    monkeypatch.setattr(bill_cli, "client", Client)
    monkeypatch.setattr(usage_cli, "client", Client)
    monkeypatch.setenv("KH_CREDENTIAL", "s3cret")  # not sent: --removed is the operator's
    r = CliRunner().invoke(main, ["bill", "bob", "--removed", "--period", "2026-11"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["usage", "bob", "--removed"])
    assert r.exit_code == 0, r.output
    assert asked == [("GET", "/v1/bill?principal=bob&period=2026-11&removed=true", None),
                     ("GET", "/v1/usage?by=principal&principal=bob&removed=true", None)]
    r = CliRunner().invoke(main, ["usage", "--removed"])
    assert r.exit_code == 2 and "--removed is the operator's, for a USER" in r.output
