"""`kh topo [LAB.yaml]`: the topology as a picture, from the running service or from a lab
file that has not run (kh.topo)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kh.cli import credential
from kh.cli.common import handle_errors
from kh.errors import KhError, UsageError
from kh.topo import render
from kh.topo.model import Topology, from_ps


def running(user: str | None, cred: str | None) -> Topology:
    """The running state through khd's API: everything for the operator (GET /v1/ps over
    the socket), a principal's own with -u (POST /v1/ps with its credential)."""
    from kh.cli.service import client, config
    cfg = config()
    if user is None:
        if cred is not None:
            raise UsageError("-c goes with -u USER", "kh topo -u USER -c FILE")
        text = client().call("GET", "/v1/ps", as_json=True)
    else:
        body = {"user": user, "credential": credential.resolve(cred)}
        text = client().call("POST", "/v1/ps", body, as_json=True)
    try:
        data = json.loads(text)
    except ValueError:
        raise UsageError("khd's answer to kh ps is not JSON", "kh --debug topo") from None
    return from_ps(data, server=cfg.server, ssh_port=cfg.ssh_port)


def planned(path: Path) -> Topology:
    from kh.lab.model import load_lab
    from kh.topo.lab import from_lab
    return from_lab(load_lab(path, credentials=False))  # a picture needs no credential


def register(main: click.Group) -> None:
    @main.command()
    @click.argument("lab", required=False, type=click.Path(path_type=Path))
    @click.option("-u", "--user", help="A principal's own view (its credential by -c or "
                  "$KH_CREDENTIAL); without it, everything (the operator's, as root).")
    @click.option("-c", "--credential", "cred", metavar="FILE", help=credential.HELP)
    @click.option("--dot", is_flag=True, help="Graphviz DOT.")
    @click.option("--svg", is_flag=True, help="SVG, laid out by Graphviz's dot.")
    @click.option("--mermaid", is_flag=True,
                  help="A Mermaid flowchart (for a ```mermaid block in Markdown).")
    @click.option("--json", "as_json", is_flag=True, help="The graph as JSON.")
    @handle_errors
    def topo(lab: Path | None, user: str | None, cred: str | None, dot: bool, svg: bool,
             mermaid: bool, as_json: bool) -> None:
        """The topology as a picture (Figure 2 style): principals, allocations and their
        control channels, nodes and their interfaces (MAC, address, domain), domains
        (external, public, private with owners), published ports. From the running service,
        or from LAB (a lab file) without running it. Text by default (100 columns)."""
        formats = [f for f, on in (("dot", dot), ("svg", svg), ("mermaid", mermaid),
                                   ("json", as_json)) if on]
        if len(formats) > 1:
            raise UsageError(f"one format at a time, not {' and '.join(formats)}")
        fmt = formats[0] if formats else None
        if lab is not None and (user or cred):
            raise UsageError("a lab file's topology has no principal's view",
                             "kh topo LAB, or kh topo -u USER for the running one")
        t = planned(lab) if lab is not None else running(user, cred)
        click.echo(render.render(t, fmt or "text"), nl=False)

    register_page(main)


def page_link(user: str | None, cred: str | None) -> str:
    """A one-time login link to the running khd's live page: the operator's (the token file,
    root's alone) or, with ``user``, a principal's (its credential)."""
    import http.client

    from kh.cli.service import config
    from kh.page.sessions import read_operator_token
    from kh.service import control
    cfg = config()
    pid = control.pid_of(cfg)
    running = control.running_config(pid) if pid else None
    if running is None:
        raise KhError("khd is not running", "kh service start --page-port 7481")
    if not running.page_port:
        raise KhError("khd serves no live page", "start it with --page-port PORT (or "
                      "KH_PAGE_PORT) after kh service stop")
    body = ({"operator_token": read_operator_token(running.page_token)} if user is None
            else {"user": user, "credential": credential.resolve(cred)})
    conn = http.client.HTTPConnection("127.0.0.1", running.page_port, timeout=30)
    try:
        conn.request("POST", "/login/link", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read(4096).decode("utf-8", "replace")
    except OSError as e:
        raise KhError(f"cannot reach khd's page on 127.0.0.1:{running.page_port}: {e}") from None
    finally:
        conn.close()
    if resp.status != 201:
        raise KhError(text.strip().removeprefix("kh: ")[:200] or f"HTTP {resp.status}")
    url: str = json.loads(text)["url"]
    return url


def register_page(main: click.Group) -> None:
    @main.command()
    @click.option("-u", "--user", help="A principal's link (its credential by -c or "
                  "$KH_CREDENTIAL); without it, the operator's (as root).")
    @click.option("-c", "--credential", "cred", metavar="FILE", help=credential.HELP)
    @handle_errors
    def page(user: str | None, cred: str | None) -> None:
        """Print a one-time link that logs a browser into khd's live page (good once, for
        60 s): the operator's view, or with -u a principal's own."""
        if cred is not None and user is None:
            raise UsageError("-c goes with -u USER", "kh page -u USER -c FILE")
        click.echo(page_link(user, cred))
