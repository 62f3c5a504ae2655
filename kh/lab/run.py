"""Carrying out a lab's plan as its principals would, through kh.scenario: khget, khdo, kh
release/reset/token/domain, and each node's console over the control channel.

Every step that makes or removes something is written to the lab's state file at once (an
allocation before it is booted; ``pending`` while a khget or an action runs), so that a `kh up`
stopped anywhere (Ctrl-C, SIGTERM, a node that did not boot) leaves a state `kh down` undoes.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from kh import textobj
from kh.errors import KhError
from kh.lab import state as state_mod
from kh.lab import template
from kh.lab.model import SHARED, Group, Lab
from kh.lab.plan import (
    Act,
    AddToken,
    Boot,
    Khget,
    Plan,
    Release,
    Reset,
    RmDomain,
    RmToken,
    Step,
)
from kh.lab.state import AllocRec, GroupRec, LabState, Pending
from kh.scenario import Allocation, Principal, Scenario
from kh.settings import paths

Say = Callable[[str], None]
PENDING_SLACK = 60.0  # s past a step's timeout before an allocation cannot be its


class Runner:
    """The lab's principals' scenarios (made when first needed; allocations are always kept
    past the run: the state file owns them) and the state, saved after every change."""

    def __init__(self, st: LabState, lab: Lab | None, say: Say,
                 images: Path | None = None) -> None:
        self.st = st
        self.lab = lab
        self.say = say
        self.images = images or paths().out
        self.logs = state_mod.lab_dir() / f"{st.name}.logs"
        self._scs: dict[str, Scenario] = {}
        self._stack = contextlib.ExitStack()
        self.tokens: dict[str, str] = {}  # group -> token secret (memory only)
        self.booted: dict[str, list[int]] = {}  # group -> nodes booted by this run

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.__exit__(kind, error, tb)

    # -- the principals' scenarios and the state ------------------------------------------
    def sc(self, principal: str) -> Scenario:
        if principal not in self._scs:
            cred = self.st.credentials.get(principal)
            if not cred:
                raise KhError(f"lab {self.st.name} has no credential for {principal}")
            logs = self.logs / principal
            logs.mkdir(parents=True, exist_ok=True, mode=0o700)
            sc = Scenario(Principal(principal, Path(cred)), images=self.images, logs=logs,
                          name=f"lab-{self.st.name}")
            sc.keep()
            self._scs[principal] = self._stack.enter_context(sc)
        return self._scs[principal]

    def save(self, st: LabState) -> None:
        self.st = st
        state_mod.save(st)

    def kh2(self, principal: str, group: str, sub: str, *args: str, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """``kh GROUP SUB -u USER -c FILE ARGS`` (token add, domain rm ...) as ``principal``."""
        sc = self.sc(principal)
        return sc.cli("main", group, sub, "-u", principal, "-c", str(sc.principal.credential),
                      *args, check=check)

    def alloc(self, principal: str, rec: AllocRec) -> Allocation:
        sc = self.sc(principal)
        return sc.allocations.get(rec.id) or sc.adopt(rec.text)

    def view(self, principal: str, unknown_empty: bool = False) -> dict[str, Any]:
        """The principal's kh ps --json. KhError when khd does not give it (busy, slow,
        stopped, the credential refused): never taken for "holds nothing", which would make
        the lab forget, or call gone, allocations that still run. ``unknown_empty``: a
        refused credential is a principal not registered yet (khget registers it), which
        holds nothing: before a step, and settling one (a wrong credential allocated nothing
        either)."""
        r = self.sc(principal).kh("ps", "--json", check=False)
        if (r.returncode and unknown_empty and f"credential refused for principal {principal}"
                in r.stderr):
            return {"allocations": [], "domains": []}
        if r.returncode:
            raise KhError(f"lab {self.st.name}: cannot see what {principal} holds (kh ps -u "
                          f"{principal}): {r.stderr.strip()[-200:]}",
                          "kh service status; try again once khd answers (a principal the "
                          f"operator removed holds nothing: remove {self.st.name}.json from "
                          f"{state_mod.lab_dir()})")
        view: dict[str, Any] = json.loads(r.stdout)
        return view

    def holdings(self, principal: str, unknown_empty: bool = False
                 ) -> tuple[set[int], set[int]]:
        """The principal's live allocations and own private domains (kh ps -u; view)."""
        view = self.view(principal, unknown_empty)
        return ({a["id"] for a in view["allocations"]},
                {d["netid"] for d in view["domains"]
                 if d["kind"] == "private" and d["owner"] == principal})

    def others(self) -> tuple[set[int], set[int]]:
        """What the other labs of this service hold (state.claimed): never this lab's."""
        return state_mod.claimed(self.st.name, self.st.service)

    @contextlib.contextmanager
    def pending(self, principal: str, group: str, limit: float) -> Iterator[Pending]:
        """While the block may allocate (for at most ``limit`` s): what the principal held
        before, in the state. Cut short (Ctrl-C, SIGTERM, a failure), what it gained is
        released at once, while nothing else can have been made since."""
        started = time.time()
        allocs, doms = self.holdings(principal, unknown_empty=True)
        p = Pending(principal, tuple(sorted(allocs)), tuple(sorted(doms)), group, started,
                    started + limit + PENDING_SLACK)
        self.save(replace(self.st, pending=p))
        try:
            yield p
        except BaseException:
            with contextlib.suppress(Exception):  # kh down settles it when this cannot
                self.settle_pending()
            raise
        self.save(replace(self.st, pending=None))

    def group_rec(self, g: Group) -> GroupRec:
        r = self.st.groups.get(g.name)
        if r is None or r.principal != g.principal or r.domains != g.domains:
            keep = r.allocations if r is not None else ()
            r = GroupRec(g.name, g.principal, sum(len(a.nodes) for a in keep), g.domains,
                         g.appliance, g.kernel, g.keys, allocations=keep,
                         token_ids=r.token_ids if r is not None else (),
                         gained=r.gained if r is not None else ())
        return r

    # -- steps ----------------------------------------------------------------------------
    def run(self, plan: Plan) -> None:
        for note in plan.notes:
            self.say(f"lab {self.st.name}: {note}")
        for step in plan.steps:
            self.step(step)

    def step(self, s: Step) -> None:
        if isinstance(s, Khget):
            self._khget(s)
        elif isinstance(s, AddToken):
            self._token(s)
        elif isinstance(s, Reset):
            self._reset(s)
        elif isinstance(s, Boot):
            self._boot(s)
        elif isinstance(s, Act):
            self._act(s)
        elif isinstance(s, Release):
            self._release(s)
        elif isinstance(s, RmToken):
            self._rm_token(s)
        else:
            self._rm_domain(s)

    def _khget(self, s: Khget) -> None:
        assert self.lab is not None
        g = self.lab.group(s.group)
        sc = self.sc(s.principal)
        opts = s.options(lambda d: str(self.st.domains[d]))
        with self.pending(s.principal, s.group, g.timeout) as before:
            a = sc.khget(*opts, count=s.count)
            rec = self.group_rec(g)
            rec = replace(rec, count=rec.count + len(a.nodes), ready=False,
                          allocations=(*rec.allocations, AllocRec(a.id, a.nodes, a.text)))
            st = self.st.with_group(rec)
            nets = [d.netid for d in a.info.domains if d is not None]
            shared = sum(1 for d in g.domains if d in SHARED)
            doms, owners = dict(st.domains), dict(st.owners)
            for i, name in enumerate(s.creates):
                doms[name] = nets[shared + len(s.joins) + i]
                owners[name] = s.principal
            implicit = st.implicit
            if g.implicit_private and nets and nets[-1] not in before.domains:
                implicit = (*implicit, (s.principal, nets[-1]))
            self.save(replace(st, domains=doms, owners=owners, implicit=implicit))
        made = "".join(f"; {n} = domain {doms[n]}" for n in s.creates)
        self.say(f"{s.group}: khget {' '.join(opts)} {s.principal} {s.count} -> con{a.id}, "
                 f"node{'s' if len(a.nodes) > 1 else ''} {' '.join(map(str, a.nodes))}{made}")

    def _token(self, s: AddToken) -> None:
        r = self.kh2(s.principal, "token", "add", "--allocate-on",
                     str(self.st.domains[s.domain]), "--max-nodes", str(s.max_nodes), "--json")
        t = json.loads(r.stdout)
        self.tokens[s.group] = str(t["token"])
        rec = self.st.groups[s.group]
        self.save(self.st.with_group(replace(rec, token_ids=(*rec.token_ids, int(t["id"])))))
        self.say(f"{s.group}: token {t['id']} (allocates on {s.domain}, at most "
                 f"{s.max_nodes} nodes)")

    def _reset(self, s: Reset) -> None:
        sc = self.sc(s.principal)
        for n in s.nodes:
            sc.kh("reset", str(n))
        rec = self.st.groups[s.group]
        allocs = tuple(replace(a, booted=a.booted and not set(a.nodes) & set(s.nodes))
                       for a in rec.allocations)
        self.save(self.st.with_group(replace(rec, allocations=allocs, ready=False)))
        self.say(f"{s.group}: reset {' '.join(map(str, s.nodes))} to U-Boot")

    def _boot(self, s: Boot) -> None:
        assert self.lab is not None
        g = self.lab.group(s.group)
        facts = template.facts(self.lab, self.st, placeholders=False)
        shared = template.base(self.lab, facts)
        rec = self.st.groups[s.group]
        token = self.tokens.get(s.group)
        if g.token and token is None:
            raise KhError(f"{s.group}: no token to boot with")
        index = {n: i for i, n in enumerate(rec.nodes)}
        for a in rec.allocations:
            if a.booted:
                continue
            alloc = self.alloc(s.principal, a)
            keys = {n: template.node_keys(self.lab, facts, g, index[n], token, shared)
                    for n in a.nodes}
            same = len(set(keys.values())) == 1 and token is None
            t0 = time.monotonic()
            ready = self.sc(s.principal).boot(
                alloc, s.appliance, kernel=s.kernel, timeout=g.timeout,
                keys=next(iter(keys.values())) if same else "",
                node_keys=None if same else {n: k for n, k in keys.items() if k})
            rec = self.st.groups[s.group]
            allocs = tuple(replace(x, booted=True) if x.id == a.id else x
                           for x in rec.allocations)
            rec = replace(rec, allocations=allocs, appliance=g.appliance, kernel=g.kernel,
                          keys=g.keys, ready=not g.actions and all(x.booted for x in allocs),
                          token=(g.token.allocate_on, g.token.max_nodes) if g.token else None)
            self.save(self.st.with_group(rec))
            self.booted.setdefault(s.group, []).extend(a.nodes)
            for n, line in sorted(ready.items()):
                self.say(f"{s.group}: node {n} ready ({time.monotonic() - t0:.0f} s): {line}")

    def _act(self, s: Act) -> None:
        assert self.lab is not None
        g = self.lab.group(s.group)
        facts = template.facts(self.lab, self.st, placeholders=False)
        rec = self.st.groups[s.group]
        index = {n: i for i, n in enumerate(rec.nodes)}
        ours = {a.id for r in self.st.groups.values() for a in r.allocations}
        for n in self.booted.get(s.group, []):
            a = next(x for x in rec.allocations if n in x.nodes)
            alloc = self.alloc(s.principal, a)
            for cmd in template.actions(self.lab, facts, g, index[n]):
                self.say(f"{s.group}: node {n}: {cmd}")
                with self.pending(s.principal, s.group, g.timeout) as before:
                    out = self.sc(s.principal).check(alloc, n, cmd, g.timeout)
                    now, _ = self.holdings(s.principal)
                    gained = sorted(now - set(before.allocations) - ours - self.others()[0])
                    rec = self.st.groups[s.group]
                    self.save(self.st.with_group(replace(rec, gained=(*rec.gained, *gained))))
                for line in out.strip().splitlines()[-3:]:
                    self.say(f"{s.group}: node {n}:   {line.strip()}")
        rec = self.st.groups[s.group]
        self.save(self.st.with_group(replace(rec, ready=all(a.booted for a in rec.allocations))))

    def _release(self, s: Release) -> None:
        sc = self.sc(s.principal)
        rec = self.st.groups.get(s.group)
        live, _ = self.holdings(s.principal)
        if s.allocation in live:
            if s.nodes:
                sc.kh("release", str(s.allocation), *map(str, s.nodes))
            else:
                sc.release(s.allocation)
            what = f"nodes {' '.join(map(str, s.nodes))} of " if s.nodes else ""
            self.say(f"{s.group}: released {what}con{s.allocation}")
        else:
            self.say(f"{s.group}: con{s.allocation} was already gone")
        if rec is None:
            return
        allocs: list[AllocRec] = []
        for a in rec.allocations:
            if a.id != s.allocation:
                allocs.append(a)
            elif s.nodes:
                left = tuple(n for n in a.nodes if n not in s.nodes)
                info = textobj.parse(a.text)
                info = replace(info, nodes=tuple(x for x in info.nodes if x.number in left))
                allocs.append(replace(a, nodes=left, text=textobj.format(info)))
        gained = tuple(x for x in rec.gained if x != s.allocation)
        rec = replace(rec, allocations=tuple(allocs), gained=gained,
                      count=sum(len(a.nodes) for a in allocs))
        self.save(self.st.with_group(rec))

    def _rm_token(self, s: RmToken) -> None:
        self.kh2(s.principal, "token", "rm", str(s.token_id), check=False)
        rec = self.st.groups.get(s.group)
        if rec is not None:
            rec = replace(rec, token_ids=tuple(t for t in rec.token_ids if t != s.token_id))
            self.save(self.st.with_group(rec))
        self.say(f"{s.group}: token {s.token_id} removed")

    def _rm_domain(self, s: RmDomain) -> None:
        if s.netid in self.others()[1]:  # another lab's nodes are in it (khget's default)
            heir = state_mod.hand_over(s.netid, s.principal, self.st.name, self.st.service)
            self.say(f"domain {s.name or s.netid} ({s.netid}) kept: "
                     + (f"lab {heir} uses it and removes it at its kh down" if heir else
                        "another lab uses it"))
        else:
            self._rm_domain_now(s)
        doms = {n: i for n, i in self.st.domains.items() if i != s.netid}
        implicit = tuple(x for x in self.st.implicit if x != (s.principal, s.netid))
        self.save(replace(self.st, domains=doms, implicit=implicit))

    def _rm_domain_now(self, s: RmDomain) -> None:
        r = self.kh2(s.principal, "domain", "rm", str(s.netid), check=False)
        if r.returncode and "no private domain" not in r.stderr:
            raise KhError(f"domain {s.name or s.netid}: kh domain rm {s.netid} failed: "
                          f"{r.stderr.strip()[-200:]}")
        self.say(f"domain {s.name or s.netid} ({s.netid}) removed")

    def forget_gone(self) -> LabState:
        """Drop from the state the allocations khd no longer has (released by hand, khd
        restarted): the next plan allocates their nodes again. Says which."""
        live: dict[str, set[int]] = {}
        for name, rec in list(self.st.groups.items()):
            have = live.setdefault(rec.principal, self.holdings(rec.principal)[0])
            gone = [a.id for a in rec.allocations if a.id not in have]
            if not gone and set(rec.gained) <= have:
                continue
            allocs = tuple(a for a in rec.allocations if a.id in have)
            self.say(f"{name}: con{', con'.join(map(str, gone))} gone from the service: "
                     "its nodes are allocated again" if gone else
                     f"{name}: allocations its actions made are gone")
            rec = replace(rec, allocations=allocs, count=sum(len(a.nodes) for a in allocs),
                          gained=tuple(x for x in rec.gained if x in have))
            self.save(self.st.with_group(rec))
        return self.st

    # -- after an interrupted step ----------------------------------------------------------
    def settle_pending(self) -> None:
        """A step that may have allocated was cut short: release what its principal gained
        since (allocations, then private domains), then forget it."""
        p = self.st.pending
        if p is None:
            return
        view = self.view(p.principal, unknown_empty=True)
        _, doms = self.holdings(p.principal, unknown_empty=True)
        other_allocs, other_doms = self.others()
        ours = {a.id for r in self.st.groups.values() for a in r.allocations}
        ours |= {x for r in self.st.groups.values() for x in r.gained}
        # the step's: not held before it, not another lab's, not made after it had to end
        late = {a["id"] for a in view["allocations"]
                if p.deadline and float(a.get("created") or 0) > p.deadline}
        allocs = {a["id"] for a in view["allocations"]}
        for a in sorted(allocs - set(p.allocations) - ours - other_allocs - late,
                        reverse=True):
            self.sc(p.principal).release(a)
            self.say(f"{p.group}: released con{a} (made by an interrupted step)")
        known = set(self.st.domains.values()) | {n for _, n in self.st.implicit}
        for d in sorted(doms - set(p.domains) - known - other_doms, reverse=True):
            self.kh2(p.principal, "domain", "rm", str(d), check=False)
            self.say(f"{p.group}: removed domain {d} (made by an interrupted step)")
        self.save(replace(self.st, pending=None))
