"""One domain across several hosts, all or nothing (issue 16, item 3): the caller (khd) names
the hosts that have a node in the domain, each as a ``Side`` (this host's fabric, or another
host reached by a command runner such as ssh), and ``span`` stretches the domain on every one
of them with the others as peers (kh.hw.stretch). When a host refuses, the sides this call made
are taken away again, so nothing is half-made across hosts; the error is the refusing host's own
line ("host b: VXLAN port 4789 is taken ...").

A remote side runs `kh fabric stretch|unstretch` there through ``runner``: the argv prefix that
reaches the host (``["ssh", "-i", KEY, "-o", "BatchMode=yes", "root@HOST", "--"]``, or nothing
in tests where the "host" is a namespace on this machine); every word after it was checked by
kh.hw.stretch.remote_argv, so ssh's joining them with spaces changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kh import proc
from kh.errors import KhError
from kh.hw import stretch
from kh.hw.stretch import Made, Peer, StretchError, Underlay

if TYPE_CHECKING:
    from kh.hw.fabric import Fabric

log = logging.getLogger("kh.span")
REMOTE_TIMEOUT = 60.0  # s for one `kh fabric` command on another host
REMOTE_OUTPUT = 1 << 20  # bytes one `kh fabric` command there may print (its JSON is small)
MAX_LINE = 200  # characters of another host's error line kh passes on
# `kh fabric` commands run on one host at once: each is an ssh connection, and an sshd drops
# unauthenticated ones past a few per source (dropbear: 5; OpenSSH's MaxStartups: from 10).
MAX_REMOTE = 4


def host_gate() -> threading.BoundedSemaphore:
    """One host's bound on its concurrent `kh fabric` commands (share it between that host's
    ``remote`` side and its ``RemoteFabric``)."""
    return threading.BoundedSemaphore(MAX_REMOTE)


@dataclass(frozen=True)
class Side:
    """One host of a stretched domain: its name, its underlay end, and how its side is made
    (``ensure(netid, peers) -> Made``) and taken away (``remove(netid, bridge)``: the bridge
    too when the ensure being undone made it)."""

    host: str
    underlay: Underlay
    ensure: Callable[[int, Sequence[Peer]], Made]
    remove: Callable[[int, bool], object]

    @property
    def peer(self) -> Peer:
        return Peer(self.host, self.underlay.address)


def local(fabric: Fabric, underlay: Underlay, host: str) -> Side:
    """This host's side: kh.hw.stretch on ``fabric`` itself."""
    return Side(host, underlay,
                lambda netid, peers: stretch.ensure(fabric, underlay, netid, peers, host),
                lambda netid, bridge: stretch.remove(fabric, netid, bridge))


def _remote_error(host: str, e: KhError) -> StretchError:
    """The remote kh's own one line (it names the host), or what kept it from answering."""
    tail = getattr(e, "output_tail", "") or ""
    said = [ln[4:] for ln in tail.splitlines() if ln.startswith("kh: ")]
    if said:
        return StretchError(printable(said[-1]))
    last = tail.strip().splitlines()[-1:] or [e.message]
    return StretchError(f"host {host}: `kh fabric` did not answer: {printable(last[0])}",
                        "is kh installed there, and the host reachable?")


def printable(text: str) -> str:
    """Another host's line as kh passes it on: control characters (terminal escapes) dropped,
    at most MAX_LINE characters."""
    clean = "".join(c for c in text if c.isprintable())
    return clean if len(clean) <= MAX_LINE else clean[:MAX_LINE] + "..."


