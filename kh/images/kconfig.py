"""Kconfig fragments: merge one into a ``.config`` and check that every option landed.

``make olddefconfig`` silently drops options whose dependencies are unmet (NFSD was lost that
way once), so every build checks the result against the fragment and fails loudly.
"""

from __future__ import annotations

import re
from pathlib import Path

from kh.errors import ImageError

SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse(text: str) -> dict[str, str | None]:
    """Option → value (``None`` for 'is not set'); comments and blank lines ignored."""
    opts: dict[str, str | None] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if m := SET_RE.match(line):
            opts[m[1]] = m[2]
        elif m := UNSET_RE.match(line):
            opts[m[1]] = None
        elif line and not line.startswith("#"):
            raise ImageError(f"config fragment line {n} is not an option: {line!r}")
    return opts


def merge(config: Path, fragment: dict[str, str | None]) -> None:
    """Overwrite ``config``'s values with ``fragment``'s, appending options it lacks."""
    lines = config.read_text().splitlines() if config.exists() else []
    seen: set[str] = set()
    out: list[str] = []
    for line in lines:
        m = SET_RE.match(line) or UNSET_RE.match(line)
        if m and m[1] in fragment:
            seen.add(m[1])
            out.append(_line(m[1], fragment[m[1]]))
        else:
            out.append(line)
    out += [_line(k, v) for k, v in fragment.items() if k not in seen]
    config.write_text("\n".join(out) + "\n")


def _line(opt: str, value: str | None) -> str:
    return f"# {opt} is not set" if value is None else f"{opt}={value}"


def missing(config_text: str, fragment: dict[str, str | None]) -> list[str]:
    """Options of ``fragment`` whose value did not land, as 'OPT=want (got ...)'."""
    have = parse_loose(config_text)
    bad = []
    for opt, want in fragment.items():
        got = have.get(opt)
        if want in (None, "n"):
            if got not in (None, "n"):
                bad.append(f"{opt} off (got {got})")
        elif got != want:
            bad.append(f"{opt}={want} (got {'not set' if got is None else got})")
    return bad


def parse_loose(text: str) -> dict[str, str | None]:
    opts: dict[str, str | None] = {}
    for line in text.splitlines():
        if m := SET_RE.match(line):
            opts[m[1]] = m[2]
        elif m := UNSET_RE.match(line):
            opts[m[1]] = None
    return opts


def check(config: Path, fragment: dict[str, str | None], what: str) -> None:
    bad = missing(config.read_text(), fragment)
    if bad:
        raise ImageError(f"{what}: {len(bad)} fragment option(s) did not land in .config: "
                         + ", ".join(bad[:6]),
                         "their dependencies are unmet; add those to the fragment")
