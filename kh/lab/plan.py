"""The plan of `kh up` and `kh down`: a pure function of the remembered state and the lab file
(old state + new file -> steps). `kh up --dry-run` prints the steps as the khget/khdo/kh
commands they run; kh.lab.run carries them out.

Reconcile rules, group by group (``diff``):
  * a group new in the file: khget, boot, its actions;
  * a group gone from the file: its allocations released (and those its actions made, e.g.
    khgetdisk's disk nodes), its token removed;
  * principal or domains changed: released and allocated again (new node numbers);
  * count up: the difference allocated as a new allocation and booted; the nodes it had are
    untouched (same numbers, consoles unbroken). Count down: the newest nodes released;
  * appliance, kernel, keys or token changed, or a group its templates name was allocated
    again (``nodes.G``: its addresses changed), or an earlier `kh up` did not finish it:
    every node reset to U-Boot and booted again (actions run again);
  * otherwise nothing.
Private domains the file no longer names are removed once no group of the lab uses them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kh.lab.model import PUBLIC, Group, Lab
from kh.lab.state import AllocRec, LabState
from kh.model import EXTERNAL as EXTERNAL_ID
from kh.model import PUBLIC as PUBLIC_ID


@dataclass(frozen=True)
class GroupStep:
    """A step on one of the lab's groups (its name), as the principal that holds it; the
    steps' own fields follow these two."""

    group: str
    principal: str


@dataclass(frozen=True)
class Khget(GroupStep):
    """``G=$(khget -c CRED OPTS PRINCIPAL COUNT)``: ``joins`` existing private domains (-n),
    ``creates`` new ones (-p), in this order after external/public."""

    count: int
    external: bool
    public: bool
    joins: tuple[str, ...]
    creates: tuple[str, ...]

    def options(self, netid: Callable[[str], str]) -> list[str]:
        """khget's options before PRINCIPAL COUNT: -x, -i, -n with the joined domains' ids
        (``netid`` gives one from its name), -p with how many domains it makes."""
        opts = (["-x"] if self.external else []) + (["-i"] if self.public else [])
        if self.joins:
            opts += ["-n", ",".join(netid(d) for d in self.joins)]
        if self.creates:
            opts += ["-p", str(len(self.creates))]
        return opts


@dataclass(frozen=True)
class AddToken(GroupStep):
    domain: str
    max_nodes: int


@dataclass(frozen=True)
class Reset(GroupStep):
    """``kh reset`` of each of the group's nodes (back to U-Boot, to be booted again)."""

    nodes: tuple[int, ...]


@dataclass(frozen=True)
class Boot(GroupStep):
    """Listing 1 on each of the group's allocations not booted yet, then every ready line."""

    appliance: str
    kernel: str


@dataclass(frozen=True)
class Act(GroupStep):
    """The group's actions on each node booted by this run."""

    actions: tuple[str, ...]


@dataclass(frozen=True)
class Release(GroupStep):
    """``kh release ID [NODES]`` (``nodes`` empty: the whole allocation)."""

    allocation: int
    nodes: tuple[int, ...] = ()


@dataclass(frozen=True)
class RmToken(GroupStep):
    token_id: int


@dataclass(frozen=True)
class RmDomain:
    name: str
    principal: str
    netid: int


Step = Khget | AddToken | Reset | Boot | Act | Release | RmToken | RmDomain


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    notes: tuple[str, ...]  # what changes and why, one line per group

    @property
    def empty(self) -> bool:
        return not self.steps

    @property
    def nodes(self) -> int:
        """Nodes the plan's khgets ask for."""
        return sum(s.count for s in self.steps if isinstance(s, Khget))


def _refers(g: Group, other: str) -> bool:
    """Do the group's templates name group ``other`` (nodes.other / nodes['other'])?"""
    pat = re.compile(rf"nodes\s*(?:\.\s*{re.escape(other)}\b|\[\s*['\"]{re.escape(other)}['\"])")
    return any(pat.search(t) for t in (g.keys, *g.actions))


def _settings_changed(g: Group, old: LabState) -> list[str]:
    r = old.groups[g.name]
    why = []
    for what, a, b in (("appliance", r.appliance, g.appliance), ("kernel", r.kernel, g.kernel),
                       ("keys", r.keys, g.keys)):
        if a != b:
            why.append(f"{what} {a!r} -> {b!r}")
    tok = (g.token.allocate_on, g.token.max_nodes) if g.token else None
    if tok != r.token:
        why.append("token changed")
    return why


