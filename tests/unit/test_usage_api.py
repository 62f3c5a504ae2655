"""`kh usage`'s API (kh.metering.routes) on a real Service with fake nodes and fake counters:
a principal sees only its own usage, everyone's is the operator's, a token sees the
allocations it made, and bad input is one clear 4xx that changes nothing. The service's hooks
(khget, release) take the samples."""

from __future__ import annotations

import json
import time
import urllib.parse
from datetime import UTC, datetime, timedelta

import pytest

from kh.errors import UsageError
from kh.metering.report import time_range
from kh.service import tokens
from tests.unit.fake_khd import api_fixture, get, make_service, post, serving_tcp, text_of
from tests.unit.test_metering import FakeSource

# the samples are taken in the future (``used``): every report asks until a day from now
UNTIL = (datetime.now(UTC) + timedelta(days=1)).isoformat()
UNTIL_Q = urllib.parse.quote(UNTIL)


@pytest.fixture
def svc(tmp_path, monkeypatch):
    s = make_service(tmp_path, monkeypatch)
    src = FakeSource()
    for n in range(1, 5):
        src.cpu_of[n] = (f"g{n}", 0)
    s.meter.source = src
    yield s
    s.store.close()


khd = api_fixture()


def khget(sock, user: str, **kw: object) -> dict:
    status, resp = post(sock, "/v1/allocations?format=json", json.dumps(
        dict(user=user, credential=user + "-cred", **kw)).encode())
    assert status == 201, text_of(resp)
    return json.loads(text_of(resp))


def used(svc, seconds: float, cpu_us: int) -> None:
    """Every node's QEMU used ``cpu_us`` more, and a sample is taken ``seconds`` later (in the
    future: the tests ask until UNTIL)."""
    src = svc.meter.source
    for n, (gen, us) in list(src.cpu_of.items()):
        src.cpu_of[n] = (gen, us + cpu_us)
    svc.meter.take(now=svc.meter.clock() + seconds)


def own(sock, user: str, secret: str | None = None, key: str = "credential", **kw: object
        ) -> tuple[int, str]:
    status, resp = post(sock, "/v1/usage?format=json", json.dumps(
        {"user": user, key: secret or user + "-cred", "until": UNTIL, **kw}).encode())
    return status, text_of(resp)


def meter_rows(svc) -> tuple[int, ...]:
    return tuple(svc.store._rows(f"SELECT COUNT(*) FROM {t}")[0][0]
                 for t in ("meter_usage", "meter_net", "meter_gaps", "meter_last"))


def test_a_principal_sees_only_its_own_usage(svc, khd):
    khget(khd, "alice", count=2)
    khget(khd, "bob")
    used(svc, 10, 3_000_000)
    status, text = own(khd, "bob", by="node")
    assert status == 200, text
    data = json.loads(text)
    assert {r["principal"] for r in data["rows"]} == {"bob"}
    assert len(data["rows"]) == 1 and "alice" not in text
    assert data["rows"][0]["cpu_seconds"] == "3"
    status, text = own(khd, "alice")
    (row,) = json.loads(text)["rows"]
    assert (row["principal"], row["cpu_seconds"]) == ("alice", "6")
    # a wrong credential, or an unknown principal, gets the same 403
    wrong = own(khd, "alice", "bob-cred")
    nobody = own(khd, "carol", "carol-cred")
    assert wrong[0] == nobody[0] == 403
    assert json.loads(wrong[1])["error"].replace("alice", "X") == \
        json.loads(nobody[1])["error"].replace("carol", "X")


def test_everyones_usage_is_the_operators(svc, khd):
    khget(khd, "alice")
    khget(khd, "bob")
    used(svc, 10, 1_000_000)
    status, resp = get(khd, f"/v1/usage?until={UNTIL_Q}&format=json")
    assert status == 200, text_of(resp)
    assert {r["principal"] for r in json.loads(text_of(resp))["rows"]} == {"alice", "bob"}
    status, resp = get(khd, f"/v1/usage?principal=bob&by=allocation&until={UNTIL_Q}&format=json")
    assert [r["principal"] for r in json.loads(text_of(resp))["rows"]] == ["bob"]
    with serving_tcp(svc) as addr:  # any other caller
        status, resp = get(addr, "/v1/usage?principal=alice")
        assert status == 403 and "operator" in text_of(resp), text_of(resp)


