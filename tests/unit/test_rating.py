"""Rating (issue 14, item 2): tiers and time-of-day windows give hand-computed bills exactly.
Each test writes its hand computation next to the figures it checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from kh.errors import UsageError
from kh.metering import prices, rating
from kh.metering.usage import UNITS, Quantity, UsageRecord
from kh.model import DomainKind

D = Decimal
HOUR = timedelta(hours=1)


def plist(body: str, tz: str = "UTC", extra: str = "") -> prices.PriceList:
    head = f'currency = "EUR"\ntimezone = "{tz}"\nvalid_from = 2026-01-01\n{extra}\n'
    return prices.parse((head + body).encode(), "t.toml")


def rec(q: str, start: datetime, end: datetime, amount: object, domain: str | None = None,
        who: str = "alice") -> UsageRecord:
    quantity = Quantity(q)
    return UsageRecord(who, None, None, quantity, None if domain is None else DomainKind(domain),
                       None if domain is None else 5, start, end, D(str(amount)),
                       UNITS[quantity])


def hourly(q: str, first: datetime, hours: int, amount: object = 3600) -> list[UsageRecord]:
    return [rec(q, first + i * HOUR, first + (i + 1) * HOUR, amount) for i in range(hours)]


def bill(records: list[UsageRecord], pl: prices.PriceList, period: str = "2026-11"
         ) -> rating.Bill:
    start, end = rating.period(period, pl)
    return rating.rate(records, pl, "alice", period, start, end)


def charges(b: rating.Bill) -> dict[str, Decimal]:
    return {f"{x.entry} {x.rate}": x.charge for x in b.lines}


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


TIERS = """
[[price]]
quantity = "net_tx_bytes"
domain = "external"
per = 1000
tiers = "{mode}"
  [[price.tier]]
  upto = 10
  price = 0
  [[price.tier]]
  upto = 100
  price = 0.5
  [[price.tier]]
  price = 0.2
"""


@pytest.mark.parametrize("sent, mode, expect", [
    # 150 units of 1000 B, graduated: 10 x 0 + 90 x 0.5 + 50 x 0.2 = 0 + 45 + 10 = 55
    (150_000, "graduated", {"price[0] tier 1: 0 to 10": D("0.00"),
                            "price[0] tier 2: 10 to 100": D("45.00"),
                            "price[0] tier 3: above 100": D("10.00")}),
    # volume: the total (150) is in tier 3, so all of it at 0.2: 150 x 0.2 = 30
    (150_000, "volume", {"price[0] volume tier 3: above 100": D("30.00")}),
    # exactly 100 units is still tier 2 (upto is inclusive): 100 x 0.5 = 50
    (100_000, "volume", {"price[0] volume tier 2: 10 to 100": D("50.00")}),
    # graduated up to 100: 10 x 0 + 90 x 0.5 = 45, and no line for tier 3
    (100_000, "graduated", {"price[0] tier 1: 0 to 10": D("0.00"),
                            "price[0] tier 2: 10 to 100": D("45.00")}),
])
def test_volume_and_graduated_tiers(sent, mode, expect):
    pl = plist(TIERS.format(mode=mode))
    # the traffic in three records on two days: the tiers apply to the period's total
    t = utc(2026, 11, 3)
    recs = [rec("net_tx_bytes", t, t + HOUR, sent // 2, "external"),
            rec("net_tx_bytes", t + 24 * HOUR, t + 25 * HOUR, sent // 4, "external"),
            rec("net_tx_bytes", t + 30 * HOUR, t + 31 * HOUR, sent // 4, "external")]
    b = bill(recs, pl)
    assert charges(b) == expect
    assert b.total == sum(expect.values())


def test_a_window_across_midnight():
    pl = plist("""
[[price]]
quantity = "node_seconds"
per = 3600
price = 1.00
  [[price.window]]
  hours = "22:00-06:00"
  price = 0.25
""")
    # one node-hour every hour from 20:00 to 08:00 next morning (12 hours):
    # 20, 21, 06, 07 are outside the window: 4 x 1.00 = 4.00
    # 22, 23, 00, 01, 02, 03, 04, 05 are in it: 8 x 0.25 = 2.00
    b = bill(hourly("node_seconds", utc(2026, 11, 2, 20), 12), pl)
    assert charges(b) == {"price[0] base": D("4.00"), "price[0] 22:00-06:00": D("2.00")}
    assert [x.amount for x in b.lines] == [D(4 * 3600), D(8 * 3600)]
    assert b.total == D("6.00")


def test_a_window_boundary_inside_a_record_is_split_pro_rata():
    pl = plist("""
[[price]]
quantity = "cpu_seconds"
per = 3600
price = 1
  [[price.window]]
  hours = "08:00-20:00"
  price = 2
