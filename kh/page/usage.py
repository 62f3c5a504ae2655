"""A principal's usage in the last 24 hours for the live page, from the meter (kh.metering):
one row per quantity (net quantities per domain kind). None when khd has no meter or nothing
was metered, so the page says so instead of showing zeros."""

from __future__ import annotations

import logging
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from kh.errors import KhError

log = logging.getLogger("kh.page")
DAY = 86400


def _amount(value: Decimal, unit: str) -> str:
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB"):
            if value < 1024 or u == "GiB":
                return f"{value:.0f} {u}" if u == "B" else f"{value:.1f} {u}"
            value /= 1024
    return f"{value:.1f} {unit}" if unit in ("s", "MiB*s") else f"{value:.0f} {unit}"


def last_day(store: Any, principal: str | None, now: datetime | None = None
             ) -> list[tuple[str, str]] | None:
    """(quantity, amount with unit) of ``principal``'s (None: everyone's) last 24 hours."""
    try:
        from kh.metering import usage
    except ImportError:
        return None
    end = now or datetime.now(UTC)
    try:
        records = usage.usage_records(store, end - timedelta(seconds=DAY), end, principal,
                                      step=DAY, by="principal")
    except (KhError, sqlite3.Error) as e:  # a state without the meter's tables
        log.debug("no usage for the page: %s", e)
        return None
    if not records:
        return None
    units = {r.quantity: r.unit for r in records}
    rows = []
    for (quantity, kind), amount in sorted(usage.total(records).items(),
                                           key=lambda kv: (kv[0][0].value, str(kv[0][1]))):
        what = quantity.value + (f" ({kind.value})" if kind is not None else "")
        rows.append((what, _amount(amount, units[quantity])))
    return rows
