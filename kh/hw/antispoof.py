"""Anti-spoofing on the shared domains (issue 11, item 2): an nftables table of kh's own in
the ``bridge`` family, in kh's namespace, checked on every frame a node's tap sends into a
bridge (hook ``prerouting``), so it needs no ``br_netfilter`` and no guest cooperation.

What a tap may send, by the kind of domain it is plugged into:

- private, or no domain: anything (a principal's nodes may bridge, route or run any protocol
  among themselves). Such taps are in the set ``free`` and accepted at once.
- public and external: Ethernet source MAC = that NIC's MAC; an ARP's sender MAC the same and
  its sender address the node's assigned address; IPv4 only from the node's assigned address;
  IPv6 link-local only from the link-local the MAC gives (EUI-64); no 802.1Q/802.1ad tags
  (a tag would carry a second, unchecked network inside) and nothing to the IEEE 802.1 group
  addresses 01:80:c2:00:00:0X (STP, LLDP, pause: the bridge's own business); ARP claiming
  one of the service's addresses (``host_address`` of public and external) never.
- external only: IPv4 and ARP, nothing else (the paper: "restricted to the protocol technology
  provided for external communications").

Node addresses are static: ``kh.ethN`` boot keys give ``node_address(netid, node)``, and no
DHCP server serves the shared domains, so 0.0.0.0 is never allowed as a source there.

The rules fail closed: a tap that is neither ``free`` nor has its identity in the sets drops
every frame. Rules stay fixed; plugging a tap changes only set elements, in one nft JSON
transaction each (atomic; libnftables in-process, ``NftContext``), before the tap moves when
that tightens and after it when that loosens, so the rules hold at every instant of a move.
``rebuild`` puts the table back from the taps' actual wiring (khd's start, or the first change
after this object was made).

The kernel here has no ``meta ibrname`` (nft_meta_bridge), so a tap's domain kind is tracked
in sets keyed by interface name instead of read from its bridge.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import logging
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pyroute2 import NetNS

from kh import deps, proc
from kh.allocation import host_address, node_address
from kh.errors import KhError
from kh.hw import netns as nsutil
from kh.hw.tags import FabricConfig
from kh.model import EXTERNAL, PUBLIC

log = logging.getLogger("kh.antispoof")

TABLE = "kh_antispoof"
CHAIN = "spoof"
FAMILY = "bridge"
SHARED = (EXTERNAL, PUBLIC)
ETH_VLAN, ETH_QINQ, ETH_QINQ_OLD = 0x8100, 0x88A8, 0x9100
Json = dict[str, Any]
NFT_CTX_OUTPUT_JSON = 1 << 4


class AntiSpoofError(KhError):
    """nft refused a change of kh's anti-spoofing table."""


def nic_mac(node: int, slot: int) -> str:
    """The MAC of node ``node``'s interface ``slot`` (kh.service.nodes.mac gives QEMU the same:
    a unit test holds them equal)."""
    return f"52:54:00:{node >> 8 & 0xff:02x}:{node & 0xff:02x}:{slot:02x}"


def link_local(mac: str) -> str:
    """The IPv6 link-local address a MAC gives by EUI-64 (Linux's default)."""
    b = bytes(int(x, 16) for x in mac.split(":"))
    eui = bytes([b[0] ^ 0x02]) + b[1:3] + b"\xff\xfe" + b[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui))


@dataclass(frozen=True)
class Plug:
    """Where a tap is plugged: ``netid`` None for no domain or a private one (free)."""

    node: int
    slot: int
    netid: int | None

    @property
    def shared(self) -> bool:
        return self.netid in SHARED


def plug_of(node: int, slot: int, netid: int | None) -> Plug:
    return Plug(node, slot, netid if netid in SHARED else None)


def _elem(name: str, *items: object) -> Json:
    return {"family": FAMILY, "table": TABLE, "name": name,
            "elem": [{"concat": list(i)} if isinstance(i, tuple) else i for i in items]}


def _goto(chain: str) -> Json:
    return {"goto": {"target": chain}}


