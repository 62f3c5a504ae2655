"""examples/webfarm.sh (the paper's Listing 1 as a web farm) against a khd of the test's own:
every node's page from the outside world, the summary line, and nothing left afterwards, also
when it is interrupted. A failing run keeps the script's output beside khd's and the nodes'
console logs (tests/artifacts)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from kh.service.config import ServiceConfig
from tests.integration.conftest import allocate, credfile, env, kh, ps, release, wait_free

pytestmark = [pytest.mark.guest, pytest.mark.scenario]
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "webfarm.sh"
USER, CRED = "webfarm", "webfarmcred"


def script_env(cfg: ServiceConfig) -> dict[str, str]:
    e = {**env(cfg), "USER": USER}
    if cfg.uplink_netns:  # the principal's host: the test's outside world
        e["KHDO_NETNS"] = cfg.uplink_netns
    return e


def held(cfg: ServiceConfig) -> list[dict]:
    r = kh(cfg, "ps", "--json", "-u", USER, "-c", credfile(CRED))
    if r.returncode:  # a principal khd does not know yet holds nothing
        assert "credential refused" in r.stderr, r.stderr
        return []
    return json.loads(r.stdout)["allocations"]


def webfarm(cfg: ServiceConfig, artifacts: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["bash", str(SCRIPT), *args, "-c", credfile(CRED)], env=script_env(cfg),
                       capture_output=True, text=True, timeout=900)
    (artifacts / "webfarm.out").write_text(f"exit {r.returncode}\n{r.stdout}\n--\n{r.stderr}")
    return r


@pytest.mark.parametrize("count", [1, 4])
def test_webfarm_serves_every_page_and_releases(khd, artifacts, count):
    wait_free(khd, count + 1)
    # another principal's node, there all along: the farm never touches it
    other, _, _ = allocate(khd, "-c", credfile("othercred"), "other", "1")
    r = webfarm(khd, artifacts, str(count))
    assert r.returncode == 0, r
    pages = re.findall(r"<h1>node(\d+)</h1>", r.stdout)
    assert len(set(pages)) == count, r.stdout
    # Each page is its own node's: it names the external-domain address khget gave.
    for n in pages:
        assert re.search(rf"eth0=10\.0\.{int(n) >> 8}\.{int(n) & 255}/", r.stdout), r.stdout
    assert re.search(rf"^{count}/{count} pages in \d+\.\d s$", r.stdout, re.M), r.stdout
    assert f"> nodes=$(khget -x $USER {count})" in r.stdout
    assert held(khd) == []
    assert [a["id"] for a in ps(khd)["allocations"]] == [other]
    release(khd, "other", "othercred", other)


def test_keep_leaves_the_farm_and_says_how_to_release_it(khd, artifacts):
    wait_free(khd, 1)
    r = webfarm(khd, artifacts, "1", "--keep")
    assert r.returncode == 0, r
    m = re.search(r"^kept: (con\d+) \(release it: kh release -u webfarm con\d+\)$", r.stdout,
                  re.M)
    assert m, r.stdout
    assert [f"con{a['id']}" for a in held(khd)] == [m[1]]
    assert kh(khd, "release", "-u", USER, "-c", credfile(CRED), m[1]).returncode == 0
    assert held(khd) == []


def test_ctrl_c_while_the_pages_are_polled_releases_the_nodes(khd, artifacts):
    wait_free(khd, 1)
    p = subprocess.Popen(["bash", str(SCRIPT), "1", "-c", credfile(CRED)],
                         env={**script_env(khd), "KH_WEBFARM_WAIT": "600"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        assert p.stdout is not None
        for line in p.stdout:  # wait until the nodes boot and the poller runs
            if "khdo peripcmd" in line:
                break
        assert held(khd), "the farm should be up while its pages are polled"
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    (artifacts / "webfarm.out").write_text(f"exit {p.returncode}\n{out}\n--\n{err}")
    assert p.returncode == 130, (out, err)
    assert held(khd) == []
