"""The service's API over the control channel: what in-node tools ask with a secret (issue 11).

A node reaches khd's API only over the public domain, where HTTP would carry a token or a
credential in clear to anyone who can see or take the service's address. The control channel's
ssh server is there too, and every node pins its host key (boot key ``kh.channel``,
kh.service.pins): so requests that carry a secret go over ssh, which authenticates the server
by that pinned key and keeps the secret confidential and intact, and khd's public HTTP listener
takes none (kh.service.api refuses its POSTs).

Login: user ``api+PRINCIPAL``, the password one of PRINCIPAL's active tokens (kh token add) or
PRINCIPAL's credential; a token-shaped password that is not a token of PRINCIPAL's is tried as
the credential, as for ``con<ID>`` logins. A refused login is counted by the service's limiter
(admission.Limiter) per source and principal, as the API counts one. The channel registers no
principal: a principal's first use is `khget` on the host (or the loopback API).

Commands (ssh exec), each the same request as an API route, answered by that route itself
(kh.service.api, kh.service.aoe) with the login's principal and secret in the body and the
connection's source as the caller, so authentication, a token's scope and budget, rate limits
and quotas are the API's own:

  khget [-p N] [-n LIST] [-i] [-x] [COUNT]       POST /v1/allocations (the in-node khget)
  aoe-address [-s SHELF] [-a SLOTS] NODE NETID   POST /v1/aoe/addresses (khgetdisk)
  release ALLOC [NODE...]                        POST /v1/allocations/ALLOC/release
  usage [-s SINCE] [-u UNTIL] [-b BY]            POST /v1/usage (the in-node khget -U; a
                                                 token's: the allocations it made)

The answer is the API's text (khget's text object) on stdout with exit status 0, or khd's
one-line reason ``kh: ...`` on stderr with the exit status kh's CLI gives for it (2 malformed,
3 refused, 4 not found, 1 otherwise).
"""

from __future__ import annotations

import getopt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kh import admission
from kh.errors import KhError, UsageError
from kh.service import request as rq
from kh.service import tokens
from kh.service.request import Caller

if TYPE_CHECKING:
    from kh.service.access import Grant
    from kh.service.core import Service
    from kh.store import Store

MAX_COMMAND = 512  # characters of one command (the longest lawful one is under 100)
MAX_WORDS = 64
_NUMBER = re.compile(r"[0-9]{1,10}", re.ASCII)
_LIST = re.compile(r"[0-9,]{1,1024}", re.ASCII)
USAGE = ("khget [-p N] [-n LIST] [-i] [-x] [COUNT]; aoe-address [-s SHELF] [-a SLOTS] NODE "
         "NETID; release ALLOC [NODE...]; usage [-s SINCE] [-u UNTIL] [-b BY]")


@dataclass(frozen=True)
class Answer:
    """What one command answers: ``status`` (the exit status: 0, or the error's kh exit code),
    ``out`` (the API's text, for stdout) and ``err`` (one line ``kh: ...\\n``, for stderr)."""

    status: int
    out: str
    err: str


# -- logins ------------------------------------------------------------------------------------
def login(svc: Service, principal: str, password: str, source: str) -> Grant | None:
    """The grant of an ``api+PRINCIPAL`` login, or None (malformed, refused or rate-limited:
    all the same to the client). ``source`` is the connection's (admission.source_of_peer)."""
    from kh.service.access import Grant
    try:
        admission.check_user(principal)
        admission.check_credential(password)
    except KhError:
        return None
    src = admission.source_of(source)
    tok = tokens.channel_token(svc, principal, None, password, src)
    if tok is not None:
        return Grant(principal, None, None, None, tok, secret=password)
    try:  # the service's own check (scrypt; counted and limited per source and principal)
        svc.authenticate(principal, password, register=False, source=src)
    except KhError:
        return None
    return Grant(principal, None, None, None, None, secret=password)


def lost(store: Store, grant: Grant) -> str | None:
    """Under khd's lock: why an API login no longer holds (its principal was removed, its
    token revoked or expired), or None."""
    if store.principal(grant.principal) is None:
        return f"principal {grant.principal} was removed"
    if grant.token is not None:
        return tokens.token_lost(store, grant.token)
    return None


