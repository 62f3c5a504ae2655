"""Domains across hosts, the pure parts (kh.hw.stretchrules; issue 16, item 3): VNIs, MTUs,
what a stretch request may hold, the remote command, and the rules the firewall and
anti-spoofing get. No root."""

from __future__ import annotations

import fnmatch
import json

import pytest

from kh.allocation import MAX_NETID, boot_keys
from kh.hw import antispoof, firewall, stretchrules
from kh.hw.stretchrules import Peer, StretchError, Underlay
from kh.hw.tags import FabricConfig
from kh.model import Domain, DomainKind

CFG = FabricConfig(prefix="kh")
UL = Underlay("khul0", "192.0.2.1")
B = Peer("b", "192.0.2.2")


def test_vni_is_fixed_by_the_netid_and_unique() -> None:
    vnis = [stretchrules.vni(n) for n in range(MAX_NETID + 1)]
    assert len(set(vnis)) == len(vnis) and vnis[3] == stretchrules.VNI_BASE + 3
    assert all(0 < v < 1 << 24 for v in vnis)  # VXLAN's 24 bits, never 0
    for bad in (-1, MAX_NETID + 1):
        with pytest.raises(StretchError, match="does not exist"):
            stretchrules.vni(bad)


def test_guest_mtu_is_the_underlays_less_50_and_never_below_1280() -> None:
    assert stretchrules.guest_mtu(1500) == 1450 and stretchrules.guest_mtu(9000) == 8950
    assert stretchrules.guest_mtu(1330) == 1280
    with pytest.raises(StretchError, match=r"^host b: underlay eth1 has MTU 1329, too small "
                                           r"for a stretched domain \(needs 1330"):
        stretchrules.guest_mtu(1329, "b", "eth1")


@pytest.mark.parametrize("underlay,peers,host,what", [
    (UL, [B], "bad host!", "host name 'bad host!' is malformed"),
    (Underlay("a b", "192.0.2.1"), [B], "a", "underlay interface 'a b' is malformed"),
    (Underlay("khul0", "192.0.2.1", 0), [B], "a", "VXLAN port 0 is not a UDP port"),
    (Underlay("khul0", "fe80::1"), [B], "a", "underlay address 'fe80::1' is not an IPv4"),
    (Underlay("khul0", "224.0.0.1"), [B], "a", "cannot be a host's underlay address"),
    (UL, [Peer("b", "127.0.0.1")], "a", "peer b's underlay address 127.0.0.1 cannot be"),
    (UL, [Peer("b", "192.0.2.1")], "a", "peer b has this host's own underlay address"),
    (UL, [B, Peer("c", "192.0.2.2")], "a", "peers b and c share underlay address"),
    (UL, [Peer("b;rm", "192.0.2.2")], "a", "peer name 'b;rm' is malformed"),
    (UL, [Peer(f"p{i}", f"198.51.100.{i}") for i in range(1, 66)], "a", "would span 66"),
])
def test_a_stretch_request_is_checked_whole(underlay: Underlay, peers: list[Peer], host: str,
                                            what: str) -> None:
    with pytest.raises(StretchError) as e:
        stretchrules.check(underlay, 3, peers, host)
    assert what in str(e.value) and "\n" not in str(e.value)
    if host != "bad host!":
        assert str(e.value).startswith(f"host {host}: ")


def test_peers_are_sorted_addresses() -> None:
    assert stretchrules.check(UL, 3, [Peer("c", "192.0.2.10"), B], "a") == ("192.0.2.2",
                                                                       "192.0.2.10")
    assert stretchrules.check(UL, 3, [], "a") == ()


