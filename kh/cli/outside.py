"""`kh outside|publish|unpublish`: reaching the external domain from the host.

`kh outside CMD...` runs CMD in khd's outside world (kh.hw.outside), where external-domain nodes
are reachable; it enters a network namespace, so it is the operator's (root). `kh publish`
puts a node's port on the host's 127.0.0.1 (kh.service.publish), for a principal.
"""

from __future__ import annotations

import json
import os

import click

from kh import proc
from kh.cli.common import handle_errors
from kh.cli.service import as_principal, client, principal_options
from kh.client import Client
from kh.errors import KhError, UsageError
from kh.hw import netns as nsutil


def outside_netns(api: Client) -> str:
    """The outside world's namespace khd runs with (from its status). KhError when khd does
    not run or has none."""
    status = json.loads(api.call("GET", "/v1/status", as_json=True))
    out = status.get("outside")
    if not out:
        raise KhError("khd runs without an outside world (it was started with --no-outside)",
                      "kh service stop, then kh service start without --no-outside")
    name = str(out["netns"])
    if not nsutil.exists(name):
        raise KhError(f"khd's outside world {name} is gone",
                      "kh service stop and kh service start make it again")
    return name


def register(main: click.Group) -> None:
    @main.command(context_settings={"ignore_unknown_options": True,
                                    "allow_interspersed_args": False})
    @click.argument("argv", nargs=-1, type=click.UNPROCESSED)
    @handle_errors
    def outside(argv: tuple[str, ...]) -> None:
        """Run ARGV in khd's outside world: the network namespace the external domain's
        uplink ends in, from which external nodes (10.0.x.y) are reachable and nothing else
        is (not even the host's 127.0.0.1). As root (it enters a namespace): `kh outside --
        wget -qO- http://10.0.0.4/`. Its exit status is ARGV's."""
        if not argv:
            raise UsageError("kh outside needs a command to run", "kh outside -- sh")
        if os.geteuid() != 0:
            raise KhError("kh outside needs root", "it enters khd's network namespace")
        name = outside_netns(client())
        proc.replace(nsutil.enter_argv(name) + list(argv))

    @main.command()
    @principal_options
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.argument("node", type=int)
    @click.argument("port", type=int)
    @click.argument("host_port", metavar="[HOSTPORT]", type=int, required=False)
    @handle_errors
    def publish(user: str, cred: str | None, as_json: bool, node: int, port: int,
                host_port: int | None) -> None:
        """Forward 127.0.0.1:HOSTPORT on the host (loopback only) to NODE's TCP PORT, as
        `docker run -p` does; NODE must be the principal's and in the external domain.
        Without HOSTPORT a free port is picked; the line printed names it. Lasts until `kh
        unpublish`, or until the node is released or reset (`kh ps` lists it). Any local
        user can connect to it."""
        from kh.service.publish import MIN_HOST_PORT
        if not 1 <= port <= 65535:  # named as typed here, not as the API's fields
            raise UsageError(f"PORT must be from 1 to 65535, got {port}")
        if host_port is not None and not MIN_HOST_PORT <= host_port <= 65535:
            raise UsageError(f"HOSTPORT must be from {MIN_HOST_PORT} to 65535, got {host_port}",
                             "leave it out for a free port")
        as_principal(user, cred, f"/v1/nodes/{node}/publish", as_json=as_json, port=port,
                     host_port=host_port)

    @main.command()
    @principal_options
    @click.argument("host_port", metavar="HOSTPORT", type=int)
    @handle_errors
    def unpublish(user: str, cred: str | None, host_port: int) -> None:
        """Stop forwarding 127.0.0.1:HOSTPORT (its open connections are cut)."""
        as_principal(user, cred, f"/v1/publishes/{host_port}/remove")
