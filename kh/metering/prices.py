"""Price lists: a small TOML file that says what each metered quantity costs (docs/service.md,
Billing). Parsed and checked whole before anything is rated; every fault is one PriceError
naming the file, the key and (where it can be found) the line.

    currency = "EUR"             # required
    decimals = 2                 # a bill's lines are rounded to this many places (0..6)
    timezone = "Europe/Berlin"   # IANA zone of the windows and dates (default UTC)
    valid_from = 2026-01-01      # required: a date (midnight in `timezone`) or a date-time
    valid_until = 2028-01-01     # optional (default: no end); exclusive

    [[price]]
    quantity = "node_seconds"    # one of kh.metering.usage.Quantity
    per = 3600                   # the price is for this many units (default 1)
    price = 0.02                 # outside every window
      [[price.window]]
      hours = "08:00-20:00"      # half-open; past midnight when the end is not after the start
      days = ["mon", "tue", "wed", "thu", "fri"]   # optional: every day
      price = 0.04

    [[price]]
    quantity = "net_tx_bytes"
    domain = "external"          # net quantities only: private, public or external
    per = 1_000_000_000
    tiers = "graduated"          # or "volume"; an entry has windows or tiers, not both
      [[price.tier]]
      upto = 10                  # in `per` units, inclusive; the last tier has no upto
      price = 0
      [[price.tier]]
      price = 0.05

Numbers are exact (TOML floats are read as Decimal, never float). An entry may carry its own
``valid_from``/``valid_until``; the entries of one quantity (and domain) must then cover the
list's validity without a gap or an overlap.

What a checked list is made of (PriceList and its entries): kh.metering.pricelist.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kh.metering import clock, tomlines
from kh.metering.pricelist import Entry as Entry  # the checked list's parts, here too
from kh.metering.pricelist import PriceError as PriceError
from kh.metering.pricelist import PriceList as PriceList
from kh.metering.pricelist import Tier as Tier
from kh.metering.pricelist import Window as Window
from kh.metering.usage import NET, Quantity
from kh.model import DomainKind

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

MAX_BYTES = 32 * 1024  # a price list: a file, or a body sent to khd (whose bodies are 64 KiB)
MAX_NESTING = 32  # arrays and inline tables within each other (tomlines.nesting); a list needs 2
MAX_ENTRIES = 256
MAX_WINDOWS = 32  # per entry
MAX_TIERS = 32
MAX_DECIMALS = 6
MAX_NUMBER = Decimal(10) ** 15  # prices, per, upto: a charge then fits rating's 50 digits
TIER_MODES = ("volume", "graduated")
_LIST_KEYS = {"currency", "decimals", "timezone", "valid_from", "valid_until", "price", "name"}
_ENTRY_KEYS = {"quantity", "domain", "per", "price", "window", "tiers", "tier", "valid_from",
               "valid_until", "note"}


def load(path: Path) -> PriceList:
    """Read and check a price file. PriceError (naming the file) for anything wrong with it."""
    return parse(read(path), str(path))


def read(path: Path) -> bytes:
    """A price file's bytes, at most MAX_BYTES + 1 (parse refuses more), read once: a pipe
    (``--prices <(...)``) has nothing the second time. PriceError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_BYTES + 1)
    except OSError as e:
        raise PriceError(f"cannot read price list {str(path)!r}: {e.strerror}") from None


