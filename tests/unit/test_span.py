"""One domain across hosts, all or nothing (kh.hw.span): host a's side made in-process, host b's
through `kh fabric` as khd runs it over ssh (here with no ssh: b is a namespace on this machine).
Needs root, /dev/net/tun, nft and kh in .venv."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from kh.hw import firewall, span, stretch
from kh.hw import netns as nsutil
from kh.hw.stretch import StretchError
from tests.unit.twohost import Host, two_hosts

KH = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "kh"
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None or not KH.exists(),
    reason="needs root, nft and kh in .venv (two fabrics, `kh fabric` for the remote side)")
D = 3


def sides(a: Host, b: Host, kh: str = str(KH)) -> list[span.Side]:
    return [span.local(a.fabric, a.underlay, a.name),
            span.remote([], b.cfg.prefix, b.underlay, b.name, kh=kh)]


def udp_rules(h: Host) -> int:
    return sum("rule" in o and "'udp'" in str(o) for o in firewall.listed(h.cfg.netns))


def test_span_makes_every_side_and_unspan_takes_them_away() -> None:
    with two_hosts("spa") as (a, b):
        assert span.span(D, sides(a, b)) == ["a", "b"]
        assert stretch.stretched(a.cfg)[D].peers == (b.underlay.address,)
        assert stretch.stretched(b.cfg)[D].peers == (a.underlay.address,)
        assert span.span(D, sides(a, b)) == []  # nothing new the second time
        assert span.unspan(D, sides(a, b)) == []
        assert stretch.stretched(a.cfg) == {} and stretch.stretched(b.cfg) == {}
        for h in (a, b):  # the bridges stay: they are the domain's (khd removes them)
            assert h.cfg.bridge(D) in h.fabric.links()


def test_a_host_that_refuses_leaves_nothing_on_the_others() -> None:
    """b's VXLAN port is taken: the span fails with b's own line, and a's side, made first,
    is gone again (device, bridge, firewall rules); a `kh` that cannot run on b says so."""
    with two_hosts("spb") as (a, b):
        sock = nsutil.run_in(b.cfg.netns, lambda: socket.socket(socket.AF_INET,
                                                                 socket.SOCK_DGRAM))
        try:
            sock.bind(("0.0.0.0", b.underlay.port))
            with pytest.raises(StretchError, match=r"^host b: VXLAN port 4789 is taken"):
                span.span(D, sides(a, b))
        finally:
            sock.close()
        for h in (a, b):
            assert stretch.stretched(h.cfg) == {} and udp_rules(h) == 0
            assert h.cfg.bridge(D) not in h.fabric.links()
        with pytest.raises(StretchError, match=r"^cannot start /nonexistent/kh|^host b: "):
            span.span(D, sides(a, b, kh="/nonexistent/kh"))
        assert stretch.stretched(a.cfg) == {} and udp_rules(a) == 0


def test_a_remote_hosts_node_taps_through_kh_fabric() -> None:
    """RemoteFabric.wire makes a node's taps on host b, slot 0 in domain 3 (stretched: it takes
    the domain's MTU), slot 1 unplugged; unwire removes them. A bad slot list is one line."""
    with two_hosts("spc") as (a, b):
        span.span(D, sides(a, b))
        remote = span.RemoteFabric([], b.cfg.prefix, b.name, kh=str(KH))
        assert remote.wire(7, [D, None]) == [b.cfg.tap(7, 0), b.cfg.tap(7, 1)]
        with b.fabric.ns() as ns:
            links = {str(link.get_attr("IFLA_IFNAME")): link for link in ns.get_links()}
        bridge = links[b.cfg.bridge(D)]["index"]
        assert links[b.cfg.tap(7, 0)].get_attr("IFLA_MASTER") == bridge
        assert links[b.cfg.tap(7, 0)].get_attr("IFLA_MTU") == 1450
        assert links[b.cfg.tap(7, 1)].get_attr("IFLA_MASTER") is None
        bad = subprocess.run([str(KH), "fabric", "wire", "--prefix", b.cfg.prefix, "7", "3",
                              "x"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr == "kh: slots 3 x: each a netid or '-'\n"
        remote.unwire(7, 2)
        assert not {b.cfg.tap(7, 0), b.cfg.tap(7, 1)} & set(b.fabric.links())
