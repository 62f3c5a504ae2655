"""``python -m kh.intranet`` (examples/intranet/run.sh): Figure 3 brought up, checked, grown
under a writer, reported and torn down. See the package's docstring and docs/scenarios.md."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import click

from kh.cli.common import entry, handle_errors, setup_logging
from kh.errors import KhError, Stopped, UsageError
from kh.intranet import checks, faults, figure3, growth, outside
from kh.intranet.figure3 import Figure, Made, Plan
from kh.intranet.report import Report, render
from kh.scenario import Principal, Scenario

CORP, OTHER = "corp1", "corp2"  # the intranet's owner, and another principal beside it
STATE = "intranet.json"  # what a --keep run left, for --down


def ensure_credential(path: Path) -> None:
    """A credential file for the principal, made (mode 600, a random secret) if missing."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise UsageError(f"{path} may be read by others", f"chmod 600 {path}")
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(24) + "\n")


def refuse_if_held(scs: list[Scenario]) -> dict[str, set[int]]:
    """A principal of the run that holds allocations already (a kept intranet, or another
    run of it) is not touched: the run stops before it makes anything. Returns each one's
    private domains now (which the teardown leaves alone)."""
    domains = {}
    for sc in scs:
        held, domains[sc.principal.user] = figure3.holdings(sc)
        if held:
            raise UsageError(f"{sc.principal.user} already holds allocation"
                             f"{'s' if len(held) > 1 else ''} {', '.join(map(str, sorted(held)))}"
                             f": an intranet kept with --keep, or another run",
                             "examples/intranet/run.sh --down releases a kept one")
    return domains


def down(workdir: Path, corp: Scenario, other: Scenario, rep: Report) -> None:
    """Release what a --keep run left: both principals' allocations, the token, the domains."""
    state_file = workdir / STATE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    for sc in (corp, other):
        for aid in sorted(sc.held(), reverse=True):
            rep.command(f"kh release -u {sc.principal.user} -c "
                        f"{figure3.credfile(sc.principal.user)} {aid}")
            sc.kh("release", str(aid))
    made = Made(domains=[(u, int(n)) for u, n in state.get("domains", [])],
                tokens=[(u, int(t)) for u, t in state.get("tokens", [])])
    problems = figure3.teardown({sc.principal.user: sc for sc in (corp, other)}, rep, made)
    state_file.unlink(missing_ok=True)
    if problems:
        raise KhError("could not remove: " + "; ".join(problems))
    rep.say("the kept intranet is gone")


def facts(fig: Figure | None, made: Made, rep: Report) -> dict[str, Any]:
    """The run's domains, tokens, allocations (each principal's, as khget made them) and, once
    up, the figure's nodes and disks."""
    out: dict[str, Any] = {"domains": list(made.domains), "tokens": list(made.tokens),
                           "allocations": rep.facts.get("allocations", {})}
    if fig:
        out["pnet"], out["disknet"] = fig.pnet, fig.disknet
        out["nodes"] = {"gw": fig.one(fig.gw), "fs": fig.one(fig.fs), "ds": fig.one(fig.ds),
                        "workers": list(fig.workers.nodes), "corp2": fig.one(fig.other)}
        out["disks"] = list(fig.disks)
    return out


def run(workdir: Path, plan: Plan, keep: bool, rep: Report, corp: Scenario, other: Scenario,
        before: dict[str, set[int]]) -> dict[str, Any]:
    """The whole run; its report (also written to ``workdir``/report.json and .txt).
    Stopped (Ctrl-C, SIGTERM) is raised again once everything is torn down and reported."""
    free = figure3.free_nodes(corp)
    if free is not None and free < plan.nodes:
        raise UsageError(f"the intranet needs {plan.nodes} free nodes, the service has {free}",
                         f"kh service start --nodes {plan.nodes}, or --no-growth "
                         f"({plan.nodes - plan.grow_disks - plan.grow_workers} nodes)")
    made = Made(before=before)
    fig: Figure | None = None
    error: KhError | None = None
    try:
        with contextlib.ExitStack() as stack:
            if not keep:
                stack.callback(lambda: _teardown([corp, other], rep, made))
            stack.enter_context(corp)
            stack.enter_context(other)
            watch: faults.Watch | None = None
            try:
                web = stack.enter_context(outside.web_server(corp.env))
                rep.say(f"the outside world serves {web.url}")
                with corp.step("bring-up (GW, FS, DS, disks, workers)"):
                    fig = figure3.bring_up(corp, other, rep, plan, made)
                watch = stack.enter_context(faults.Watch(corp, rep, {
                    fig.gw.id: "GW", fig.fs.id: "FS", fig.ds.id: "DS",
                    fig.workers.id: "worker", fig.other.id: "corp2's node"}))
                with corp.step("checks: every arrow of Figure 3"):
                    checks.run_all(corp, other, rep, fig, web)
                if plan.grow:
                    _grow(corp, rep, fig, plan, watch)
            except KhError:
                if watch is not None:
                    watch.look()
                if fig is not None and rep.faults:
                    faults.file_server_view(corp, rep, fig.fs)  # before the teardown
                raise
            if watch is not None:
                watch.look()
            if fig is not None and rep.faults:
                faults.file_server_view(corp, rep, fig.fs)
            if keep:
                (workdir / STATE).write_text(json.dumps(facts(fig, made, rep)) + "\n")
                corp.keep()
                other.keep()
                rep.say(f"kept running (--keep): examples/intranet/run.sh --dir {workdir} "
                        f"--down releases it")
    except KhError as e:
        error = e
        if "credential refused" in e.message:
            error = UsageError(e.message, f"the principals were registered with the credentials "
                                          f"of another --dir than {workdir}: run there, or have "
                                          f"the operator remove them (kh principal rm)")
    report = _finish(workdir, rep, corp, other, fig, made, None if error is None else
                     error.message + (f" ({error.hint})" if error.hint else ""))
    if isinstance(error, Stopped):
        raise error
    return report


