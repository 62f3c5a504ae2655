"""Billing (issue 14, Speed): how long a bill takes over 30 days of 64 nodes' samples.

A state holding 30 days of 64 nodes (8 principals of 8 nodes; benchmarks.metering.synthesize,
the meter's tables as the sampler and its compaction leave them), then, in-process as khd
answers `kh bill`, one principal's bill for the 30 whole days before today, with the default
price list (UTC, no windows: daily buckets) and with examples/prices-time-of-day.toml (Berlin,
windows on the hour: hourly buckets): the records read (usage_records, in the buckets
rating.step_for picks), the rating, and both together; then every principal's bill in turn.
Prints numbers; asserts nothing. `python -m benchmarks.billing`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchmarks.metering import PRINCIPALS, synthesized
from kh.metering import billing, prices, rating
from kh.metering.clock import local_midnight
from kh.metering.usage import gaps, usage_records
from kh.store import Store

ROOT = Path(__file__).resolve().parents[1]


def one_bill(st: Store, who: str, plist: prices.PriceList, start: datetime, end: datetime
             ) -> tuple[float, float, int, rating.Bill]:
    """(seconds reading, seconds rating, records, the bill), as billing.bill does it."""
    t0 = time.perf_counter()
    step = rating.step_for(plist, start, end)
    recs = usage_records(st, start, end, who, step=step, by="principal")
    found = gaps(st, start, end, who)
    t1 = time.perf_counter()
    b = rating.rate(recs, plist, who, "30 days", start, end, found)
    return t1 - t0, time.perf_counter() - t1, len(recs), b


def main() -> None:
    with synthesized("kh-bench-bill-") as (st, _, _, seconds):
        print(f"30 days x 64 nodes synthesized in {seconds:.1f} s")
        lists = {"default": prices.load(billing.DEFAULT),
                 "time of day": prices.load(ROOT / "examples" / "prices-time-of-day.toml")}
        for name, plist in lists.items():
            today = datetime.now(UTC).astimezone(plist.zone).date()
            end = local_midnight(today, plist.zone)
            start = local_midnight(today - timedelta(days=30), plist.zone)
            read, rate, n, b = one_bill(st, "p3", plist, start, end)
            print(f"{name} price list ({plist.timezone}, buckets of "
                  f"{rating.step_for(plist, start, end)} s): one principal of 8 nodes, 30 days: "
                  f"{n} records read in {read:.3f} s, rated in {rate:.3f} s, "
                  f"{read + rate:.3f} s in all; {len(b.lines)} lines, total {b.total} "
                  f"{plist.currency}")
            t0 = time.perf_counter()
            for p in range(PRINCIPALS):
                one_bill(st, f"p{p}", plist, start, end)
            print(f"  all {PRINCIPALS} principals' bills one after another: "
                  f"{time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
