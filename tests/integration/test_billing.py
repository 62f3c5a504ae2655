"""Issue 14, items 2 and 4 on a real guest: `kh bill` rates what the meter counted for a node
at the U-Boot prompt, as the operator and as the principal (another principal is refused), with
the service's list and with one sent along; `kh top --once` shows the node with its CPU and
memory from the host's counters. One node, never booted past U-Boot: a short test."""

from __future__ import annotations

import json
import os
import time
from decimal import Decimal

import pytest

from tests.integration import meter
from tests.integration.conftest import allocate, credfile, kh, running_khd

pytestmark = pytest.mark.guest

PER_SECOND = ('currency = "EUR"\ndecimals = 0\nvalid_from = 2026-01-01\n[[price]]\n'
              'quantity = "node_seconds"\nprice = 1\n')  # a node-second costs 1, whole euros


@pytest.fixture
def khd(request, tmp_path, kh_paths):
    with running_khd(request, tmp_path / "state", kh_paths, keep_as="billing-logs", nodes=1,
                     prefix=f"kb{os.getpid() % 10000}", outside=False,
                     meter_interval=2) as cfg:
        yield cfg


def bill(cfg, *args: str) -> dict:
    r = kh(cfg, "bill", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_bill_and_top_of_a_node_at_the_uboot_prompt(khd, tmp_path):
    carol = credfile("carol-b1")
    _, (node,), _ = allocate(khd, "-c", carol, "carol")
    meter.wait_samples(khd, 4)  # three whole intervals or more after the first
    period = time.strftime("%Y-%m", time.gmtime())

    # the service's list (kh's default), as the operator and as carol herself: the same bill
    # (the meter samples every 2 s: one may fall between the two asks, so ask again then)
    for _ in range(5):
        mine = bill(khd, "carol", "--period", period, "-c", carol)
        theirs = bill(khd, "carol", "--period", period)
        if theirs["lines"] == mine["lines"]:
            break
    assert theirs["lines"] == mine["lines"]
    held = {x["quantity"]: Decimal(x["amount"]) for x in mine["lines"]}
    assert held["node_seconds"] > 4 and held["mem_mib_seconds"] == held["node_seconds"] * 256
    assert held["cpu_seconds"] < held["node_seconds"] / 5  # it dozes at the U-Boot prompt

    # the same usage with a list sent along: a node-second costs 1, rounded to whole euros
    prices = tmp_path / "per-second.toml"
    prices.write_text(PER_SECOND)
    what_if = bill(khd, "carol", "--period", period, "--prices", str(prices), "-c", carol)
    (line,) = what_if["lines"]
    seconds = Decimal(line["amount"])
    assert seconds >= held["node_seconds"]  # the meter kept counting meanwhile
    assert Decimal(what_if["total"]) == seconds.quantize(Decimal(1)) > 4
    assert [u["quantity"] for u in what_if["unpriced"]][:2] == ["cpu_seconds",
                                                                 "mem_mib_seconds"]

    # dave's credential does not open carol's bill
    r = kh(khd, "bill", "carol", "-c", credfile("dave-b1"))
    assert r.returncode != 0 and "refused" in r.stderr and "node_seconds" not in r.stdout

    # kh top: carol's node, its QEMU's CPU and memory as the host counts them
    r = kh(khd, "top", "--once", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = [x for x in json.loads(r.stdout) if x["node"] == node]
    assert (row["state"], row["principal"]) == ("allocated", "carol")
    assert row["cpu_percent"] is not None and 0 <= row["cpu_percent"] < 50
    assert row["mem_mib"] == 256 and row["resident_bytes"] > 8 * 2**20
    r = kh(khd, "top", "--once", "-u", "carol", "-c", carol)
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[:3] == \
        [str(node), "allocated", "carol"], r
