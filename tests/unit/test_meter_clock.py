"""The meter measures intervals on the monotonic clock (HARDEN, item 4): a wall-clock step back
(NTP, the operator) lost the sampling interval it fell in (no row: the sample's time was not
after the last one's, yet its counters became the next baseline), and a step forward was charged
as node time. The wall clock only labels samples, each node's labels increasing."""

from __future__ import annotations

from decimal import Decimal

from kh.metering.sampler import Meter
from kh.metering.usage import US, Quantity
from tests.unit import test_metering as base

T0, FakeSource, allocate, totals = base.T0, base.FakeSource, base.allocate, base.totals
st = base.st  # the same fixture, this module's own


def metered(st, wall: list[float], mono: list[float]) -> tuple[FakeSource, Meter]:
    src = FakeSource()
    allocate(st, "alice", 1)
    return src, Meter(st, src, mem_mib=256, tap_name=lambda n, s: f"t{n}s{s}",
                      clock=lambda: wall[0], mono=lambda: mono[0])


def test_a_step_back_of_the_wall_clock_loses_no_interval(st):
    wall, mono = [T0], [1000.0]
    src, m = metered(st, wall, mono)
    src.set(1, "g1", 0)
    m.take()  # the baseline
    wall[0], mono[0] = T0 - 3600, 1010.0  # the wall clock went back an hour; 10 s passed
    src.set(1, "g1", 4_000_000)
    m.take()
    got = totals(st, "alice")
    assert got[(Quantity.NODE_SECONDS, None)] == 10, got
    assert got[(Quantity.CPU_SECONDS, None)] == 4, got
    wall[0], mono[0] = T0 - 3590, 1020.0
    src.set(1, "g1", 5_000_000)
    m.take()
    got = totals(st, "alice")
    assert got[(Quantity.NODE_SECONDS, None)] == 20 and got[(Quantity.CPU_SECONDS, None)] == 5
    # each sample labelled after the one before: T0, T0 + 10, T0 + 20
    ts = [r[0] for r in st._rows("SELECT t FROM meter_usage ORDER BY t")]
    assert ts == [int((T0 + 10) * US), int((T0 + 20) * US)]


def test_a_step_forward_is_not_charged_as_node_time(st):
    wall, mono = [T0], [1000.0]
    src, m = metered(st, wall, mono)
    src.set(1, "g1", 0)
    m.take()
    wall[0], mono[0] = T0 + 3600 + 10, 1010.0  # an hour ahead; 10 s passed
    src.set(1, "g1", 1_000_000)
    m.take()
    got = totals(st, "alice")
    assert got[(Quantity.NODE_SECONDS, None)] == 10, got
    assert got[(Quantity.MEM_MIB_SECONDS, None)] == Decimal(2560), got
    # labelled by the wall clock
    assert st._rows("SELECT t FROM meter_usage")[0][0] == int((T0 + 3610) * US)
