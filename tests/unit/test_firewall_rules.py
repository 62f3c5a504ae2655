"""kh's fabric firewall without root: the ruleset as nft JSON, and khd's pool asking the fabric
to check br_netfilter's switches (issue 11, item 1; the host-side proof with real taps is
tests/unit/test_fabric_firewall.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kh.hw import firewall
from kh.hw.tags import FabricConfig
from tests.unit.fake_khd import make_service

API, SSH = 7480, 7422


def test_ruleset_serves_only_public_ports_and_forwards_only_the_uplink() -> None:
    """The JSON itself: input accepts only loopback and the public bridge (TCP to the two
    ports at the public address); every base filter chain drops by default; without an uplink
    nothing is forwarded but bridged frames and there is no NAT."""
    cfg = FabricConfig(prefix="kh")
    plan = firewall.Plan.of(cfg, [0, 1, 3], [API, SSH])
    rules = firewall.ruleset(plan)
    chains = [c["add"]["chain"] for c in rules if "chain" in c.get("add", {})]
    assert {(c["family"], c["name"], c["policy"]) for c in chains} == {
        ("inet", "input", "drop"), ("inet", "forward", "drop"), ("inet", "output", "drop"),
        ("arp", "input", "drop"), ("arp", "output", "drop")}
    text = str([r for r in rules if "rule" in r.get("add", {})])
    assert "khbr3" not in text.replace("{'concat': ['khbr3', 'khbr3']}", "")
    assert "masquerade" not in text
    with_uplink = firewall.Plan.of(FabricConfig(prefix="kh", uplink_netns="out"), [0, 1],
                                   [API, SSH])
    assert "masquerade" in str(firewall.ruleset(with_uplink))


def test_khds_pool_watches_br_netfilter_every_turn(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """khd notices br_netfilter turned on without a node being wired: each turn of the pool
    (at least once a second) asks the fabric to check."""
    svc = make_service(tmp_path, monkeypatch)
    turns = threading.Event()

    def watch() -> list[str]:
        turns.set()
        return []

    monkeypatch.setattr(svc.fabric, "watch", watch)
    svc.pool.start()
    try:
        assert turns.wait(30), "the pool never checked br_netfilter"
    finally:
        svc.pool.stop()
        svc.store.close()


def test_khds_fabric_serves_khds_own_ports(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The ruleset khd loads accepts the API and ssh ports khd listens on (a merge once lost
    them: nodes on the public domain could then reach neither khget nor the channel)."""
    svc = make_service(tmp_path, monkeypatch, api_port=7581, ssh_port=7523)
    try:
        plan = firewall.Plan.of(svc.cfg.fabric, [0, 1], svc.fabric.ports)
        assert plan.ports == (7523, 7581)
        assert "7581" in str(firewall.ruleset(plan)) and "7523" in str(firewall.ruleset(plan))
    finally:
        svc.store.close()