def elements(cfg: FabricConfig, p: Plug) -> list[Json]:
    """The set and map elements a tap has in state ``p``: [{family, table, name, elem}, ...].
    The map ``taps`` sends a tap's frames to their domain kind's chain (or accepts them)."""
    tap = cfg.tap(p.node, p.slot)
    if p.netid is None:
        return [_elem("taps", [tap, {"accept": None}])]
    mac = nic_mac(p.node, p.slot)
    return [_elem("macs", (tap, mac)),
            _elem("addrs", (tap, str(node_address(p.netid, p.node).ip))),
            _elem("addrs6", (tap, link_local(mac))),
            _elem("taps", [tap, _goto("external" if p.netid == EXTERNAL else "public")])]


def _add(e: Json) -> Json:
    return {"add": {"element": e}}


def _remove(e: Json) -> list[Json]:
    # add, then delete: removing what may already be gone never fails the transaction
    return [{"add": {"element": e}}, {"delete": {"element": e}}]


def batch(*commands: Json) -> str:
    return json.dumps({"nftables": list(commands)})


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _pl(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(op: str, left: Json, right: object) -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _by_tap(field: Json) -> Json:
    return {"concat": [_meta("iifname"), field]}


def tunnel_ports(cfg: FabricConfig) -> str:
    """nft's wildcard for kh's vxlan devices (kh.hw.stretch): ``<prefix>vx*``. Tap names are
    ``<prefix><digits>s<digits>``, so no tap matches it."""
    return cfg.vxlan(0)[:-1] + "*"


def rules(tunnels: str | None = None) -> dict[str, list[list[Json]]]:
    """Each chain's rules, in order, as nft JSON expression lists: {chain: [rule, ...]}. The
    base chain sends a tap's frames by the verdict map ``taps`` (accept: free; goto public or
    external); a tap the map does not know drops everything. Each frame meets few rules: a
    lawful IPv4 frame on the public domain, five lookups.

    ``tunnels`` (``tunnel_ports``): frames from kh's vxlan devices are accepted. They come
    from another host's nodes, checked by that host's table at their taps; only the peer
    hosts' underlay addresses can send into a vxlan device (kh.hw.firewall). Without the rule
    a stretched domain would carry nothing from the other host (fail closed)."""
    drop: Json = {"drop": None}
    service = {"set": [str(host_address(n).ip) for n in SHARED]}
    own_mac = [_match("!=", _by_tap(_pl("ether", "saddr")), "@macs"), drop]
    # IEEE 802.1 link-local groups (STP, pause, LLDP, ...): the bridge's business, not a node's
    groups = [_match("==", {"&": [_pl("ether", "daddr"), "ff:ff:ff:ff:ff:f0"]},
                     "01:80:c2:00:00:00"), drop]
    ip_or_arp: list[object] = [["ip", _goto("ip4")], ["arp", _goto("arp")]]
    tagged: list[object] = [[t, drop] for t in (ETH_VLAN, ETH_QINQ, ETH_QINQ_OLD)]

    def by_type(verdicts: list[object]) -> list[Json]:
        return [{"vmap": {"key": _pl("ether", "type"), "data": {"set": verdicts}}}]

    return {
        CHAIN: [[{"vmap": {"key": _meta("iifname"), "data": "@taps"}}],
                *([[_match("==", _meta("iifname"), tunnels), {"accept": None}]]
                  if tunnels else []), [drop]],
        "public": [own_mac, groups, by_type([*ip_or_arp, ["ip6", _goto("ip6")], *tagged])],
        "external": [own_mac, groups, by_type(ip_or_arp), [drop]],  # TCP/IP only
        "ip4": [[_match("!=", _by_tap(_pl("ip", "saddr")), "@addrs"), drop]],
        "arp": [[_match("==", _pl("arp", "saddr ip"), service), drop],
                [_match("!=", _by_tap(_pl("arp", "saddr ether")), "@macs"), drop],
                [_match("!=", _by_tap(_pl("arp", "saddr ip")), "@addrs"), drop]],
        "ip6": [[_match("==", _pl("ip6", "saddr"), {"prefix": {"addr": "fe80::", "len": 10}}),
                 _match("!=", _by_tap(_pl("ip6", "saddr")), "@addrs6"), drop]],
    }


def table(plugs: list[Plug], cfg: FabricConfig) -> list[Json]:
    """One transaction that makes the table (or empties it) and fills it for ``plugs``."""
    t = {"family": FAMILY, "name": TABLE}
    sets = {"macs": ["ifname", "ether_addr"], "addrs": ["ifname", "ipv4_addr"],
            "addrs6": ["ifname", "ipv6_addr"]}
    where = {"family": FAMILY, "table": TABLE}
    cmds: list[Json] = [{"add": {"table": t}}, {"delete": {"table": t}}, {"add": {"table": t}}]
    for name, typ in sets.items():
        cmds.append({"add": {"set": {**where, "name": name, "type": typ}}})
    cmds.append({"add": {"map": {**where, "name": "taps", "type": "ifname", "map": "verdict"}}})
    chains = rules(tunnel_ports(cfg))
    for name in chains:
        base = {"type": "filter", "hook": "prerouting", "prio": -200, "policy": "accept"}
        cmds.append({"add": {"chain": {**where, "name": name, **(base if name == CHAIN else {})}}})
    cmds += [{"add": {"rule": {**where, "chain": name, "expr": r}}}
             for name, rs in chains.items() for r in rs]
    cmds += [_add(e) for p in plugs for e in elements(cfg, p)]
    return cmds


def moves(cfg: FabricConfig, old: Plug | None, new: Plug) -> tuple[list[Json], list[Json]]:
    """(before, after): the commands to run before the tap changes bridge and after it, so
    that at no instant is it looser than both its old and its new state allow. ``old`` None:
    the table has nothing of this tap."""
    old_elems = elements(cfg, old) if old is not None else []
    new_elems = elements(cfg, new)
    if old == new:
        return [], []
    if old is not None and not old.shared and not new.shared:
        return [], []
    if not new.shared:  # loosening: filtered as before while it moves, free once there
        return [], [c for e in old_elems for c in _remove(e)] + [_add(e) for e in new_elems]
    if old is None or not old.shared:  # tightening: its identity before it arrives
        return [c for e in old_elems for c in _remove(e)] + [_add(e) for e in new_elems], []
    # shared to another shared domain: nothing passes while it moves
    return [c for e in old_elems for c in _remove(e)], [_add(e) for e in new_elems]


def _libnftables() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
    except OSError as e:
        raise AntiSpoofError(f"cannot load libnftables: {e}", deps.missing_hint("nft")) from None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


class NftContext:
    """libnftables (the library behind nft, same package) in-process, bound to one network
    namespace: its context is made by a thread inside the namespace, and its netlink socket
    stays there. A change costs 0.3 ms this way; `nsenter ... nft -j -f -` took 20 ms on this
    host, and so did a fresh context per change (it reads the ruleset into its cache first):
    this is on khget's path. The context keeps the namespace alive until ``close`` (or until
    it is garbage-collected). Not thread-safe: callers hold a lock."""

    def __init__(self, netns: str) -> None:
        lib = self.lib = _libnftables()

        def new() -> int:
            ctx = lib.nft_ctx_new(0)
            if not ctx:
                raise AntiSpoofError("libnftables could not make a context")
            # with JSON output, libnftables 1.0.6 reads its input as JSON too
            lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            return int(ctx)

        self.ctx = nsutil.run_in(netns, new)
        self._free = weakref.finalize(self, lib.nft_ctx_free, ctypes.c_void_p(self.ctx))

    def run(self, commands: list[Json]) -> None:
        """Apply ``commands`` (nft JSON) in one transaction; AntiSpoofError if refused."""
        if not self._free.alive:
            raise AntiSpoofError("libnftables context already closed")
        if self.lib.nft_run_cmd_from_buffer(self.ctx, batch(*commands).encode()) != 0:
            err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode(errors="replace")
            lines = err.strip().splitlines()
            raise AntiSpoofError("nft refused kh's anti-spoofing rules: "
                                 + (lines[0] if lines else "no reason given"))

    def close(self) -> None:
        self._free()


class AntiSpoof:
    """kh's anti-spoofing table in the fabric namespace, and what it holds for each tap."""

    def __init__(self, cfg: FabricConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a move ends
        self._moving: set[tuple[int, int]] = set()  # taps in the middle of a move
        self._plugs: dict[tuple[int, int], Plug] | None = None  # None: not built yet
        self._ctx: NftContext | None = None

    def _nft(self, commands: list[Json]) -> None:
        if commands:
            if self._ctx is None:
                self._ctx = NftContext(self.cfg.netns)
            self._ctx.run(commands)

    def close(self) -> None:
        """Let go of the namespace (before it is removed: the context would keep it alive)."""
        with self._lock:
            if self._ctx is not None:
                self._ctx.close()
                self._ctx = None
            self._plugs = None

    def wiring(self) -> dict[tuple[int, int], Plug]:
        """Every kh tap in the namespace and where it is plugged now, from the kernel:
        {(node, slot): Plug}."""
        prefix = self.cfg.prefix
        with contextlib.closing(NetNS(self.cfg.netns)) as ns:
            links = list(ns.get_links())
        names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in links}
        bridges = {self.cfg.bridge(n): n for n in SHARED}
        out: dict[tuple[int, int], Plug] = {}
        for link in links:
            name = str(link.get_attr("IFLA_IFNAME"))
            node_s, _, slot_s = name[len(prefix):].partition("s")
            if not (name.startswith(prefix) and node_s.isdigit() and slot_s.isdigit()
                    and name == self.cfg.tap(int(node_s), int(slot_s))):
                continue
            master = names.get(int(link.get_attr("IFLA_MASTER") or 0))
            node, slot = int(node_s), int(slot_s)
            out[(node, slot)] = plug_of(node, slot, bridges.get(master or ""))
        return out

    def rebuild(self) -> None:
        """Make the table afresh, in one transaction, for the taps' present wiring (once no
        tap is in the middle of a move: its wiring would be read half-way)."""
        with self._lock:
            while self._moving:
                self._idle.wait()
            self._rebuild()

    def _rebuild(self) -> None:
        plugs = self.wiring()
        if self._ctx is not None:  # the namespace may be a new one of the same name
            self._ctx.close()
            self._ctx = None
        self._nft(table(list(plugs.values()), self.cfg))
        self._plugs = plugs
        log.info("anti-spoofing table built: %d taps on shared domains",
                 sum(p.shared for p in plugs.values()))

    @contextlib.contextmanager
    def moving(self, node: int, slot: int, netid: int | None) -> Iterator[None]:
        """Around moving a tap to ``netid`` (None: unplugged): the table is tightened before
        the move and loosened after it. A move that fails leaves the tap no looser than its
        old and new states both allow. Moves of different taps run side by side (the link
        change is the slow part: ~40 ms through pyroute2, against 0.3 ms for nft); a tap's
        moves take turns. Raises AntiSpoofError when nft refuses."""
        key = (node, slot)
        new = plug_of(node, slot, netid)
        with self._lock:
            while key in self._moving:
                self._idle.wait()
            self._moving.add(key)
        try:
            with self._lock:
                if self._plugs is None:
                    self._rebuild()
                assert self._plugs is not None
                before, after = moves(self.cfg, self._plugs.get(key), new)
                self._nft(before)
                if before and after:  # shared to shared: the table holds nothing of it now
                    self._plugs.pop(key, None)
                elif before:
                    self._plugs[key] = new
            yield
            with self._lock:
                if self._plugs is not None:  # None: closed meanwhile, nothing to keep up
                    self._nft(after)
                    self._plugs[key] = new
        finally:
            with self._lock:
                self._moving.discard(key)
                self._idle.notify_all()

    def listing(self) -> str:
        """The table as nft prints it (for people and tests)."""
        argv = nsutil.enter_argv(self.cfg.netns) + ["nft", "list", "table", FAMILY, TABLE]
        return proc.run(argv, what="nft").stdout

    def plugs(self) -> Mapping[tuple[int, int], Plug]:
        with self._lock:
            return dict(self._plugs or {})
