"""`kh principal list|rm`: the operator's commands for principals (through khd's socket; khd
answers with the text, or JSON with --json)."""

from __future__ import annotations

import click

from kh import admission
from kh.cli.common import handle_errors
from kh.cli.service import client


def register(main: click.Group) -> None:
    @main.group()
    def principal() -> None:
        """Principals (the operator's: khd's socket, as root)."""

    @principal.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @handle_errors
    def principal_list(as_json: bool) -> None:
        """Every principal: its live allocations and their nodes, its private domains and
        keys, when it registered."""
        click.echo(client().call("GET", "/v1/principals", as_json=as_json), nl=False)

    @principal.command("rm")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.argument("name")
    @handle_errors
    def principal_rm(as_json: bool, name: str) -> None:
        """Remove principal NAME: release its allocations (their nodes go back to the pool as
        fresh nodes), remove its private domains and keys, then the principal."""
        admission.check_user(name)  # it goes into the request's path
        click.echo(client().call("POST", f"/v1/principals/{name}/remove", {},
                                 as_json=as_json), nl=False)
