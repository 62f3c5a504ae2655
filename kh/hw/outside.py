"""The outside world: a network namespace kh makes and owns, where the external domain's uplink
ends (kh.hw.fabric wires it: the veth ``<prefix>out0`` at 10.254.255.2/30, and a route to the
external domain's 10.0.0.0/16 through kh's namespace).

It stands for "the rest of the Internet" of the paper's external domain without being any of
it: it holds only its loopback and that veth, so nothing run there (`kh outside CMD`, khdo's
`peripcmd`, `kh publish`'s forwarder) reaches anything but external-domain nodes, and the
host's own network is out of its reach (its 127.0.0.1 is its own). No IPv6, no forwarding.
Its name is ``<prefix>-outside``: kh's tag, so `kh clean` finds it, and an operator's own
namespace (`--uplink-netns`) may not take it.
"""

from __future__ import annotations

import contextlib
import logging

from pyroute2 import NetNS, netns

from kh.errors import KhError
from kh.hw import firewall
from kh.hw import netns as nsutil

log = logging.getLogger("kh.fabric")

# Set in the order given ("default" before "all", so the veth made later inherits them too).
SYSCTLS = (
    ("net.ipv6.conf.default.disable_ipv6", "1"), ("net.ipv6.conf.all.disable_ipv6", "1"),
    ("net.ipv4.ip_forward", "0"),  # never inherited from the host: nothing is routed on
)


def ensure(name: str) -> bool:
    """Make namespace ``name`` if it is not there (True when made), with its sysctls and its
    loopback up; one made by an earlier khd is taken as it is. KhError if the kernel
    refuses."""
    made = False
    if not nsutil.exists(name):
        try:
            netns.create(name)
        except OSError as e:
            raise KhError(f"cannot create network namespace {name}: {e.strerror}",
                          "kh's outside world needs root") from None
        made = True
        log.info("made the outside world's namespace %s", name)
    firewall.write_sysctls(name, list(SYSCTLS))
    with contextlib.closing(NetNS(name)) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    return made


def remove(name: str) -> bool:
    """Remove namespace ``name`` if it is there (True when it was). A process still in it
    keeps it alive, nameless, until it exits (control.clean names such processes)."""
    if not nsutil.exists(name):
        return False
    netns.remove(name)
    return True
