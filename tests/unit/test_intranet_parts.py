"""The intranet run's own pieces, without guests: khwrite's records and the writer's rates,
the report (lines, JSON, text), the credential file the run makes, the refusal to touch a
principal that holds allocations, and the teardown of domains a step could not record."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest

from kh.errors import UsageError
from kh.intranet import __main__ as intranet
from kh.intranet import figure3, growth
from kh.intranet.report import Report, render
from kh.scenario import Principal, Scenario

SHA = "ab" * 32


def test_records_and_rates_per_phase():
    text = (f"f000001 {SHA} 131072 before 10.00 10.50\n"
            f"f000002 {SHA} 131072 before 10.50 11.00\n"
            f"garbage line\nf000003 {'cd' * 32} 262144 during 20.00 20.25\n"
            f"f00004 {SHA} 1 before 1 2\n")  # a bad name is not a record
    recs = growth.records(text)
    assert [r.name for r in recs] == ["f000001", "f000002", "f000003"]
    assert recs[2].sha256 == "cd" * 32 and recs[2].size == 262144 and recs[2].phase == "during"
    assert growth.rates(recs) == {"before": round(262144 / 1.0 / 1e6, 3),
                                  "during": round(262144 / 0.25 / 1e6, 3)}


def test_report_lines_json_and_text():
    out = io.StringIO()
    rep = Report(out=out)
    rep.command("khget -x corp1 1")
    assert rep.check("storage", True, "fine")
    assert not rep.check("ARP", False, "node 3 answered")
    rep.fault("disk node 6 (con4) died: QEMU was killed by SIGKILL")
    rep.fault("disk node 6 (con4) died: QEMU was killed by SIGKILL")  # once
    assert out.getvalue().splitlines() == [
        "$ khget -x corp1 1", "ok    storage: fine", "FAIL  ARP: node 3 answered",
        "FAULT disk node 6 (con4) died: QEMU was killed by SIGKILL"]
    rep.growth = {"disks": [2, 4], "size_mb": [167, 339], "verified": 10, "mismatched": [],
                  "writer": {"files": {"before": 3, "during": 5, "after": 2}, "errors": 0,
                             "mb_per_s": {"before": 0.5, "during": 0.4}}}
    j = rep.to_json([{"name": "bring-up", "seconds": 63.9, "ok": True}], None)
    assert j["ok"] is False and j["faults"] == ["disk node 6 (con4) died: QEMU was killed by "
                                                "SIGKILL"]
    json.dumps(j)
    text = render(j)
    assert text.startswith("intranet (Figure 3): FAILED in ")
    assert "checks: 1/2 held" in text and "FAIL ARP: node 3 answered" in text
    assert "volume 167 MB on 2 disks -> 339 MB on 4 disks" in text
    assert "3 before, 5 during, 2 after files, 0 errors; 0.50 MB/s before growth" in text


def test_the_credential_file_is_made_private_and_kept(tmp_path):
    f = tmp_path / "corp1cred"
    intranet.ensure_credential(f)
    first = f.read_text()
    assert f.stat().st_mode & 0o777 == 0o600 and len(first.strip()) >= 32
    intranet.ensure_credential(f)
    assert f.read_text() == first
    f.chmod(0o644)
    with pytest.raises(UsageError, match="may be read by others"):
        intranet.ensure_credential(f)


class FakeKh:
    """`kh ps -u USER --json`, `kh domain rm`, `kh token rm` as a principal's view answers."""

    def __init__(self, allocations: list[int], domains: list[int]) -> None:
        self.allocations = allocations
        self.domains = domains
        self.calls: list[tuple[str, ...]] = []

    def cli(self, module: str, *args: str, stdin: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        if args[0] == "ps":
            view = {"allocations": [{"id": a} for a in self.allocations],
                    "domains": [{"netid": 1, "kind": "public", "owner": None}]
                    + [{"netid": d, "kind": "private", "owner": "corp1"} for d in self.domains]}
            return subprocess.CompletedProcess(args, 0, json.dumps(view), "")
        if args[:2] == ("domain", "rm"):
            self.domains.remove(int(args[-1]))
        return subprocess.CompletedProcess(args, 0, "", "")


@pytest.fixture
def corp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Scenario, FakeKh]:
    fake = FakeKh([], [3])
    monkeypatch.setattr(Scenario, "cli", lambda self, *a, **kw: fake.cli(*a, **kw))
    cred = tmp_path / "corp1cred"
    cred.write_text("secret\n")
    return Scenario(Principal("corp1", cred), logs=tmp_path / "logs"), fake


def test_a_principal_holding_allocations_is_refused_untouched(corp):
    sc, fake = corp
    assert intranet.refuse_if_held([sc]) == {"corp1": {3}}
    fake.allocations = [7, 9]
    with pytest.raises(UsageError, match=r"corp1 already holds allocations 7, 9"):
        intranet.refuse_if_held([sc])
    assert all(c[0] == "ps" for c in fake.calls)


def test_teardown_removes_recorded_and_unrecorded_domains_but_not_older_ones(corp):
    sc, fake = corp
    made = figure3.Made(before={"corp1": {3}})
    made.domain(sc, 5)
    made.tokens.append(("corp1", 2))
    fake.domains += [5, 6]  # 6: made by a khget that was cut short before it was recorded
    out = io.StringIO()
    assert figure3.teardown({"corp1": sc}, Report(out=out), made) == []
    assert fake.domains == [3]
    assert out.getvalue().splitlines() == ["$ kh token rm -u corp1 -c ./corp1cred 2",
                                           "$ kh domain rm -u corp1 -c ./corp1cred 5",
                                           "$ kh domain rm -u corp1 -c ./corp1cred 6"]
