"""The fabric namespace's own firewall: what kh's namespace answers, where, and what it forwards.

The host has a presence only where it serves: the API and the control channel's ssh, over TCP,
on the public bridge at the public host address; the external bridge carries only the nodes'
gateway to the uplink. Nothing arriving on a private bridge (or the external one) reaches the
host, the host sends nothing into a private domain, and each of its addresses is answered by
ARP only on its own bridge. Forwarding (routing) happens only between the external bridge and
its uplink. Frames bridged inside one domain are accepted wherever br_netfilter would hand them
to IP filtering, so a host that turns `bridge-nf-call-iptables` on cannot cut a domain. A domain
stretched to other hosts (kh.hw.stretch) adds its tunnels: VXLAN in only from the peer hosts'
underlay addresses on the underlay interface, to this host's address and port, and out only
to them; ARP on the underlay interfaces (``<prefix>ulN``), whether or not a domain is stretched,
so another host can tell this one is up.

The ruleset is nft JSON built from Python values (``ruleset``) and applied in one transaction
(``load``, through libnftables in kh's namespace; ``apply`` runs nft itself): kh's tables are
created, deleted and made again in a single batch, so there is never a moment without them and
applying the same ruleset twice changes nothing. Other tables in the namespace (anti-spoofing's
bridge table) are left alone.

The namespace's sysctls (``hardening``) back the ruleset up: IPv6 off (no link-local address on any
bridge or tap), ARP answered only for an address of the interface asked on, forwarding set
explicitly (never inherited from the host), br_netfilter's hooks off (``bridge_nf_on`` finds
them turned back on).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kh import proc
from kh.allocation import host_address, subnet
from kh.errors import KhError
from kh.hw import netns as nsutil
from kh.hw.antispoof import NftContext
from kh.hw.stretch import Tunnel
from kh.hw.tags import FabricConfig
from kh.model import EXTERNAL, PUBLIC

TABLE = "kh_fabric"  # kh's table in the inet and arp families of its namespace
LEGACY = ("filter", "nat")  # the ip tables kh's iptables rules made before nftables
Json = dict[str, Any]

# br_netfilter's switches (they exist once the module is loaded; a new namespace gets them on)
BRIDGE_NF = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
             "net.bridge.bridge-nf-call-arptables")


class FirewallError(KhError):
    """nft refused kh's ruleset, or is missing."""


@dataclass(frozen=True)
class Plan:
    """What the ruleset is made from: interface names, the ports served, the uplink."""

    public: str  # the public domain's bridge: the only place the host serves
    external: str  # the external domain's bridge: the nodes' gateway, nothing served
    uplink: str | None  # the external domain's veth to the outside world, if configured
    bridges: tuple[str, ...]  # every domain bridge now (bridged traffic within each passes)
    ports: tuple[int, ...]  # TCP ports served at the public host address (API, ssh)
    tunnels: tuple[Tunnel, ...] = ()  # VXLAN to and from peer hosts (kh.hw.stretch)
    underlays: str = ""  # nft wildcard of the underlay interfaces (<prefix>ul*): ARP there

    @classmethod
    def of(cls, cfg: FabricConfig, netids: Iterable[int], ports: Iterable[int],
           tunnels: Iterable[Tunnel] = ()) -> Plan:
        return cls(cfg.bridge(PUBLIC), cfg.bridge(EXTERNAL),
                   cfg.uplink if cfg.uplink_netns else None,
                   tuple(sorted({cfg.bridge(n) for n in netids})),
                   tuple(sorted(set(ports))), tuple(tunnels), cfg.underlay(0)[:-1] + "*")


