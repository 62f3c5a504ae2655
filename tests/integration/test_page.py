"""khd's live page in a real browser (issue 15, item 4): headless Chromium loads the page of a
running 4-node system (alice's allocation of 3, bob's of 1), the DOM shows every node with its
state and the topology SVG, a node's console line arrives escaped, a principal's view holds no
other principal's node, and a screenshot is kept in tests/artifacts/page/ (CI copies it);
`kh topo` draws the same running system (a principal's --json without the other's nodes).

Chromium runs as the unprivileged user kh-node (tools/setup-apt makes it), with its own
sandbox (a user namespace, or in a chroot, where the kernel refuses one, Debian's setuid
chromium-sandbox helper), an empty profile, background networking off and a proxy that goes
nowhere, so the only place it reaches is the page on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.integration.conftest import (
    ARTIFACTS,
    allocate,
    credfile,
    env,
    free_port,
    kh,
    running_khd,
)

pytestmark = pytest.mark.guest
SHOTS = ARTIFACTS / "page"
BROWSER_USER = "kh-node"
MARK = "<b>kh-page-test</b>"  # typed at alice's U-Boot prompts: must show as text


def chromium_argv() -> list[str]:
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (tools/setup-apt installs it)")
    try:
        pwd.getpwnam(BROWSER_USER)
    except KeyError:
        pytest.skip(f"no user {BROWSER_USER} to run the browser as (tools/setup-apt makes it)")
    return ["runuser", "-u", BROWSER_USER, "--", "chromium", "--headless", "--disable-gpu",
            "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-default-apps",
            "--disable-breakpad", "--proxy-server=http://127.0.0.1:9",
            "--window-size=1280,1800"]


def browse(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Chromium on ``url`` in a fresh profile of the browser user's."""
    profile = Path(tempfile.mkdtemp(prefix="kh-page-browser-"))
    user = pwd.getpwnam(BROWSER_USER)
    os.chown(profile, user.pw_uid, user.pw_gid)
    try:
        e = {"HOME": str(profile), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
             "LANG": "C.UTF-8"}
        return subprocess.run([*chromium_argv(), f"--user-data-dir={profile}/p", *args, url],
                              capture_output=True, text=True, timeout=180, env=e,
                              cwd=profile)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def link(cfg, *who: str) -> str:
    r = kh(cfg, "page", *who)
    assert r.returncode == 0, r.stderr
    url = r.stdout.strip()
    assert re.fullmatch(rf"http://127\.0\.0\.1:{cfg.page_port}/login/once/[\w-]+", url), url
    return url


def dom(cfg, *who: str) -> str:
    r = browse(link(cfg, *who), "--dump-dom")
    assert r.returncode == 0 and "<html" in r.stdout, r.stderr[-2000:]
    return r.stdout


def test_page_in_a_browser(request, tmp_path, kh_paths):
    chromium_argv()
    with running_khd(request, tmp_path / "state", kh_paths, keep_as="page-logs", nodes=4,
                     prefix=f"kg{os.getpid() % 10000}", outside=False,
                     page_port=free_port()) as cfg:
        alice, bob = credfile("alice-page-secret"), credfile("bob-page-secret")
        _, mine, text = allocate(cfg, "-c", alice, "alice", "3")
        _, theirs, _ = allocate(cfg, "-c", bob, "bob", "1")
        e = env(cfg)
        e["KH_CREDENTIAL"] = "alice-page-secret"
        r = subprocess.run([sys.executable, "-m", "kh.cli.khdo", "write", f"echo {MARK}"],
                           input="\n".join(text) + "\n", env=e, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr

        page = dom(cfg)  # the operator's
        for n in mine + theirs:
            assert re.search(rf'<tr class="node" id="node-{n}" data-node="{n}" '
                             r'data-state="allocated"', page), page[-3000:]
        assert re.search(rf"<svg[^>]*>.*node {mine[0]}.*</svg>", page, re.S), "no picture"
        assert "&lt;b&gt;kh-page-test&lt;/b&gt;" in page and MARK not in page

        SHOTS.mkdir(parents=True, exist_ok=True)
        shot = SHOTS / "operator.png"
        shot.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory() as d:
            os.chown(d, pwd.getpwnam(BROWSER_USER).pw_uid, -1)
            r = browse(link(cfg), f"--screenshot={d}/page.png")
            assert r.returncode == 0, r.stderr[-2000:]
            shutil.copy(f"{d}/page.png", shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        r = kh(cfg, "topo")  # the same picture in a terminal, from the running khd
        assert r.returncode == 0, r.stderr
        assert all(f"node {n}  [allocated]" in r.stdout for n in mine + theirs), r.stdout
        assert "principal alice" in r.stdout and "principal bob" in r.stdout
        r = kh(cfg, "topo", "-u", "alice", "-c", alice, "--json")
        assert r.returncode == 0, r.stderr
        assert {n["number"] for n in json.loads(r.stdout)["nodes"]} == set(mine)
        assert "bob" not in r.stdout

        view = dom(cfg, "-u", "alice", "-c", alice)
        assert all(f'id="node-{n}"' in view for n in mine)
        assert all(f'id="node-{n}"' not in view for n in theirs)
        assert "bob" not in view and "principal alice" in view