def _grow(corp: Scenario, rep: Report, fig: Figure, plan: Plan, watch: faults.Watch) -> None:
    # The writer's bound: about half of the volume before it grows (KiB files), so it can
    # never fill it however slow the growth is.
    _, size = growth.volume(corp, fig)
    max_files = max(16, size * 1024 // 2 // growth.WRITER_KIB)
    growth.grow(corp, rep, fig, plan, max_files, alive=watch.raise_if_died)


def _teardown(scs: list[Scenario], rep: Report, made: Made) -> None:
    for p in figure3.teardown({sc.principal.user: sc for sc in scs}, rep, made):
        rep.fault(f"teardown: {p}")


def _finish(workdir: Path, rep: Report, corp: Scenario, other: Scenario, fig: Figure | None,
            made: Made, error: str | None) -> dict[str, Any]:
    rep.facts = facts(fig, made, rep)
    steps = [{**s, "name": f"{other.principal.user}: {s['name']}"} for s in other.steps]
    report = rep.to_json(steps + corp.steps, error)
    (workdir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (workdir / "report.txt").write_text(render(report))
    return report


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dir", "workdir", type=click.Path(path_type=Path, file_okay=False),
              default=lambda: os.environ.get("KH_INTRANET_DIR") or "intranet",
              show_default="./intranet, or $KH_INTRANET_DIR",
              help="Working directory: ./corp1cred and ./corp2cred (made if missing, mode "
                   "600), the report, console logs, what --keep left.")
@click.option("--keep", is_flag=True, help="Leave the intranet running (--down removes it).")
@click.option("--down", "take_down", is_flag=True,
              help="Release an intranet a --keep run left, and nothing else.")
@click.option("--no-growth", is_flag=True, help="Bring up and check only.")
@click.option("--disk-size", default="96M", show_default=True, help="Each AoE disk's size.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON on stdout (the running lines go to stderr).")
@click.option("--debug", is_flag=True)
@handle_errors
def main(workdir: Path, keep: bool, take_down: bool, no_growth: bool, disk_size: str,
         as_json: bool, debug: bool) -> None:
    """Figure 3 of the Kittyhawk paper: corp1's intranet (GW, FS, DS, AoE disk nodes,
    workers) with the paper's commands; every arrow checked; grown on demand while a worker
    writes; a report; everything released at the end. Needs a running khd with 12 free
    nodes (8 with --no-growth)."""
    setup_logging(debug)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # the paper's ./corp1cred
    for user in (CORP, OTHER):
        ensure_credential(workdir / f"{user}cred")
    rep = Report(out=sys.stderr if as_json else sys.stdout)
    env = dict(os.environ)
    scs = [Scenario(Principal(u, Path(f"{u}cred")), env=env, logs=workdir / "logs" / u,
                    name=f"intranet-{u}") for u in (CORP, OTHER)]
    if take_down:
        down(workdir, scs[0], scs[1], rep)
        return
    if (workdir / STATE).exists():
        raise UsageError(f"an intranet kept with --keep is recorded in {workdir / STATE}",
                         f"examples/intranet/run.sh --dir {workdir} --down first")
    plan = Plan(disk_size=disk_size, grow=not no_growth)
    before = refuse_if_held(scs)
    shutil.rmtree(workdir / "logs", ignore_errors=True)  # the last run's only
    for sc in scs:
        sc.logs.mkdir(parents=True)
    report = run(workdir, plan, keep, rep, scs[0], scs[1], before)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        print(render(report), end="")
    if not report["ok"]:
        sys.exit(1)


run_cli = entry(main, "intranet")

if __name__ == "__main__":
    run_cli()
