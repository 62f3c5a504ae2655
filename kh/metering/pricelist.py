"""A checked price list as kh.metering.rating uses it (kh.metering.prices reads and checks the
TOML file into one): its entries, each one quantity's price (of one domain kind, or of every
kind) for a span of validity, flat, by time-of-day windows or by tiers; and the entry that
prices a quantity at a moment (PriceList.entry_for). Amounts are exact Decimals; times aware
UTC.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from kh.errors import UsageError
from kh.metering import clock
from kh.metering.usage import Quantity
from kh.model import DomainKind


class PriceError(UsageError):
    """A price list that cannot be used: ``SOURCE:LINE: KEY: problem``."""


@dataclass(frozen=True)
class Window:
    """A time-of-day price: ``hours`` on ``days`` (0 = Monday), covering ``spans`` of the
    week (kh.metering.clock)."""

    hours: str
    days: tuple[int, ...]
    spans: tuple[clock.Span, ...]
    price: Decimal

    @property
    def label(self) -> str:
        """``08:00-20:00 mon-fri``: the hours, and the days unless every day (runs of three or
        more days as a range)."""
        if len(self.days) == 7:
            return self.hours
        runs: list[list[int]] = []
        for d in self.days:
            if runs and runs[-1][-1] == d - 1:
                runs[-1].append(d)
            else:
                runs.append([d])
        words = [f"{clock.DAYS[r[0]]}-{clock.DAYS[r[-1]]}" if len(r) >= 3 else
                 ",".join(clock.DAYS[d] for d in r) for r in runs]
        return f"{self.hours} {','.join(words)}"


@dataclass(frozen=True)
class Tier:
    """Up to ``upto`` (in the entry's ``per`` units, inclusive; None: no bound) at ``price``."""

    upto: Decimal | None
    price: Decimal


@dataclass(frozen=True)
class Entry:
    """The price of one quantity (of one domain kind, or of every kind: ``domain`` None) for
    [valid_from, valid_until) (aware UTC; until None: no end): ``price`` per ``per`` units,
    or in ``windows`` their own prices, or by ``tiers`` (``mode`` volume or graduated).
    ``key`` names it in errors and bills: ``price[2]``."""

    key: str
    quantity: Quantity
    domain: DomainKind | None
    per: Decimal
    price: Decimal | None
    windows: tuple[Window, ...]
    mode: str | None
    tiers: tuple[Tier, ...]
    valid_from: datetime
    valid_until: datetime | None


@dataclass(frozen=True)
class PriceList:
    source: str  # the file's name, or how it came ("the price list sent")
    sha256: str  # of its bytes: which list a bill was rated with
    name: str | None
    currency: str
    decimals: int
    timezone: str
    zone: ZoneInfo
    valid_from: datetime  # aware UTC
    valid_until: datetime | None
    entries: tuple[Entry, ...]

    @functools.cached_property
    def _by_kind(self) -> dict[tuple[Quantity, DomainKind | None], list[Entry]]:
        out: dict[tuple[Quantity, DomainKind | None], list[Entry]] = {}
        for e in self.entries:
            out.setdefault((e.quantity, e.domain), []).append(e)
        return out

    def entry_for(self, quantity: Quantity, domain: DomainKind | None, moment: datetime
                  ) -> Entry | None:
        """The entry that prices ``quantity`` (of ``domain``) at ``moment``: one for that
        domain kind before one for every kind; None when the list does not price it."""
        for want in (domain, None) if domain is not None else (None,):
            for e in self._by_kind.get((quantity, want), ()):
                if e.valid_from <= moment and (e.valid_until is None or moment < e.valid_until):
                    return e
        return None
