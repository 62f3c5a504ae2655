"""Issue 11, item 2: the pure parts of kh.hw.antispoof (a tap's elements, the order of changes
around a move, the rules), no root needed."""

from __future__ import annotations

import json

from kh.hw import antispoof
from kh.hw.antispoof import Plug, elements, link_local, moves, nic_mac, plug_of, rules
from kh.hw.tags import FabricConfig
from kh.service.qemunode import mac

CFG = FabricConfig(prefix="ku")


def names(cmds: list[dict]) -> list[tuple[str, str, object]]:
    """(verb, set or map, element) of each element command; a map element's verdict is
    written "accept" or "goto CHAIN"."""
    out = []
    for c in cmds:
        (verb, body), = c.items()
        e = body["element"]
        for item in e["elem"]:
            if isinstance(item, list):  # [key, verdict]
                (v, arg), = item[1].items()
                item = (item[0], f"goto {arg['target']}" if v == "goto" else v)
            elif isinstance(item, dict):
                item = tuple(item["concat"])
            out.append((verb, e["name"], item))
    return out


def test_nic_mac_is_the_mac_qemu_gets():
    for node, slot in ((1, 0), (300, 2), (65000, 3), (255, 1), (256, 0)):
        assert nic_mac(node, slot) == mac(node, slot)


def test_link_local_is_linux_eui64():
    assert link_local("52:54:00:01:2c:02") == "fe80::5054:ff:fe01:2c02"


def test_a_shared_tap_has_its_mac_and_its_address_in_that_domain():
    pub = names([antispoof._add(e) for e in elements(CFG, Plug(300, 1, 1))])
    assert ("add", "macs", ("ku300s1", "52:54:00:01:2c:01")) in pub
    assert ("add", "addrs", ("ku300s1", "10.1.1.44")) in pub
    assert ("add", "taps", ("ku300s1", "goto public")) in pub
    ext = names([antispoof._add(e) for e in elements(CFG, Plug(300, 0, 0))])
    assert ("add", "addrs", ("ku300s0", "10.0.1.44")) in ext
    assert ("add", "taps", ("ku300s0", "goto external")) in ext


def test_private_and_unplugged_taps_are_free():
    assert plug_of(5, 2, 7) == plug_of(5, 2, None) == Plug(5, 2, None)
    assert names([antispoof._add(e) for e in elements(CFG, Plug(5, 2, None))]) == [
        ("add", "taps", ("ku5s2", "accept"))]


def test_moving_onto_a_shared_domain_tightens_before_the_move():
    before, after = moves(CFG, Plug(4, 0, None), Plug(4, 0, 1))
    assert after == []
    b = names(before)
    # no longer accepted (add, then delete: never fails) before its identity goes in
    assert b[:2] == [("add", "taps", ("ku4s0", "accept")), ("delete", "taps", ("ku4s0", "accept"))]
    assert ("add", "macs", ("ku4s0", nic_mac(4, 0))) in b
    assert b[-1] == ("add", "taps", ("ku4s0", "goto public"))


def test_moving_off_a_shared_domain_loosens_after_the_move():
    before, after = moves(CFG, Plug(4, 0, 1), Plug(4, 0, None))
    assert before == []
    a = names(after)
    assert ("delete", "addrs", ("ku4s0", "10.1.0.4")) in a
    assert a[-1] == ("add", "taps", ("ku4s0", "accept"))


def test_moving_between_shared_domains_passes_nothing_in_between():
    before, after = moves(CFG, Plug(4, 0, 1), Plug(4, 0, 0))
    assert {v for v, _, _ in names(before)} == {"add", "delete"}
    assert names(before)[-1][0] == "delete"  # the old identity is gone before the move
    assert ("add", "addrs", ("ku4s0", "10.0.0.4")) in names(after)
    assert all(v == "add" for v, _, _ in names(after))


def test_no_change_costs_nothing():
    assert moves(CFG, Plug(4, 0, 1), Plug(4, 0, 1)) == ([], [])
    assert moves(CFG, Plug(4, 0, None), Plug(4, 0, None)) == ([], [])
    # an unknown tap going nowhere shared becomes free (a known state)
    assert names(moves(CFG, None, Plug(4, 0, None))[1]) == [("add", "taps", ("ku4s0", "accept"))]


def test_taps_are_dispatched_by_kind_and_unknown_taps_drop():
    rs = rules()
    assert rs[antispoof.CHAIN] == [[{"vmap": {"key": {"meta": {"key": "iifname"}},
                                              "data": "@taps"}}], [{"drop": None}]]
    assert json.dumps(rs["external"][-1]) == '[{"drop": null}]'  # TCP/IP only
    text = json.dumps(rs["arp"])
    assert "10.1.255.254" in text and "10.0.255.254" in text  # the service's addresses
    # nothing is waved through but a free tap
    assert all("accept" not in json.dumps(r) for name, chain in rs.items() for r in chain)


def test_table_is_one_transaction_that_starts_afresh():
    cmds = antispoof.table([Plug(1, 0, 1), Plug(2, 0, None)], CFG)
    verbs = [next(iter(c)) for c in cmds[:3]]
    assert verbs == ["add", "delete", "add"]  # any old table goes in the same batch
    assert sum("rule" in c.get("add", {}) for c in cmds) == sum(
        map(len, rules(antispoof.tunnel_ports(CFG)).values()))
    chains = [c["add"]["chain"] for c in cmds if "chain" in c.get("add", {})]
    assert [c["name"] for c in chains if "hook" in c] == [antispoof.CHAIN]