""")
    day = utc(2026, 11, 4)
    recs = [rec("cpu_seconds", day + timedelta(hours=7, minutes=30),
                day + timedelta(hours=8, minutes=30), 1800),
            rec("cpu_seconds", day + timedelta(hours=19, minutes=50),
                day + timedelta(hours=20, minutes=10), 600)]
    # 07:30-08:30 holds 1800 s: half (900) before 08:00, half in the window;
    # 19:50-20:10 holds 600 s: 300 in the window, 300 after it.
    # window: 900 + 300 = 1200 s -> 1200/3600 x 2 = 0.666.. -> 0.67
    # base:   900 + 300 = 1200 s -> 1200/3600 x 1 = 0.333.. -> 0.33
    b = bill(recs, pl)
    assert {x.rate: x.amount for x in b.lines} == {"base": D(1200), "08:00-20:00": D(1200)}
    assert charges(b) == {"price[0] base": D("0.33"), "price[0] 08:00-20:00": D("0.67")}
    assert b.total == D("1.00")  # the sum of the rounded lines


DST = """
[[price]]
quantity = "node_seconds"
per = 3600
price = 1
  [[price.window]]
  hours = "{hours}"
  price = 0.5
"""


def test_the_day_berlin_turns_its_clocks_back():
    pl = plist(DST.format(hours="01:00-03:00"), tz="Europe/Berlin")
    # 2026-10-25 in Berlin: 00:00 CEST (22:00 UTC the day before) to 24:00 CET (23:00 UTC):
    # 25 hours. 01:00 CEST is 23:00 UTC; the clock shows 03:00 CEST at 01:00 UTC, goes back to
    # 02:00 CET and shows 03:00 again (CET) at 02:00 UTC: the window lasts 23:00-02:00 UTC,
    # 3 hours. window: 3 x 0.5 = 1.50; the other 22 hours: 22 x 1 = 22.00
    recs = hourly("node_seconds", utc(2026, 10, 24, 22), 25)
    b = bill(recs, pl, "2026-10-25")
    assert b.start == utc(2026, 10, 24, 22) and b.end == utc(2026, 10, 25, 23)
    assert charges(b) == {"price[0] base": D("22.00"), "price[0] 01:00-03:00": D("1.50")}


def test_the_day_berlin_turns_its_clocks_forward():
    pl = plist(DST.format(hours="01:00-03:00"), tz="Europe/Berlin")
    # 2026-03-29: 00:00 CET (23:00 UTC the day before) to 24:00 CEST (22:00 UTC): 23 hours.
    # 01:00 CET is 00:00 UTC; at 01:00 UTC the clock jumps from 02:00 CET to 03:00 CEST: the
    # window lasts one hour. window: 1 x 0.5 = 0.50; the other 22 hours: 22.00
    b = bill(hourly("node_seconds", utc(2026, 3, 28, 23), 23), pl, "2026-03-29")
    assert charges(b) == {"price[0] base": D("22.00"), "price[0] 01:00-03:00": D("0.50")}


def test_a_window_in_the_repeated_hour_comes_twice():
    pl = plist(DST.format(hours="02:30-03:00"), tz="Europe/Berlin")
    # 02:30-03:00 happens twice on 2026-10-25: 00:30-01:00 UTC (CEST) and 01:30-02:00 UTC
    # (CET); half-hour records of 1800 node-seconds: 2 x 1800 s in the window = 1 h x 0.5
    # = 0.50; the rest of the 25-hour day, 24 h x 1 = 24.00
    start = utc(2026, 10, 24, 22)
    half = timedelta(minutes=30)
    recs = [rec("node_seconds", start + i * half, start + (i + 1) * half, 1800)
            for i in range(50)]
    b = bill(recs, pl, "2026-10-25")
    assert charges(b) == {"price[0] base": D("24.00"), "price[0] 02:30-03:00": D("0.50")}


def test_weekday_windows_and_a_night_that_belongs_to_friday():
    pl = plist("""
[[price]]
quantity = "node_seconds"
per = 3600
price = 1
  [[price.window]]
  hours = "00:00-24:00"
  days = ["sat", "sun"]
  price = 0.5
[[price]]
quantity = "cpu_seconds"
per = 3600
price = 1
  [[price.window]]
  hours = "22:00-02:00"
  days = ["fri"]
  price = 0