# -- commands ----------------------------------------------------------------------------------
Route = Callable[..., tuple[int, Any, Any]]


def _number(text: str, what: str) -> int:
    if not _NUMBER.fullmatch(text):
        raise UsageError(f"bad {what} {text[:40]!r}", "a number")
    return int(text)


def _slots(text: str, what: str) -> str:
    """A comma-separated list of numbers, as the API takes it (checked there)."""
    if not _LIST.fullmatch(text):
        raise UsageError(f"bad {what} {text[:40]!r}", "write 3,4")
    return text


def _options(words: list[str], spec: str, most: int) -> tuple[dict[str, str], list[str]]:
    """getopt's options (last one wins) and the operands, at most ``most`` of them."""
    try:
        opts, rest = getopt.getopt(words, spec)
    except getopt.GetoptError as e:
        raise UsageError(str(e), USAGE) from None
    if len(rest) > most:
        raise UsageError(f"too many arguments: {' '.join(rest)[:60]!r}", USAGE)
    return dict(opts), rest


def parse(command: str) -> tuple[Route, dict[str, Any], tuple[str, ...]]:
    """A command line → (the API route, the body it takes without user and secret, the path's
    groups). UsageError for anything else."""
    from kh.service import aoe, api
    if len(command) > MAX_COMMAND:
        raise UsageError(f"command of {len(command)} characters is too long",
                         f"at most {MAX_COMMAND}")
    words = [w for w in re.split(r"[ \t]+", command) if w]
    if not words or len(words) > MAX_WORDS:
        raise UsageError("an API login takes one of these commands", USAGE)
    name, args = words[0], words[1:]
    if name == "khget":
        opts, rest = _options(args, "p:n:ix", 1)
        body: dict[str, Any] = {
            "count": _number(rest[0], "COUNT") if rest else 1,
            "p": _number(opts.get("-p", "0"), "-p"),
            "n": _slots(opts["-n"], "-n") if "-n" in opts else "",
            "i": "-i" in opts, "x": "-x" in opts}
        return api.allocate, body, ()
    if name == "aoe-address":
        opts, rest = _options(args, "s:a:", 2)
        if len(rest) != 2:
            raise UsageError("aoe-address takes NODE and NETID", USAGE)
        body = {"node": _number(rest[0], "NODE"), "netid": _number(rest[1], "NETID"),
                "shelf": _number(opts.get("-s", "1"), "-s")}
        if "-a" in opts:
            body["avoid"] = _slots(opts["-a"], "-a")
        return aoe.route_assign, body, ()
    if name == "release":
        if not args:
            raise UsageError("release takes ALLOC", USAGE)
        nodes = [_number(w, "NODE") for w in args[1:]]
        return api.release, {"nodes": nodes}, (str(_number(args[0], "ALLOC")),)
    if name == "usage":
        from kh.metering import routes
        opts, _ = _options(args, "s:u:b:", 0)
        body = {key: opts[o] for o, key in (("-s", "since"), ("-u", "until"), ("-b", "by"))
                if o in opts}
        return routes.usage_own, body, ()
    raise UsageError(f"unknown API command {name[:40]!r}", USAGE)


def run(svc: Service, grant: Grant, command: str, source: str) -> Answer:
    """Answer ``command`` of API login ``grant`` (from ``source``) through the API's route, as
    the route answers an HTTP request from ``source`` carrying the login's secret."""
    from kh.service import api
    caller = Caller(source, False)
    try:
        route, body, groups = parse(command)
        if grant.token is not None and route not in api.TOKEN_ROUTES:
            raise tokens.out_of_scope(command.split()[0])
        body["user"] = grant.principal
        body["token" if grant.token is not None else "credential"] = grant.secret
        with rq.calling(caller):
            _, text, _ = route(svc, caller, body, *groups)
    except KhError as e:
        return Answer(e.exit_code, "", f"kh: {e}\n")
    return Answer(0, str(text), "")
