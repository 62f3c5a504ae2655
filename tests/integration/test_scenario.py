"""kh.scenario with real nodes: Listing 1 through the harness, ready lines and commands over the
control channel, and everything released when a step fails."""

from __future__ import annotations

import json

import pytest

from kh.scenario import ScenarioError
from tests.integration.conftest import credfile, kh, principal, scenario, wait_free

pytestmark = [pytest.mark.guest, pytest.mark.scenario]


def held(cfg, user: str, secret: str) -> list[int]:
    r = kh(cfg, "ps", "--json", "-u", user, "-c", credfile(secret))
    return [a["id"] for a in json.loads(r.stdout)["allocations"]] if r.returncode == 0 else []


def test_boot_run_and_release_through_the_harness(khd, artifacts):
    wait_free(khd, 2)
    who = principal("harness", "harnesscred")
    with scenario(khd, who, artifacts, "harness") as sc:
        farm = sc.khget("-x", count=2)
        ready = sc.boot(farm, "apache", node_keys={farm.nodes[1]: "kh.hostname=second"})
        assert set(ready) == set(farm.nodes)
        assert all(line.startswith("kh-ready: apache") for line in ready.values()), ready
        first, second = farm.nodes
        assert sc.check(farm, first, "hostname").strip() == f"node{first}"
        assert sc.check(farm, second, "hostname").strip() == "second"
        out, status = sc.run(farm, first, "echo out; exit 3")
        assert (out, status) == ("out\n", 3)
        # the principal's host (the outside world) fetches every page
        r = sc.khdo(farm, "peripcmd", "wget -q -T 10 -O - http://%ip%/")
        assert f"<h1>node{first}</h1>" in r.stderr and "<h1>second</h1>" in r.stderr
        assert held(khd, "harness", "harnesscred") == [farm.id]
    assert held(khd, "harness", "harnesscred") == []
    # the console logs, as the principal saw them
    assert "kh-ready: apache" in (artifacts / f"node{first}.console.log").read_text()
    assert json.loads((artifacts / "report.json").read_text())["ok"] is True


def test_a_failed_boot_names_the_node_and_releases_everything(khd, artifacts):
    wait_free(khd, 2)
    who = principal("harness", "harnesscred")
    with pytest.raises(ScenarioError, match=r"node \d+: the appliance failed: .*kh\.aoe"), \
            scenario(khd, who, artifacts, "harness-fails") as sc:
        sc.khget(count=1)
        bad = sc.khget("-p", "1", count=1)
        sc.boot(bad, "vblade", keys="kh.aoe=1.x")
    assert held(khd, "harness", "harnesscred") == []
    report = json.loads((artifacts / "report.json").read_text())
    assert report["ok"] is False and report["steps"][-1]["ok"] is False
