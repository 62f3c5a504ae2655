"""`kh token add|list|rm`: a principal's scoped, revocable tokens for in-node tools
(kh.service.tokens; khget -t, khgetdisk and the diskserver's kh.token boot key use them)."""

from __future__ import annotations

import re

import click

from kh.cli import credential
from kh.cli.common import handle_errors
from kh.cli.service import client, principal_options
from kh.errors import UsageError

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` → seconds (at least 1);
    UsageError otherwise."""
    m = re.fullmatch(r"([0-9]{1,9})([smhdw]?)", text.strip(), re.ASCII)
    if not m or int(m[1]) == 0:
        raise UsageError(f"bad duration {text!r}", "like 90s, 30m, 12h, 7d or 2w")
    return int(m[1]) * _UNITS[m[2]]


def parse_netids(text: str) -> list[int]:
    """``1,3`` → [1, 3]; empty → []."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(re.fullmatch(r"[0-9]{1,3}", p, re.ASCII) for p in parts):
        raise UsageError(f"bad domain list {text!r}",
                         "netids like 1,3 (0 is the external domain, 1 the public one)")
    return [int(p) for p in parts]


def _call(path: str, user: str, cred: str | None, as_json: bool, **extra: object) -> None:
    body = {"user": user, "credential": credential.resolve(cred), **extra}
    click.echo(client().call("POST", path, body, as_json=as_json), nl=False)


def register(main: click.Group) -> None:
    @main.group()
    def token() -> None:
        """Scoped, revocable tokens for in-node tools (khget -t, kh.token=), never the
        credential."""

    @token.command("add")
    @principal_options
    @click.option("--allocate-on", "netids", default="", metavar="NETIDS",
                  help="Domains its allocations may use, e.g. 1,3: 0 lets it ask -x (the "
                       "external domain), 1 -i (the public one), others are the principal's "
                       "private domains. Default: none (nodes with no domain).")
    @click.option("--max-nodes", type=click.IntRange(1), metavar="N",
                  help="Nodes it may hold at once (default: only the principal's quota).")
    @click.option("--expires", metavar="DURATION",
                  help="Lifetime, like 90s, 30m, 12h, 7d (default: until revoked).")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @handle_errors
    def token_add(user: str, cred: str | None, netids: str, max_nodes: int | None,
                  expires: str | None, as_json: bool) -> None:
        """Make a token; it is printed once, alone on the first line (khd keeps only a
        hash of it)."""
        _call("/v1/tokens", user, cred, as_json, allocate_on=parse_netids(netids),
              max_nodes=max_nodes,
              expires_in=None if expires is None else parse_duration(expires))

    @token.command("list")
    @principal_options
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @handle_errors
    def token_list(user: str, cred: str | None, as_json: bool) -> None:
        """The principal's tokens: id, state, domains, node budget, expiry (not the
        secrets)."""
        _call("/v1/tokens/list", user, cred, as_json)

    @token.command("rm")
    @principal_options
    @click.argument("token_id", type=int)
    @handle_errors
    def token_rm(user: str, cred: str | None, token_id: int) -> None:
        """Revoke token TOKEN_ID: refused from now on, and the control-channel sessions it
        opened end. What it allocated stays the principal's."""
        _call(f"/v1/tokens/{token_id}/remove", user, cred, False)
