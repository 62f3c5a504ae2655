"""`GET /v1/bill` and `POST /v1/bill` (issue 14, items 2 and 3): a principal sees only its own
bill, the operator anyone's; the price list is the service's or one sent with the request,
never a path; bad input is a 4xx naming it; a bill changes nothing. And what `kh bill` asks."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner

from kh.allocation import Request
from kh.cli import bill as bill_cli
from kh.cli.main import main
from kh.metering import store as mstore
from kh.metering.store import Usage
from kh.metering.usage import US
from tests.unit.fake_khd import get, make_service, post, serving, serving_tcp, text_of

H = 3600 * US  # an hour in us


def at(day: int, hour: int) -> int:
    """2026-11-DAY HOUR:00 UTC in us."""
    return int(datetime(2026, 11, day, hour, tzinfo=UTC).timestamp()) * US


@pytest.fixture
def khd(tmp_path, monkeypatch):
    svc = make_service(tmp_path, monkeypatch, nodes=4)
    a = svc.khget(Request(user="alice", count=1), "alice-cred")
    b = svc.khget(Request(user="bob", count=1), "bob-cred")
    # alice: 10 node-hours and 1 CPU-hour in November; bob: 2 node-hours, no CPU
    na, nb = a.nodes[0].number, b.nodes[0].number
    usage = [Usage("alice", at(3, 10), na, a.id, 10 * H, H, 0, 0),
             Usage("bob", at(4, 2), nb, b.id, 2 * H, 0, 0, 0)]
    mstore.write(svc.store, usage, [], [], [], [])
    # both registered before the November they used (a principal is billed from its
    # registration on)
    with svc.store.tx() as db:
        db.execute("UPDATE principals SET created = ?", (at(1, 0) / US,))
    with serving(svc, tmp_path / "run" / "khd.sock") as sock, serving_tcp(svc) as tcp:
        yield svc, sock, tcp
    svc.store.close()


def answer(status_body: tuple[int, bytes]) -> tuple[int, dict]:
    status, raw = status_body
    return status, json.loads(text_of(raw))


def as_principal(tcp, **body) -> tuple[int, dict]:
    return answer(post(tcp, "/v1/bill?format=json", json.dumps(body).encode()))


def meter_rows(svc) -> list:
    return [svc.store._rows(f"SELECT * FROM {t}") for t in ("meter_usage", "meter_net")]


def test_the_operator_sees_anyones_bill_and_others_only_their_own(khd):
    svc, sock, tcp = khd
    before = meter_rows(svc)
    # default list: a node-hour 0.01, a CPU-hour 0.02: alice 10 x 0.01 + 1 x 0.02 = 0.12
    status, data = answer(get(sock, "/v1/bill?principal=alice&period=2026-11&format=json"))
    assert status == 200 and data["total"] == "0.12" and data["currency"] == "EUR"
    assert data["principal"] == "alice" and data["prices"]["name"] == "kh default"
    assert data["prices"]["source"] == "kh's default price list"  # never a host path
    # bob: 2 x 0.01 = 0.02
    assert answer(get(sock, "/v1/bill?principal=bob&period=2026-11&format=json"))[1][
        "total"] == "0.02"
    # over TCP, GET is no one's: a principal asks with its credential
    status, data = answer(get(tcp, "/v1/bill?principal=alice&period=2026-11&format=json"))
    assert status == 403 and "needs the principal's credential" in data["error"]
    status, data = as_principal(tcp, user="alice", credential="alice-cred", period="2026-11")
    assert status == 200 and data["total"] == "0.12" and "bob" not in json.dumps(data)
    # bob's credential does not open alice's bill: the answer a wrong credential gets
    status, data = as_principal(tcp, user="alice", credential="bob-cred", period="2026-11")
    assert status == 403 and data["error"] == "credential refused for principal alice"
    status, data = as_principal(tcp, user="nobody", credential="x", period="2026-11")
    assert status == 403 and data["error"] == "credential refused for principal nobody"
    assert meter_rows(svc) == before  # rating read the usage only


WHAT_IF = ('currency = "USD"\nvalid_from = 2026-01-01\n[[price]]\nquantity = '
           '"node_seconds"\nper = 3600\nprice = 1.5\n')


def test_a_price_list_sent_with_the_request_rates_the_same_usage(khd):
    tcp = khd[2]
    what_if = WHAT_IF
    # 10 node-hours x 1.5 = 15.00; cpu_seconds is not priced by this list: free
    status, data = as_principal(tcp, user="alice", credential="alice-cred", period="2026-11",
                                prices=what_if)
    assert status == 200 and (data["total"], data["currency"]) == ("15.00", "USD")
    assert data["unpriced"] == [{"quantity": "cpu_seconds", "domain": None, "amount": "3600",
                                 "unit": "s"}]
    assert data["prices"]["source"] == "the price list sent"
    status, data = as_principal(tcp, user="alice", credential="alice-cred",
                                prices=what_if.replace("1.5", "-1.5"))
    assert status == 400 and data["error"] == \
        "the price list sent:6: price[0].price: must be at least 0, not -1.5"
    # a path is only text to khd, never opened
    status, data = as_principal(tcp, user="alice", credential="alice-cred",
                                prices="/etc/shadow")
    assert status == 400 and data["error"].startswith("the price list sent: not valid TOML")
    # nor can one nested too deeply for the TOML parser make khd fail (it was a 500)
    status, data = as_principal(tcp, user="alice", credential="alice-cred",
                                prices="a = " + "[" * 5000 + "]" * 5000)
    assert status == 400 and data["error"].startswith("the price list sent: nested too deeply")


def test_the_service_rates_with_the_operators_price_list(khd):
    svc, sock = khd[:2]
    own = svc.cfg.state_dir / "prices.toml"
    own.write_text('currency = "CHF"\nvalid_from = 2026-01-01\n[[price]]\n'
                   'quantity = "cpu_seconds"\nper = 3600\nprice = 3\n')
    # alice's 1 CPU-hour x 3 = 3.00
    data = answer(get(sock, "/v1/bill?principal=alice&period=2026-11&format=json"))[1]
    assert (data["total"], data["currency"]) == ("3.00", "CHF")
    own.write_text("currency = \n")
    status, data = answer(get(sock, "/v1/bill?principal=alice&period=2026-11&format=json"))
    assert status == 500 and data["error"].startswith(
        "the service's price list (<state dir>/prices.toml): not valid TOML")
    assert str(own) not in data["error"] and data["hint"].startswith("the operator fixes")


@pytest.mark.parametrize("path, status, error", [
    ("/v1/bill?principal=nobody", 404, "no principal nobody"),
    ("/v1/bill?principal=alice&period=2026-13", 400, "bad period '2026-13'"),
    ("/v1/bill?principal=alice&period=9999-12-31", 400, "bad period '9999-12-31'"),
    ("/v1/bill?principal=alice&period=2025-11", 400,
     "kh's default price list holds from 2026-01-01"),
    ("/v1/bill?principal=alice&since=2026-11-01", 400, "unknown parameter 'since'"),
    ("/v1/bill?period=2026-11", 400, "`principal` is required"),
    ("/v1/bill?principal=alice&principal=bob", 400, "given twice"),
])
def test_bad_requests_name_the_problem(khd, path, status, error):
    got, data = answer(get(khd[1], path + "&format=json"))
    assert got == status and error in data["error"]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def call(self, method, path, body=None, *, as_json=False):  # type: ignore[no-untyped-def]
        self.calls.append((method, path, body, as_json))
        return "a bill\n"


def test_what_kh_bill_asks(tmp_path, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(bill_cli, "client", lambda: rec)
    monkeypatch.delenv("KH_CREDENTIAL", raising=False)
    cred = tmp_path / "alice.cred"
    cred.write_text("s3cret\n")
    prices = tmp_path / "p.toml"
    prices.write_text('currency = "EUR"\nvalid_from = 2026-01-01\n[[price]]\n'
                      'quantity = "cpu_seconds"\nprice = 1\n')
    run = CliRunner()
    assert run.invoke(main, ["bill", "alice", "--period", "2026-11"]).output == "a bill\n"
    assert run.invoke(main, ["bill", "alice", "-c", str(cred), "--json"]).exit_code == 0
    assert run.invoke(main, ["bill", "alice", "--prices", str(prices)]).exit_code == 0
    assert rec.calls == [
        ("GET", "/v1/bill?principal=alice&period=2026-11", None, False),
        ("POST", "/v1/bill", {"user": "alice", "credential": "s3cret"}, True),
        ("POST", "/v1/bill", {"user": "alice", "prices": prices.read_text()}, False)]
    r = run.invoke(main, ["bill", "no body"])
    assert r.exit_code == 2 and r.output.startswith("kh: ")


def test_kh_bill_reads_the_price_file_once(monkeypatch):
    # `kh bill alice --prices <(...)`: a pipe, checked and then read again (empty), so khd
    # got "" and answered 'the price list sent: currency: must be a currency code'
    import os
    rec = Recorder()
    monkeypatch.setattr(bill_cli, "client", lambda: rec)
    monkeypatch.delenv("KH_CREDENTIAL", raising=False)
    text = 'currency = "EUR"\nvalid_from = 2026-01-01\n[[price]]\nquantity = "cpu_seconds"\n' \
        'price = 1\n'
    r, w = os.pipe()
    try:
        os.write(w, text.encode())
        os.close(w)
        got = CliRunner().invoke(main, ["bill", "alice", "--prices", f"/dev/fd/{r}"])
    finally:
        os.close(r)
    assert got.exit_code == 0, got.output
    assert rec.calls == [("POST", "/v1/bill", {"user": "alice", "prices": text}, False)]


def test_the_bill_as_text(khd):
    status, raw = get(khd[1], "/v1/bill?principal=alice&period=2026-11")
    lines = text_of(raw).splitlines()
    assert status == 200 and lines[0].startswith(
        "bill for alice, 2026-11 (2026-11-01 00:00 to 2026-12-01 00:00 UTC), prices: kh default")
    assert [x.split() for x in lines[1:]] == [
        ["ENTRY", "QUANTITY", "DOMAIN", "RATE", "AMOUNT", "PRICE", "CHARGE"],
        ["price[0]", "node_seconds", "-", "base", "36000", "s", "0.01/3600", "0.10"],
        ["price[1]", "cpu_seconds", "-", "base", "3600", "s", "0.02/3600", "0.02"],
        ["total", "EUR", "0.12"]]
    assert len({len(x) for x in lines[1:]}) == 1  # the figures line up on the right


def test_a_new_principal_of_a_removed_ones_name_is_not_billed_its_usage(khd):
    # the first bob's bill went to whoever registered bob next (usage did not; the bill did)
    svc, sock, tcp = khd
    svc.remove_principal("bob")
    svc.khget(Request(user="bob", count=1), "another-bob")
    status, data = as_principal(tcp, user="bob", credential="another-bob", period="2026-11")
    assert status == 200 and data["lines"] == [] and data["total"] == "0.00", data
    status, data = as_principal(tcp, user="bob", credential="another-bob", period="2026-11",
                                prices=WHAT_IF)  # a price list sent changes nothing to that
    assert status == 200 and data["lines"] == [], data
    # the operator still bills the first bob's November, asked for as removed
    data = answer(get(sock, "/v1/bill?principal=bob&removed=true&period=2026-11&format=json"))[1]
    assert data["total"] == "0.02" and data["lines"][0]["amount"] == "7200"
