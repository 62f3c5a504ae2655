"""Time-of-day windows of a price list: which window a moment falls in, and where the windows
of a span of time change (rating splits usage there).

A window is half-open wall-clock time ``HH:MM-HH:MM`` in the price list's IANA time zone, on
the weekdays it names (default every day). One whose end is not after its start runs past
midnight, into the next day: ``22:00-06:00`` on ``fri`` is Friday 22:00 to Saturday 06:00 (the
day a window starts on is the one its ``days`` name). ``24:00`` ends a window at midnight.
Windows begin and end on a quarter hour.

A moment's window is decided by its wall-clock time in the zone (what a clock on the wall
there shows): on the day a clock skips an hour (DST begins) a window within the skipped hour
never comes and one around it is an hour shorter; on the day a clock repeats an hour (DST ends)
a window in the repeated hour comes twice and one around it is an hour longer. ``edges`` gives
the UTC moments where that may change within a span, so that each piece between two edges
lies wholly in one window (or none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday()'s order
DAY = 1440  # minutes
# Windows begin and end on a quarter hour (as time-of-use tariffs do), so the meter's records
# can be read in buckets of 15 minutes or more (rating.step_for) whatever the list says:
# at most 96 edges a day, and 2,976 buckets in a month.
QUARTER = 15
WEEK = 7 * DAY
# The years a price list's dates and a bill's period may name: the meter counts from 1970 on,
# and a day and a time zone's offset either side of them stay within datetime's years 1..9999
# (at its ends, converting a moment or finding a day's edges overflowed).
YEARS = (1970, 9998)
_HOURS = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})", re.ASCII)


class WindowError(ValueError):
    """A window's text is malformed (the message says how); prices.py names the file and key."""


@dataclass(frozen=True)
class Span:
    """Minutes of the week [start, end), 0 = Monday 00:00, end <= WEEK."""

    start: int
    end: int


def parse_hours(text: str) -> tuple[int, int]:
    """``HH:MM-HH:MM`` as minutes of the day (start 0..1439, end 1..1440). WindowError when
    malformed, out of range or empty (the same start and end)."""
    m = _HOURS.fullmatch(text)
    if not m:
        raise WindowError(f"{text!r} is not HH:MM-HH:MM")
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
        raise WindowError(f"{text!r} is not a time of day (00:00 to 23:59, or 24:00 as an end)")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start % QUARTER or end % QUARTER:
        raise WindowError(f"{text!r} does not start and end on a quarter hour (:00, :15, :30 "
                          "or :45)")
    if start == end:
        raise WindowError(f"{text!r} is an empty window (00:00-24:00 is a whole day)")
    return start, end


def parse_days(items: list[object]) -> tuple[int, ...]:
    """Weekday names (mon..sun, each at most once) as 0..6. WindowError otherwise."""
    out: list[int] = []
    for item in items:
        if not isinstance(item, str) or item.lower() not in DAYS:
            raise WindowError(f"{item!r} is not a weekday ({', '.join(DAYS)})")
        d = DAYS.index(item.lower())
        if d in out:
            raise WindowError(f"{item!r} is named twice")
        out.append(d)
    if not out:
        raise WindowError("names no weekday (leave `days` out for every day)")
    return tuple(sorted(out))


def spans(start: int, end: int, days: tuple[int, ...]) -> tuple[Span, ...]:
    """The minutes of the week a window covers: from ``start`` on each of ``days`` to ``end``
    the same day, or the next one when ``end`` is not after ``start`` (past Sunday: Monday)."""
    out: list[Span] = []
    for d in days:
        base = d * DAY
        if end > start:
            out.append(Span(base + start, base + end))
        else:
            out.append(Span(base + start, base + DAY))
            nxt = (d + 1) % 7 * DAY
            if end:
                out.append(Span(nxt, nxt + end))
    return tuple(out)


def overlap(a: tuple[Span, ...], b: tuple[Span, ...]) -> Span | None:
    """The first minutes of the week two windows share, or None."""
    for x in a:
        for y in b:
            lo, hi = max(x.start, y.start), min(x.end, y.end)
            if lo < hi:
                return Span(lo, hi)
    return None


def span_text(s: Span) -> str:
    """``sat 00:00-06:00``: a span of the week in words (for errors)."""
    def at(m: int) -> str:
        return f"{m % DAY // 60:02d}:{m % 60:02d}"
    end = at(s.end) if s.end % DAY else "24:00"
    return f"{DAYS[s.start // DAY]} {at(s.start)}-{end}"


def minute_of_week(moment: datetime, zone: ZoneInfo) -> float:
    """Where an aware moment falls in the week of the zone's wall clock, in minutes."""
    local = moment.astimezone(zone)
    return (local.weekday() * DAY + local.hour * 60 + local.minute
            + (local.second + local.microsecond / 1e6) / 60)


def contains(window: tuple[Span, ...], minute: float) -> bool:
    return any(s.start <= minute < s.end for s in window)


def edges(start: datetime, end: datetime, zone: ZoneInfo, minutes: set[int]
          ) -> list[datetime]:
    """The UTC moments in (start, end) where the zone's wall clock shows one of ``minutes``
    (minutes of the day) or jumps (a change of UTC offset), sorted: between two consecutive
    ones (and ``start``/``end``) the wall clock runs without reaching a window's edge, so every
    moment of the piece is in the same window. A wall time the clock shows twice gives both
    moments; one it skips is covered by the jump. ``start``/``end``: aware datetimes."""
    found: set[datetime] = set()
    first = start.astimezone(zone).date() - timedelta(days=1)
    last = end.astimezone(zone).date() + timedelta(days=1)
    day = first
    while day <= last:
        for m in minutes:
            for fold in (0, 1):
                wall = datetime.combine(day, time(m % DAY // 60, m % 60, fold=fold), zone)
                found.add(wall.astimezone(UTC))  # 24:00 is the next day's 00:00
        found.update(_offset_changes(day, zone))
        day += timedelta(days=1)
    return sorted(t for t in found if start < t < end)


def _offset_changes(day: date, zone: ZoneInfo) -> list[datetime]:
    """The UTC moments on a local day when the zone's UTC offset changes (found to the
    second by halving, between this midnight and the next)."""
    lo = datetime.combine(day, time(0), zone).astimezone(UTC)
    hi = lo + timedelta(days=1, hours=3)  # the next midnight, on days of 23 to 25 hours too
    if lo.astimezone(zone).utcoffset() == hi.astimezone(zone).utcoffset():
        return []  # (two changes on one day, there and back, are not known anywhere)
    before = lo.astimezone(zone).utcoffset()
    a, b = 0, int((hi - lo).total_seconds())
    while b - a > 1:
        mid = (a + b) // 2
        if (lo + timedelta(seconds=mid)).astimezone(zone).utcoffset() == before:
            a = mid
        else:
            b = mid
    return [lo + timedelta(seconds=b)]


def local_midnight(day: date, zone: ZoneInfo) -> datetime:
    """The first moment of a local day, as aware UTC: its midnight, or where the clock skips
    midnight (DST beginning at 00:00), the moment it jumps (fold=0 reads a skipped wall time
    with the offset before the change)."""
    return datetime.combine(day, time(0), zone).astimezone(UTC)
