"""`kh up --dry-run`: a plan printed as the commands it runs, as a principal would type them
(khget, khdo, kh). Node numbers and domain ids the service has not given yet are shown as
shell variables (``$pnet``) or placeholders (``<fs[0].ip.pnet>``); token secrets never."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from kh.lab import template
from kh.lab.model import Lab
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
    netid_text,
)
from kh.lab.state import LabState


def _cred(lab: Lab, st: LabState | None, principal: str) -> str:
    path = lab.credentials(st.credentials if st is not None else {}).get(principal, "")
    try:
        rel = os.path.relpath(path)
        path = rel if not rel.startswith("../..") else path
    except ValueError:
        pass
    return shlex.quote(path or f"./{principal}cred")


def lines(plan: Plan, lab: Lab, st: LabState | None, images: Path) -> list[str]:
    """The plan as shell lines (comments say what cannot be typed as one command)."""
    fresh = frozenset(s.group for s in plan.steps if isinstance(s, Khget)
                      and (st is None or s.group not in st.groups
                           or any(isinstance(r, Release) and r.group == s.group
                                  and not r.nodes for r in plan.steps)))
    facts = template.facts(lab, st, fresh)
    shared = template.base(lab, facts)
    out = [f"# kh up {lab.path}: lab {lab.name}"]
    if st is not None:
        out.append("# $conN: allocation N's text object (khget's output, kept in the lab's state)")
    out += [f"#   {n}" for n in plan.notes]
    if plan.empty:
        out.append("# nothing to do: the lab runs as the file says")
        return out
    made: dict[str, list[str]] = {}  # group -> shell variables of allocations to boot
    for s in plan.steps:
        if isinstance(s, Reset) and st is not None:  # its allocations are booted again
            made.setdefault(s.group, []).extend(
                f"con{a.id}" for a in st.groups[s.group].allocations if set(a.nodes) & set(s.nodes))
        out += _step(s, lab, st, images, facts, shared, made)
    return out


def _var(group: str, made: dict[str, list[str]], st: LabState | None) -> str:
    n = sum(not v.startswith("con") for v in made.get(group, []))
    n += 1 if st is not None and group in st.groups else 0
    return group if n == 0 else f"{group}_{n + 1}"


def _step(s: Step, lab: Lab, st: LabState | None, images: Path, facts: template.Facts,
          shared: dict[str, object], made: dict[str, list[str]]) -> list[str]:
    c = _cred(lab, st, s.principal) if not isinstance(s, RmDomain) else ""
    if isinstance(s, Khget):
        var = _var(s.group, made, st)
        made.setdefault(s.group, []).append(var)
        opts = s.options(lambda d: netid_text(d, st))
        line = f"{var}=$(khget -c {c} {' '.join(opts)}{' ' if opts else ''}{s.principal} {s.count})"
        eth = (1 if s.external else 0) + (1 if s.public else 0) + len(s.joins)
        return [line] + [f"{d}=$(echo \"${var}\" | sed -n 's/^network \\([0-9]*\\) : "
                         f"eth{eth + i}$/\\1/p')   # the new domain on its eth{eth + i}"
                         for i, d in enumerate(s.creates)]
    if isinstance(s, AddToken):
        return [f"kh token add -u {s.principal} -c {c} --allocate-on "
                f"{netid_text(s.domain, st)} --max-nodes {s.max_nodes}   "
                f"# its secret becomes {{{{ token }}}} in {s.group}'s keys"]
    if isinstance(s, Reset):
        return [f"kh reset -u {s.principal} -c {c} {n}" for n in s.nodes]
    if isinstance(s, Boot):
        return _boot(s, lab, st, images, facts, shared, made, c)
    if isinstance(s, Act):
        return [f"# on each new node of {s.group} (con$ID.N, its shell): {a}" for a in s.actions]
    if isinstance(s, Release):
        nodes = "".join(f" {n}" for n in s.nodes)
        return [f"kh release -u {s.principal} -c {c} {s.allocation}{nodes}"]
    if isinstance(s, RmToken):
        return [f"kh token rm -u {s.principal} -c {c} {s.token_id}"]
    return [f"kh domain rm -u {s.principal} -c {_cred(lab, st, s.principal)} {s.netid}"
            + (f"   # {s.name}" if s.name else "")]


def _boot(s: Boot, lab: Lab, st: LabState | None, images: Path, facts: template.Facts,
          shared: dict[str, object], made: dict[str, list[str]], c: str) -> list[str]:
    g = lab.group(s.group)
    vars_ = list(made.get(s.group, []))
    token = "kht_..." if g.token else None
    keys = [template.node_keys(lab, facts, g, i, token, shared) for i in range(g.count)]
    out = []
    for v in vars_:
        pipe = f'echo "${v}" | khdo -c {c}'
        out.append(f"{pipe} loadkernel {shlex.quote(str(images / s.kernel))}")
        out.append(f"{pipe} loadramdisk "
                   f"{shlex.quote(str(images / (s.appliance + '.cpio.gz.uimg')))}")
    if keys and not token and len(set(keys)) == 1 and keys[0]:
        setenv = shlex.quote(f'setenv khargs "${{khargs}} {keys[0]}"')
        out += [f'echo "${v}" | khdo -c {c} write {setenv}' for v in vars_]
    elif any(keys):
        out += [f"# {s.group}[{i}] (node {facts.nodes[s.group][i]}), typed at its U-Boot prompt "
                f'over con$ID.N: setenv khargs "${{khargs}} {k}"'
                for i, k in enumerate(keys) if k]
    out += [f'echo "${v}" | khdo -c {c} write "run kboot"' for v in vars_]
    out.append(f"# wait for every node's ready line ({g.timeout:.0f} s)")
    return out
