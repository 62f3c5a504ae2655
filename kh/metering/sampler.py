"""khd's meter: one thread samples every allocated node's counters (issue 14, item 1).

Every ``interval`` seconds (KH_METER_INTERVAL, default 10), and at every change the service
makes (an allocation, a release, a reset, a domain join or leave, a principal's removal, khd's
start and stop), the meter reads, for each node that is allocated now or was at its last sample:

- its emulator's generation and cumulative CPU time (Source.cpu: the node's cgroup where there
  is one, else /proc/PID/stat); a new QEMU process is a new generation;
- every tap's cumulative bytes and packets (Source.taps: the kernel's link statistics of kh's
  fabric namespace, which the sampler's thread enters for good); a recreated tap (a new
  ifindex) is a new generation;

and compares them with the node's last sample (kh.metering.store.Last, kept in the state, so a
khd restart compares across the time it was down). An interval's length is measured on the
monotonic clock (a wall-clock step, NTP's or the operator's, neither loses an interval nor adds
one's jump to it); the wall clock only labels samples, each node's labels kept increasing (a
sample after a step back is labelled its last one's plus the time elapsed). Across a khd
restart only the wall clock is there to compare. The interval since then is charged to the
allocation that held the node at that last sample: its length (node seconds), memory reserved x
length, the CPU and traffic increases where the generation is the same and no counter dropped,
and the bytes loaded over the control channel meanwhile. Where a generation changed, or a
counter dropped, nothing is guessed: the increase of that counter over the interval is recorded
as a gap (kh.metering.store, meter_gaps), and the new counter value is the next baseline. A node
no longer running (its QEMU died unseen) is charged nothing for the interval and leaves a gap.
Nothing a guest says is read.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kh.allocation import NIC_SLOTS
from kh.metering import store as mstore
from kh.metering.store import GapRow, Last, NetUsage, Nic, Usage
from kh.metering.usage import US
from kh.model import DomainKind, NodeState

if TYPE_CHECKING:
    from kh.hw.backend import Backend, Ram
    from kh.store import AllocRow, Store

log = logging.getLogger("kh.metering")
DEFAULT_INTERVAL = 10.0
COMPACT_EVERY = 3600.0  # s between compactions of the samples older than a day
TapCounters = tuple[int, int, int, int, int]  # ifindex, rx bytes, tx bytes, rx pkts, tx pkts


class Source(Protocol):
    """Where the host's counters come from (HostSource; tests give their own)."""

    def enter(self) -> None:
        """Called once in the sampler's thread before its first sample."""

    def cpu(self, number: int) -> tuple[str, int] | None:
        """Node ``number``'s emulator: (generation, cumulative CPU us), None if not running."""

    def taps(self) -> Mapping[str, TapCounters]:
        """Every tap's counters as the host counts them, by name."""


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(start time in clock ticks since boot, utime + stime in us) of process ``pid``, from
    /proc/PID/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    rest = text[text.rindex(b")") + 2:].split()  # field 3 (state) on; comm may hold spaces
    hz = os.sysconf("SC_CLK_TCK")
    return int(rest[19]), (int(rest[11]) + int(rest[12])) * US // hz