def remote(runner: Sequence[str], prefix: str, underlay: Underlay, host: str,
           kh: str = "kh", gate: threading.BoundedSemaphore | None = None) -> Side:
    """Another host's side, made by `kh fabric` there through ``runner`` (its argv prefix;
    at most ``gate``'s count at once, host_gate). A refusal there is a StretchError with that
    host's line; `kh fabric stretch` says what it made new, so a failed span undoes exactly
    that."""
    bound = gate or contextlib.nullcontext()

    def ensure(netid: int, peers: Sequence[Peer]) -> Made:
        argv = [*runner, *stretch.remote_argv(prefix, underlay, netid, peers, host, kh)]
        try:
            with bound:
                out = proc.run(argv, timeout=REMOTE_TIMEOUT, limit=REMOTE_OUTPUT,
                               what=f"kh fabric stretch on {host}")
            made = json.loads(out.stdout)["made"]
            return Made(bool(made["device"]), bool(made["bridge"]))
        except KhError as e:
            raise _remote_error(host, e) from None
        except (ValueError, KeyError, TypeError):
            raise StretchError(f"host {host}: `kh fabric stretch` answered something else",
                               "is the same kh installed there?") from None

    def remove(netid: int, bridge: bool) -> object:
        argv = [*runner, kh, "fabric", "unstretch", "--prefix", prefix,
                *(["--bridge"] if bridge else []), str(netid)]
        try:
            with bound:
                return proc.run(argv, timeout=REMOTE_TIMEOUT, limit=REMOTE_OUTPUT,
                                what=f"kh fabric unstretch on {host}")
        except KhError as e:
            raise _remote_error(host, e) from None

    return Side(host, underlay, ensure, remove)


def span(netid: int, sides: Sequence[Side]) -> list[str]:
    """Stretch domain ``netid`` over exactly these hosts: each side with every other as a peer.
    All or nothing: when one host refuses, the sides this call made new are removed again (in
    reverse order) and the refusal is raised. The hosts whose side was made new, in order."""
    names = [s.host for s in sides]
    if len(set(names)) != len(names):
        raise StretchError(f"domain {netid}: a host is named twice in {', '.join(names)}")
    made: list[tuple[Side, Made]] = []
    try:
        for side in sides:
            m = side.ensure(netid, [o.peer for o in sides if o is not side])
            if m.device or m.bridge:
                made.append((side, m))
    except BaseException:
        for side, m in reversed(made):
            try:
                side.remove(netid, m.bridge)
            except Exception as e:  # the first fault is the one to report; this one is logged
                log.warning("host %s: domain %d's side stays after a failed span: %s",
                            side.host, netid, e)
        raise
    return [s.host for s, m in made if m.device]


def unspan(netid: int, sides: Sequence[Side]) -> list[str]:
    """Take domain ``netid``'s side away on every host (each tried, whatever the others did);
    the faults, one line each (empty: all done)."""
    faults = []
    for side in sides:
        try:
            side.remove(netid, False)
        except Exception as e:
            faults.append(f"host {side.host}: {e}" if not str(e).startswith("host ") else str(e))
    return faults


class RemoteFabric:
    """Another host's fabric through `kh fabric` behind ``runner`` (as ``remote``): the taps of
    the nodes khd runs there (through libvirt), which libvirt's ``managed='no'`` interfaces need
    made in that host's fabric namespace. One command per node. KhError with that host's line."""

    def __init__(self, runner: Sequence[str], prefix: str, host: str, kh: str = "kh",
                 gate: threading.BoundedSemaphore | None = None) -> None:
        self.runner, self.prefix, self.host, self.kh = tuple(runner), prefix, host, kh
        self.gate = gate  # at most its count of commands there at once (host_gate)

    def _run(self, *words: str) -> str:
        argv = [*self.runner, self.kh, "fabric", *words]
        try:
            with self.gate or contextlib.nullcontext():
                return proc.run(argv, timeout=REMOTE_TIMEOUT, limit=REMOTE_OUTPUT,
                                what=f"kh fabric {words[0]} on {self.host}").stdout
        except KhError as e:
            raise _remote_error(self.host, e) from None

    def wire(self, node: int, netids: Sequence[int | None]) -> list[str]:
        """Node ``node``'s taps there, slot by slot in ``netids`` (None: unplugged); their
        names."""
        out = self._run("wire", "--prefix", self.prefix, "--host", self.host, str(int(node)),
                        *("-" if n is None else str(int(n)) for n in netids))
        try:
            taps = json.loads(out)["taps"]
            ok = isinstance(taps, list) and len(taps) == len(netids) and all(
                isinstance(t, str) and stretch.IFNAME.fullmatch(t) for t in taps)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise StretchError(f"host {self.host}: `kh fabric wire` answered something else",
                               "is the same kh installed there?")
        return list(taps)

    def unwire(self, node: int, slots: int) -> None:
        """Remove node ``node``'s taps there."""
        self._run("unwire", "--prefix", self.prefix, str(int(node)), str(int(slots)))