def up(lab: Lab, old: LabState | None, only: str | None = None) -> Plan:
    """The steps that make the running lab what ``lab`` says, from ``old`` (None: nothing
    runs). ``only``: that group alone (the others are neither touched nor removed)."""
    groups = [g for g in lab.groups if only is None or g.name == only]
    st = old or LabState(lab.name, str(lab.path), "")
    steps: list[Step] = []
    notes: list[str] = []
    known = set(st.domains)  # private domains that exist (or will, once a khget made them)
    realloc: set[str] = set()
    new_nodes: dict[str, int] = {}  # group -> nodes to allocate
    for g in groups:
        r = st.groups.get(g.name)
        if r is None:
            new_nodes[g.name] = g.count
            notes.append(f"{g.name}: new, {g.count} node{'s' if g.count > 1 else ''}")
        elif r.principal != g.principal or r.domains != g.domains:
            realloc.add(g.name)
            new_nodes[g.name] = g.count
            what = "principal" if r.principal != g.principal else "domains"
            notes.append(f"{g.name}: {what} changed: released and allocated again")
            steps += [Release(g.name, r.principal, a.id) for a in reversed(r.allocations)]
            steps += [Release(g.name, r.principal, a) for a in reversed(r.gained)]
            steps += [RmToken(g.name, r.principal, t) for t in r.token_ids]
        elif g.count > r.count:
            new_nodes[g.name] = g.count - r.count
            notes.append(f"{g.name}: {r.count} -> {g.count} nodes: {g.count - r.count} added "
                         f"in a new allocation; nodes {' '.join(map(str, r.nodes))} untouched")
        elif g.count < r.count:
            steps += _shrink(g, r.allocations, r.count - g.count)
            gone = r.nodes[g.count:]
            notes.append(f"{g.name}: {r.count} -> {g.count} nodes: "
                         f"{' '.join(map(str, gone))} released")
    for g in groups:
        if g.name in new_nodes:
            steps.append(_khget(g, new_nodes[g.name], known))
    for g in lab.order():
        if g not in groups:
            continue
        r = st.groups.get(g.name)
        reboot: list[str] = []
        if r is not None and g.name not in realloc:
            reboot = _settings_changed(g, st)
            reboot += [f"it names {o}, allocated again" for o in sorted(realloc)
                       if _refers(g, o)]
            if not r.ready and not reboot:
                reboot.append("an earlier kh up did not finish it")
            if reboot:
                notes.append(f"{g.name}: re-booted: {'; '.join(reboot)}")
                kept = r.nodes[:g.count]
                if kept:
                    steps.append(Reset(g.name, g.principal, kept))
                steps += [RmToken(g.name, g.principal, t) for t in r.token_ids]
        fresh = r is None or g.name in realloc or bool(reboot)
        if g.token and (fresh or g.name in new_nodes):
            # a token's secret is never stored: new nodes of a running group get a new one
            steps.append(AddToken(g.name, g.principal, g.token.allocate_on, g.token.max_nodes))
        if fresh or g.name in new_nodes:
            steps.append(Boot(g.name, g.principal, g.appliance, g.kernel))
            if g.actions:
                steps.append(Act(g.name, g.principal, g.actions))
    if only is None:
        for name in st.groups:
            if all(g.name != name for g in lab.groups):
                notes.append(f"{name}: gone from the file: released")
                steps += _teardown_group(st, name)
        used = {d for g in lab.groups for d in g.domains}
        for name, netid in st.domains.items():
            if name not in used:
                notes.append(f"domain {name}: no group uses it: removed")
                steps.append(RmDomain(name, st.owners.get(name, ""), netid))
    return Plan(tuple(steps), tuple(notes))


def _khget(g: Group, count: int, known: set[str]) -> Khget:
    joins = tuple(d for d in g.private if d in known)
    creates = tuple(d for d in g.private if d not in known)
    known.update(creates)
    return Khget(g.name, g.principal, count, "external" in g.domains, PUBLIC in g.domains,
                 joins, creates)


def _shrink(g: Group, allocs: tuple[AllocRec, ...], drop: int) -> list[Step]:
    """Release ``drop`` nodes, the newest first: whole allocations, or their last nodes."""
    out: list[Step] = []
    for a in reversed(allocs):
        if drop <= 0:
            break
        if len(a.nodes) <= drop:
            out.append(Release(g.name, g.principal, a.id))
            drop -= len(a.nodes)
        else:
            out.append(Release(g.name, g.principal, a.id, tuple(a.nodes[-drop:])))
            drop = 0
    return out


def _teardown_group(st: LabState, name: str) -> list[Step]:
    r = st.groups[name]
    steps: list[Step] = [Release(name, r.principal, a) for a in reversed(r.gained)]
    steps += [Release(name, r.principal, a.id) for a in reversed(r.allocations)]
    steps += [RmToken(name, r.principal, t) for t in r.token_ids]
    return steps


def down(st: LabState) -> Plan:
    """Everything the state holds, undone: allocations (newest group first), tokens, the
    private domains the lab made (its named ones and those khget made unasked)."""
    steps: list[Step] = []
    for name in reversed(list(st.groups)):
        steps += _teardown_group(st, name)
    steps += [RmDomain(n, st.owners.get(n, ""), netid)
              for n, netid in reversed(list(st.domains.items()))]
    steps += [RmDomain("", u, netid) for u, netid in reversed(st.implicit)]
    return Plan(tuple(steps), ("everything it made goes",))


def netid_text(name: str, st: LabState | None) -> str:
    """A domain's id as a dry run shows it: the number when known, else ``$name``."""
    if name == "external":
        return str(EXTERNAL_ID)
    if name == PUBLIC:
        return str(PUBLIC_ID)
    if st is not None and name in st.domains:
        return str(st.domains[name])
    return f"${name}"