class HostSource:
    """The real counters: the backend's accounting (kh.hw.backend.Backend.usage: a cgroup per
    node) or /proc/PID/stat for a ``qemu`` node without a cgroup, and the links of kh's fabric
    namespace (read_taps), from a thread that entered it."""

    def __init__(self, nodes: Backend, netns: str | None) -> None:
        self.nodes = nodes
        self.netns = netns
        self._entered = False

    def enter(self) -> None:
        if self.netns is None:
            return
        from kh.hw import netns as nsutil
        nsutil.enter(self.netns)
        self._entered = True

    def cpu(self, number: int) -> tuple[str, int] | None:
        node = self.nodes.running.get(number)
        if node is None:
            return None
        pid = node.pid
        # else pid is not a process of this host (libvirt's domain ID; a node of another host)
        mine = getattr(self.nodes, "pid_is_local", None)  # kh.service.multibackend
        local = mine(number) if mine is not None else self.nodes.name == "qemu"
        stat = proc_stat(pid) if local else None
        start = stat[0] if stat is not None else ""
        try:
            used = self.nodes.usage(number)
        except Exception as e:  # an unreadable cgroup: /proc below
            log.warning("node %d: cannot read its accounting: %s", number, e)
            used = None
        if used is not None:
            return f"cg:{pid}:{start}", used.cpu_ns // 1000
        if stat is not None:
            return f"proc:{pid}:{start}", stat[1]
        return None if local else (f"none:{pid}", 0)

    def taps(self) -> Mapping[str, TapCounters]:
        return read_taps() if self._entered else {}


def read_taps() -> dict[str, TapCounters]:
    """Every link's counters by name, in the calling thread's network namespace: the kernel's
    64-bit link statistics (what IFLA_STATS64 carries) from /proc/thread-self/net/dev, and each
    link's ifindex (socket.if_nameindex). 1 ms for 257 links, where pyroute2's dump of the same
    took 52 ms to parse."""
    index = {name: i for i, name in socket.if_nameindex()}
    out = {}
    with open("/proc/thread-self/net/dev", "rb") as f:
        lines = f.read().splitlines()[2:]  # two header lines
    for line in lines:
        name, _, data = line.partition(b":")
        link = name.strip().decode(errors="replace")
        v = data.split()
        if link in index and len(v) >= 10:
            # receive: bytes packets errs drop fifo frame compressed multicast; transmit: ...
            out[link] = (index[link], int(v[0]), int(v[8]), int(v[1]), int(v[9]))
    return out


@dataclass(frozen=True)
class Holder:
    """Who holds a node now: its allocation, principal and domains by NIC slot."""

    alloc: int
    principal: str
    slots: tuple[int | None, ...]


def holders(st: Store) -> dict[int, Holder]:
    """The allocated nodes of live allocations, from the state."""
    from kh.service import membership
    out: dict[int, Holder] = {}
    allocs: dict[int, AllocRow | None] = {}
    for row in st.nodes(NodeState.ALLOCATED):
        if row.alloc is None:
            continue
        if row.alloc not in allocs:
            allocs[row.alloc] = st.allocation(row.alloc)
        a = allocs[row.alloc]
        if a is None or a.released is not None:
            continue
        out[row.number] = Holder(row.alloc, a.principal,
                                 tuple(membership.node_map(st, row.number, a)))
    return out


def nics_of(n: int, h: Holder | None, kinds: Mapping[int, DomainKind],
            taps: Mapping[str, TapCounters], tap_name: Callable[[int, int], str]
            ) -> tuple[Nic, ...]:
    """Node ``n``'s interfaces whose taps exist, with the domains ``h`` plugs them into."""
    out = []
    for slot in range(NIC_SLOTS):
        c = taps.get(tap_name(n, slot))
        if c is None:
            continue
        netid = h.slots[slot] if h is not None and slot < len(h.slots) else None
        kind = kinds.get(netid, DomainKind.PRIVATE) if netid is not None else None
        # the tap receives what the node sends: the node's tx is the tap's rx
        out.append(Nic(slot, c[0], netid, kind, c[1], c[2], c[3], c[4]))
    return tuple(out)


