"""Rating: usage records and a price list make a bill. Pure: rating reads the records and
never changes them, so the same usage rated with another price list gives the other bill.

The rules (docs/service.md, Billing):

- A record's usage belongs to the moment it was measured: the meter puts each sample's increase
  in the bucket of the sample's time, and the window of that time decides its price. A record
  whose [start, end) spans a window's edge, a validity date or the period's bounds is split
  there pro rata by time (its last piece takes what is left, so nothing is lost or made up).
  ``step_for`` picks buckets that no edge falls inside, so with the meter's records this only
  happens where the meter keeps hourly sums instead of samples (past a week) and an edge is
  off the hour.
- Each quantity (and domain kind, for net quantities) is priced by the list's entry for that
  kind, else its entry for every kind; a quantity the list does not price is listed as
  unpriced and costs nothing.
- An entry with windows charges each piece of time at the price of the window its wall-clock
  time is in (kh.metering.clock), else at the entry's price. An entry with tiers prices the
  total it priced over the period (within its validity): "volume" charges all of it at the
  price of the tier the total falls in (a total equal to a tier's ``upto`` is in that tier);
  "graduated" charges each slice at its own tier's price.
- Amounts are exact Decimals (50 digits) until a line's charge is rounded, once, half up, to
  the list's ``decimals``; the total is the sum of the rounded lines.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Context, Decimal, localcontext
from typing import Any

from kh.errors import UsageError
from kh.metering import clock
from kh.metering.pricelist import Entry, PriceList
from kh.metering.usage import UNITS, Gap, Quantity, UsageRecord
from kh.model import DomainKind

PRECISION = Context(prec=50, rounding=ROUND_HALF_UP)
ZERO = Decimal(0)
_PERIOD = re.compile(r"([0-9]{4})-([0-9]{2})(?:-([0-9]{2}))?", re.ASCII)


@dataclass(frozen=True)
class Line:
    """``amount`` (in ``unit``) of ``quantity`` priced by entry ``entry`` at ``price`` per
    ``per`` units, in the part ``rate`` names (``base``, a window ``08:00-20:00 mon,tue``, or a
    tier ``tier 2: 10 to 100``); ``charge`` rounded. ``domain``: the entry's domain kind (None:
    not per domain, or every kind)."""

    entry: str
    quantity: Quantity
    domain: DomainKind | None
    rate: str
    amount: Decimal
    unit: str
    price: Decimal
    per: Decimal
    charge: Decimal

    def to_json(self) -> dict[str, Any]:
        return {"entry": self.entry, "quantity": self.quantity.value,
                "domain": None if self.domain is None else self.domain.value,
                "rate": self.rate, "amount": num(self.amount), "unit": self.unit,
                "price": num(self.price), "per": num(self.per), "charge": str(self.charge)}


@dataclass(frozen=True)
class Unpriced:
    quantity: Quantity
    domain: DomainKind | None
    amount: Decimal
    unit: str


@dataclass(frozen=True)
class Bill:
    """What ``principal`` owes for [start, end) (aware UTC; ``period`` as asked), rated with
    ``prices``. ``total`` = the sum of the lines' rounded charges, in ``currency``."""

    principal: str
    period: str
    start: datetime
    end: datetime
    prices: PriceList
    lines: tuple[Line, ...]
    unpriced: tuple[Unpriced, ...]
    gaps: tuple[Gap, ...]
    total: Decimal

    def to_json(self) -> dict[str, Any]:
        p = self.prices
        return {"principal": self.principal, "period": self.period,
                "start": self.start.isoformat(), "end": self.end.isoformat(),
                "timezone": p.timezone, "currency": p.currency, "decimals": p.decimals,
                "prices": {"source": p.source, "name": p.name, "sha256": p.sha256},
                "lines": [x.to_json() for x in self.lines],
                "unpriced": [{"quantity": u.quantity.value,
                              "domain": None if u.domain is None else u.domain.value,
                              "amount": num(u.amount), "unit": u.unit} for u in self.unpriced],
                "gaps": [{"allocation": g.allocation, "node": g.node,
                          "start": g.start.isoformat(), "end": g.end.isoformat(),
                          "what": g.what} for g in self.gaps],
                "total": str(self.total)}