def test_a_release_ends_the_charge(svc, khd):
    a = khget(khd, "alice")
    used(svc, 10, 2_000_000)
    status, resp = post(khd, f"/v1/allocations/{a['id']}/release", json.dumps(
        {"user": "alice", "credential": "alice-cred"}).encode())
    assert status == 200, text_of(resp)
    before = json.loads(own(khd, "alice")[1])["rows"][0]
    used(svc, 100, 50_000_000)  # its node is no one's now
    assert json.loads(own(khd, "alice")[1])["rows"][0] == before


def test_a_token_sees_the_allocations_it_made(svc, khd):
    khget(khd, "alice")  # with the credential
    _, secret = tokens.add(svc, "alice", "alice-cred", (), None, None)
    status, resp = post(khd, "/v1/allocations?format=json", json.dumps(
        {"user": "alice", "token": secret}).encode())
    assert status == 201, text_of(resp)
    mine = json.loads(text_of(resp))["id"]
    used(svc, 10, 1_000_000)
    status, text = own(khd, "alice", secret, key="token", by="allocation")
    assert status == 200, text
    assert [r["allocation"] for r in json.loads(text)["rows"]] == [mine]
    assert len(json.loads(own(khd, "alice", by="allocation")[1])["rows"]) == 2


@pytest.mark.parametrize(("query", "words"), [
    ("since=yesterday", "since 'yesterday' is not a time"),
    ("since=2026-12-01&until=2026-11-01", "reversed or empty"),
    ("since=now&until=now", "reversed or empty"),
    ("by=week", "by must be one of"),
    ("principal=nobody", "no principal nobody"),
    ("principal=Bad%20Name", "principal"),
    ("since=-5x", "not a time"),
    ("colour=red", "unknown parameter 'colour'"),
])
def test_bad_input_is_one_clear_error_and_changes_nothing(svc, khd, query, words):
    khget(khd, "alice")
    used(svc, 10, 1_000_000)
    before = meter_rows(svc)
    status, resp = get(khd, f"/v1/usage?{query}")
    text = text_of(resp)
    assert status in (400, 404), text
    assert text.startswith("kh: ") and text.count("\n") == 1 and words in text, text
    assert meter_rows(svc) == before


def test_a_principal_gets_the_same_checks(svc, khd):
    khget(khd, "alice")
    status, text = own(khd, "alice", since="2026-12-02", until="2026-12-01")
    assert status == 400 and "reversed" in text
    status, text = own(khd, "alice", principal="bob")
    assert status == 400 and "unknown parameter 'principal'" in text


def test_time_forms():
    from datetime import UTC, datetime, timedelta
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert time_range(None, None, now) == (now - timedelta(days=30), now)
    assert time_range("-2h", "now", now) == (now - timedelta(hours=2), now)
    assert time_range("2026-11-30", "2026-12-01T08:00+01:00", now) == (
        datetime(2026, 11, 30, tzinfo=UTC), datetime(2026, 12, 1, 7, tzinfo=UTC))


@pytest.mark.parametrize("since, until", [
    ("0001-01-01T00:00+14:00", None), (None, "9999-12-31T23:59-14:00"), ("-999999d", None),
    (None, "0001-01-05"), ("1969-12-31T23:59Z", None), (None, "9999-06-01")])
def test_a_time_at_the_calendars_ends_is_one_error_not_an_overflow(since, until):
    # each was 'internal error: OverflowError' (khd's 500, to any principal)
    from datetime import UTC, datetime
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    with pytest.raises(UsageError, match=r"(since|until) .* is not in the years 1970 to 9998"):
        time_range(since, until, now)


def test_the_channel_and_the_in_node_khget_ask_the_same(tmp_path):
    from kh.metering import routes
    from kh.service import chanapi
    from tests.unit.test_khget_sh import TOKEN, khget
    assert chanapi.parse("usage -s -2h -u now -b node") == (
        routes.usage_own, {"since": "-2h", "until": "now", "by": "node"}, ())
    r, db = khget(tmp_path, "-t", TOKEN, "-U", "-s", "-2h", "-b", "hour", "alice")
    assert db is not None and db["argv"][4:] == ["usage", "-s", "-2h", "-b", "hour"], r.stderr
    r, db = khget(tmp_path, "-t", TOKEN, "-U", "-s", "1 day", "alice")
    assert r.returncode == 2 and db is None and "bad -s" in r.stderr


