"""Guest tests of the meter (issue 14): wait for the meter's samples instead of sleeping.

A sample adds each allocated node's interval to its principal's node-seconds, so while a node
is allocated every sample changes the operator's `kh usage` total: counting the changes seen
counts the samples taken (two samples between two looks count as one: a wait may last a sample
longer than asked, never shorter).
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

from kh.service.config import ServiceConfig
from tests.integration.conftest import kh


def usage(cfg: ServiceConfig, *args: str) -> dict[str, Any]:
    """`kh usage ARGS --json` (the operator's, unless ARGS give a credential), its JSON data;
    asserts that kh answered."""
    r = kh(cfg, "usage", *args, "--json")
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def node_seconds(cfg: ServiceConfig) -> Decimal:
    """Every principal's node-seconds in the last hour, summed (grows with each sample)."""
    return sum((Decimal(row["node_seconds"]) for row in usage(cfg, "--since", "-1h")["rows"]),
               Decimal(0))


def wait_samples(cfg: ServiceConfig, count: int, timeout: float = 120) -> None:
    """Wait until the meter has taken ``count`` samples more (a node must be allocated);
    asserts that it did within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last, seen = node_seconds(cfg), 0
    while seen < count:
        assert time.monotonic() < deadline, f"{seen} of {count} samples in {timeout} s"
        time.sleep(0.2)
        now = node_seconds(cfg)
        seen += now != last
        last = now


def wait_allocation(cfg: ServiceConfig, principal: str, alloc: int,
                    timeout: float = 120) -> None:
    """Wait until the meter has a usage row for allocation ``alloc`` of ``principal`` (its
    first sample after the baseline); asserts that it did within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not any(row["allocation"] == alloc for row in
                  usage(cfg, principal, "--since", "-1h", "--by", "allocation")["rows"]):
        assert time.monotonic() < deadline, f"no usage of allocation {alloc} in {timeout} s"
        time.sleep(0.2)