def num(d: Decimal) -> str:
    """An exact Decimal without exponent or trailing zeros: 3600, 0.25."""
    text = f"{d:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def period(text: str, prices: PriceList) -> tuple[datetime, datetime]:
    """``YYYY-MM`` (a month) or ``YYYY-MM-DD`` (a day) of the price list's time zone, as
    [start, end) aware UTC. UsageError when malformed."""
    m = _PERIOD.fullmatch(text)
    try:
        if not m:
            raise ValueError
        y, mo = int(m[1]), int(m[2])
        if not clock.YEARS[0] <= y <= clock.YEARS[1]:
            raise ValueError
        first = date(y, mo, int(m[3]) if m[3] else 1)
        last = first + timedelta(days=1) if m[3] else \
            date(y + mo // 12, mo % 12 + 1, 1)
    except ValueError:
        raise UsageError(f"bad period {text[:40]!r}", "a month, 2026-11, or a day, "
                         f"2026-11-05, of the years {clock.YEARS[0]} to {clock.YEARS[1]}") \
            from None
    return clock.local_midnight(first, prices.zone), clock.local_midnight(last, prices.zone)


def _bounds(prices: PriceList, start: datetime, end: datetime) -> list[datetime]:
    """The moments in (start, end) where a price may change: window edges, validity dates."""
    minutes = {m for e in prices.entries for w in e.windows
               for s in w.spans for m in (s.start % clock.DAY, s.end % clock.DAY)}
    out = set(clock.edges(start, end, prices.zone, minutes)) if minutes else set()
    out.update(t for e in prices.entries for t in (e.valid_from, e.valid_until)
               if t is not None and start < t < end)
    return sorted(out)


def step_for(prices: PriceList, start: datetime, end: datetime) -> int:
    """The longest bucket (seconds, 60 to 86400, dividing a day) that every moment where a
    price may change falls on, so that records of such buckets need no split."""
    g = 86400
    for t in (start, end, *_bounds(prices, start, end)):
        g = math.gcd(g, int(t.timestamp()) % 86400 if t.microsecond == 0 else 1)
    return max(60, g)


def rate(records: Iterable[UsageRecord], prices: PriceList, principal: str, period_text: str,
         start: datetime, end: datetime, gaps: Sequence[Gap] = ()) -> Bill:
    """The bill of ``principal`` for [start, end) from its usage records (others' and those
    outside the period are left out) under ``prices``. UsageError when the price list is not
    valid for the whole period."""
    if start < prices.valid_from or (prices.valid_until is not None
                                     and end > prices.valid_until):
        until = "no end" if prices.valid_until is None else prices.valid_until.isoformat()
        raise UsageError(f"{prices.source} holds from "
                         f"{prices.valid_from.isoformat()} to {until}, not for all of the "
                         f"period {period_text}", "rate it with a price list for that time")
    cuts = [start, *_bounds(prices, start, end), end]
    used: dict[tuple[int, Quantity, DomainKind | None], Decimal] = {}
    with localcontext(PRECISION):
        for r in records:
            if r.principal != principal:
                continue
            for i, share in _split(r, cuts):
                k = (i, r.quantity, r.domain)
                used[k] = used.get(k, ZERO) + share
        return _bill(used, cuts, prices, principal, period_text, gaps)


def _split(r: UsageRecord, cuts: list[datetime]) -> list[tuple[int, Decimal]]:
    """The record's amount in [cuts[0], cuts[-1]) by piece (index into ``cuts``), pro rata by
    time; the last piece takes what the others left, so the shares add up exactly."""
    lo, hi = cuts[0], cuts[-1]
    if r.end <= r.start:  # an instant
        return [(bisect.bisect_right(cuts, r.start) - 1, r.amount)] if lo <= r.start < hi \
            else []
    a0, b0 = max(r.start, lo), min(r.end, hi)
    if b0 <= a0:
        return []
    amount = r.amount if (a0, b0) == (r.start, r.end) else \
        r.amount * _us(b0 - a0) / _us(r.end - r.start)
    out: list[tuple[int, Decimal]] = []
    left = amount
    i = bisect.bisect_right(cuts, a0) - 1
    while cuts[i + 1] < b0:
        share = amount * _us(cuts[i + 1] - max(cuts[i], a0)) / _us(b0 - a0)
        out.append((i, share))
        left -= share
        i += 1
    out.append((i, left))
    return out


def _us(d: timedelta) -> Decimal:
    return Decimal(d // timedelta(microseconds=1))


def _bill(used: dict[tuple[int, Quantity, DomainKind | None], Decimal], cuts: list[datetime],
          prices: PriceList, principal: str, period_text: str, gaps: Sequence[Gap]) -> Bill:
    by_rate: dict[tuple[str, str], tuple[Entry, Decimal, Decimal]] = {}  # key, rate -> price
    tiered: dict[str, tuple[Entry, Decimal]] = {}
    unpriced: dict[tuple[Quantity, DomainKind | None], Decimal] = {}
    entry: dict[tuple[int, Quantity, DomainKind | None], Entry | None] = {}  # looked up once
    rate_of: dict[tuple[str, int], tuple[str, Decimal]] = {}  # (entry, piece) -> window
    for (i, q, d), amount in used.items():
        if (i, q, d) not in entry:
            entry[(i, q, d)] = prices.entry_for(q, d, cuts[i])
        e = entry[(i, q, d)]
        if e is None:
            unpriced[(q, d)] = unpriced.get((q, d), ZERO) + amount
        elif e.mode is not None:
            tiered[e.key] = (e, tiered.get(e.key, (e, ZERO))[1] + amount)
        else:
            if (e.key, i) not in rate_of:
                rate_of[(e.key, i)] = _window(e, cuts[i], cuts[i + 1], prices)
            label, price = rate_of[(e.key, i)]
            old = by_rate.get((e.key, label), (e, price, ZERO))[2]
            by_rate[(e.key, label)] = (e, price, old + amount)
    q_ = Decimal(1).scaleb(-prices.decimals)
    lines: list[Line] = []
    for (key, label), (e, price, amount) in by_rate.items():
        lines.append(Line(key, e.quantity, e.domain, label, amount, UNITS[e.quantity], price,
                          e.per, (amount / e.per * price).quantize(q_)))
    for e, amount in tiered.values():
        lines += _tier_lines(e, amount, q_)
    order = {e.key: n for n, e in enumerate(prices.entries)}
    lines.sort(key=lambda x: (order[x.entry], x.rate != "base", x.rate))
    total = sum((x.charge for x in lines), ZERO.quantize(q_))  # no line: 0.00, not 0
    return Bill(principal, period_text, cuts[0], cuts[-1], prices, tuple(lines),
                tuple(Unpriced(q, d, a, UNITS[q]) for (q, d), a in sorted(
                    unpriced.items(), key=lambda kv: (kv[0][0].value, kv[0][1] or ""))),
                tuple(gaps), total)


def _window(e: Entry, a: datetime, b: datetime, prices: PriceList) -> tuple[str, Decimal]:
    """The rate of the piece [a, b): the window its middle's wall-clock time is in."""
    if e.windows:
        minute = clock.minute_of_week(a + (b - a) / 2, prices.zone)
        for w in e.windows:
            if clock.contains(w.spans, minute):
                return w.label, w.price
    assert e.price is not None
    return "base", e.price


def _tier_lines(e: Entry, amount: Decimal, q_: Decimal) -> list[Line]:
    units = amount / e.per
    unit = UNITS[e.quantity]
    if e.mode == "volume":
        for n, t in enumerate(e.tiers, 1):
            if t.upto is None or units <= t.upto:
                return [Line(e.key, e.quantity, e.domain, f"volume tier {n}: {_range(e, n)}",
                             amount, unit, t.price, e.per, (units * t.price).quantize(q_))]
    out: list[Line] = []
    below = ZERO
    for n, t in enumerate(e.tiers, 1):
        top = units if t.upto is None else min(units, t.upto)
        if top <= below:
            break
        out.append(Line(e.key, e.quantity, e.domain, f"tier {n}: {_range(e, n)}",
                        (top - below) * e.per, unit, t.price, e.per,
                        ((top - below) * t.price).quantize(q_)))
        below = top
    return out


def _range(e: Entry, n: int) -> str:
    """Tier n's range in words, in the entry's ``per`` units: ``0 to 10``, ``above 100``."""
    lo = ZERO if n == 1 else e.tiers[n - 2].upto
    hi = e.tiers[n - 1].upto
    return f"above {num(lo or ZERO)}" if hi is None else f"{num(lo or ZERO)} to {num(hi)}"
