"""Appliance specs: small TOML files naming what an appliance takes from the PPC root.

A spec is data, checked strictly here, so a typo is refused by key name before anything is
built.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kh.errors import SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
DEVICE_RE = re.compile(r"^(/\S+)\s+([cb])\s+(\d+)\s+(\d+)\s+(0?[0-7]{3,4})$")


@dataclass(frozen=True)
class Device:
    path: str
    kind: str  # "c" or "b"
    major: int
    minor: int
    mode: int


@dataclass(frozen=True)
class Spec:
    """What one appliance contains. Paths inside the root are absolute."""

    name: str
    description: str
    source: Path  # the spec file
    init: Path  # a file of the repo, installed as /init
    programs: tuple[str, ...] = ()
    symlinks_to: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()
    nss: tuple[str, ...] = ()
    trees: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()
    devices: tuple[Device, ...] = ()
    extra: tuple[tuple[str, Path], ...] = ()  # (path in appliance, repo file)


_LIST_KEYS = ("programs", "symlinks_to", "files", "libraries", "nss", "trees", "dirs")
_KEYS = {"name", "description", "init", "devices", "extra", "include", *_LIST_KEYS}
MAX_INCLUDE_DEPTH = 4


def _strings(src: Path, key: str, value: Any, *, absolute: bool) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{src}: `{key}` must be a list of strings")
    for v in value:
        if absolute and not v.startswith("/"):
            raise SpecError(f"{src}: `{key}` entry {v!r} must be an absolute path in the root")
        if ".." in v.split("/"):
            raise SpecError(f"{src}: `{key}` entry {v!r} must not contain '..'")
    return tuple(value)


def _device(src: Path, text: Any) -> Device:
    m = DEVICE_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise SpecError(f"{src}: device {text!r} is malformed",
                        "write devices as \"/dev/null c 1 3 0666\"")
    return Device(m[1], m[2], int(m[3]), int(m[4]), int(m[5], 8))


def parse(text: str, src: Path, _depth: int = 0) -> Spec:
    """Parse spec text; ``src`` names the file in errors and anchors relative repo paths."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{src}: not valid TOML: {e}") from None
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise SpecError(f"{src}: unknown key `{unknown[0]}`",
                        f"known keys: {', '.join(sorted(_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError(f"{src}: `name` must be a short lower-case name, got {name!r}")
    init = raw.get("init")
    if not isinstance(init, str):
        raise SpecError(f"{src}: `init` must name the file that becomes /init")
    base = src.parent
    init_path = (base / init).resolve()
    if not init_path.is_file():
        raise SpecError(f"{src}: init file {init} does not exist")
    lists = {k: _strings(src, k, raw.get(k, []), absolute=k not in ("libraries", "nss"))
             for k in _LIST_KEYS}
    devices = raw.get("devices", [])
    if not isinstance(devices, list):
        raise SpecError(f"{src}: `devices` must be a list")
    extra_raw = raw.get("extra", {})
    if not isinstance(extra_raw, dict):
        raise SpecError(f"{src}: `extra` must be a table of \"/path/in/appliance\" = \"file\"")
    extra: list[tuple[str, Path]] = []
    for dest, rel in sorted(extra_raw.items()):
        if not dest.startswith("/") or not isinstance(rel, str):
            raise SpecError(f"{src}: `extra` entry {dest!r} must map an absolute path to a file")
        p = (base / rel).resolve()
        if not p.is_file():
            raise SpecError(f"{src}: extra file {rel} does not exist")
        extra.append((dest, p))
    desc = raw.get("description", "")
    if not isinstance(desc, str):
        raise SpecError(f"{src}: `description` must be a string")
    devs = [_device(src, d) for d in devices]
    for inc in _strings(src, "include", raw.get("include", []), absolute=False):
        base_spec = _included(src, inc, _depth)
        for k in _LIST_KEYS:
            lists[k] = _union(getattr(base_spec, k), lists[k])
        devs = list(_union(base_spec.devices, tuple(devs)))
        own = {d for d, _ in extra}
        extra = [e for e in base_spec.extra if e[0] not in own] + extra
    return Spec(name=name, description=desc, source=src, init=init_path,
                devices=tuple(devs), extra=tuple(sorted(extra)), **lists)


def _included(src: Path, name: str, depth: int) -> Spec:
    """A spec this one builds on (``include = ["shell"]``): its contents, not its init."""
    if depth >= MAX_INCLUDE_DEPTH:
        raise SpecError(f"{src}: includes nest deeper than {MAX_INCLUDE_DEPTH} (a cycle?)")
    p = src.parent / f"{name}.toml"
    if not NAME_RE.match(name) or not p.is_file():
        raise SpecError(f"{src}: included spec {name!r} does not exist")
    return parse(p.read_text(encoding="utf-8"), p, depth + 1)


def _union(first: tuple[Any, ...], then: tuple[Any, ...]) -> tuple[Any, ...]:
    out = list(first)
    out += [x for x in then if x not in out]
    return tuple(out)


def load(path: Path) -> Spec:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec {path} does not exist",
                        "specs live in appliance-builder/specs/") from None
    return parse(text, path)


def find(name_or_path: str, specs_dir: Path) -> Path:
    """A spec given by name (``shell``) or by path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or "/" in name_or_path:
        return p
    cand = specs_dir / f"{name_or_path}.toml"
    if not cand.exists():
        known = ", ".join(sorted(s.stem for s in specs_dir.glob("*.toml")))
        raise SpecError(f"no appliance spec named {name_or_path!r}", f"known: {known}")
    return cand
