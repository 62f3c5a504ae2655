"""What `kh up` made, remembered per lab so that `kh down`, `kh status` and the next `kh up`
work from it, even after the lab file was edited or deleted.

One JSON file per lab: ``$KH_LAB_DIR/NAME.json`` (default ``$XDG_STATE_HOME/kh/labs``, i.e.
~/.local/state/kh/labs), mode 600, rewritten whole (a temporary file renamed over it) after
every step that made or removed something: an allocation is recorded before it is booted, so
an interrupted `kh up` leaves nothing `kh down` does not know of. ``pending`` holds, while a
step that may allocate runs (khget, an action such as khgetdisk), what its principal held
before it; a `kh down` that finds it releases what the principal gained since.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kh import textobj
from kh.errors import KhError, UsageError

NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
VERSION = 1


@dataclass(frozen=True)
class AllocRec:
    """One khget of a group: its id, nodes and text object (khdo's stdin); ``booted``: the
    nodes were booted with the group's current appliance/kernel/keys."""

    id: int
    nodes: tuple[int, ...]
    text: str
    booted: bool = False


@dataclass(frozen=True)
class GroupRec:
    """A group as it was brought up: the settings the reconcile compares, its allocations,
    its token's id, and allocations its actions made (khgetdisk's disk nodes)."""

    name: str
    principal: str
    count: int
    domains: tuple[str, ...]
    appliance: str
    kernel: str
    keys: str
    token: tuple[str, int] | None = None  # (allocate_on, max_nodes)
    token_ids: tuple[int, ...] = ()  # tokens made for it (one per boot that needed one)
    allocations: tuple[AllocRec, ...] = ()
    gained: tuple[int, ...] = ()
    ready: bool = False  # booted and its actions done

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(n for a in self.allocations for n in a.nodes)


@dataclass(frozen=True)
class Pending:
    """A step that may allocate is running: what its principal held before it, when it
    began and by when it must have ended (time.time(); 0: not known, a state of an older kh).
    An allocation the principal made after ``deadline`` is not the step's."""

    principal: str
    allocations: tuple[int, ...]
    domains: tuple[int, ...]
    group: str = ""
    started: float = 0.0
    deadline: float = 0.0


@dataclass(frozen=True)
class LabState:
    name: str
    file: str  # the lab file `kh up` read last (absolute)
    service: str  # khd's socket: a state belongs to one service
    credentials: dict[str, str] = field(default_factory=dict)  # principal -> credential file
    domains: dict[str, int] = field(default_factory=dict)  # private domain name -> netid
    owners: dict[str, str] = field(default_factory=dict)  # private domain name -> principal
    implicit: tuple[tuple[str, int], ...] = ()  # (principal, netid) khget made unasked
    groups: dict[str, GroupRec] = field(default_factory=dict)
    pending: Pending | None = None
    checks: tuple[tuple[str, bool, str], ...] = ()  # (name, passed, detail) of the last run

    def with_group(self, g: GroupRec) -> LabState:
        return replace(self, groups={**self.groups, g.name: g})

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = VERSION
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> LabState:
        groups = {}
        for name, g in d.get("groups", {}).items():
            allocs = tuple(AllocRec(a["id"], tuple(a["nodes"]), a["text"], a["booted"])
                           for a in g.get("allocations", []))
            tok = g.get("token")
            groups[name] = GroupRec(
                name=name, principal=g["principal"], count=g["count"],
                domains=tuple(g["domains"]), appliance=g["appliance"], kernel=g["kernel"],
                keys=g["keys"], token=(tok[0], int(tok[1])) if tok else None,
                token_ids=tuple(g.get("token_ids", ())), allocations=allocs,
                gained=tuple(g.get("gained", ())), ready=bool(g.get("ready")))
        p = d.get("pending")
        return LabState(
            name=d["name"], file=d["file"], service=d["service"],
            credentials=dict(d.get("credentials", {})), domains=dict(d.get("domains", {})),
            owners=dict(d.get("owners", {})),
            implicit=tuple((str(u), int(n)) for u, n in d.get("implicit", [])),
            groups=groups,
            pending=Pending(p["principal"], tuple(p["allocations"]), tuple(p["domains"]),
                            p.get("group", ""), float(p.get("started", 0.0)),
                            float(p.get("deadline", 0.0))) if p else None,
            checks=tuple((str(n), bool(ok), str(det)) for n, ok, det in d.get("checks", [])))


def lab_dir() -> Path:
    """Where the state files are: $KH_LAB_DIR, else $XDG_STATE_HOME/kh/labs."""
    if os.environ.get("KH_LAB_DIR"):
        return Path(os.environ["KH_LAB_DIR"])
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "kh" / "labs"


def path_of(name: str) -> Path:
    if not NAME.match(name):
        raise UsageError(f"{name!r} is not a lab name", "a name is [a-z][a-z0-9-]*")
    return lab_dir() / f"{name}.json"


def load(name: str) -> LabState | None:
    """The lab's state, None when it has none (never brought up, or taken down)."""
    p = path_of(name)
    try:
        text = p.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"cannot read lab state {p}: {e.strerror}") from None
    try:
        return LabState.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise UsageError(f"lab state {p} is damaged: {e}",
                         "kh ps shows what runs; kh release removes it") from None