# -- nft JSON building blocks ------------------------------------------------------------------
def _is(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _field(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _net(net: str) -> Json:
    addr, length = net.split("/")
    return {"prefix": {"addr": addr, "len": int(length)}}


ACCEPT: Json = {"accept": None}


def _table(family: str, name: str = TABLE) -> list[Json]:
    """Create-then-delete-then-create: the batch replaces kh's table whatever it held."""
    t = {"family": family, "name": name}
    return [{"add": {"table": t}}, {"delete": {"table": t}}, {"add": {"table": t}}]


def _chain(family: str, name: str, kind: str, hook: str, prio: int, policy: str) -> Json:
    return {"add": {"chain": {"family": family, "table": TABLE, "name": name, "type": kind,
                              "hook": hook, "prio": prio, "policy": policy}}}


def _rule(family: str, chain: str, *expr: Json) -> Json:
    return {"add": {"rule": {"family": family, "table": TABLE, "chain": chain,
                             "expr": list(expr)}}}


def ruleset(plan: Plan) -> list[Json]:
    """The nft JSON commands (the list under ``"nftables"``) for kh's namespace: tables
    ``inet kh_fabric`` (input, forward, output, the uplink's masquerade) and ``arp kh_fabric``
    (ARP in and out), every base chain with policy drop except NAT's."""
    public = str(host_address(PUBLIC).ip)
    gateway = str(host_address(EXTERNAL).ip)
    ext = str(subnet(EXTERNAL))
    inet, arp = "inet", "arp"
    # The iptables(-nft) tables kh used before (FORWARD policy DROP, the masquerade) go: left
    # in place, their forward chain would still drop bridged frames under br_netfilter. kh's
    # namespace is kh's own, so nothing else keeps rules there.
    cmds = [c for name in LEGACY for c in _table("ip", name)[:2]]
    cmds += _table(inet)
    cmds.append(_chain(inet, "input", "filter", "input", 0, "drop"))
    cmds += [
        _rule(inet, "input", _is(_meta("iifname"), "lo"), ACCEPT),
        # replies to what the host itself was asked on the public bridge, and nothing else
        _rule(inet, "input", _is(_meta("iifname"), plan.public),
              _is({"ct": {"key": "state"}}, ["established", "related"], "in"), ACCEPT),
    ]
    if plan.ports:
        cmds.append(_rule(inet, "input", _is(_meta("iifname"), plan.public),
                          _is(_field("ip", "daddr"), public),
                          _is(_field("tcp", "dport"), {"set": list(plan.ports)}),
                          _is({"ct": {"key": "state"}}, ["new"], "in"), ACCEPT))
    for t in plan.tunnels:  # VXLAN from the peer hosts only, on the underlay only
        cmds.append(_rule(inet, "input", _is(_meta("iifname"), t.ifname),
                          _is(_field("ip", "saddr"), {"set": list(t.peers)}),
                          _is(_field("ip", "daddr"), t.address),
                          _is(_field("udp", "dport"), t.port), ACCEPT))
    cmds.append(_chain(inet, "forward", "filter", "forward", 0, "drop"))
    if plan.bridges:
        # Frames bridged inside one domain reach this hook only through br_netfilter (in and
        # out are then the same bridge): they pass, whatever the host's sysctls say. Routed
        # packets never have in == out here except a hairpin inside one domain.
        pairs = [{"concat": [b, b]} for b in plan.bridges]
        cmds.append(_rule(inet, "forward",
                          _is({"concat": [_meta("iifname"), _meta("oifname")]},
                              {"set": pairs}), ACCEPT))
    if plan.uplink:
        cmds += [
            _rule(inet, "forward", _is(_meta("iifname"), plan.external),
                  _is(_meta("oifname"), plan.uplink), _is(_field("ip", "saddr"), _net(ext)),
                  ACCEPT),
            # the outside world reaches external nodes, as in the paper (Listing 1's pages)
            _rule(inet, "forward", _is(_meta("iifname"), plan.uplink),
                  _is(_meta("oifname"), plan.external), _is(_field("ip", "daddr"), _net(ext)),
                  ACCEPT),
        ]
    cmds.append(_chain(inet, "output", "filter", "output", 0, "drop"))
    mine = ["lo", plan.public, plan.external] + ([plan.uplink] if plan.uplink else [])
    cmds.append(_rule(inet, "output", _is(_meta("oifname"), {"set": mine}), ACCEPT))
    for t in plan.tunnels:  # and to them only
        cmds.append(_rule(inet, "output", _is(_meta("oifname"), t.ifname),
                          _is(_field("ip", "saddr"), t.address),
                          _is(_field("ip", "daddr"), {"set": list(t.peers)}),
                          _is(_field("udp", "dport"), t.port), ACCEPT))
    if plan.uplink:
        cmds += [
            _chain(inet, "postrouting", "nat", "postrouting", 100, "accept"),
            _rule(inet, "postrouting", _is(_meta("oifname"), plan.uplink),
                  _is(_field("ip", "saddr"), _net(ext)), {"masquerade": None}),
        ]
    # ARP: each address of the host answered only on its own bridge; nothing said elsewhere
    cmds += _table(arp)
    cmds.append(_chain(arp, "input", "filter", "input", 0, "drop"))
    cmds += [_rule(arp, "input", _is(_meta("iifname"), bridge),
                   _is(_field("arp", "daddr ip"), addr), ACCEPT)
             for bridge, addr in ((plan.public, public), (plan.external, gateway))]
    if plan.uplink:
        cmds.append(_rule(arp, "input", _is(_meta("iifname"), plan.uplink), ACCEPT))
    if plan.underlays:  # the network between kh's hosts: ARP as any host there (arp_ignore
        # answers only for the interface's own address), so a peer can tell this host is up
        cmds.append(_rule(arp, "input", _is(_meta("iifname"), plan.underlays), ACCEPT))
    cmds.append(_chain(arp, "output", "filter", "output", 0, "drop"))
    cmds.append(_rule(arp, "output", _is(_meta("oifname"), {"set": mine[1:]}), ACCEPT))
    if plan.underlays:
        cmds.append(_rule(arp, "output", _is(_meta("oifname"), plan.underlays), ACCEPT))
    return cmds


def apply(netns: str, commands: Sequence[Json]) -> None:
    """Load ``commands`` into namespace ``netns`` in one nft transaction (all or nothing).
    FirewallError with nft's own words when it refuses."""
    doc = json.dumps({"nftables": list(commands)}).encode()
    try:
        proc.run(nsutil.enter_argv(netns) + ["nft", "-j", "-f", "-"], input=doc, what="nft")
    except KhError as e:
        raise FirewallError(f"cannot load kh's firewall into {netns}: {e}") from None


def load(ctx: NftContext, commands: Sequence[Json]) -> None:
    """Load ``commands`` through a libnftables context made in kh's namespace, in one
    transaction (all or nothing). FirewallError with nft's own words when it refuses."""
    try:
        ctx.run(list(commands))
    except KhError as e:
        # NftContext words its refusals for anti-spoofing's rules; keep only nft's reason
        reason = str(e).partition("rules: ")[2] or str(e)
        raise FirewallError(f"nft refused kh's firewall: {reason}") from None


def listed(netns: str) -> list[Json]:
    """kh's tables as nft lists them now (nft's JSON objects: table, chain, rule, ...)."""
    out: list[Json] = []
    for family in ("inet", "arp"):
        r = proc.run(nsutil.enter_argv(netns) + ["nft", "-j", "list", "table", family, TABLE],
                     check=False)
        if r.returncode == 0:
            out += [o for o in json.loads(r.stdout)["nftables"] if "metainfo" not in o]
    return out


def served_ports(netns: str) -> tuple[int, ...]:
    """The TCP ports kh's firewall in ``netns`` serves now (a khd's API and ssh), so that
    another kh command reloading the ruleset there (`kh fabric stretch`) keeps them."""
    ports: set[int] = set()
    for o in listed(netns):
        rule = o.get("rule")
        if not rule or rule.get("chain") != "input":
            continue
        for e in rule.get("expr", []):
            m = e.get("match", {})
            if m.get("left") == _field("tcp", "dport") and isinstance(m.get("right"), dict):
                ports.update(int(p) for p in m["right"].get("set", []))
    return tuple(sorted(ports))


# -- the namespace's sysctls -------------------------------------------------------------------
def read_sysctls(netns: str, keys: Iterable[str]) -> dict[str, str]:
    """The values of /proc/sys/net keys inside ``netns``; keys that do not exist are left out."""
    keys = list(keys)

    def read() -> dict[str, str]:
        found = {}
        for key in keys:
            try:
                with open("/proc/sys/" + key.replace(".", "/")) as f:
                    found[key] = f.read().strip()
            except FileNotFoundError:
                continue
        return found

    return nsutil.run_in(netns, read)


def write_sysctls(netns: str, values: Sequence[tuple[str, str]]) -> None:
    """Set keys in order inside ``netns``; a key that does not exist is skipped (br_netfilter
    not loaded). KhError if the kernel refuses one."""

    def write() -> None:
        for key, value in values:
            path = "/proc/sys/" + key.replace(".", "/")
            if not os.path.exists(path):
                continue
            try:
                with open(path, "w") as f:
                    f.write(value)
            except OSError as e:
                raise KhError(f"cannot set {key}={value} in {netns}: {e.strerror}") from None

    nsutil.run_in(netns, write)


def hardening(uplink: bool) -> list[tuple[str, str]]:
    """The namespace's sysctls, in the order they are set: ``default`` before ``all`` so that
    interfaces made later inherit them too."""
    values = [
        # no IPv6 at all in kh's namespace: no link-local address, no ND answered anywhere
        ("net.ipv6.conf.default.disable_ipv6", "1"), ("net.ipv6.conf.all.disable_ipv6", "1"),
        # ARP answered only for an address of the interface asked on, and sent only with one
        ("net.ipv4.conf.default.arp_ignore", "1"), ("net.ipv4.conf.all.arp_ignore", "1"),
        ("net.ipv4.conf.default.arp_announce", "2"), ("net.ipv4.conf.all.arp_announce", "2"),
        # never inherited from the host: on only towards an uplink
        ("net.ipv4.ip_forward", "1" if uplink else "0"),
        ("net.ipv6.conf.default.forwarding", "0"), ("net.ipv6.conf.all.forwarding", "0"),
    ]
    return values + [(key, "0") for key in BRIDGE_NF]


def bridge_nf_on(netns: str) -> list[str]:
    """br_netfilter's switches that are on in ``netns`` (something turned them on, or the
    module was loaded after kh set them)."""
    return [k for k, v in read_sysctls(netns, BRIDGE_NF).items() if v != "0"]
