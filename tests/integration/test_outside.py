"""The outside world and published ports on a real guest (issue 12, item 1): a khd started
with its defaults makes `<prefix>-outside` and names it in `kh service status`; an apache
node booted with -x (khdo's peripcmd finds the outside world by itself) answers `kh outside
wget` and, through `kh publish`, a fetch of http://127.0.0.1:HOSTPORT/ on the host; after
the release the port is closed, and `kh clean` removes the namespace."""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.request

import pytest

from kh.hw import netns as nsutil
from tests.integration.conftest import (
    credfile,
    kh,
    principal,
    running_khd,
    scenario,
    wait_free,
)

pytestmark = [pytest.mark.guest]
USER, CRED = "webby", "webbycred"


def test_outside_world_kh_outside_and_publish(request, tmp_path, kh_paths, artifacts):
    prefix = f"ko{os.getpid() % 10000}"
    with running_khd(request, tmp_path / "state", kh_paths, keep_as="outside-khd-logs",
                     nodes=1, prefix=prefix) as cfg:
        own = f"{prefix}-outside"
        status = json.loads(kh(cfg, "service", "status", "--json").stdout)
        assert status["outside"] == {"netns": own, "own": True}
        assert nsutil.exists(own)
        wait_free(cfg, 1)
        with scenario(cfg, principal(USER, CRED), artifacts, "outside") as sc:
            web = sc.khget("-x", count=1)
            (node,) = web.nodes
            sc.boot(web, "apache")
            ip = web.address(node)
            assert ip.startswith("10.0.")
            # khdo's peripcmd runs in the outside world without being told (no KHDO_NETNS)
            r = sc.khdo(web, "peripcmd", "wget -q -T 10 -O - http://%ip%/")
            assert f"<h1>node{node}</h1>" in r.stderr, r.stderr
            # kh outside: a command there, its output and exit status kh's
            r = kh(cfg, "outside", "--", "wget", "-q", "-T", "10", "-O", "-", f"http://{ip}/")
            assert r.returncode == 0 and f"<h1>node{node}</h1>" in r.stdout, r.stderr
            assert kh(cfg, "outside", "sh", "-c", "exit 7").returncode == 7
            # kh publish: the host's 127.0.0.1:PORT gives the node's page
            r = kh(cfg, "publish", "-u", USER, "-c", credfile(CRED), str(node), "80")
            assert r.returncode == 0, r.stderr
            m = re.fullmatch(rf"127\.0\.0\.1:(\d+) -> node {node} port 80 \({re.escape(ip)}\)\n",
                             r.stdout)
            assert m, r.stdout
            port = int(m[1])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as resp:
                assert resp.status == 200
                assert f"<h1>node{node}</h1>" in resp.read().decode()
            listed = json.loads(kh(cfg, "ps", "--json").stdout)["publishes"]
            assert [(p["host_port"], p["node"], p["port"]) for p in listed] == [(port, node, 80)]
        # the scenario released the node: the port is closed
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        assert json.loads(kh(cfg, "ps", "--json").stdout)["publishes"] == []
    assert not nsutil.exists(own)  # kh clean removed kh's own outside world
