"""`kh top` (issue 14, item 4): rates from two reads of the host's counters, one screen from a
fake khd with --once, and who sees which nodes (`GET /v1/top` the operator's, `POST /v1/top` a
principal's own)."""

from __future__ import annotations

import copy
import json

import pytest
from click.testing import CliRunner

from kh.allocation import Request
from kh.cli import bill as bill_cli
from kh.cli.main import main
from kh.metering import top
from tests.unit.fake_khd import get, make_service, post, serving, serving_tcp, text_of


def node(n, t, cpu_us, nics=(), state="allocated", who="alice", alloc=7, gen="cg:100:5"):
    return {"node": n, "t": t, "state": state, "principal": who, "allocation": alloc,
            "mem_mib": 256, "resident_bytes": 90 * 2**20, "cpu_gen": gen, "cpu_us": cpu_us,
            "nics": [{"slot": s, "netid": netid, "kind": kind, "gen": g, "tx_bytes": tx,
                      "rx_bytes": rx} for s, netid, kind, g, tx, rx in nics]}


BEFORE = {"nodes": [
    node(1, 100.0, 5_000_000, [(0, 0, "external", 11, 1000, 500), (1, 3, "private", 12, 0, 0)]),
    node(2, 100.0, 9_000_000, [(0, 3, "private", 21, 10_000, 0)]),
    node(3, 100.0, None, state="free", who=None, alloc=None, gen=None)]}
AFTER = copy.deepcopy(BEFORE)
# node 1, 2 s later: 1.5 s of CPU -> 75 % of a core; ext: 2_401_000 - 1000 = 2_400_000 B / 2 s
# = 1.2 MB/s sent, (4500 - 500) / 2 = 2000 B/s = 2.0 kB/s received; domain 3: 300 B / 2 s sent
AFTER["nodes"][0] = node(1, 102.0, 6_500_000, [(0, 0, "external", 11, 2_401_000, 4500),
                                                (1, 3, "private", 12, 300, 0)])
# node 2: a new QEMU (generation) and a recreated tap: no rate, never a negative one
AFTER["nodes"][1] = node(2, 102.0, 100, [(0, 3, "private", 22, 5, 0)], gen="cg:200:9")


def test_rates_from_two_reads():
    rows = {r.node: r for r in top.rates(BEFORE, AFTER)}
    one = rows[1]
    assert one.cpu_pct == pytest.approx(75.0)
    assert [(t.label, t.tx, t.rx) for t in one.traffic] == [("ext", 1_200_000.0, 2000.0),
                                                            ("3", 150.0, 0.0)]
    two = rows[2]
    assert two.cpu_pct is None and [(t.tx, t.rx) for t in two.traffic] == [(None, None)]
    assert rows[3].cpu_pct is None and rows[3].traffic == ()
    # a counter that went down gives no rate; so does a node now in another allocation
    dropped = copy.deepcopy(AFTER)
    dropped["nodes"][0]["nics"][0]["tx_bytes"] = 10
    dropped["nodes"][0]["cpu_us"] = 4_000_000
    r = top.rates(BEFORE, dropped)[0]
    assert r.cpu_pct is None and (r.traffic[0].tx, r.traffic[0].rx) == (None, 2000.0)
    moved = copy.deepcopy(AFTER)
    moved["nodes"][0]["allocation"] = 8
    assert top.rates(BEFORE, moved)[0].cpu_pct is None


class Khd:
    """Answers each read with the next snapshot."""

    def __init__(self, *snapshots):
        self.snapshots = list(snapshots)
        self.calls: list[tuple] = []

    def call(self, method, path, body=None, *, as_json=False):  # type: ignore[no-untyped-def]
        self.calls.append((method, path, body, as_json))
        return json.dumps(self.snapshots.pop(0))


