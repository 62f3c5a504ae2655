"""`kh service|ps|hw|release|reset|domain|clean|console`: the service's host-side commands."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from kh.cli import credential
from kh.cli.common import handle_errors, stop_on_signals
from kh.client import Client
from kh.errors import UsageError
from kh.service.config import SETTINGS, ServiceConfig, env_help, from_env, given

if TYPE_CHECKING:
    from kh.service.pool import PoolStatus


ENV_EPILOG = "\b\nEnvironment (options win over it):\n" + env_help()


def config() -> ServiceConfig:
    return from_env()


def client() -> Client:
    return Client(config().socket)


F = TypeVar("F", bound=Callable[..., Any])


def setting_options(fn: F) -> F:
    """`kh service start`'s option for each setting that has one (config.SETTINGS), in that
    order, with its help; each passes its value under the setting's field name, None when not
    given (a flag, such as --no-outside, passes the opposite of the setting's default)."""
    for s in reversed(SETTINGS):
        if s.option is None:
            continue
        text = s.help_text()
        kw: dict[str, Any] = {"help": text[0].upper() + text[1:] + "."}
        if s.kind == "bool":
            kw.update(flag_value=not s.value, default=None)
        elif s.choices:
            kw["type"] = click.Choice(s.choices)
        elif s.kind == "int":
            kw["type"] = int
        fn = click.option(s.option, s.field, **kw)(fn)
    return fn


def principal_options(fn: F) -> F:
    fn = click.option("-c", "--credential", "cred", metavar="FILE", help=credential.HELP)(fn)
    return click.option("-u", "--user", required=True, help="The principal.")(fn)


def as_principal(user: str, cred: str | None, path: str, as_json: bool = False,
                 **extra: object) -> None:
    """POST a principal's request to khd and print its answer (JSON with ``as_json``)."""
    body = {"user": user, "credential": credential.resolve(cred), **extra}
    click.echo(client().call("POST", path, body, as_json=as_json), nl=False)


def alloc_id(text: str) -> int:
    """An allocation's number, or its channel ``con<ID>[@host]``, spelt as the channel takes
    it (kh.cc.sshd: ASCII digits, no leading zero). UsageError otherwise."""
    m = re.fullmatch(r"(?:con)?([1-9][0-9]{0,8})(?:@\S+)?", text, re.ASCII)
    if not m:
        raise UsageError(f"bad allocation {text!r}", "give its number or con<ID>@host")
    return int(m[1])


def register(main: click.Group) -> None:
    from kh.cli.principal import register as register_principal
    register_principal(main)

    @main.group(epilog=ENV_EPILOG)
    def service() -> None:
        """Run khd, the service interface, in the background."""

    @service.command("start", epilog=ENV_EPILOG)
    @setting_options
    @click.option("--no-wait", is_flag=True, help="Return once khd answers; the pool fills on.")
    @handle_errors
    def service_start(no_wait: bool, **asked: Any) -> None:
        """Start khd and wait until its pool is ready (every node at the U-Boot prompt or
        failed for good). Fails, stopping khd and removing what it made, when no node of the
        pool can start, or when stopped (Ctrl-C, SIGTERM, SIGHUP). With khd already running,
        fails if it runs with other settings than the ones asked for."""
        cfg = from_env(**asked)  # every setting checked before anything else
        debug = bool(click.get_current_context().find_root().params.get("debug"))
        from kh.service import control
        t0 = time.monotonic()
        shown: list[tuple[int, int, int]] = []

        def progress(st: PoolStatus) -> None:  # only when it takes a while, and has news
            if time.monotonic() - t0 > 2 and st.milestone not in shown[-1:] and not st.ready:
                click.echo(f"kh: starting the pool: {st.milestone_text()}", err=True)
                shown.append(st.milestone)

        with stop_on_signals():
            started = control.start(cfg, debug=debug, wait=not no_wait, progress=progress,
                                    given=given(**asked))
        where = f"pid {started.pid}, state {cfg.state_dir}"
        st = started.status
        if started.already or st is None:
            click.echo(f"khd already running ({where})")
        elif no_wait:
            click.echo(f"khd running ({where}); the pool is starting: {st.progress_text()}")
        else:
            failed = f"; {st.failed_text()} (kh ps shows them)" if st.failures else ""
            click.echo(f"khd running ({where}): {st.free + st.allocated} of {st.size} nodes "
                       f"ready{failed}")
    @service.command("stop")
    @handle_errors
    def service_stop() -> None:
        """Stop khd; nodes and allocations stay."""
        from kh.service import control
        click.echo("khd stopped" if control.stop(config()) else "khd was not running")

    @service.command("status")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @handle_errors
    def service_status(as_json: bool) -> None:
        """Say whether khd runs, how many nodes it has and where its outside world is."""
        click.echo(client().call("GET", "/v1/status", as_json=as_json), nl=False)

    @main.command()
    @click.option("-u", "--user", help="Only this principal's (its credential by -c or "
                  "$KH_CREDENTIAL); without it, everything (the operator's view).")
    @click.option("-c", "--credential", "cred", metavar="FILE", help=credential.HELP)
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @handle_errors
    def ps(user: str | None, cred: str | None, as_json: bool) -> None:
        """Allocations, nodes and domains: all of them (the operator, through khd's socket),
        or with -u a principal's own."""
        if user is None:
            if cred is not None:
                raise UsageError("-c goes with -u USER", "kh ps -u USER -c FILE")
            click.echo(client().call("GET", "/v1/ps", as_json=as_json), nl=False)
            return
        body = {"user": user, "credential": credential.resolve(cred)}
        click.echo(client().call("POST", "/v1/ps", body, as_json=as_json), nl=False)

    @main.command()
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @handle_errors
    def hw(as_json: bool) -> None:
        """The documented node hardware."""
        click.echo(client().call("GET", "/v1/hw", as_json=as_json), nl=False)

    @main.command()
    @principal_options
    @click.argument("allocation")
    @click.argument("nodes", nargs=-1, type=int)
    @handle_errors
    def release(user: str, cred: str | None, allocation: str, nodes: tuple[int, ...]) -> None:
        """Give back ALLOCATION (or only NODES of it); domains stay."""
        as_principal(user, cred, f"/v1/allocations/{alloc_id(allocation)}/release",
                     nodes=list(nodes))

    @main.command()
    @principal_options
    @click.argument("node", type=int)
    @handle_errors
    def reset(user: str, cred: str | None, node: int) -> None:
        """Reset NODE back to the U-Boot prompt."""
        as_principal(user, cred, f"/v1/nodes/{node}/reset")

    @main.group()
    def domain() -> None:
        """Communication domains."""

    @domain.command("rm")
    @principal_options
    @click.argument("netid", type=int)
    @handle_errors
    def domain_rm(user: str, cred: str | None, netid: int) -> None:
        """Remove a private domain the principal owns (no allocated node may be in it)."""
        as_principal(user, cred, f"/v1/domains/{netid}/remove")

    @domain.command("join")
    @principal_options
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.argument("node", type=int)
    @click.argument("netid", type=int)
    @handle_errors
    def domain_join(user: str, cred: str | None, as_json: bool, node: int, netid: int) -> None:
        """Plug running NODE's next free interface into domain NETID (one of the principal's
        private domains, 1 public, 0 external), with no reboot; prints the interface and the
        address kh computes for the node there (the node configures it itself)."""
        as_principal(user, cred, f"/v1/nodes/{node}/join", as_json=as_json, netid=netid)

    @domain.command("leave")
    @principal_options
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.argument("node", type=int)
    @click.argument("netid", type=int)
    @handle_errors
    def domain_leave(user: str, cred: str | None, as_json: bool, node: int, netid: int
                     ) -> None:
        """Unplug running NODE's interface in domain NETID: no frame of it reaches the node
        any more; the interface is free for another join."""
        as_principal(user, cred, f"/v1/nodes/{node}/leave", as_json=as_json, netid=netid)

    @main.group()
    def key() -> None:
        """Public keys that may open a principal's control channels."""

    @key.command("add")
    @principal_options
    @click.option("--allocation", help="Only this allocation's channel (hand it to a party).")
    @click.argument("pubkey", type=click.Path(exists=True, dir_okay=False))
    @handle_errors
    def key_add(user: str, cred: str | None, allocation: str | None, pubkey: str) -> None:
        """Register the OpenSSH public key in PUBKEY (a .pub file). It is checked here: a
        private key is refused and never sent."""
        from kh.cli.pubkey import read_public_key
        line = read_public_key(pubkey)  # before the credential is read or khd asked
        as_principal(user, cred, "/v1/keys", key=line,
                     allocation=alloc_id(allocation) if allocation else None)

    @key.command("rm")
    @principal_options
    @click.argument("key_id", type=int)
    @handle_errors
    def key_rm(user: str, cred: str | None, key_id: int) -> None:
        """Revoke key KEY_ID (see `kh key list`)."""
        as_principal(user, cred, f"/v1/keys/{key_id}/remove")

    @key.command("list")
    @principal_options
    @handle_errors
    def key_list(user: str, cred: str | None) -> None:
        """The principal's keys: id, allocation (or all), key, comment."""
        as_principal(user, cred, "/v1/keys/list")

    @main.command()
    @click.argument("node", type=int)
    @click.option("-f", "--follow", is_flag=True, help="Keep printing as the node prints.")
    @handle_errors
    def logs(node: int, follow: bool) -> None:
        """NODE's console log (one time-stamped line per console line); control characters
        the node printed are shown as ^X (`kh console` is the raw one)."""
        from kh.logview import follow as follow_log
        from kh.logview import terminal_writer
        path = config().console_log(node)
        if not path.exists():
            raise UsageError(f"node {node} has no console log", "see `kh ps`")
        with stop_on_signals():
            follow_log(path, terminal_writer(lambda text: click.echo(text, nl=False)),
                       follow=follow)

    @main.command()
    @handle_errors
    def clean() -> None:
        """Remove every host object kh created (by kh's tags) and nothing else."""
        from kh.service import control
        done = control.clean(config())
        click.echo("\n".join(done) if done else "nothing of kh's to clean")

    @main.command()
    @click.argument("node", type=int)
    @handle_errors
    def console(node: int) -> None:
        """Attach to NODE's console (Ctrl-] leaves). Raw by design: what the node prints,
        escape sequences included, reaches this terminal as is (`kh logs` shows them safely)."""
        from kh.boot import attach
        from kh.hw.console import Console
        path = config().node_dir(node) / "console.sock"
        if not path.exists():
            raise UsageError(f"node {node} has no console here", "see `kh ps`")
        with stop_on_signals():  # a SIGTERM or SIGHUP restores the terminal as Ctrl-] does
            con = Console(path, name=f"node{node}")
            con.connect(5)
            click.echo(f"kh: attached to node {node}; Ctrl-] leaves", err=True)
            try:
                attach(con)
            finally:
                con.close()


