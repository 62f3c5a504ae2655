"""Price lists (issue 14, item 2): the shipped ones load; each kind of bad file is one error
naming the file, the key and the line; `kh bill --prices BAD` says it in one line, exits
non-zero and asks khd nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kh.cli import bill as bill_cli
from kh.cli.main import main
from kh.metering import billing, prices, tomlines

ROOT = Path(__file__).resolve().parents[2]
HEAD = 'currency = "EUR"\nvalid_from = 2026-01-01\n'  # lines 1-2
NODE = '[[price]]\nquantity = "node_seconds"\n'


def test_the_shipped_price_lists_load():
    default = prices.load(billing.DEFAULT)
    example = prices.load(ROOT / "examples" / "prices-time-of-day.toml")
    assert default.currency == example.currency == "EUR"
    assert example.timezone == "Europe/Berlin"
    assert any(e.windows for e in example.entries) and any(e.mode for e in example.entries)


BAD = [
    ("not TOML", HEAD + "[[price]\n", r"t\.toml: not valid TOML: .*line 3"),
    ("negative price", HEAD + NODE + "price = -0.01\n",
     r"t\.toml:5: price\[0\]\.price: must be at least 0, not -0\.01"),
    ("negative window price", HEAD + NODE + 'price = 1\n[[price.window]]\nhours = "08:00-09:00"'
     '\nprice = -2\n', r"t\.toml:8: price\[0\]\.window\[0\]\.price: must be at least 0"),
    ("a price too large to round", HEAD + NODE + "price = 1e60\n",
     r"t\.toml:5: price\[0\]\.price: 1E\+60 is too large"),
    ("unknown quantity", HEAD + '[[price]]\nquantity = "cpu_secs"\nprice = 1\n',
     r"t\.toml:4: price\[0\]\.quantity: 'cpu_secs' is not a metered quantity"),
    ("overlapping windows", HEAD + NODE + 'price = 1\n[[price.window]]\nhours = "22:00-06:00"\n'
     'price = 0.5\n[[price.window]]\nhours = "05:00-08:00"\ndays = ["sun"]\nprice = 0.7\n',
     r"t\.toml:9: price\[0\]\.window\[1\]: overlaps price\[0\]\.window\[0\] \(22:00-06:00\) "
     r"on sun 05:00-06:00"),
    ("overlap past midnight into Monday", HEAD + NODE + 'price = 1\n[[price.window]]\n'
     'hours = "23:00-01:00"\ndays = ["sun"]\nprice = 0\n[[price.window]]\nhours = '
     '"00:00-00:30"\ndays = ["mon"]\nprice = 0\n', r"on mon 00:00-00:30"),
    ("empty window", HEAD + NODE + 'price = 1\n[[price.window]]\nhours = "08:00-08:00"\n'
     'price = 2\n', r"t\.toml:7: price\[0\]\.window\[0\]\.hours: '08:00-08:00' is an empty"),
    ("bad hours", HEAD + NODE + 'price = 1\n[[price.window]]\nhours = "8-20"\nprice = 2\n',
     r"hours: '8-20' is not HH:MM-HH:MM"),
    ("a window off the quarter hours", HEAD + NODE + 'price = 1\n[[price.window]]\n'
     'hours = "08:10-20:00"\nprice = 2\n', r"t\.toml:7: price\[0\]\.window\[0\]\.hours: "
     r"'08:10-20:00' does not start and end on a quarter hour"),
    ("a price change off the quarter hours", HEAD + NODE + "price = 1\n"
     "valid_until = 2026-06-01T12:05:00Z\n" + NODE + "price = 2\n"
     "valid_from = 2026-06-01T12:05:00Z\n", r"t\.toml:6: price\[0\]\.valid_until: "
     r"2026-06-01T12:05:00\+00:00 is not on a quarter hour"),
    ("bad weekday", HEAD + NODE + 'price = 1\n[[price.window]]\nhours = "08:00-20:00"\n'
     'days = ["monday"]\nprice = 2\n', r"t\.toml:8: price\[0\]\.window\[0\]\.days: 'monday'"),
    ("validity gap", HEAD + NODE + 'price = 1\nvalid_until = 2026-06-01\n' + NODE +
     'price = 2\nvalid_from = 2026-07-01\n',
     r"t\.toml:7: price\[1\]: nothing prices node_seconds from 2026-06-01 00:00 to "
     r"2026-07-01 00:00: a gap in validity"),
    ("validity overlap", HEAD + NODE + 'price = 1\nvalid_until = 2026-07-01\n' + NODE +
     'price = 2\nvalid_from = 2026-06-01\n', r"price\[1\]: its validity overlaps price\[0\]"),
    ("ends before the list", HEAD.replace("\n", "\nvalid_until = 2027-01-01\n", 1) + NODE +
     'price = 1\nvalid_until = 2026-06-01\n', r"nothing prices node_seconds from 2026-06-01"),
    ("unknown key", HEAD + NODE + "price = 1\ncost = 2\n",
     r"t\.toml:6: price\[0\]\.cost: is not a key"),
    ("bad time zone", 'timezone = "Mars/Olympus"\n' + HEAD + NODE + "price = 1\n",
     r"t\.toml:1: timezone: 'Mars/Olympus' is not an IANA time zone"),
    ("tiers and windows", HEAD + NODE + 'tiers = "volume"\nprice = 1\n[[price.tier]]\n'
     'price = 1\n', r"t\.toml:3: price\[0\]: has tiers and also a price"),
    ("tiers not rising", HEAD + NODE + 'tiers = "graduated"\n[[price.tier]]\nupto = 10\n'
     'price = 1\n[[price.tier]]\nupto = 5\nprice = 1\n[[price.tier]]\nprice = 0\n',
     r"t\.toml:10: price\[0\]\.tier\[1\]\.upto: 5 is not above"),
    ("domain on a quantity without one", HEAD + NODE + 'domain = "external"\nprice = 1\n',
     r"price\[0\]\.domain: node_seconds has no domain"),
    ("no currency", 'valid_from = 2026-01-01\n' + NODE + "price = 1\n",
     r"t\.toml: currency: must be a currency code"),
    ("no prices", HEAD, r"t\.toml: price: the list prices nothing"),
    ("a float where a date goes", HEAD.replace("2026-01-01", "2026.5"),
     r"t\.toml:2: valid_from: must be a date"),
]


@pytest.mark.parametrize("text, error", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_price_list_is_one_error_naming_file_key_and_line(text, error):
    with pytest.raises(prices.PriceError, match=error) as e:
        prices.parse(text.encode(), "t.toml")
    assert "\n" not in str(e.value)


def test_too_large_or_not_text():
    with pytest.raises(prices.PriceError, match="at most 32768 bytes"):
        prices.parse(b"#" * (prices.MAX_BYTES + 1), "big.toml")
    with pytest.raises(prices.PriceError, match="not UTF-8"):
        prices.parse(b"\xff\xfe", "bin.toml")
    with pytest.raises(prices.PriceError, match=r"cannot read price list 'nowhere\.toml'"):
        prices.load(Path("nowhere.toml"))


@pytest.mark.parametrize("when", [
    "0001-01-01T00:00:00+23:59", "0001-01-01", "9999-12-31T00:00:00-23:45", "9999-01-01",
    "1969-12-31T23:45:00Z"])
def test_a_date_at_the_calendars_ends_is_one_error_not_an_overflow(when):
    # 0001-01-01T00:00:00+23:59 was 'internal error: OverflowError' (khd's 500)
    text = f'currency = "EUR"\nvalid_from = {when}\n' + NODE + "price = 1\n"
    with pytest.raises(prices.PriceError, match=r"^t\.toml:2: valid_from: .*years 1970 to 9998"):
        prices.parse(text.encode(), "t.toml")


@pytest.mark.parametrize("nest", [
    "a = " + "[" * 5000 + "]" * 5000,  # arrays in arrays
    "a = " + "{a = " * 3000 + "1" + "}" * 3000,  # inline tables in inline tables
])
def test_a_deeply_nested_price_list_is_one_error_not_a_crash(nest):
    # under MAX_BYTES: tomllib recursed past Python's limit (RecursionError, khd's 500)
    text = (HEAD + nest + "\n").encode()
    assert len(text) <= prices.MAX_BYTES
    with pytest.raises(prices.PriceError, match=r"^t\.toml: nested too deeply"):
        prices.parse(text, "t.toml")


@pytest.mark.parametrize("limit", [200, 100_000])
def test_nesting_is_refused_whatever_the_recursion_limit(limit):
    # what tomllib does with 5000 levels depended on sys.getrecursionlimit() (hypothesis and
    # pytest change it): with a high one it parsed them, with a low one anything could fail
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        text = (HEAD + "a = " + "[" * 5000 + "]" * 5000 + "\n").encode()
        with pytest.raises(prices.PriceError, match=r"^t\.toml: nested too deeply"):
            prices.parse(text, "t.toml")
    finally:
        sys.setrecursionlimit(old)


@pytest.mark.parametrize("text, depth", [
    ("a = 1", 0), ("[t]\na = [1, [2]]", 2), ("a = '[[[['", 0), ('a = "\\"[[["', 0),
    ('a = """[[\n[["""\nb = [ ]', 1), ("# [[[[\na = {b = [1]}", 2), ("a = ']]]' \nb = [[1]]", 2),
])
def test_nesting_counts_brackets_outside_strings_and_comments(text, depth):
    assert tomlines.nesting(text) == depth


def test_kh_bill_with_a_bad_price_file_says_so_in_one_line_and_asks_khd_nothing(
        tmp_path, monkeypatch):
    asked: list[object] = []

    class Khd:
        def call(self, *a, **kw):  # type: ignore[no-untyped-def]
            asked.append(a)
            return ""

    monkeypatch.setattr(bill_cli, "client", lambda: Khd())
    monkeypatch.delenv("KH_CREDENTIAL", raising=False)
    bad = tmp_path / "p.toml"
    bad.write_text(HEAD + NODE + "price = -1\n")
    r = CliRunner().invoke(main, ["bill", "alice", "--prices", str(bad)])
    assert r.exit_code == 2
    assert r.output == f"kh: {bad}:5: price[0].price: must be at least 0, not -1 (prices " \
        "and amounts are never negative)\n"
    assert asked == []