@pytest.fixture
def fake(monkeypatch):
    khd = Khd(BEFORE, AFTER)
    monkeypatch.setattr(bill_cli, "client", lambda: khd)
    monkeypatch.setattr(bill_cli.time, "sleep", lambda s: None)
    monkeypatch.delenv("KH_CREDENTIAL", raising=False)
    return khd


def test_kh_top_once_prints_one_screen(fake):
    r = CliRunner().invoke(main, ["top", "--once"])
    assert r.exit_code == 0
    assert r.output == (
        "NODE  STATE      PRINCIPAL  ALLOC  CPU%  MEM MiB  RSS MiB  DOMAIN TX/s RX/s\n"
        "   1  allocated  alice          7  75.0      256       90  ext: 1.2 MB 2.0 kB  "
        "3: 150 B 0 B\n"
        "   2  allocated  alice          7     -      256       90  3: ? ?\n"
        "   3  free       -              -     -      256       90  -\n")
    assert fake.calls == [("GET", "/v1/top", None, True)] * 2


def test_kh_top_once_json_and_a_principals_view(fake, tmp_path):
    cred = tmp_path / "c"
    cred.write_text("s3cret")
    r = CliRunner().invoke(main, ["top", "--once", "--json", "-u", "alice", "-c", str(cred)])
    assert r.exit_code == 0
    rows = json.loads(r.output)
    assert rows[0] == {"node": 1, "state": "allocated", "principal": "alice", "allocation": 7,
                       "cpu_percent": 75.0, "mem_mib": 256, "resident_bytes": 90 * 2**20,
                       "domains": [{"netid": 0, "kind": "external",
                                    "tx_bytes_per_s": 1_200_000.0, "rx_bytes_per_s": 2000.0},
                                   {"netid": 3, "kind": "private", "tx_bytes_per_s": 150.0,
                                    "rx_bytes_per_s": 0.0}]}
    assert fake.calls[0] == ("POST", "/v1/top", {"user": "alice", "credential": "s3cret"}, True)
    r = CliRunner().invoke(main, ["top", "--json"])
    assert r.exit_code == 2 and r.output == "kh: --json goes with --once (kh top --once --json)\n"


def test_kh_top_to_a_pipe_says_to_use_once(fake):
    # `kh top | head` (or > file) printed nothing, for ever: its screen is a terminal's
    r = CliRunner().invoke(main, ["top"])  # CliRunner's stdout is no terminal
    assert r.exit_code == 2 and r.output == (
        "kh: kh top refreshes a terminal, and stdout is none (kh top --once, or --once "
        "--json, for scripts)\n")
    assert fake.calls == []


def test_who_sees_which_nodes(tmp_path, monkeypatch):
    svc = make_service(tmp_path, monkeypatch, nodes=4)
    a = svc.khget(Request(user="alice", count=2), "alice-cred")
    svc.khget(Request(user="bob", count=1), "bob-cred")
    try:
        with serving(svc, tmp_path / "run" / "khd.sock") as sock, serving_tcp(svc) as tcp:
            status, raw = get(sock, "/v1/top?format=json")
            everyone = json.loads(text_of(raw))["nodes"]
            assert status == 200 and len(everyone) == 4
            assert sorted(n["principal"] or "-" for n in everyone) == ["-", "alice", "alice",
                                                                      "bob"]
            status, raw = post(tcp, "/v1/top?format=json",
                               b'{"user": "alice", "credential": "alice-cred"}')
            mine = json.loads(text_of(raw))["nodes"]
            assert status == 200 and sorted(n["node"] for n in mine) == \
                sorted(x.number for x in a.nodes)
            assert {n["principal"] for n in mine} == {"alice"}
            status, raw = post(tcp, "/v1/top?format=json",
                               b'{"user": "alice", "credential": "bob-cred"}')
            assert status == 403 and b"credential refused for principal alice" in raw
            status, raw = get(tcp, "/v1/top?format=json")
            assert status == 403 and b"needs a principal's credential" in raw
    finally:
        svc.store.close()