""")
    # node-seconds, a day each: Fri 6 Nov, Sat 7, Sun 8, Mon 9 (2026):
    # Fri + Mon at 1 = 48.00; Sat + Sun at 0.5 = 24.00
    days = [rec("node_seconds", utc(2026, 11, d), utc(2026, 11, d + 1), 86400)
            for d in (6, 7, 8, 9)]
    # cpu-seconds, an hour each, Fri 20:00 to Sun 04:00 (32 h): the window is Fri 22:00 to
    # Sat 02:00 only (it starts on Friday): 4 h free; Sat 22:00-Sun 02:00 is not: 28 x 1
    cpu = hourly("cpu_seconds", utc(2026, 11, 6, 20), 32)
    b = bill(days + cpu, pl)
    assert charges(b) == {"price[0] base": D("48.00"), "price[0] 00:00-24:00 sat,sun": D("24.00"),
                          "price[1] base": D("28.00"), "price[1] 22:00-02:00 fri": D("0.00")}
    assert b.total == D("100.00")


def test_the_same_usage_with_another_price_list_gives_the_other_bill():
    recs = hourly("node_seconds", utc(2026, 11, 2), 10)
    kept = list(recs)
    cheap = plist('[[price]]\nquantity = "node_seconds"\nper = 3600\nprice = 0.1\n')
    dear = plist('[[price]]\nquantity = "node_seconds"\nper = 3600\nprice = 0.35\n')
    # 10 node-hours: x 0.1 = 1.00, x 0.35 = 3.50, and again 1.00 with the first list
    assert [bill(recs, p).total for p in (cheap, dear, cheap)] == \
        [D("1.00"), D("3.50"), D("1.00")]
    assert recs == kept  # rating read them only


def test_rounding_is_half_up_once_per_line():
    pl = plist('[[price]]\nquantity = "cpu_seconds"\nprice = 0.001\n'
               '[[price]]\nquantity = "node_seconds"\nprice = 0.001\n')
    # 5 s x 0.001 = 0.005 -> 0.01 (half up, not to even); 4 s -> 0.004 -> 0.00
    # total: 0.01 + 0.00 = 0.01 (the sum of rounded lines; unrounded it would be 0.009)
    t = utc(2026, 11, 5)
    b = bill([rec("cpu_seconds", t, t + HOUR, 5), rec("node_seconds", t, t + HOUR, 4)], pl)
    assert charges(b) == {"price[0] base": D("0.01"), "price[1] base": D("0.00")}
    assert b.total == D("0.01")


def test_a_price_change_within_the_period_splits_a_record_between_the_entries():
    pl = plist("""
[[price]]
quantity = "node_seconds"
per = 3600
price = 1
valid_until = 2026-11-16
[[price]]
quantity = "node_seconds"
per = 3600
price = 2
valid_from = 2026-11-16
""")
    # a day's record from the 15th 12:00 to the 16th 12:00: 12 h at 1 and 12 h at 2 = 36.00
    b = bill([rec("node_seconds", utc(2026, 11, 15, 12), utc(2026, 11, 16, 12), 86400)], pl)
    assert charges(b) == {"price[0] base": D("12.00"), "price[1] base": D("24.00")}


def test_domains_unpriced_quantities_and_others_usage():
    pl = plist("""
[[price]]
quantity = "net_tx_bytes"
domain = "external"
price = 0.01
[[price]]
quantity = "net_tx_bytes"
price = 0.001
""")
    t = utc(2026, 11, 5)
    recs = [rec("net_tx_bytes", t, t + HOUR, 100, "external"),   # 100 x 0.01 = 1.00
            rec("net_tx_bytes", t, t + HOUR, 1000, "private"),   # every kind's: 1000 x 0.001
            rec("net_tx_bytes", t, t + HOUR, 10**6, "external", who="bob"),  # not alice's
            rec("cpu_seconds", t, t + HOUR, 50)]                 # not priced: free
    b = bill(recs, pl)
    assert charges(b) == {"price[0] base": D("1.00"), "price[1] base": D("1.00")}
    assert [(u.quantity.value, u.amount) for u in b.unpriced] == [("cpu_seconds", D(50))]
    # the period's bounds cut records too: half of this one lies in October
    half = rec("net_tx_bytes", utc(2026, 10, 31, 23, 30), utc(2026, 11, 1, 0, 30), 200,
               "external")
    assert bill([half], pl).total == D("1.00")  # 100 x 0.01


def test_a_period_outside_the_lists_validity_is_refused():
    pl = plist('[[price]]\nquantity = "cpu_seconds"\nprice = 1\n',
               extra="valid_until = 2026-11-15")
    with pytest.raises(UsageError, match=r"holds from .* not for all of the period 2026-11"):
        bill([], pl)
    with pytest.raises(UsageError, match="bad period"):
        rating.period("2026-13", pl)


@pytest.mark.parametrize("tz, period", [
    ("UTC", "9999-12-31"), ("UTC", "9999-12"), ("Etc/GMT+12", "9999-12-30"),
    ("Pacific/Kiritimati", "0001-01-01"), ("UTC", "1969-12")])
def test_a_period_at_the_calendars_ends_is_a_bad_period_not_an_overflow(tz, period):
    # 9999-12-31 was 'internal error: OverflowError' (khd's 500) for any principal
    pl = plist('[[price]]\nquantity = "cpu_seconds"\nprice = 1\n', tz=tz)
    with pytest.raises(UsageError, match=r"bad period .*years 1970 to 9998"):
        bill([], pl, period)


def test_buckets_are_chosen_so_that_no_edge_falls_inside_one():
    pl = plist(DST.format(hours="08:30-20:00"), tz="Europe/Berlin")
    start, end = rating.period("2026-11", pl)
    assert rating.step_for(pl, start, end) == 1800  # Berlin's 08:30 is XX:30 UTC
    flat = plist('[[price]]\nquantity = "cpu_seconds"\nprice = 1\n')
    assert rating.step_for(flat, *rating.period("2026-11", flat)) == 86400