class Meter:
    """The sampler (see the module). ``sample`` may be called from any thread: the sample is
    taken by the meter's thread when it runs (so one thread reads and writes the meter's
    state), else in the caller's."""

    def __init__(self, st: Store, source: Source, *, mem_mib: int,
                 tap_name: Callable[[int, int], str], interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.store = st
        self.source = source
        self.mem_mib = mem_mib
        self.tap_name = tap_name
        self.interval = interval
        self.clock = clock  # labels samples (s since the epoch)
        self.mono = mono  # measures intervals (s)
        self._last: dict[int, Last] = mstore.lasts(st)
        self._mono: dict[int, int] = {}  # node -> its last sample's monotonic time (us), if ours
        self._loads: dict[int, int] = {}
        self._loads_lock = threading.Lock()
        self._requests: queue.Queue[tuple[frozenset[int] | None, threading.Event] | None] = \
            queue.Queue()
        self._thread: threading.Thread | None = None
        self._compacted = 0.0
        self._taking = threading.Lock()  # one sample at a time (inline ones, without the thread)
        self.cpu_seconds = 0.0  # the sampler thread's own CPU, for benchmarks
        self.closed = False  # the state is closed: the thread ends

    # -- life ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread; its first sample (khd's start) is taken at once."""
        self._thread = threading.Thread(target=self._run, name="kh-meter", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """A last sample (khd's stop), then the thread ends."""
        t = self._thread
        if t is None:
            return
        self._requests.put(None)
        t.join(timeout)
        self._thread = None

    def _run(self) -> None:
        try:
            self.source.enter()
        except Exception:
            log.exception("the meter cannot read the taps: traffic is not metered")
        self._guarded(None)
        next_at = time.monotonic() + self.interval
        while not self.closed:
            try:
                req = self._requests.get(timeout=max(0.0, next_at - time.monotonic()))
            except queue.Empty:
                self._guarded(None)
                next_at = time.monotonic() + self.interval
                continue
            if req is None:
                self._guarded(None)
                return
            numbers, done = req
            self._guarded(numbers)
            done.set()
        while True:  # answer whoever still asks, at once
            req = self._requests.get()
            if req is None:
                return
            req[1].set()

    def _guarded(self, numbers: frozenset[int] | None) -> None:
        c0 = time.thread_time()
        try:
            with self._taking:
                self.take(numbers)
            if numbers is None and self.clock() - self._compacted >= COMPACT_EVERY:
                self._compacted = self.clock()
                mstore.compact(self.store, int(self._compacted * US))
        except sqlite3.ProgrammingError:  # the state was closed under it (khd is going away)
            self.closed = True
        except Exception:
            log.exception("metering sample failed")
        self.cpu_seconds += time.thread_time() - c0

    # -- hooks -----------------------------------------------------------------------------
    def sample(self, numbers: Iterable[int] | None = None, timeout: float = 10.0) -> None:
        """Sample nodes ``numbers`` (None: all) now, and return once that is done (or after
        ``timeout`` s; the sample is then still taken). Never raises."""
        which = None if numbers is None else frozenset(numbers)
        t = self._thread
        if t is None:
            self._guarded(which)
        elif t is not threading.current_thread():
            done = threading.Event()
            self._requests.put((which, done))
            done.wait(timeout)

    def loaded(self, number: int, nbytes: int) -> None:
        """``nbytes`` were written into node ``number``'s RAM over the control channel."""
        with self._loads_lock:
            self._loads[number] = self._loads.get(number, 0) + nbytes

    # -- one sample ------------------------------------------------------------------------
    def take(self, numbers: frozenset[int] | None = None, now: float | None = None) -> None:
        """One sample of nodes ``numbers`` (None: every node held now or at its last sample),
        at ``now`` (s; default: the wall clock labels it and the monotonic clock measures its
        intervals; a ``now`` given, a test's, is a wall-clock time that does both), written in
        one transaction."""
        t = int((self.clock() if now is None else now) * US)
        m = int(self.mono() * US) if now is None else None
        hold = holders(self.store)
        kinds = {d.netid: d.kind for d in self.store.domains()}
        want = set(hold) | {n for n, x in self._last.items() if x.alloc is not None}
        if numbers is not None:
            want &= numbers
        if not want:
            return
        taps = self.source.taps()
        with self._loads_lock:
            loads = {n: self._loads.pop(n) for n in list(self._loads) if n in want}
        usage: list[Usage] = []
        net: list[NetUsage] = []
        gaps: list[GapRow] = []
        new: list[Last] = []
        gone: list[int] = []
        for n in sorted(want):
            cpu = self.source.cpu(n)
            h = hold.get(n) if cpu is not None else None
            nics = self._nics(n, h, kinds, taps)
            prev = self._last.get(n)
            label = t
            if prev is not None:
                since = self._mono.get(n)  # None: the last sample is a previous khd's
                elapsed = t - prev.t if since is None or m is None else m - since
                label = max(t, prev.t + elapsed)  # after the last one's, whatever the clock did
                if prev.alloc is not None and prev.principal is not None and elapsed > 0:
                    self._charge(prev, label, elapsed, cpu, nics, loads.get(n, 0), usage, net,
                                 gaps)
            if h is not None and cpu is not None:
                new.append(Last(n, label, cpu[0], h.alloc, h.principal, cpu[1], self.mem_mib,
                                nics))
            else:
                gone.append(n)
        mstore.write(self.store, usage, net, gaps, new, gone)
        for x in new:
            self._last[x.node] = x
            if m is None:
                self._mono.pop(x.node, None)
            else:
                self._mono[x.node] = m
        for n in gone:
            self._last.pop(n, None)
            self._mono.pop(n, None)

    def _nics(self, n: int, h: Holder | None, kinds: Mapping[int, DomainKind],
              taps: Mapping[str, TapCounters]) -> tuple[Nic, ...]:
        return nics_of(n, h, kinds, taps, self.tap_name)

    @staticmethod
    def _charge(prev: Last, t: int, dt: int, cpu: tuple[str, int] | None,
                nics: tuple[Nic, ...], load: int, usage: list[Usage], net: list[NetUsage],
                gaps: list[GapRow]) -> None:
        """What node ``prev.node`` used in the ``dt`` us (the monotonic clock's) up to the
        sample labelled ``t`` (after prev.t), charged to ``prev``'s holder."""
        assert prev.alloc is not None and prev.principal is not None
        n, t0, who = prev.node, prev.t, prev.principal
        if cpu is None:  # gone without a sample of its end: nothing is known
            gaps.append((t0, t, n, prev.alloc, who, "node: stopped unseen"))
            return
        gen, raw = cpu
        if gen == prev.gen and raw >= prev.cpu_us:
            used = raw - prev.cpu_us
        else:
            used = 0
            gaps.append((t0, t, n, prev.alloc, who, "cpu: " + (
                "counter dropped" if gen == prev.gen else "new generation")))
        usage.append(Usage(who, t, n, prev.alloc, dt, used, prev.mem_mib, load))
        now = {x.slot: x for x in nics}
        for p in prev.nics:
            if p.netid is None or p.kind is None:
                continue
            c = now.get(p.slot)
            if c is None or c.gen != p.gen:
                gaps.append((t0, t, n, prev.alloc, who, f"net slot {p.slot}: " + (
                    "tap gone" if c is None else "tap recreated")))
                continue
            d = (c.tx_bytes - p.tx_bytes, c.rx_bytes - p.rx_bytes,
                 c.tx_packets - p.tx_packets, c.rx_packets - p.rx_packets)
            if min(d) < 0:
                gaps.append((t0, t, n, prev.alloc, who, f"net slot {p.slot}: counter dropped"))
                continue
            if any(d):
                net.append(NetUsage(who, t, n, p.slot, prev.alloc, p.netid, *d))


class CountedRam:
    """A node's RAM opened for a load over the control channel (kh.hw.backend.Ram), telling
    the meter how many bytes were written into it."""

    def __init__(self, ram: Ram, meter: Meter, number: int) -> None:
        self.ram = ram
        self.meter = meter
        self.number = number

    def write(self, offset: int, data: bytes) -> None:
        self.ram.write(offset, data)
        self.meter.loaded(self.number, len(data))

    def close(self) -> None:
        self.ram.close()
