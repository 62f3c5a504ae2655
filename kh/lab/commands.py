"""What `kh up|down|status|restart|check` do (kh/cli/lab.py is their click front).

A lab is named by its file (``examples/webfarm.yaml``) or by its name (``webfarm``); its state
(kh.lab.state) belongs to the service it was brought up on (khd's socket): commands run against
another service refuse it.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from kh.admission import AuthError, Throttled
from kh.client import Client
from kh.errors import KhError, UsageError
from kh.hw import uboot
from kh.hw.board import BOARDS
from kh.lab import dryrun, plan, template
from kh.lab import state as state_mod
from kh.lab.checks import Result, run_checks
from kh.lab.model import Lab, load_lab
from kh.lab.run import Runner, Say
from kh.lab.source import LabError
from kh.lab.state import LabState
from kh.service.config import from_env
from kh.settings import paths

NODE_ARG = re.compile(r"^([a-z][a-z0-9_]{0,31})(?:\[(\d+)\])?$")


def service() -> str:
    """The service a state belongs to: khd's socket, as KH_* name it."""
    return str(from_env().socket)


def resolve(arg: str | None) -> tuple[str, Path | None]:
    """LAB as typed -> (the lab's name, its file or None). No LAB: the one lab with a state."""
    if arg is None:
        names = state_mod.names()
        if len(names) != 1:
            raise UsageError("which lab?" if names else "no lab is up",
                             "labs with a state: " + ", ".join(names) if names else "kh up LAB")
        return names[0], None
    p = Path(arg)
    if not (arg.endswith((".yaml", ".yml")) or "/" in arg or p.is_file()):
        return arg, None
    ab = str(p.resolve())
    for n in state_mod.names():
        st = state_mod.load(n)
        if st is not None and st.file == ab:
            return n, p
    name = load_lab(p).name
    st = state_mod.load(name)
    if st is not None:  # another file of the same name is up: never act on it through this one
        raise UsageError(f"lab {name} is up from another file, {st.file}, not {arg}",
                         f"kh status {name} / kh down {name}: a lab is named by its name")
    return name, p


def _state(name: str, must: bool = True) -> LabState | None:
    st = state_mod.load(name)
    if st is None:
        if must:
            raise UsageError(f"lab {name} is not up (no state)", "kh up LAB.yaml")
        return None
    if st.service != service():
        raise KhError(f"lab {name} runs on the service at {st.service}, not {service()}",
                      "set KH_STATE_DIR / KH_PREFIX as they were at kh up")
    return st


def preflight(lab: Lab, p: plan.Plan, images: Path, st: LabState | None) -> None:
    """Before anything is allocated: every image the plan boots exists, and the service has
    the nodes the plan's khgets ask for. LabError naming the line and key."""
    for s in p.steps:
        if isinstance(s, plan.Boot):
            g = lab.group(s.group)
            for key, f in (("appliance", f"{s.appliance}.cpio.gz.uimg"), ("kernel", s.kernel)):
                if not (images / f).is_file():
                    raise LabError(f"{g.src.get(key, g.at).file}:{lab_line(lab, g.name, key)}: "
                                   f"key groups.{g.name}.{key}: no {images / f}",
                                   "kh images build; kh images list names them")
    need = p.nodes
    if not need:
        return
    m = re.search(r"(\d+) free", Client(from_env().socket).call("GET", "/v1/status"))
    free = int(m[1]) if m else None
    if free is None:
        raise KhError("the service did not say how many nodes are free",
                      "kh service status; is khd running?")
    sizes = {a.id: len(a.nodes) for r in (st.groups.values() if st else ()) for a in
             r.allocations}
    freed = sum(len(s.nodes) or sizes.get(s.allocation, 0) for s in p.steps
                if isinstance(s, plan.Release))
    total = 0
    for s in p.steps:
        if isinstance(s, plan.Khget):
            total += s.count
            if total > free + freed:
                raise LabError(f"{lab.path}:{lab_line(lab, s.group, 'count')}: key "
                               f"groups.{s.group}.count: the lab needs {need} more node"
                               f"{'s' if need > 1 else ''}, the service has {free} free; "
                               "nothing was allocated",
                               "kh service status; release some, or start khd with more")
    quotas(lab, p, sizes)


