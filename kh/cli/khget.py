"""`khget`: allocate nodes, print the paper's text object (a thin client of khd's API)."""

from __future__ import annotations

import click

from kh.cli import credential
from kh.cli.common import entry, handle_errors, setup_logging
from kh.cli.service import client


def _netids(text: str | None) -> list[int]:
    """-n's domains, read as khd reads a list (request.number_list): ``3,4`` → [3, 4]."""
    from kh.service.request import number_list
    return number_list(text or "", "domain list")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "cred", metavar="FILE",
              help=credential.HELP + " The first use registers a new USER with it.")
@click.option("-p", "new_private", type=int, default=0, help="Create N private domains.")
@click.option("-n", "netids", help="Existing private domains, e.g. 3,4.")
@click.option("-i", "public", is_flag=True, help="Add the nodes to the public domain (D1).")
@click.option("-x", "external", is_flag=True, help="Add the nodes to the external domain (D0).")
@click.option("--host", "host", metavar="NAME",
              help="Every node on host NAME (kh host list; 'local': khd's own).")
@click.option("--json", "as_json", is_flag=True, help="The same object as JSON.")
@click.option("--debug", is_flag=True, help="Tracebacks on errors.")
@click.argument("user")
@click.argument("count", type=int, default=1)
@handle_errors
def main(cred: str | None, new_private: int, netids: str | None, public: bool, external: bool,
         host: str | None, as_json: bool, debug: bool, user: str, count: int) -> None:
    """Allocate COUNT nodes (default 1) for principal USER."""
    setup_logging(debug)
    body = {"user": user, "credential": credential.resolve(cred), "count": count,
            "p": new_private, "n": _netids(netids), "i": public, "x": external}
    if host is not None:
        body["host"] = host
    click.echo(client().call("POST", "/v1/allocations", body, as_json=as_json), nl=False)


run = entry(main, "khget")

if __name__ == "__main__":
    run()
