"""`kh up|down|status|restart|check`: labs (issue 15; kh.lab, docs/labs.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kh.cli.common import handle_errors, stop_on_signals
from kh.lab import commands


def _say(line: str) -> None:
    click.echo(line)


def register(main: click.Group) -> None:
    @main.command()
    @click.argument("lab", type=click.Path(path_type=Path, dir_okay=False))
    @click.option("--dry-run", "-n", is_flag=True,
                  help="Print the plan as the khget/khdo/kh commands it runs; run nothing.")
    @click.option("--only", metavar="GROUP", help="Bring up (or reconcile) this group alone.")
    @click.option("--take-over", is_flag=True,
                  help="A lab of this name is up from another file: make it what LAB says "
                  "(refused without).")
    @handle_errors
    def up(lab: Path, dry_run: bool, only: str | None, take_over: bool) -> None:
        """Bring the lab in LAB (a YAML file) up, or make the running lab what the file now
        says: nodes added or released where a count changed, groups re-booted whose
        appliance, kernel or keys changed; what it does is printed. The state is remembered
        (kh down works from it even if the file changes or goes). Credentials are read from
        the files the lab names; nothing is allocated when the file has an error."""
        with stop_on_signals():
            sys.exit(commands.up(lab, _say, dry_run=dry_run, only=only, take_over=take_over))

    @main.command()
    @click.argument("lab", required=False)
    @handle_errors
    def down(lab: str | None) -> None:
        """Release everything LAB (a lab file or name; default: the one lab up) made, from the
        state remembered at kh up: allocations (and those its nodes made, e.g. khgetdisk's),
        tokens, the private domains it created."""
        with stop_on_signals():
            sys.exit(commands.down(lab, _say))

    @main.command()
    @click.argument("lab", required=False)
    @handle_errors
    def status(lab: str | None) -> None:
        """Each lab's groups, nodes, readiness (checked against kh ps) and last checks."""
        sys.exit(commands.status(lab, _say))

    @main.command()
    @click.argument("lab")
    @click.argument("node", metavar="GROUP[N]")
    @handle_errors
    def restart(lab: str, node: str) -> None:
        """Reset one node of LAB (GROUP[N], default N 0) to U-Boot, load its kernel and
        appliance again, boot it with its keys and wait for its ready line. Its actions are
        not run again."""
        with stop_on_signals():
            sys.exit(commands.restart(lab, node, _say))

    @main.command()
    @click.argument("lab", required=False)
    @handle_errors
    def check(lab: str | None) -> None:
        """Run LAB's checks (from its file) against the running lab; exit 1 when one
        fails."""
        with stop_on_signals():
            results = commands.check(lab, _say)
        sys.exit(0 if all(r.ok for r in results) else 1)
