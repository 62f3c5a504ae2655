"""What the service benchmarks share: a free port, khget as a user would run it, and waiting
for released nodes to come back to the pool."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

from kh import textobj
from kh.client import Client
from kh.service.config import ServiceConfig

REPO = Path(__file__).resolve().parents[1]
CRED = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def khget(cfg: ServiceConfig, count: int, *opts: str, user: str = "bench") -> str:
    """The text object of `KH_CREDENTIAL=bench khget [OPTS] USER COUNT` against ``cfg``'s
    khd (the credential in the environment, not on the command line)."""
    env = {**os.environ, "KH_STATE_DIR": str(cfg.state_dir), "KH_PREFIX": cfg.prefix,
           "KH_CREDENTIAL": CRED}
    return subprocess.run([str(REPO / ".venv/bin/khget"), *opts, user, str(count)], env=env,
                          capture_output=True, text=True, check=True).stdout


def alloc_of(text: str) -> int:
    """The allocation of khget's text object (read with kh.textobj)."""
    return textobj.parse(text).id


def nodes_of(text: str) -> list[int]:
    """The node numbers of khget's text object."""
    return [n.number for n in textobj.parse(text).nodes]


def release(cfg: ServiceConfig, alloc: int, user: str = "bench") -> None:
    Client(cfg.socket).call("POST", f"/v1/allocations/{alloc}/release",
                            {"user": user, "credential": CRED})


def wait_free(cfg: ServiceConfig, n: int, timeout: float = 120) -> None:
    c = Client(cfg.socket)
    deadline = time.monotonic() + timeout
    while True:
        nodes = json.loads(c.call("GET", "/v1/ps", as_json=True))["nodes"]
        if sum(x["state"] == "free" for x in nodes) >= n:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"nodes did not come back: {nodes}")
        time.sleep(0.1)


def release_all(cfg: ServiceConfig, user: str = "bench") -> None:
    """Give back every allocation and wait until the whole pool is free again."""
    allocs = json.loads(Client(cfg.socket).call("GET", "/v1/ps", as_json=True))["allocations"]
    for a in allocs:
        release(cfg, a["id"], user)
    wait_free(cfg, cfg.nodes)