def test_text_and_csv_show_the_exact_report(svc, khd):
    from kh.metering import report
    khget(khd, "alice", x=True)
    used(svc, 10, 1_500_000)
    data = json.loads(text_of(get(khd, f"/v1/usage?by=node&until={UNTIL_Q}&format=json")[1]))
    data["gaps"] = [{"principal": "alice", "allocation": 1, "node": 2, "what": "cpu: new "
                     "generation", "start": "2026-12-01T09:00:00+00:00",
                     "end": "2026-12-01T09:00:10+00:00"}]
    text = report.text(data)
    head, row = text.splitlines()[:2]
    assert head.split()[:4] == ["PRINCIPAL", "ALLOC", "NODE", "NODE-S"]
    assert row.split()[0] == "alice" and row.split()[4] == "1.50"
    assert "gap: node 2 (allocation 1, alice) 2026-12-01T09:00:00+00:00" in text
    lines = report.to_csv(data).splitlines()
    assert lines[0].startswith("principal,allocation,node,node_seconds,cpu_seconds,")
    assert lines[1].split(",")[4] == "1.5"


def test_the_cli_asks_as_the_operator_or_as_the_principal(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from kh.cli import usage as usage_cli
    from kh.cli.main import main
    from tests.unit.test_cli_principal import Recorder
    rec = Recorder('{"by": "principal", "rows": [], "gaps": []}')
    monkeypatch.setattr(usage_cli, "client", lambda: rec)
    monkeypatch.setenv("KH_CREDENTIAL", "from-env")

    def kh(*args: str):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(main, ["usage", *args])
    assert kh("--since", "-2h", "--by", "node").exit_code == 0  # everyone's, whatever the env
    assert kh("alice", "--csv").exit_code == 0  # alice herself, with $KH_CREDENTIAL
    monkeypatch.delenv("KH_CREDENTIAL")
    assert kh("bob", "--until", "now").exit_code == 0  # the operator asks for bob's
    assert rec.calls == [
        ("GET", "/v1/usage?since=-2h&by=node", None, False),
        ("POST", "/v1/usage", {"user": "alice", "credential": "from-env", "by": "principal"},
         True),
        ("GET", "/v1/usage?until=now&by=principal&principal=bob", None, False)]
    cred = tmp_path / "c"
    cred.write_text("x")
    r = kh("-c", str(cred))
    assert r.exit_code == 2 and "a credential goes with USER" in r.stderr
    assert kh("--json", "--csv").exit_code == 2


def test_by_domain_gives_each_domain_and_the_totals(svc, khd):
    khget(khd, "alice", x=True, p=1)
    (n,) = [r.number for r in svc.store.nodes() if r.alloc is not None]
    src = svc.meter.source
    src.tap_of[f"ku{n}s0"] = (70, 0, 0, 0, 0)
    src.tap_of[f"ku{n}s1"] = (71, 0, 0, 0, 0)
    used(svc, 1, 0)  # the taps' baseline
    src.tap_of[f"ku{n}s0"] = (70, 500, 40, 5, 1)  # the tap received 500 B: the node sent them
    src.tap_of[f"ku{n}s1"] = (71, 30, 0, 1, 0)
    used(svc, 10, 0)
    data = json.loads(text_of(get(khd, f"/v1/usage?by=domain&until={UNTIL_Q}&format=json")[1]))
    assert sorted((t["kind"], t["tx_bytes"], t["rx_bytes"]) for t in data["traffic"]) == [
        ("external", 500, 40), ("private", 30, 0)]
    (row,) = data["rows"]
    assert row["net"]["external"]["tx_bytes"] == 500 and row["net"]["private"]["tx_bytes"] == 30


def test_a_new_principal_of_a_removed_ones_name_sees_none_of_its_usage(svc, khd):
    khget(khd, "alice")
    used(svc, 0.001, 4_000_000)  # now: before the next alice is registered
    svc.remove_principal("alice")
    time.sleep(0.05)
    status, resp = post(khd, "/v1/allocations?format=json", json.dumps(
        {"user": "alice", "credential": "another-alice"}).encode())
    assert status == 201, text_of(resp)
    status, text = own(khd, "alice", "another-alice")
    assert status == 200 and json.loads(text)["rows"] == [], text
    # the operator still has the first alice's, to bill, asked for as removed
    status, resp = get(khd, f"/v1/usage?principal=alice&removed=1&until={UNTIL_Q}&format=json")
    assert json.loads(text_of(resp))["rows"][0]["cpu_seconds"] == "4"