def parse(data: bytes, source: str) -> PriceList:
    """A price list from its bytes; ``source`` names it in errors. PriceError when it is over
    MAX_BYTES, not UTF-8, not TOML (or nested past the parser's depth), or breaks a rule of
    the module's docstring."""
    if len(data) > MAX_BYTES:
        raise PriceError(f"{source}: a price list is at most {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PriceError(f"{source}: not UTF-8 text") from None
    if tomlines.nesting(text) > MAX_NESTING:
        raise PriceError(f"{source}: nested too deeply (arrays or inline tables within each "
                         f"other, more than {MAX_NESTING} levels; a price list needs two)")
    try:
        raw = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as e:
        raise PriceError(f"{source}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses per [ or {: 32 KiB of them pass Python's limit
        raise PriceError(f"{source}: nested too deeply (arrays or inline tables within each "
                         "other; a price list needs two levels)") from None
    return _Reader(text, source).price_list(raw, hashlib.sha256(data).hexdigest())


class _Reader:
    """Checks the parsed TOML, raising PriceError at the first fault, with its line."""

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source
        self.zone = ZoneInfo("UTC")

    def fail(self, key: str, problem: str, hint: str | None = None) -> PriceError:
        line = tomlines.locate(self.lines, key)
        where = f"{self.source}:{line}" if line else self.source
        return PriceError(f"{where}: {key}: {problem}", hint)

    def price_list(self, raw: dict[str, Any], sha256: str) -> PriceList:
        self._known(raw, _LIST_KEYS, "", "currency, decimals, timezone, valid_from, "
                    "valid_until, name, [[price]]")
        currency = raw.get("currency")
        if not isinstance(currency, str) or not re.fullmatch(r"[A-Za-z]{1,8}", currency):
            raise self.fail("currency", f"must be a currency code such as \"EUR\", not "
                            f"{_show(currency)}")
        decimals = raw.get("decimals", 2)
        if type(decimals) is not int or not 0 <= decimals <= MAX_DECIMALS:
            raise self.fail("decimals", f"must be a whole number 0 to {MAX_DECIMALS}, not "
                            f"{_show(decimals)}")
        tz = raw.get("timezone", "UTC")
        try:
            if not isinstance(tz, str) or not re.fullmatch(r"[A-Za-z0-9_+/-]{1,64}", tz):
                raise ValueError
            self.zone = ZoneInfo(tz)
        except (ValueError, ZoneInfoNotFoundError):
            raise self.fail("timezone", f"{_show(tz)} is not an IANA time zone",
                            "e.g. \"Europe/Berlin\" or \"UTC\"") from None
        if "valid_from" not in raw:
            raise self.fail("valid_from", "is missing", "the first day the prices hold")
        start = self._moment(raw["valid_from"], "valid_from")
        end = self._moment(raw["valid_until"], "valid_until") if "valid_until" in raw else None
        if end is not None and end <= start:
            raise self.fail("valid_until", "is not after valid_from")
        name = raw.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 200):
            raise self.fail("name", "must be a string of at most 200 characters")
        items = raw.get("price")
        if not isinstance(items, list) or not items or \
                not all(isinstance(x, dict) for x in items):
            raise self.fail("price", "the list prices nothing", "one [[price]] table per "
                            "quantity")
        if len(items) > MAX_ENTRIES:
            raise self.fail("price", f"more than {MAX_ENTRIES} entries")
        entries = tuple(self._entry(x, f"price[{i}]", start, end) for i, x in enumerate(items))
        self._coverage(entries, start, end)
        return PriceList(self.source, sha256, name, currency.upper(), decimals, tz, self.zone,
                         start, end, entries)

    def _known(self, raw: dict[str, Any], allowed: set[str], prefix: str, hint: str) -> None:
        for k in raw:
            if k not in allowed:
                raise self.fail(prefix + k, "is not a key of a price list here", hint)

    def _moment(self, value: object, key: str) -> datetime:
        if isinstance(value, date) and not clock.YEARS[0] <= value.year <= clock.YEARS[1]:
            raise self.fail(key, f"{value.isoformat()} is not in the years {clock.YEARS[0]} "
                            f"to {clock.YEARS[1]}")
        if isinstance(value, datetime):
            if value.minute % clock.QUARTER or value.second or value.microsecond:
                raise self.fail(key, f"{value.isoformat()} is not on a quarter hour",
                                "prices change on a quarter hour: :00, :15, :30 or :45")
            return (value if value.tzinfo else value.replace(tzinfo=self.zone)).astimezone(UTC)
        if isinstance(value, date):
            return clock.local_midnight(value, self.zone)
        raise self.fail(key, f"must be a date (2026-11-01) or a date-time, not {_show(value)}")

    def _number(self, value: object, key: str, *, positive: bool = False) -> Decimal:
        if type(value) is int:
            value = Decimal(value)
        if not isinstance(value, Decimal) or not value.is_finite():
            raise self.fail(key, f"must be a number, not {_show(value)}")
        if value >= MAX_NUMBER:
            raise self.fail(key, f"{value} is too large", "below 10^15")
        if value < 0 or (positive and value == 0):
            raise self.fail(key, f"must be {'above' if positive else 'at least'} 0, not "
                            f"{value}", "prices and amounts are never negative")
        return value

    def _entry(self, raw: dict[str, Any], key: str, start: datetime, end: datetime | None
               ) -> Entry:
        self._known(raw, _ENTRY_KEYS, key + ".", ", ".join(sorted(_ENTRY_KEYS)))
        q = raw.get("quantity")
        try:
            quantity = Quantity(q)
        except ValueError:
            raise self.fail(f"{key}.quantity", f"{_show(q)} is not a metered quantity",
                            ", ".join(x.value for x in Quantity)) from None
        domain = None
        if "domain" in raw:
            if quantity not in NET:
                raise self.fail(f"{key}.domain", f"{quantity.value} has no domain",
                                "only the net_* quantities are counted per domain")
            try:
                domain = DomainKind(raw["domain"])
            except ValueError:
                raise self.fail(f"{key}.domain", f"{_show(raw['domain'])} is not a domain kind",
                                "private, public or external") from None
        per = self._number(raw.get("per", 1), f"{key}.per", positive=True)
        vf = self._moment(raw["valid_from"], f"{key}.valid_from") if "valid_from" in raw \
            else start
        vu = self._moment(raw["valid_until"], f"{key}.valid_until") if "valid_until" in raw \
            else end
        if vf < start or (end is not None and (vu is None or vu > end)):
            raise self.fail(f"{key}.valid_from" if vf < start else f"{key}.valid_until",
                            "lies outside the list's valid_from..valid_until")
        if vu is not None and vu <= vf:
            raise self.fail(f"{key}.valid_until", "is not after valid_from")
        if "tiers" in raw or "tier" in raw:
            if "window" in raw or "price" in raw:
                raise self.fail(key, "has tiers and also a price or windows",
                                "an entry is priced by tiers, or by a price and windows")
            mode, tiers = self._tiers(raw, key)
            return Entry(key, quantity, domain, per, None, (), mode, tiers, vf, vu)
        if "price" not in raw:
            raise self.fail(f"{key}.price", "is missing", "or give tiers")
        price = self._number(raw["price"], f"{key}.price")
        return Entry(key, quantity, domain, per, price, self._windows(raw, key), None, (),
                     vf, vu)

    def _windows(self, raw: dict[str, Any], key: str) -> tuple[Window, ...]:
        items = raw.get("window", [])
        if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
            raise self.fail(f"{key}.window", "must be [[...window]] tables")
        if len(items) > MAX_WINDOWS:
            raise self.fail(f"{key}.window", f"more than {MAX_WINDOWS} windows")
        out: list[Window] = []
        for i, w in enumerate(items):
            wk = f"{key}.window[{i}]"
            self._known(w, {"hours", "days", "price"}, wk + ".", "hours, days, price")
            if not isinstance(w.get("hours"), str):
                raise self.fail(f"{wk}.hours", f"must be a string, not {_show(w.get('hours'))}",
                                "half-open HH:MM-HH:MM, e.g. \"22:00-06:00\"")
            try:
                start, end = clock.parse_hours(w["hours"])
            except clock.WindowError as e:
                raise self.fail(f"{wk}.hours", str(e), "half-open HH:MM-HH:MM, e.g. "
                                "\"22:00-06:00\"") from None
            try:
                days = clock.parse_days(w["days"]) if isinstance(w.get("days"), list) else \
                    tuple(range(7)) if "days" not in w else clock.parse_days([w["days"]])
            except clock.WindowError as e:
                raise self.fail(f"{wk}.days", str(e)) from None
            if "price" not in w:
                raise self.fail(f"{wk}.price", "is missing")
            win = Window(w["hours"], days, clock.spans(start, end, days),
                         self._number(w["price"], f"{wk}.price"))
            for j, other in enumerate(out):
                if (both := clock.overlap(other.spans, win.spans)) is not None:
                    raise self.fail(wk, f"overlaps {key}.window[{j}] ({other.label}) on "
                                    f"{clock.span_text(both)}",
                                    "windows of an entry must not share a minute")
            out.append(win)
        return tuple(out)

    def _tiers(self, raw: dict[str, Any], key: str) -> tuple[str, tuple[Tier, ...]]:
        mode = raw.get("tiers")
        if mode not in TIER_MODES:
            raise self.fail(f"{key}.tiers", f"must be \"volume\" or \"graduated\", not "
                            f"{_show(mode)}")
        items = raw.get("tier")
        if not isinstance(items, list) or not items or \
                not all(isinstance(x, dict) for x in items):
            raise self.fail(f"{key}.tier", "is missing", "[[...tier]] tables: upto, price")
        if len(items) > MAX_TIERS:
            raise self.fail(f"{key}.tier", f"more than {MAX_TIERS} tiers")
        out: list[Tier] = []
        for i, t in enumerate(items):
            tk = f"{key}.tier[{i}]"
            self._known(t, {"upto", "price"}, tk + ".", "upto, price")
            last = i == len(items) - 1
            if last and "upto" in t:
                raise self.fail(f"{tk}.upto", "the last tier has no bound",
                                "leave upto out: it takes everything above the one before")
            if not last and "upto" not in t:
                raise self.fail(f"{tk}.upto", "is missing", "only the last tier is unbounded")
            upto = None if last else self._number(t["upto"], f"{tk}.upto", positive=True)
            if upto is not None and out and out[-1].upto is not None and upto <= out[-1].upto:
                raise self.fail(f"{tk}.upto", f"{upto} is not above the tier before's "
                                f"{out[-1].upto}")
            if "price" not in t:
                raise self.fail(f"{tk}.price", "is missing")
            out.append(Tier(upto, self._number(t["price"], f"{tk}.price")))
        return str(mode), tuple(out)

    def _coverage(self, entries: tuple[Entry, ...], start: datetime, end: datetime | None
                  ) -> None:
        """The entries of each quantity (and domain) cover [start, end) once: no overlap, no
        gap."""
        groups: dict[tuple[Quantity, DomainKind | None], list[Entry]] = {}
        for e in entries:
            groups.setdefault((e.quantity, e.domain), []).append(e)
        for (q, d), group in groups.items():
            what = q.value + (f" ({d.value})" if d else "")
            group.sort(key=lambda e: e.valid_from)
            at: datetime | None = start
            prev: Entry | None = None
            for e in group:
                if prev is not None and (at is None or e.valid_from < at):
                    raise self.fail(e.key, f"its validity overlaps {prev.key}'s for {what}",
                                    "entries of one quantity take turns in time")
                if at is not None and e.valid_from > at:
                    raise self.fail(e.key, f"nothing prices {what} from {_day(at, self.zone)} "
                                    f"to {_day(e.valid_from, self.zone)}: a gap in validity",
                                    "let the entry before end where this one starts")
                at, prev = e.valid_until, e
            if at != end:
                raise self.fail(group[-1].key, f"nothing prices {what} from "
                                f"{_day(at, self.zone)} to the list's valid_until: a gap in "
                                "validity", "the last entry should end where the list does")


def _day(t: datetime | None, zone: ZoneInfo) -> str:
    return "no end" if t is None else t.astimezone(zone).strftime("%Y-%m-%d %H:%M")


def _show(value: object) -> str:
    text = repr(value) if not isinstance(value, Decimal) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
