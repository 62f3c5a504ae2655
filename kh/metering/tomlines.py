"""Where a key of a TOML file is written: the line a price list's error names."""

from __future__ import annotations

import re
from collections.abc import Iterator

_HEADER = re.compile(r"\s*\[(\[?)\s*([A-Za-z0-9_.\s]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=")


def locate(lines: list[str], key: str) -> int | None:
    """The line (1-based) of a key such as ``price[2].window[0].hours`` in the file, found by
    following its table headers (``[[price]]``, ``[[price.window]]``); the table's own line
    when the key is not written there itself; None when it cannot be told."""
    parts = re.findall(r"([A-Za-z0-9_]+)(?:\[(\d+)\])?", key)
    want_table = tuple((name, int(i)) for name, i in parts if i != "")
    leaf = parts[-1][0] if parts and parts[-1][1] == "" else None
    counts: dict[tuple[str, ...], int] = {}
    here: tuple[tuple[str, int], ...] = ()
    table_line: int | None = None
    for n, line in numbered(lines):
        if m := _HEADER.match(line):
            names = tuple(x.strip() for x in m[2].split("."))
            if m[1]:  # [[array.of.tables]]: the next of its kind; its children count afresh
                counts[names] = counts.get(names, -1) + 1
                for deeper in [k for k in counts if len(k) > len(names)
                               and k[:len(names)] == names]:
                    del counts[deeper]
            here = tuple((names[k], counts.get(names[:k + 1], -1)) for k in range(len(names)))
            if here == want_table:
                table_line = n
            continue
        if leaf is not None and here == want_table and (m := _KEY.match(line)) and m[1] == leaf:
            return n
    return table_line


def numbered(lines: list[str]) -> Iterator[tuple[int, str]]:
    multiline = False
    for n, line in enumerate(lines, 1):
        if line.count('"""') % 2 or line.count("'''") % 2:
            multiline = not multiline
            continue
        if not multiline:
            yield n, line


def nesting(text: str) -> int:
    """The deepest nesting of arrays and inline tables (``[``/``{``) in TOML ``text``, outside
    strings and comments, counted without recursion; table headers count 1. Why: tomllib
    recurses once per level, so what it does with deep nesting depends on the interpreter's
    recursion limit at the time (which tests and libraries change), not on the text."""
    depth = deepest = i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "#":  # a comment, to the end of its line
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if c in "\"'":
            quote = text[i:i + 3] if text[i:i + 3] in ('"""', "'''") else c
            i += len(quote)
            while i < n and not text.startswith(quote, i):
                i += 2 if c == '"' and text[i] == "\\" else 1  # a basic string's escape
            i += len(quote)
            continue
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return deepest
