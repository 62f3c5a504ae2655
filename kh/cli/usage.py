"""`kh usage [USER]`: what principals used, as khd's meter counted it (kh.metering)."""

from __future__ import annotations

import json
import urllib.parse

import click

from kh.cli import credential
from kh.cli.common import handle_errors
from kh.cli.service import client
from kh.errors import UsageError
from kh.metering.report import BYS, to_csv


def register(main: click.Group) -> None:
    @main.command()
    @click.argument("user", required=False)
    @click.option("-c", "--credential", "cred", metavar="FILE",
                  help="USER's credential: its own usage, as that principal (without it, the "
                       "operator's view through khd's socket). " + credential.HELP)
    @click.option("--since", metavar="T", help="From T: now, -N[smhd] (e.g. -2h) or ISO 8601 "
                  "(UTC without an offset). Default: 30 days before --until.")
    @click.option("--until", metavar="T", help="Up to T (not included). Default: now.")
    @click.option("--by", type=click.Choice(BYS), default="principal", show_default=True,
                  help="Sum per principal, node, allocation, UTC hour, or domain (traffic).")
    @click.option("--removed", is_flag=True, help="The operator's: the removed principals "
                  "named USER (not the one of that name now).")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output, exact.")
    @click.option("--csv", "as_csv", is_flag=True, help="CSV, exact amounts.")
    @handle_errors
    def usage(user: str | None, cred: str | None, since: str | None, until: str | None,
              by: str, removed: bool, as_json: bool, as_csv: bool) -> None:
        """What USER (or every principal: the operator) used: node-, CPU- and memory-seconds,
        traffic per domain, bytes loaded over the control channel; and any gaps."""
        if as_json and as_csv:
            raise UsageError("--json and --csv are two formats", "give one")
        params = {k: v for k, v in (("since", since), ("until", until), ("by", by))
                  if v is not None}
        if user is None and cred is not None:
            raise UsageError("a credential goes with USER", "kh usage USER -c FILE")
        if removed and (user is None or cred is not None):
            raise UsageError("--removed is the operator's, for a USER", "kh usage USER --removed")
        # without USER, everyone's (the operator's), whatever $KH_CREDENTIAL holds; --removed
        # is the operator's too
        secret = credential.resolve(cred) if user is not None and not removed else None
        if secret is not None:
            text = client().call("POST", "/v1/usage", {"user": user, "credential": secret,
                                                       **params}, as_json=as_json or as_csv)
        else:
            if user is not None:
                params["principal"] = user
            if removed:
                params["removed"] = "true"
            text = client().call("GET", "/v1/usage?" + urllib.parse.urlencode(params),
                                 as_json=as_json or as_csv)
        click.echo(to_csv(json.loads(text)) if as_csv else text, nl=False)
