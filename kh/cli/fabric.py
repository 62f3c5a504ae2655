"""`kh fabric stretch|unstretch|show|underlay`: this host's side of domains that span hosts
(kh.hw.stretch), run as root on the host itself; khd runs `kh fabric stretch` on another host
over ssh to make that host's side (docs/multihost.md)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import click

from kh.cli.common import handle_errors
from kh.errors import KhError, UsageError
from kh.hw import firewall
from kh.hw import netns as nsutil
from kh.hw.tags import FabricConfig
from kh.service.config import PREFIX_RE

if TYPE_CHECKING:
    from kh.hw.fabric import Fabric
    from kh.hw.stretch import Peer


def _cfg(prefix: str) -> FabricConfig:
    if not PREFIX_RE.fullmatch(prefix):
        raise UsageError(f"prefix {prefix!r} is malformed", "[a-z][a-z0-9]{0,7}")
    if os.geteuid() != 0:
        raise KhError("kh fabric needs root", "it changes kh's network namespace")
    return FabricConfig(prefix=prefix)


def _fabric(cfg: FabricConfig, host: str, make: bool = False) -> Fabric:
    """This host's fabric. Where a khd of this prefix serves (its firewall lets its ports in),
    khd's own, kept serving them; otherwise another host's side (``Fabric.remote``: no kh
    address on its bridges), made when missing only with ``make`` (`kh fabric underlay`, a
    host's first kh command); KhError otherwise, before anything is made."""
    from kh.hw.fabric import Fabric
    if not nsutil.exists(cfg.netns):
        if not make:
            raise KhError(f"host {host}: kh's fabric {cfg.netns} does not exist here",
                          "kh fabric underlay DEV A.B.C.D/LEN makes it with its underlay")
        f = Fabric(cfg, remote=host)
        f.ensure()
        return f
    ports = firewall.served_ports(cfg.netns)
    return Fabric(cfg, ports=ports) if ports else Fabric(cfg, remote=host)


def _peer(text: str) -> Peer:
    from kh.hw.stretch import Peer
    name, sep, addr = text.partition("=")
    if not sep:
        raise UsageError(f"--peer {text!r} is malformed", "NAME=ADDRESS")
    return Peer(name, addr)


def register(main: click.Group) -> None:
    @main.group()
    def fabric() -> None:
        """This host's side of communication domains that span hosts (VXLAN)."""

    prefix_opt = click.option("--prefix", default="kh", show_default=True, envvar="KH_PREFIX",
                              help="The kh installation's tag (its fabric is PREFIX-fabric; "
                              "default $KH_PREFIX, as every kh command).")

    @fabric.command("stretch")
    @prefix_opt
    @click.option("--host", "host", default="this host", help="This host's kh name (errors).")
    @click.option("--underlay", "ifname", required=True,
                  help="The underlay interface, in the fabric namespace.")
    @click.option("--local", "address", required=True, help="Its IPv4 address.")
    @click.option("--port", default=4789, show_default=True, type=int, help="VXLAN UDP port.")
    @click.option("--peer", "peers", multiple=True, metavar="NAME=ADDRESS",
                  help="Another host with a node in the domain (repeat; exactly these).")
    @click.argument("netid", type=int)
    @handle_errors
    def stretch_cmd(prefix: str, host: str, ifname: str, address: str, port: int,
                    peers: tuple[str, ...], netid: int) -> None:
        """Stretch domain NETID from this host to exactly the given peers: its bridge, its
        vxlan device and FDB, MTUs, firewall. Prints the result as JSON."""
        from kh.hw import stretch
        cfg = _cfg(prefix)
        made = stretch.ensure(_fabric(cfg, host), stretch.Underlay(ifname, address, port), netid,
                              [_peer(p) for p in peers], host)
        click.echo(json.dumps({**stretch.stretched(cfg)[netid].as_json(),
                               "made": {"device": made.device, "bridge": made.bridge}}))

    @fabric.command("unstretch")
    @prefix_opt
    @click.option("--bridge", is_flag=True,
                  help="Remove the domain's bridge too when no tap is in it (undoing a stretch "
                       "that made it).")
    @click.argument("netid", type=int)
    @handle_errors
    def unstretch_cmd(prefix: str, bridge: bool, netid: int) -> None:
        """Take domain NETID's vxlan device away (the domain's bridge stays unless --bridge)."""
        from kh.hw import stretch
        cfg = _cfg(prefix)
        if not nsutil.exists(cfg.netns):
            click.echo(f"no fabric {cfg.netns} here")
            return
        gone = stretch.remove(_fabric(cfg, "this host"), netid, bridge)
        click.echo(f"domain {netid}: {'unstretched' if gone else 'was not stretched'}")

    @fabric.command("show")
    @prefix_opt
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @handle_errors
    def show_cmd(prefix: str, as_json: bool) -> None:
        """The domains stretched from this host: VNI, device, underlay, peers, MTU."""
        from kh.hw import stretch
        found = stretch.stretched(_cfg(prefix))
        if as_json:
            click.echo(json.dumps([s.as_json() for _, s in sorted(found.items())]))
            return
        for _, s in sorted(found.items()):
            click.echo(f"domain {s.netid}: vni {s.vni} {s.device} on {s.underlay.ifname} "
                       f"{s.underlay.address}:{s.underlay.port} mtu {s.mtu} peers "
                       f"{' '.join(s.peers) or '-'}")
        if not found:
            click.echo("no domain is stretched from this host")

    @fabric.command("underlays")
    @prefix_opt
    @handle_errors
    def underlays_cmd(prefix: str) -> None:
        """This host's underlay interfaces in kh's fabric (up, with an IPv4 address), as JSON:
        [{"ifname", "address", "mtu"}] (khd's `kh host add` reads another host's with it)."""
        from kh.hw.underlay import underlays
        click.echo(json.dumps([u.as_json() for u in underlays(_cfg(prefix))]))

    @fabric.command("libvirtd")
    @prefix_opt
    @handle_errors
    def libvirtd_cmd(prefix: str) -> None:
        """Start kh's own libvirtd in this host's fabric namespace (its directories under the
        state dir's libvirt/: KH_STATE_DIR, kh --state-dir), unless it runs: the daemon whose
        QEMUs use the taps khd makes here for its nodes (kh host add on khd's host). Prints
        its socket, for the URI: qemu+ssh://root@HOST/system?socket=SOCKET."""
        from kh.hw import libvirtd
        from kh.service import statedir
        from kh.service.config import ServiceConfig, default_state_dir
        from kh.settings import paths
        cfg = _cfg(prefix)
        if not nsutil.exists(cfg.netns):
            raise KhError(f"kh's fabric {cfg.netns} does not exist here",
                          "kh fabric underlay DEV A.B.C.D/LEN makes it with its underlay")
        # the state directory as khd's would be (marked: `kh clean` there removes it all)
        here = ServiceConfig(state_dir=default_state_dir(), images=paths().out, prefix=prefix,
                             outside=False)
        statedir.prepare(here)
        d = libvirtd.Libvirtd(here.libvirt_dir, cfg.netns, None)
        libvirtd.start(d, here.logs / "libvirtd.log")
        click.echo(str(d.socket))

    @fabric.command("wire")
    @prefix_opt
    @click.option("--host", "host", default="this host", help="This host's kh name.")
    @click.argument("node", type=int)
    @click.argument("netids", nargs=-1, metavar="NETID|-...")
    @handle_errors
    def wire_cmd(prefix: str, host: str, node: int, netids: tuple[str, ...]) -> None:
        """Node NODE's taps here, one per NIC slot, each plugged into the domain given for its
        slot ('-': none), making the domains' bridges (a node of this host that khd runs through
        libvirt elsewhere). Prints the taps as JSON."""
        from kh.allocation import MAX_NODE, NIC_SLOTS
        if not 1 <= node <= MAX_NODE or not 1 <= len(netids) <= NIC_SLOTS:
            raise UsageError(f"node {node} with {len(netids)} slots",
                             f"a node 1-{MAX_NODE}, 1-{NIC_SLOTS} slots")
        if any(n != "-" and not n.isdigit() for n in netids):
            raise UsageError(f"slots {' '.join(netids)}: each a netid or '-'")
        f = _fabric(_cfg(prefix), host)
        taps = []
        for slot, n in enumerate(netids):
            taps.append(f.ensure_tap(node, slot))
            if n != "-":
                f.ensure_domain(int(n))
            f.attach(node, slot, None if n == "-" else int(n))
        click.echo(json.dumps({"node": node, "taps": taps}))

    @fabric.command("unwire")
    @prefix_opt
    @click.argument("node", type=int)
    @click.argument("slots", type=click.IntRange(1, 16))
    @handle_errors
    def unwire_cmd(prefix: str, node: int, slots: int) -> None:
        """Remove node NODE's taps here (slots 0..SLOTS-1)."""
        f = _fabric(_cfg(prefix), "this host")
        names = f.links()
        for slot in range(slots):
            if f.cfg.tap(node, slot) in names:
                f.attach(node, slot, None)  # anti-spoofing lets go of it first
        f.remove_taps(node, slots)
        click.echo(f"node {node}: taps removed")

    @fabric.command("underlay")
    @prefix_opt
    @click.option("--host", "host", default="this host", help="This host's kh name.")
    @click.argument("dev")
    @click.argument("address", metavar="A.B.C.D/LEN")
    @handle_errors
    def underlay_cmd(prefix: str, host: str, dev: str, address: str) -> None:
        """Move host interface DEV into kh's fabric namespace as the underlay <prefix>ulN, with
        ADDRESS (a NIC on the network between kh's hosts; it returns to the host on `kh
        clean`). On a host where kh has no fabric yet, it is made (another host's side)."""
        from kh.hw.underlay import move_underlay
        cfg = _cfg(prefix)
        made = not nsutil.exists(cfg.netns)
        fabric = _fabric(cfg, host, make=True)
        try:
            u = move_underlay(cfg, dev, address)
        except KhError:
            if made:  # nothing half-made: the fabric this command made goes again
                fabric.destroy()
            raise
        click.echo(f"underlay {u.ifname} {u.address} in {cfg.netns}")
