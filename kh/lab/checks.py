"""`kh check LAB`: each check of the lab file run where it says (a node's shell over its
control channel console, or the outside world) with the running lab's addresses; a check that
cannot run (a node does not answer) fails with the reason, and the others still run."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from kh import proc
from kh.errors import KhError
from kh.intranet.outside import address, enter_argv
from kh.lab import template
from kh.lab.model import Check, Lab
from kh.lab.run import Runner

MAX_DETAIL = 300  # characters of a failed check's output shown


@dataclass(frozen=True)
class Result:
    name: str
    place: str
    ok: bool
    detail: str


def judge(c: Check, rendered: dict[str, str | None], out: str, status: int) -> Result:
    """Pass or fail one check from its output and exit status (pure)."""
    want, bad = rendered.get("expect"), rendered.get("reject")
    why = []
    if status != c.status:
        why.append(f"exit status {status}, not {c.status}")
    if want is not None and want not in out:
        why.append(f"no {want!r} in its output")
    if bad is not None and bad in out:
        why.append(f"{bad!r} in its output")
    tail = " ".join(out.split())[-MAX_DETAIL:]
    detail = "; ".join(why) + (f": {tail}" if tail else "") if why else \
        (f"found {want!r}" if want else f"exit status {status}")
    return Result(c.name, c.place, not why, detail)


def _outside(cmd: str, timeout: float) -> tuple[str, int]:
    """``sh -c CMD`` in the outside world (KHDO_NETNS, else kh outside): output, status.
    ProcessError when it does not end within ``timeout`` seconds."""
    argv = [*enter_argv(os.environ), "sh", "-c", cmd]
    r = proc.run(argv, timeout=timeout, check=False, what="a check in the outside world")
    return r.stdout + r.stderr, r.returncode


def run_checks(runner: Runner, lab: Lab) -> list[Result]:
    """Every check, in the file's order; the results are kept in the lab's state."""
    facts = template.facts(lab, runner.st, placeholders=False)
    if any("outside" in (c.run + (c.expect or "") + (c.reject or "")) for c in lab.checks):
        try:
            facts = replace(facts, outside=address(enter_argv(os.environ), os.environ))
        except KhError:
            pass  # the checks that need it fail, naming the placeholder
    shared = template.base(lab, facts)
    results = []
    for c in lab.checks:
        try:
            rendered = template.check(lab, facts, c, shared)
            assert rendered["run"] is not None
            if c.group is None:
                out, status = _outside(rendered["run"], c.timeout)
            else:
                rec = runner.st.groups.get(c.group)
                if rec is None or c.index >= len(rec.nodes):
                    raise KhError(f"{c.place} is not running (kh up)")
                node = rec.nodes[c.index]
                a = next(x for x in rec.allocations if node in x.nodes)
                out, status = runner.sc(rec.principal).run(runner.alloc(rec.principal, a),
                                                            node, rendered["run"], c.timeout)
            res = judge(c, rendered, out, status)
        except KhError as e:
            res = Result(c.name, c.place, False, f"could not be checked: {e.message}")
        runner.say(f"{'ok  ' if res.ok else 'FAIL'} {res.name} [{res.place}]: {res.detail}")
        results.append(res)
    runner.save(replace(runner.st, checks=tuple((r.name, r.ok, r.detail) for r in results)))
    return results