def test_remote_argv_is_kh_fabric_stretch_with_checked_words() -> None:
    ub = Underlay("khbul0", "192.0.2.2", 4790)
    argv = stretchrules.remote_argv("khb", ub, 7, [Peer("a", "192.0.2.1")], "b", kh="/opt/kh")
    assert argv == ["/opt/kh", "fabric", "stretch", "--prefix", "khb", "--host", "b",
                    "--underlay", "khbul0", "--local", "192.0.2.2", "--port", "4790",
                    "--peer", "a=192.0.2.1", "7"]
    assert all(" " not in w and ";" not in w for w in argv)
    with pytest.raises(StretchError, match="prefix"):
        stretchrules.remote_argv("k b", ub, 7, [], "b")


def test_boot_keys_carry_each_interfaces_mtu_when_asked() -> None:
    doms = (Domain(1, DomainKind.PUBLIC, None), Domain(3, DomainKind.PRIVATE, "u"))
    assert "kh.mtu" not in boot_keys(doms, 4, None)
    keys = boot_keys(doms, 4, None, mtu=1450).split()
    assert "kh.mtu0=1450" in keys and "kh.mtu1=1450" in keys and "kh.mtu2=1450" not in keys


def plan(tunnels: tuple[stretchrules.Tunnel, ...]) -> str:
    p = firewall.Plan.of(CFG, [1, 0, 3], [7480], tunnels)
    return json.dumps(firewall.ruleset(p))


def test_firewall_lets_vxlan_in_only_from_peers_on_the_underlay() -> None:
    t = stretchrules.Tunnel("khul0", "192.0.2.1", 4789, ("192.0.2.2", "192.0.2.3"))
    rules = [c["add"]["rule"] for c in firewall.ruleset(firewall.Plan.of(CFG, [3], [], [t]))
             if "rule" in c.get("add", {})]
    udp_in = [r for r in rules if r["chain"] == "input" and "udp" in json.dumps(r)]
    assert len(udp_in) == 1
    text = json.dumps(udp_in[0]["expr"])
    for want in ('"iifname"}}, "right": "khul0"', '"192.0.2.2", "192.0.2.3"',
                 '"daddr"}}, "right": "192.0.2.1"', '"dport"}}, "right": 4789'):
        assert want in text, want
    udp_out = [r for r in rules if r["chain"] == "output" and "udp" in json.dumps(r)]
    assert len(udp_out) == 1 and '"oifname"}}, "right": "khul0"' in json.dumps(udp_out[0])
    assert "udp" not in plan(()) and "khul0" not in plan(())


def test_arp_is_let_through_on_kh_underlays_even_before_a_stretch() -> None:
    """A host with no stretched domain yet answers ARP on its underlay (<prefix>ulN), so a
    peer stretching a domain to it can tell it is up; nowhere else new."""
    for tunnels in ((), (stretchrules.Tunnel("khul0", "192.0.2.1", 4789, ("192.0.2.2",)),)):
        rules = [c["add"]["rule"] for c in firewall.ruleset(firewall.Plan.of(CFG, [3], [],
                                                                              tunnels))
                 if "rule" in c.get("add", {}) and c["add"]["rule"]["family"] == "arp"]
        on_underlay = [r["chain"] for r in rules if '"right": "khul*"' in json.dumps(r)]
        assert on_underlay == ["input", "output"]
    assert fnmatch.fnmatch(CFG.underlay(0), "khul*") and not fnmatch.fnmatch(CFG.tap(1, 0),
                                                                              "khul*")


def test_antispoofing_accepts_vxlan_ports_and_no_tap_is_one() -> None:
    glob = antispoof.tunnel_ports(CFG)
    assert glob == "khvx*"
    assert fnmatch.fnmatch(CFG.vxlan(253), glob)
    assert not any(fnmatch.fnmatch(CFG.tap(n, s), glob) for n in (1, 99, 65000)
                   for s in range(4))
    chain = antispoof.rules(glob)[antispoof.CHAIN]
    assert chain[-1] == [{"drop": None}]  # still fail closed for anything else
    assert chain[1] == [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                                   "right": "khvx*"}}, {"accept": None}]
    made = antispoof.table([], CFG)
    assert sum("rule" in c.get("add", {}) for c in made) == sum(
        map(len, antispoof.rules(glob).values()))