def quotas(lab: Lab, p: plan.Plan, sizes: dict[int, int]) -> None:
    """Each principal's khgets fit its node and private-domain quotas (what it holds, less
    what the plan releases first, as khd counts them in kh ps -u): LabError naming the
    group's count (or domains) otherwise, before anything is allocated."""
    from kh.cli import credential
    for pr in lab.principals:
        gets = [s for s in p.steps if isinstance(s, plan.Khget) and s.principal == pr.name]
        if not gets:
            continue
        body = {"user": pr.name, "credential": credential.resolve(str(pr.credential))}
        try:
            view = json.loads(Client(from_env().socket).call("POST", "/v1/ps", body,
                                                             as_json=True))
        except AuthError as e:
            if isinstance(e, Throttled):
                raise
            continue  # not registered yet (khget registers it: it holds nothing)
        (held, most), (doms, most_doms) = view["quota"]["nodes"], view["quota"]["domains"]
        held -= sum(len(s.nodes) or sizes.get(s.allocation, 0) for s in p.steps
                    if isinstance(s, plan.Release) and s.principal == pr.name)
        for s in gets:
            held += s.count
            doms += len(s.creates)
            if held > most:
                raise LabError(f"{lab.path}:{lab_line(lab, s.group, 'count')}: key "
                               f"groups.{s.group}.count: principal {pr.name} would hold "
                               f"{held} nodes, over its node quota of {most}; nothing was "
                               "allocated", "kh ps -u shows its quota; release some, or ask "
                               "the operator to raise --node-quota")
            if doms > most_doms:
                raise LabError(f"{lab.path}:{lab_line(lab, s.group, 'domains')}: key "
                               f"groups.{s.group}.domains: principal {pr.name} would own "
                               f"{doms} private domains, over its quota of {most_doms}; "
                               "nothing was allocated", "kh domain rm frees some, or ask the "
                               "operator to raise --domain-quota")


def resolvable(lab: Lab, p: plan.Plan, st: LabState | None) -> None:
    """Every template the plan renders (the keys and actions of the groups it boots) names
    only nodes and domains that are up or that the plan makes: LabError before anything is
    allocated (`kh up --only web` while web's keys name gw's node, and gw is not up)."""
    made = {s.group for s in p.steps if isinstance(s, plan.Khget)}
    new_doms = {d for s in p.steps if isinstance(s, plan.Khget) for d in s.creates}
    sym = template.facts(lab, st, frozenset(made))
    facts = template.Facts(
        {g: n if g in made else tuple(x for x in n if isinstance(x, int))
         for g, n in sym.nodes.items()},
        {d: i for d, i in sym.netids.items() if isinstance(i, int) or d in new_doms})
    shared = template.base(lab, facts)
    for name in dict.fromkeys(s.group for s in p.steps if isinstance(s, plan.Boot | plan.Act)):
        g = lab.group(name)
        for i in range(g.count):
            try:
                template.node_keys(lab, facts, g, i, "<token>" if g.token else None, shared)
                template.actions(lab, facts, g, i, shared)
            except LabError as e:
                down = [x for x in sorted(set(sym.nodes) - made - set(st.groups if st else ()))
                        if plan._refers(g, x)] or sorted(set(sym.nodes) - made
                                                         - set(st.groups if st else ()))
                raise LabError(e.message, f"groups not up: {', '.join(down)}; bring them up "
                               "first (kh up without --only, or --only each)"
                               if down else e.hint) from None


def lab_line(lab: Lab, group: str, key: str) -> int:
    from kh.lab.source import read
    return read(lab.path).line(("groups", group, key))


def up(path: Path, say: Say, *, dry_run: bool = False, only: str | None = None,
       take_over: bool = False) -> int:
    """``take_over``: a lab of the same name up from another file becomes what this file
    says (without it, that is refused: two files named alike must not undo each other)."""
    lab = load_lab(path)
    if dry_run:
        return _up(lab, path, say, True, only, take_over)
    with state_mod.locked(lab.name):
        return _up(lab, path, say, False, only, take_over)


def _up(lab: Lab, path: Path, say: Say, dry_run: bool, only: str | None,
        take_over: bool = False) -> int:
    if only is not None and all(g.name != only for g in lab.groups):
        raise UsageError(f"lab {lab.name} has no group {only!r}",
                         "groups: " + ", ".join(g.name for g in lab.groups))
    st = state_mod.load(lab.name)
    if st is not None and st.service != service():
        _state(lab.name)
    if st is not None and st.file != str(path.resolve()) and not take_over:
        raise UsageError(f"lab {lab.name} is up from another file, {st.file}; {path} would "
                         "undo it", f"kh down {lab.name} first, name this lab otherwise "
                         f"(lab: NAME), or kh up --take-over to make lab {lab.name} what "
                         f"{path} says")
    if st is not None and not dry_run:
        with Runner(st, lab, say) as r:
            st = r.forget_gone()
    p = plan.up(lab, st, only)
    resolvable(lab, p, st)
    images = paths().out
    if dry_run:
        for line in dryrun.lines(p, lab, st, images):
            say(line)
        return 0
    if p.empty:
        say(f"lab {lab.name}: nothing to do: it runs as {path} says")
        return 0
    preflight(lab, p, images, st)
    if st is None:
        st = LabState(lab.name, str(path.resolve()), service(), credentials=lab.credentials({}))
    else:
        st = replace(st, file=str(path.resolve()), credentials=lab.credentials(st.credentials))
    state_mod.save(st)
    with Runner(st, lab, say) as r:
        r.settle_pending()
        r.run(p)
        nodes = sum(len(g.nodes) for g in r.st.groups.values())
    n = len(lab.groups)
    say(f"lab {lab.name} is up: {nodes} node{'s' if nodes != 1 else ''} in {n} "
        f"group{'s' if n != 1 else ''} "
        f"(kh status {lab.name}; kh check {lab.name}; kh down {lab.name})")
    return 0


