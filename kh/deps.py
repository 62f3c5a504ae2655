"""Which Debian package brings each program kh runs, from ``tools/packages``.

``tools/packages`` is the one list of kh's host dependencies: ``tools/setup-apt`` installs it and
this module reads it, so an error about a missing program names the package and the command
that installs it (the README's ``make demo``/``make test`` run ``tools/setup-apt``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from kh.settings import paths


@dataclass(frozen=True)
class Package:
    """One row of ``tools/packages``: a Debian package, programs run from it, who needs it."""

    name: str
    programs: tuple[str, ...]
    needed_by: str


def parse(text: str) -> list[Package]:
    """Rows of ``tools/packages``: ``PACKAGE PROGRAMS|- NEEDED-BY...``; ``#`` starts a comment."""
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, progs, *why = line.split()
        rows.append(Package(name, tuple(p for p in progs.split(",") if p != "-"), " ".join(why)))
    return rows


def table_file() -> Path:
    return paths().repo / "tools" / "packages"


@functools.cache
def packages() -> tuple[Package, ...]:
    try:
        return tuple(parse(table_file().read_text(encoding="utf-8")))
    except OSError:
        return ()


def provider(program: str) -> str | None:
    """The Debian package kh installs ``program`` from (by its base name), or None."""
    base = Path(program).name
    for pkg in packages():
        if base in pkg.programs:
            return pkg.name
    return None


def missing_hint(program: str) -> str:
    """The hint for a program that is not there: its package and how to install it."""
    pkg = provider(program)
    if pkg is None:
        return "is it installed? `make setup` installs kh's dependencies"
    return f"it comes with the Debian package {pkg}: `make setup` or `tools/setup-apt` installs it"