def save(st: LabState) -> None:
    """Write the state atomically (mode 600)."""
    d = lab_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    p = path_of(st.name)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(st.to_json(), f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """One command at a time on a lab (kh up, down, restart, check): an exclusive lock on
    NAME.lock beside its state; UsageError at once when another holds it."""
    d = lab_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path_of(name).with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another kh command is working on lab {name}",
                             "wait for it to end") from None
        yield
    finally:
        os.close(fd)


def remove(name: str) -> None:
    path_of(name).unlink(missing_ok=True)


def claimed(but: str, service: str) -> tuple[set[int], set[int]]:
    """The allocations and private domains the other labs' states (of ``service``) hold
    (domains: those they made and those their allocations are in): never the leftovers of
    lab ``but``'s interrupted step, nor a domain ``but`` may remove, whoever made it."""
    allocs: set[int] = set()
    doms: set[int] = set()
    for n in names():
        if n == but:
            continue
        try:
            st = load(n)
        except UsageError:
            continue
        if st is None or st.service != service:
            continue
        for g in st.groups.values():
            allocs |= {a.id for a in g.allocations} | set(g.gained)
            for a in g.allocations:
                with contextlib.suppress(KhError):
                    doms |= {d.netid for d in textobj.parse(a.text).domains if d is not None}
        doms |= set(st.domains.values()) | {d for _, d in st.implicit}
    return allocs, doms


def hand_over(netid: int, principal: str, but: str, service: str) -> str | None:
    """Lab ``but`` goes, but another lab's nodes are in its private domain ``netid`` (khget
    put them in their principal's first one): the first such lab (not busy with another kh
    command) takes it over, removing it at its own kh down. Its name, or None."""
    for n in names():
        if n == but:
            continue
        with contextlib.suppress(UsageError), locked(n):  # busy or damaged: the next one
            st = load(n)
            if st is None or st.service != service:
                continue
            uses = set()
            for g in st.groups.values():
                for a in g.allocations:
                    with contextlib.suppress(KhError):
                        uses |= {d.netid for d in textobj.parse(a.text).domains
                                 if d is not None}
            if netid not in uses:
                continue
            if (principal, netid) not in st.implicit:
                save(replace(st, implicit=(*st.implicit, (principal, netid))))
            return n
    return None


def names() -> list[str]:
    """Every lab with a state."""
    d = lab_dir()
    return sorted(p.stem for p in d.glob("*.json") if NAME.match(p.stem)) if d.is_dir() else []