def down(arg: str | None, say: Say) -> int:
    name, _ = resolve(arg)
    with state_mod.locked(name):
        return _down(name, say)


def _down(name: str, say: Say) -> int:
    st = _state(name)
    assert st is not None
    with Runner(st, None, say) as r:
        r.settle_pending()
        r.run(plan.down(r.st))
    state_mod.remove(name)
    say(f"lab {name} is down")
    return 0


def status(arg: str | None, say: Say) -> int:
    names = [resolve(arg)[0]] if arg else state_mod.names()
    if not names:
        say("no lab is up")
        return 0
    for name in names:
        st = _state(name)
        assert st is not None
        with Runner(st, None, say) as r:
            live: dict[str, set[int]] = {p: r.holdings(p)[0]
                                         for p in {g.principal for g in st.groups.values()}}
        say(f"lab {name} ({st.file})")
        say(f"  {'GROUP':<12} {'PRINCIPAL':<12} {'APPLIANCE':<12} {'STATE':<10} NODES")
        for g in st.groups.values():
            gone = [a.id for a in g.allocations if a.id not in live[g.principal]]
            state = "GONE" if gone else "ready" if g.ready else "not ready"
            say(f"  {g.name:<12} {g.principal:<12} {g.appliance:<12} {state:<10} "
                f"{' '.join(map(str, g.nodes)) or '-'}  "
                f"({', '.join(f'con{a.id}' for a in g.allocations)})")
        if st.domains:
            say("  domains: " + ", ".join(f"{n}={i}" for n, i in st.domains.items()))
        if st.checks:
            bad = [c for c in st.checks if not c[1]]
            say(f"  checks (last kh check): {len(st.checks) - len(bad)} ok, {len(bad)} failed"
                + "".join(f"\n    FAIL {n}: {d}" for n, _, d in bad))
    return 0


def check(arg: str | None, say: Say) -> list[Result]:
    name, path = resolve(arg)
    st = _state(name)
    assert st is not None
    lab = load_lab(path or Path(st.file))
    with state_mod.locked(name), Runner(st, lab, say) as r:
        results = run_checks(r, lab)
    ok = sum(x.ok for x in results)
    say(f"lab {name}: {ok}/{len(results)} checks passed")
    return results


def restart(arg: str, node_arg: str, say: Say) -> int:
    """Reset GROUP[N] (default N 0) to U-Boot, load its kernel and appliance over its own
    channel (con<ID>.<N>), type its keys, run kboot, wait for its ready line. Actions are
    not run again (they may allocate: khgetdisk)."""
    name, path = resolve(arg)
    st = _state(name)
    assert st is not None
    m = NODE_ARG.match(node_arg)
    if not m or m[1] not in st.groups:
        raise UsageError(f"no node {node_arg!r} in lab {name}",
                         "GROUP or GROUP[N]: " + ", ".join(st.groups))
    rec = st.groups[m[1]]
    i = int(m[2] or 0)
    if i >= len(rec.nodes):
        raise UsageError(f"group {rec.name} has {len(rec.nodes)} nodes: no {node_arg}")
    lab = load_lab(path or Path(st.file))
    g = lab.group(rec.name)
    node = rec.nodes[i]
    a = next(x for x in rec.allocations if node in x.nodes)
    images = paths().out
    with state_mod.locked(name), Runner(st, lab, say) as r:
        sc = r.sc(rec.principal)
        alloc = r.alloc(rec.principal, a)
        token = None
        if g.token:
            r.step(plan.AddToken(g.name, g.principal, g.token.allocate_on, g.token.max_nodes))
            token = r.tokens[g.name]
        keys = template.node_keys(lab, template.facts(lab, r.st, placeholders=False), g, i, token)
        sc.kh("reset", str(node))
        say(f"{rec.name}[{i}]: node {node} reset to U-Boot")
        from kh.cc.client import ChannelClient
        board = BOARDS["ppce500"]
        for addr, f in ((board.loadaddr, rec.kernel),
                        (board.ramfsaddr, f"{rec.appliance}.cpio.gz.uimg")):
            ch = ChannelClient(f"con{a.id}.{node}", alloc.info.server, sc.ssh_port,
                               password=sc.principal.secret())
            try:
                _, err, code = ch.exec(f"load 0x{addr:x}", (images / f).read_bytes())
            finally:
                ch.close()
            if code:
                raise KhError(f"loading {f} into node {node} failed: {err.decode()[-200:]}")
        con = sc._shell(alloc, node)
        if keys:
            uboot.uboot_command(con, f'setenv khargs "${{khargs}} {keys}"')
        mark = sc.console(alloc, node).mark()
        con.write(b"run kboot\n")
        ready = sc.wait_ready(alloc, {node: mark}, g.timeout)
    say(f"{rec.name}[{i}]: node {node} ready: {ready.get(node, '')}")
    return 0
