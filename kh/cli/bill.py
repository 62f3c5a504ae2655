"""`kh bill` and `kh top`: a principal's bill for a period, and a live view of the nodes
(kh.metering.billing, kh.metering.top; docs/service.md, Billing)."""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from kh import admission
from kh.cli import credential
from kh.cli.common import handle_errors
from kh.cli.service import client
from kh.errors import UsageError
from kh.metering import prices as pricing
from kh.metering import top as topview

REFRESH = 1.0  # s between two screens of `kh top`


def register(main: click.Group) -> None:
    @main.command()
    @click.argument("user")
    @click.option("--period", metavar="YYYY-MM", help="A month (2026-11) or a day "
                  "(2026-11-05) of the price list's time zone (default: this month).")
    @click.option("--prices", "prices_file", metavar="FILE", type=click.Path(path_type=Path),
                  help="Rate with this price list (TOML) instead of the service's.")
    @click.option("-c", "--credential", "cred", metavar="FILE", help=credential.HELP)
    @click.option("--removed", is_flag=True, help="The operator's: the removed principals "
                  "named USER (not the one of that name now).")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @handle_errors
    def bill(user: str, period: str | None, prices_file: Path | None, cred: str | None,
             removed: bool, as_json: bool) -> None:
        """USER's bill: its metered usage rated with a price list (the service's, or
        --prices FILE's, checked here first). With a credential (-c, $KH_CREDENTIAL) as the
        principal, else as the operator (root), who may bill anyone. Changes nothing."""
        admission.check_user(user)
        if removed and cred is not None:
            raise UsageError("--removed is the operator's", "kh bill USER --removed, as root")
        secret = None if removed else credential.resolve(cred)
        body: dict[str, Any] = {"user": user}
        if removed:
            body["removed"] = True
        if period:
            body["period"] = period
        if prices_file is not None:
            data = pricing.read(prices_file)  # once: what is checked is what is sent
            pricing.parse(data, str(prices_file))  # its faults named here, file and line
            body["prices"] = data.decode("utf-8")
        if secret is None and prices_file is None:
            query = urllib.parse.urlencode({"principal": user, **(
                {"period": period} if period else {}), **({"removed": "true"} if removed
                                                          else {})})
            click.echo(client().call("GET", f"/v1/bill?{query}", as_json=as_json), nl=False)
            return
        if secret is not None:
            body["credential"] = secret
        click.echo(client().call("POST", "/v1/bill", body, as_json=as_json), nl=False)

    @main.command()
    @click.option("-u", "--user", help="Only this principal's nodes (its credential by -c or "
                  "$KH_CREDENTIAL); without it, every node (the operator's view).")
    @click.option("-c", "--credential", "cred", metavar="FILE", help=credential.HELP)
    @click.option("--once", is_flag=True, help="Print one screen and exit (for scripts).")
    @click.option("--json", "as_json", is_flag=True, help="With --once: machine-readable.")
    @handle_errors
    def top(user: str | None, cred: str | None, once: bool, as_json: bool) -> None:
        """The nodes now: state, principal, CPU % of a host core, memory, bytes per second
        sent and received in each domain; refreshed every second (Ctrl-C leaves).
        Rates come from the host's own counters, read twice a second apart."""
        if as_json and not once:
            raise UsageError("--json goes with --once", "kh top --once --json")
        if not once and not sys.stdout.isatty():
            raise UsageError("kh top refreshes a terminal, and stdout is none",
                             "kh top --once, or --once --json, for scripts")
        read = _reader(user, cred)
        before = read()
        time.sleep(REFRESH)
        now = read()
        if once:
            rows = topview.rates(before, now)
            click.echo(json.dumps([r.to_json() for r in rows], indent=1) + "\n" if as_json
                       else topview.text(rows), nl=False)
            return
        _live(read, before, now)


def _reader(user: str | None, cred: str | None) -> Any:
    if user is None:
        if cred is not None:
            raise UsageError("-c goes with -u USER", "kh top -u USER -c FILE")
        return lambda: json.loads(client().call("GET", "/v1/top", as_json=True))
    body = {"user": user, "credential": credential.resolve(cred)}
    return lambda: json.loads(client().call("POST", "/v1/top", body, as_json=True))


def _live(read: Any, before: dict[str, Any], now: dict[str, Any]) -> None:
    """The refreshing screen (rich's Live, on the terminal's alternate screen)."""
    from rich.live import Live
    from rich.table import Table

    def screen(rows: list[topview.Row]) -> Table:
        t = Table(title=f"kh top  {datetime.now():%H:%M:%S}  {len(rows)} nodes, "
                  f"{sum(1 for r in rows if r.principal)} held  (Ctrl-C leaves)",
                  title_justify="left", box=None, header_style="bold")
        for i, h in enumerate(topview.HEADER):
            t.add_column(h, justify="right" if i in topview.RIGHT else "left",
                         no_wrap=i < len(topview.HEADER) - 1)
        for r in rows:
            t.add_row(*topview.cells(r))
        return t

    try:
        with Live(screen(topview.rates(before, now)), screen=True, auto_refresh=False) as live:
            while True:
                time.sleep(REFRESH)
                before, now = now, read()
                live.update(screen(topview.rates(before, now)), refresh=True)
    except KeyboardInterrupt:
        pass
