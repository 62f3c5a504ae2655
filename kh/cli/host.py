"""`kh host add|list|rm`: the operator's hosts (issue 16; through khd's socket, as root):
libvirt hosts khd runs nodes on besides its own (kh.service.hosts, docs/libvirt.md)."""

from __future__ import annotations

import click

from kh.cli.common import handle_errors
from kh.cli.service import client


def register(main: click.Group) -> None:
    @main.group()
    def host() -> None:
        """Hosts khd runs nodes on (the operator's: khd's socket, as root)."""

    @host.command("add")
    @click.option("--capacity", type=int, help="Nodes khd keeps there (default: probed from "
                  "its free memory).")
    @click.option("--underlay", metavar="ADDRESS", help="Its underlay address (default: the "
                  "first `kh fabric underlays` reports there).")
    @click.option("--prefix", help="kh's prefix there (default: khd's own).")
    @click.option("--kh", "kh_cmd", default="kh", show_default=True,
                  help="The kh command there: one path (the far shell reads it unquoted).")
    @click.option("--runner", metavar="'WORDS'", help="What runs a command there (default: "
                  "ssh as the qemu+ssh URI reaches it; nothing for a qemu:// URI).")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.argument("name")
    @click.argument("uri")
    @handle_errors
    def host_add(capacity: int | None, underlay: str | None, prefix: str | None, kh_cmd: str,
                 runner: str | None, as_json: bool, name: str, uri: str) -> None:
        """Add libvirt host NAME at URI (qemu+ssh://root@HOST/system?keyfile=PATH, ...): khd
        checks it (reachable, qemu-system-ppc with ppce500, kh and an underlay there that
        answers), records it and starts its capacity of nodes there."""
        from kh.service import hostspec
        body: dict[str, object] = {"name": name, "uri": uri, "kh": kh_cmd}
        if capacity is not None:
            body["capacity"] = capacity
        if underlay is not None:
            body["underlay"] = underlay
        if prefix is not None:
            body["prefix"] = prefix
        if runner is not None:
            body["runner"] = list(hostspec.runner_words(runner))
        click.echo(client().call("POST", "/v1/hosts", body, as_json=as_json), nl=False)

    @host.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @handle_errors
    def host_list(as_json: bool) -> None:
        """khd's hosts, its own (local) first: capacity, nodes used and free, state, URI."""
        click.echo(client().call("GET", "/v1/hosts", as_json=as_json), nl=False)

    @host.command("rm")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.argument("name")
    @handle_errors
    def host_rm(as_json: bool, name: str) -> None:
        """Remove host NAME (refused while it has allocated nodes): its pool nodes are
        stopped and their taps there removed."""
        from kh.service import hostspec
        hostspec.check_name(name)  # it goes into the request's path
        click.echo(client().call("POST", f"/v1/hosts/{name}/remove", {}, as_json=as_json),
                   nl=False)
