"""The meter (kh.metering.sampler) over a real store with fake host counters: generations and
resets never give negative or double usage, a khd restart between two samples loses nothing
(or records a gap), compaction keeps totals exact."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from kh.metering import store as mstore
from kh.metering.sampler import Meter
from kh.metering.usage import Quantity, gaps, total, usage_records
from kh.model import Domain, DomainKind, NodeState
from kh.service import membership
from kh.store import NodeRow, Store

T0 = 1_790_000_000.0  # a fixed clock (s): 2026-09-21
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
END = datetime(2027, 1, 1, tzinfo=UTC)


class FakeSource:
    """Counters the test sets: cpu[n] = (generation, us); taps[name] = (ifindex, rx bytes,
    tx bytes, rx packets, tx packets) as the host counts them."""

    def __init__(self) -> None:
        self.cpu_of: dict[int, tuple[str, int]] = {}
        self.tap_of: dict[str, tuple[int, int, int, int, int]] = {}

    def enter(self) -> None:
        pass

    def cpu(self, number: int) -> tuple[str, int] | None:
        return self.cpu_of.get(number)

    def taps(self) -> dict[str, tuple[int, int, int, int, int]]:
        return dict(self.tap_of)

    def set(self, node: int, gen: str, cpu_us: int,
            tap: tuple[int, int, int, int, int] | None = None) -> None:
        """Node ``node``'s QEMU generation and CPU time (us) and, with ``tap``, its slot-0 tap's
        counters (ifindex, rx bytes, tx bytes, rx packets, tx packets), as the host counts them."""
        self.cpu_of[node] = (gen, cpu_us)
        if tap is not None:
            self.tap_of[f"t{node}s0"] = tap


@pytest.fixture
def st(tmp_path):
    s = Store(tmp_path / "state.db")
    membership.ensure_schema(s)
    yield s
    s.close()


def allocate(st: Store, user: str, node: int, netids: tuple[int, ...] = (3,)) -> int:
    """``node`` allocated to ``user`` (registered if new) on private domains ``netids``."""
    if st.principal(user) is None:
        st.add_principal(user, b"salt", b"hash")
    for n in netids:
        if n not in {d.netid for d in st.domains()}:
            st.add_domain(Domain(n, DomainKind.PRIVATE, user))
    alloc = st.add_allocation(user, netids)
    st.put_node(NodeRow(node, node, NodeState.ALLOCATED, 1000 + node, alloc, "/tmp", T0, None))
    return alloc


def meter(st: Store, src: FakeSource) -> Meter:
    return Meter(st, src, mem_mib=256, tap_name=lambda n, s: f"t{n}s{s}")


def alice_metered(st: Store) -> tuple[FakeSource, Meter]:
    """alice holding node 1 (private domain 3), metered from a FakeSource with no counters yet."""
    src = FakeSource()
    allocate(st, "alice", 1)
    return src, meter(st, src)


def totals(st: Store, user: str | None = None) -> dict[tuple[Quantity, DomainKind | None], Decimal]:
    return total(usage_records(st, EPOCH, END, user))


def test_an_interval_is_charged_to_who_held_the_node(st):
    src = FakeSource()
    allocate(st, "alice", 1)
    src.set(1, "g1", 5_000_000, tap=(40, 100, 200, 1, 2))
    m = meter(st, src)
    m.take(now=T0)  # the allocation's baseline: nothing before it is charged
    assert totals(st) == {}
    # the tap received 1000 B: the node sent them
    src.set(1, "g1", 7_500_000, tap=(40, 1100, 500, 11, 5))
    m.loaded(1, 4096)
    m.take(now=T0 + 10)
    got = totals(st, "alice")
    assert got == {(Quantity.NODE_SECONDS, None): Decimal(10),
                   (Quantity.CPU_SECONDS, None): Decimal("2.5"),
                   (Quantity.MEM_MIB_SECONDS, None): Decimal(2560),
                   (Quantity.LOAD_BYTES, None): Decimal(4096),
                   (Quantity.NET_TX_BYTES, DomainKind.PRIVATE): Decimal(1000),
                   (Quantity.NET_RX_BYTES, DomainKind.PRIVATE): Decimal(300),
                   (Quantity.NET_TX_PACKETS, DomainKind.PRIVATE): Decimal(10),
                   (Quantity.NET_RX_PACKETS, DomainKind.PRIVATE): Decimal(3)}
    net = [r for r in usage_records(st, EPOCH, END) if r.quantity == Quantity.NET_TX_BYTES]
    assert [(r.netid, r.node, r.unit) for r in net] == [(3, 1, "B")]
    assert totals(st, "bob") == {}


def test_a_counter_that_drops_is_a_gap_never_negative(st):
    src, m = alice_metered(st)
    src.set(1, "g1", 9_000_000, tap=(40, 5000, 0, 50, 0))
    m.take(now=T0)
    src.cpu_of[1] = ("g1", 1_000_000)  # the same process, a counter lower than before
    src.tap_of["t1s0"] = (40, 10, 0, 1, 0)
    m.take(now=T0 + 10)
    src.set(1, "g1", 3_000_000, tap=(40, 110, 0, 2, 0))
    m.take(now=T0 + 20)
    got = totals(st)
    assert got[(Quantity.CPU_SECONDS, None)] == 2  # only from the new baseline on
    assert got[(Quantity.NET_TX_BYTES, DomainKind.PRIVATE)] == 100
    assert got[(Quantity.NODE_SECONDS, None)] == 20
    assert all(r.amount >= 0 for r in usage_records(st, EPOCH, END))
    assert sorted(g.what for g in gaps(st, EPOCH, END)) == [
        "cpu: counter dropped", "net slot 0: counter dropped"]


def test_a_new_qemu_or_a_recreated_tap_starts_a_generation(st):
    src, m = alice_metered(st)
    src.set(1, "g1", 4_000_000, tap=(40, 1000, 0, 10, 0))
    m.take(now=T0)
    # a new QEMU whose counter is already above the old one's, and a new tap likewise
    src.set(1, "g2", 6_000_000, tap=(41, 3000, 0, 30, 0))
    m.take(now=T0 + 10)
    src.set(1, "g2", 6_500_000, tap=(41, 3500, 0, 31, 0))
    m.take(now=T0 + 20)
    got = totals(st)
    assert got[(Quantity.CPU_SECONDS, None)] == Decimal("0.5")  # never 6 - 4, never 6
    assert got[(Quantity.NET_TX_BYTES, DomainKind.PRIVATE)] == 500
    assert {g.what for g in gaps(st, EPOCH, END)} == {"cpu: new generation",
                                                      "net slot 0: tap recreated"}
    (g,) = [g for g in gaps(st, EPOCH, END) if g.what.startswith("cpu")]
    assert (g.start.timestamp(), g.end.timestamp(), g.node) == (T0, T0 + 10, 1)


def test_a_reset_and_a_repeated_sample_count_nothing_twice(st):
    src, m = alice_metered(st)
    src.cpu_of[1] = ("g1", 0)
    m.take(now=T0)
    src.cpu_of[1] = ("g1", 1_000_000)
    m.take(now=T0 + 5)  # the reset's samples: before and after, at the same instant
    m.take(now=T0 + 5)
    src.cpu_of[1] = ("g1", 3_000_000)  # a reset keeps the QEMU: its counter goes on
    m.take(now=T0 + 10)
    got = totals(st)
    assert got[(Quantity.CPU_SECONDS, None)] == 3
    assert got[(Quantity.NODE_SECONDS, None)] == 10
    assert gaps(st, EPOCH, END) == []


def test_a_khd_restart_between_two_samples_loses_nothing(st):
    src = FakeSource()
    allocate(st, "alice", 1)
    src.set(1, "g1", 0, tap=(40, 0, 0, 0, 0))
    meter(st, src).take(now=T0)
    # khd killed: a new Meter (a new khd) on the same state, 40 s later, the QEMU ran on
    src.set(1, "g1", 8_000_000, tap=(40, 7000, 0, 7, 0))
    meter(st, src).take(now=T0 + 40)
    got = totals(st)
    assert got[(Quantity.CPU_SECONDS, None)] == 8
    assert got[(Quantity.NODE_SECONDS, None)] == 40
    assert got[(Quantity.NET_TX_BYTES, DomainKind.PRIVATE)] == 7000
    assert gaps(st, EPOCH, END) == []


def test_a_khd_restart_across_a_new_generation_records_the_gap(st):
    src = FakeSource()
    allocate(st, "alice", 1)
    src.cpu_of[1] = ("g1", 2_000_000)
    meter(st, src).take(now=T0)
    src.cpu_of[1] = ("g2", 500_000)  # the QEMU was replaced while no khd ran
    m = meter(st, src)
    m.take(now=T0 + 40)
    src.cpu_of[1] = ("g2", 1_500_000)
    m.take(now=T0 + 50)
    assert totals(st)[(Quantity.CPU_SECONDS, None)] == 1
    (g,) = gaps(st, EPOCH, END)
    assert (g.start.timestamp(), g.end.timestamp(), g.what) == (T0, T0 + 40,
                                                                 "cpu: new generation")


def test_release_ends_the_charge_and_a_vanished_node_is_a_gap(st):
    src = FakeSource()
    a = allocate(st, "alice", 1)
    allocate(st, "bob", 2, (4,))
    src.cpu_of[1] = ("g1", 0)
    src.cpu_of[2] = ("h1", 0)
    m = meter(st, src)
    m.take(now=T0)
    st.nodes_releasing([1])  # what release does before its sample
    src.cpu_of[1] = ("g1", 1_000_000)
    del src.cpu_of[2]  # bob's QEMU died unseen
    m.take(now=T0 + 10)
    src.cpu_of[1] = ("g1", 5_000_000)
    m.take(now=T0 + 20)
    assert totals(st, "alice") == {(Quantity.NODE_SECONDS, None): Decimal(10),
                                   (Quantity.CPU_SECONDS, None): Decimal(1),
                                   (Quantity.MEM_MIB_SECONDS, None): Decimal(2560)}
    assert totals(st, "bob") == {}
    assert [(g.principal, g.what) for g in gaps(st, EPOCH, END)] == [
        ("bob", "node: stopped unseen")]
    assert a not in {x.alloc for x in mstore.lasts(st).values()}


def test_a_domain_change_charges_traffic_to_the_domain_it_crossed(st):
    src = FakeSource()
    allocate(st, "alice", 1, (3,))
    m = meter(st, src)
    src.set(1, "g1", 0, tap=(40, 0, 0, 0, 0))
    m.take(now=T0)
    src.tap_of["t1s0"] = (40, 100, 0, 1, 0)
    membership.put_map(st, 1, (1,))  # slot 0 moved to the public domain
    m.take(now=T0 + 10)
    src.tap_of["t1s0"] = (40, 150, 0, 2, 0)
    m.take(now=T0 + 20)
    got = totals(st)
    assert got[(Quantity.NET_TX_BYTES, DomainKind.PRIVATE)] == 100
    assert got[(Quantity.NET_TX_BYTES, DomainKind.PUBLIC)] == 50


def test_compaction_keeps_totals_exact(st):
    src = FakeSource()
    allocate(st, "alice", 1)
    allocate(st, "bob", 2, (4,))
    m = meter(st, src)
    rng = random.Random(7)
    cpu = {1: 0, 2: 0}
    rx = {1: 0, 2: 0}
    t = T0
    for _ in range(900):  # five hours, every 20 s or so
        for n in (1, 2):
            cpu[n] += rng.randrange(0, 3_000_000)
            rx[n] += rng.randrange(0, 5000)
            src.set(n, "g", cpu[n], tap=(40 + n, rx[n], 0, rx[n] // 100, 0))
        m.take(now=t)
        t += 20 + rng.random()  # irregular sampling
    before = {u: totals(st, u) for u in ("alice", "bob")}
    hourly = usage_records(st, EPOCH, END, step=3600, by="principal")
    rows = st._rows("SELECT COUNT(*) FROM meter_usage")[0][0]
    gone = mstore.compact(st, int(t * 1_000_000), age=0)  # every whole minute merged
    assert gone > 0
    assert st._rows("SELECT COUNT(*) FROM meter_usage")[0][0] < rows // 2
    assert {u: totals(st, u) for u in ("alice", "bob")} == before
    assert usage_records(st, EPOCH, END, step=3600, by="principal") == hourly
    assert mstore.compact(st, int(t * 1_000_000), age=0) == 0  # again: nothing to merge


def test_records_by_grain_and_step(st):
    src = FakeSource()
    a1 = allocate(st, "alice", 1)
    allocate(st, "alice", 2, (3,))
    m = meter(st, src)
    start = 1_789_999_200.0  # a whole hour since the epoch (497222 h)
    for n in (1, 2):
        src.cpu_of[n] = ("g", 0)
    m.take(now=start)
    m.take(now=start + 3600)  # in the next hour
    node = usage_records(st, EPOCH, END, "alice", by="node")
    assert {(r.allocation, r.node) for r in node} == {(a1, 1), (a1 + 1, 2)}
    (r,) = [x for x in usage_records(st, EPOCH, END, "alice", by="principal")
            if x.quantity == Quantity.NODE_SECONDS]
    assert (r.allocation, r.node, r.amount) == (None, None, Decimal(7200))
    assert r.start == datetime.fromtimestamp(start + 3600, UTC)
    assert (r.end - r.start).total_seconds() == 3600


def test_records_refuse_a_reversed_or_naive_range(st):
    from kh.errors import UsageError
    with pytest.raises(UsageError, match="reversed"):
        usage_records(st, END, EPOCH)
    with pytest.raises(UsageError, match="time zone"):
        usage_records(st, datetime(2026, 1, 1), END)


def test_the_thread_samples_on_request_and_at_stop(st):
    src = FakeSource()
    allocate(st, "alice", 1)
    src.cpu_of[1] = ("g1", 0)
    clock = [T0]
    m = Meter(st, src, mem_mib=256, tap_name=lambda n, s: f"t{n}s{s}", interval=3600,
              clock=lambda: clock[0], mono=lambda: clock[0])  # one fake clock for both
    m.start()
    try:
        deadline = time.monotonic() + 10
        while 1 not in m._last and time.monotonic() < deadline:  # the start's sample
            time.sleep(0.01)
        clock[0] = T0 + 10
        m.sample([1])
        assert totals(st)[(Quantity.NODE_SECONDS, None)] == 10
        clock[0] = T0 + 15
    finally:
        m.stop()
    assert totals(st)[(Quantity.NODE_SECONDS, None)] == 15


def test_hourly_sums_give_what_the_samples_give(st):
    """Any range, whole hours or not, reads the same sums from the hourly table and the edge
    samples as from the samples alone; once the samples are dropped, whole hours still add up
    and a range's ends before the horizon round out to their hours."""
    from kh.metering import query
    src = FakeSource()
    allocate(st, "alice", 1)
    allocate(st, "bob", 2, (4,))
    m = meter(st, src)
    rng = random.Random(3)
    cpu, rx, t = 0, 0, 1_789_999_200.0  # a whole hour
    for _ in range(400):  # ~4.5 hours, irregular
        cpu += rng.randrange(0, 2_000_000)
        rx += rng.randrange(0, 3000)
        for n in (1, 2):
            src.set(n, "g", cpu, tap=(40 + n, rx, 0, rx // 100, 0))
        m.take(now=t)
        t += 40 + rng.random()
    lo0, hi0 = 1_789_999_200 * US_, int(t * US_)

    def brute(lo: int, hi: int) -> dict[str, tuple[int, int, int]]:
        rows = st._rows("SELECT principal, SUM(node_us), SUM(cpu_us), SUM(mem_mib * node_us) "
                        "FROM meter_usage WHERE t >= ? AND t < ? GROUP BY principal", (lo, hi))
        return {r[0]: tuple(r[1:]) for r in rows}

    for _ in range(30):
        lo = rng.randrange(lo0 - 3600 * US_, hi0)
        hi = rng.randrange(lo + 1, hi0 + 3600 * US_)
        usage, _net = query.sums(st, lo, hi, None, "principal")
        assert {r[0]: tuple(r[1:4]) for r in usage} == brute(lo, hi), (lo, hi)
        recs = query.records(st, lo, hi, "alice", 3600 * US_, "principal")
        got = sum(r.amount for r in recs if r.quantity == Quantity.CPU_SECONDS)
        assert got * US_ == brute(lo, hi).get("alice", (0, 0, 0))[1]
    whole = brute(lo0, hi0)
    mstore.compact(st, hi0 + 8 * 86400 * US_)  # over a week later: the samples go
    assert st._rows("SELECT COUNT(*) FROM meter_usage")[0][0] == 0
    usage, _ = query.sums(st, lo0, hi0, None, "principal")
    assert {r[0]: tuple(r[1:4]) for r in usage} == whole
    # from the middle of the first hour: that hour is taken whole
    usage, _ = query.sums(st, lo0 + 1800 * US_, hi0, None, "principal")
    assert {r[0]: tuple(r[1:4]) for r in usage} == whole
    (r,) = [x for x in query.records(st, lo0, lo0 + 600 * US_, "alice", 60 * US_, "principal")
            if x.quantity == Quantity.NODE_SECONDS]
    assert (r.end - r.start).total_seconds() == 3600  # an hourly sum spans its hour


US_ = 1_000_000


def test_the_taps_are_read_as_the_kernel_counts_them():
    """read_taps gives each link's ifindex and the kernel's 64-bit counters, as rtnetlink's
    IFLA_STATS64 gives them (read before and after: lo may carry others' traffic)."""
    from pyroute2 import IPRoute

    from kh.metering.sampler import read_taps

    def stats() -> dict[str, tuple[int, int, int, int, int]]:
        with IPRoute() as ipr:
            out = {}
            for link in ipr.get_links():
                s = link.get_attr("IFLA_STATS64")
                out[link.get_attr("IFLA_IFNAME")] = (
                    int(link["index"]), s["rx_bytes"], s["tx_bytes"], s["rx_packets"],
                    s["tx_packets"])
            return out
    before, got, after = stats(), read_taps(), stats()
    assert set(got) == set(before) and "lo" in got
    for name, values in got.items():
        assert values[0] == before[name][0]
        assert all(b <= v <= a for b, v, a in zip(before[name][1:], values[1:],
                                                  after[name][1:], strict=True)), name
