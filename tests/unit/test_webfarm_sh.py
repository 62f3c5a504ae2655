"""examples/webfarm.sh before it allocates anything: its arguments, the credential, khd."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "webfarm.sh"


def run(tmp_path: Path, *args: str, cred: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KH")}
    env.update(KH_STATE_DIR=str(tmp_path / "state"), USER="alice")
    if cred:
        env["KH_CREDENTIAL"] = "secret"
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("args", [["abc"], ["0"], ["-3"], ["1", "-c"], ["1x"], ["--nope"]])
def test_a_bad_argument_is_the_usage(tmp_path, args):
    r = run(tmp_path, *args)
    assert r.returncode == 2 and r.stderr.startswith("usage: examples/webfarm.sh"), r


def test_no_credential_is_named_before_anything_runs(tmp_path):
    r = run(tmp_path, "2", cred=False)
    assert r.returncode == 2, r
    assert "no credential for alice (-c FILE, a file holding it, or KH_CREDENTIAL)" in r.stderr


def test_without_khd_it_says_how_to_start_one_sized_for_count(tmp_path):
    r = run(tmp_path, "20")
    assert r.returncode == 1, r
    assert "khd is not running" in r.stderr
    assert "start one (as root): kh service start --nodes 20 --node-quota 20" in r.stderr
    r = run(tmp_path, "3", "-c", str(tmp_path / "cred"))
    assert r.returncode == 1 and "kh service start --nodes 3\n" in r.stderr, r
