"""Tokens: scoped, revocable secrets a principal hands to in-node tools instead of its
credential (issue 11).

A token is ``kht_`` and 43 characters of base64url: 256 random bits, shown once when it is
made. khd keeps only HMAC-SHA256(TOKEN_KEY, token), a fast hash, on purpose: scrypt (what a
credential gets, kh.admission) exists to make guessing a *chosen* password slow, but nothing
guesses 256 random bits, fast hash or not, so a stolen state file tells no token; and a fast
hash can be looked up (the column is unique), so a token needs no principal name to find it.

What a token may do, and nothing else (every other use is 403, TokenScope):

- allocate (POST /v1/allocations with ``token`` instead of ``credential``) for its principal,
  only on its domains (``netids``: 0 allows -x, 1 allows -i, private ones by id; never -p)
  and while the nodes held through it stay within ``max_nodes``;
- release the allocations it made (POST /v1/allocations/ID/release), and ask an AoE address
  for their nodes (POST /v1/aoe/addresses: khgetdisk does);
- drive, as the ssh password, the control channel of the allocations it made;
- log in to the channel's API (``api+PRINCIPAL``, kh.service.chanapi) to ask the above over
  ssh instead of HTTP: in-node tools do.

A wrong, expired or revoked token gets the very answer a wrong credential gets (403,
``credential refused for principal USER``), counted by the same limiter (admission.Limiter).
A revoked (or expired) token's control-channel sessions end: their grants name the token and
the ssh gate's watcher asks kh.service.access whether they still hold.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kh import admission
from kh.allocation import MAX_NETID, MAX_NODE, AllocationError, Request
from kh.errors import UsageError
from kh.model import FIRST_PRIVATE
from kh.service import request as rq
from kh.service.request import Caller, current_caller
from kh.store import AllocRow, Store, TokenRow

if TYPE_CHECKING:
    from kh.service.admit import Admitted
    from kh.service.core import Service

log = logging.getLogger("kh.tokens")
PREFIX = "kht_"
TOKEN_RE = re.compile(r"kht_[A-Za-z0-9_-]{43}", re.ASCII)
# The hash's key: a fixed label (domain separation), not a secret; see the module's docstring.
TOKEN_KEY = b"kh token v1"
MAX_LIFETIME = 10 * 365 * 86400  # seconds: what --expires may ask at most
# The state a principal can grow: active tokens at once, and revoked or expired ones kept for
# `kh token list` (older ones are forgotten when a token is made).
MAX_ACTIVE = 32
KEEP_SPENT = 32
Result = tuple[int, "str | Path", Any]


class TokenScope(admission.AuthError):
    """403: a token asked for something it may not do."""


def new_secret() -> str:
    """A new token: PREFIX and 32 random bytes in base64url (no padding)."""
    return PREFIX + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


def digest(secret: str) -> bytes:
    """What the state keeps of a token: 32 bytes."""
    return hmac.new(TOKEN_KEY, secret.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()


def looks_like(secret: str) -> bool:
    """``secret`` has a token's shape (a credential could too: then it is tried as both)."""
    return bool(TOKEN_RE.fullmatch(secret))


def from_body(body: dict[str, Any]) -> str | None:
    """The request's ``token``: None when absent, else a string (400 when not one)."""
    v = body.get("token")
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > admission.MAX_CREDENTIAL:
        raise UsageError("`token` must be a token string (as `kh token add` printed it)")
    return v


def out_of_scope(what: str = "this") -> TokenScope:
    return TokenScope(f"a token may not do {what}: it may only allocate, and release, drive "
                      "or read the usage of the allocations it made",
                      "use the principal's credential")


# -- checking a token ------------------------------------------------------------------------
def authenticate(svc: Service, user: str, secret: str, source: str | None = None) -> TokenRow:
    """The principal ``user``'s active token ``secret``, checked as Service.authenticate
    checks a credential: rate-limited per source and principal (429 first), and refused
    (AuthError, the credential's words) when unknown, another principal's, expired or
    revoked."""
    admission.check_user(user)
    caller = current_caller()
    if source is None and caller is not None:
        source = caller.source
    limited = not (caller is not None and caller.operator and source == caller.source)
    if limited:
        svc.limiter.check(user, source)
    row = svc.store.token_by_hash(digest(secret)) if looks_like(secret) else None
    if row is None or row.principal != user or row.state() != "active":
        if limited:
            svc.limiter.failed(user, source)
        raise admission.refused(user)
    if limited:
        svc.limiter.succeeded(user, source)
    return row


@contextlib.contextmanager
def admitted(svc: Service, user: str, secret: str) -> Iterator[TokenRow]:
    """The token checked outside khd's lock, then held under it while it is still active."""
    row = authenticate(svc, user, secret)
    with svc.lock:
        now = svc.store.token(row.id)
        if now is None or now.state() != "active":
            raise admission.refused(user)
        yield now


def check_scope(tok: TokenRow, req: Request) -> None:
    """TokenScope unless every domain ``req`` asks for is one of the token's."""
    if req.new_private:
        raise TokenScope(f"token {tok.id} may not make new private domains (-p)",
                         _allowed(tok))
    asked = [*([0] if req.external else []), *([1] if req.public else []), *req.existing]
    for netid in asked:
        if netid not in tok.netids:
            raise TokenScope(f"token {tok.id} may not allocate on domain {netid}",
                             _allowed(tok))


def _allowed(tok: TokenRow) -> str:
    return (f"it allocates on {','.join(map(str, tok.netids))} only" if tok.netids else
            "it allocates nodes with no domain only")


def check_budget(store: Store, tok: TokenRow, count: int) -> None:
    """AllocationError (409) when ``count`` more nodes would take what the token holds past
    its budget."""
    if tok.max_nodes is None:
        return
    held = store.token_held(tok.id)
    if held + count > tok.max_nodes:
        raise AllocationError(
            f"token {tok.id} holds {held} node{'' if held == 1 else 's'} and asks for {count} "
            f"more: over its budget of {tok.max_nodes} nodes at once",
            "release some of its allocations, or make a token with a larger --max-nodes")


@contextlib.contextmanager
def admit_khget(svc: Service, req: Request, credential: str | None, token: str | None
                ) -> Iterator[tuple[Admitted, int | None]]:
    """Service.khget's admission, under khd's lock: by credential (as Service.admitted, which
    may register a new principal), or by token, checked against its scope and budget.
    Yields (Admitted, the token's id or None)."""
    if token is None:
        with svc.admitted(req.user, credential, register=True) as adm:
            yield adm, None
        return
    from kh.service.admit import Admitted
    if credential is not None:
        raise UsageError("give a credential or a token, not both")
    with admitted(svc, req.user, token) as tok:
        check_scope(tok, req)
        check_budget(svc.store, tok, req.count)
        yield Admitted(req.user, svc.store.principal(req.user), None), tok.id


@contextlib.contextmanager
def admit_own(svc: Service, user: str, credential: str | None, token: str | None,
              alloc: int) -> Iterator[None]:
    """Admission for a request on allocation ``alloc`` (a release), under khd's lock: by
    credential, or by the token that made ``alloc`` (any other allocation looks, to a token,
    like one that does not exist)."""
    if token is None:
        with svc.admitted(user, credential):
            yield
        return
    from kh.service.core import NotFound
    if credential is not None:
        raise UsageError("give a credential or a token, not both")
    with admitted(svc, user, token) as tok:
        row = svc.store.allocation(alloc)
        if row is None or row.token != tok.id:
            raise NotFound(f"principal {user} has no active allocation {alloc}")
        yield


@contextlib.contextmanager
def admit_node(svc: Service, user: str, credential: str | None, token: str | None,
               node: int) -> Iterator[None]:
    """Admission for a request on node ``node`` (an AoE address for a disk node, kh.service.aoe),
    under khd's lock: by credential, or by the token whose allocation holds ``node``; any
    other node looks, to a token, like one that is not allocated."""
    if token is None:
        with svc.admitted(user, credential):
            yield
        return
    from kh.service.core import NotFound
    if credential is not None:
        raise UsageError("give a credential or a token, not both")
    with admitted(svc, user, token) as tok:
        row = svc.store.node(node)
        a = None if row is None or row.alloc is None else svc.store.allocation(row.alloc)
        if a is None or a.token != tok.id:
            raise NotFound(f"principal {user} has no allocated node {node}")
        yield


# -- the control channel ---------------------------------------------------------------------
def channel_token(svc: Service, owner: str, alloc: int | None, password: str,
                  source: str) -> int | None:
    """The id of the active token ``password`` of ``owner``'s when it made live allocation
    ``alloc`` (a ``con<alloc>`` login), or for ``alloc`` None (an ``api+OWNER`` login,
    kh.service.chanapi) any active token of ``owner``'s; else None (the caller then checks it
    as a credential, which counts the refusal). Past the limiter's limit: None without a look."""
    if not looks_like(password):
        return None
    try:
        svc.limiter.check(owner, source)
    except admission.Throttled:
        return None
    with svc.lock:
        row = svc.store.token_by_hash(digest(password))
        a = None if alloc is None else svc.store.allocation(alloc)
    if row is None or row.principal != owner or row.state() != "active" or \
            (alloc is not None and (a is None or a.token != row.id)):
        return None
    svc.limiter.succeeded(owner, source)
    return row.id


def token_lost(store: Store, token_id: int) -> str | None:
    """Why a login by token ``token_id`` no longer holds (revoked, expired, forgotten), or
    None."""
    tok = store.token(token_id)
    state = "revoked" if tok is None else tok.state()
    if state == "active":
        return None
    return f"token {token_id} {'expired' if state == 'expired' else 'was revoked'}"


def grant_lost(store: Store, token_id: int, row: AllocRow) -> str | None:
    """Why a control-channel grant by token ``token_id`` on allocation ``row`` no longer holds
    (revoked, expired, or not the allocation's token), or None."""
    if store.token(token_id) is None or row.token != token_id:
        return f"token {token_id} does not open allocation {row.id}"
    return token_lost(store, token_id)


# -- the principal's own requests: make, list, revoke -------------------------------------------
def check_netids(svc: Service, user: str, netids: tuple[int, ...]) -> None:
    """Under the lock: each of ``netids`` is 0, 1 or a private domain ``user`` owns."""
    from kh.service.core import NotFound
    owners = svc.store.private_owners()
    for n in netids:
        if n in (0, 1):
            continue
        if n < FIRST_PRIVATE or owners.get(n) != user:
            raise NotFound(f"principal {user} has no private domain {n}",
                           "0 is the external domain, 1 the public one")


def add(svc: Service, user: str, credential: str | None, netids: tuple[int, ...],
        max_nodes: int | None, expires_in: int | None) -> tuple[TokenRow, str]:
    """A new token of ``user``'s: (its row, the secret, which is not kept). AllocationError
    (409) past MAX_ACTIVE active tokens; NotFound for a domain that is not the principal's."""
    with svc.admitted(user, credential):
        check_netids(svc, user, netids)
        if svc.store.active_tokens(user) >= MAX_ACTIVE:
            raise AllocationError(f"principal {user} has {MAX_ACTIVE} active tokens, the most "
                                  "it may hold", "revoke some with `kh token rm`")
        svc.store.prune_tokens(user, KEEP_SPENT)
        secret = new_secret()
        expires = None if expires_in is None else time.time() + expires_in
        tid = svc.store.add_token(user, digest(secret), netids, max_nodes, expires)
        row = svc.store.token(tid)
    assert row is not None
    log.info("principal %s made token %d (domains %s, max nodes %s)", user, tid,
             row.netids, max_nodes)
    return row, secret


def revoke(svc: Service, user: str, credential: str | None, token_id: int) -> None:
    from kh.service.core import NotFound
    with svc.admitted(user, credential):
        if not svc.store.revoke_token(user, token_id):
            raise NotFound(f"principal {user} has no token {token_id}",
                           "kh token list shows them")
    log.info("principal %s revoked token %d", user, token_id)


# -- the API's routes (kh.service.api lists them) ---------------------------------------------
def _when(t: float | None) -> str:
    return "never" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def describe(t: TokenRow) -> str:
    """One line: id, state, domains, budget, expiry."""
    doms = ",".join(map(str, t.netids)) or "-"
    budget = "-" if t.max_nodes is None else str(t.max_nodes)
    return f"{t.id:>4} {t.state():<8} {doms:<12} {budget:>5}  {_when(t.expires)}"


@rq.takes(*rq.PRINCIPAL, "allocate_on", "max_nodes", "expires_in")
def route_add(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    netids = rq.integers(body, "allocate_on", MAX_NETID)
    max_nodes = None if body.get("max_nodes") is None else \
        rq.integer(body, "max_nodes", 1, 1, MAX_NODE)
    expires_in = None if body.get("expires_in") is None else \
        rq.integer(body, "expires_in", 1, 1, MAX_LIFETIME)
    row, secret = add(svc, rq.user(body), rq.credential(body), netids, max_nodes, expires_in)
    text = (f"{secret}\ntoken {row.id} of {row.principal}: allocates on "
            f"{','.join(map(str, row.netids)) or 'no domain'}, at most "
            f"{'the quota of' if row.max_nodes is None else row.max_nodes} nodes at once, "
            f"expires {_when(row.expires)}; shown once (khd keeps only its hash)\n")
    return 201, text, {**row.to_json(), "token": secret}


@rq.takes(*rq.PRINCIPAL)
def route_list(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    user = rq.user(body)
    svc.authenticate(user, rq.credential(body))
    rows = svc.store.tokens(user)
    head = f"{'ID':>4} {'STATE':<8} {'DOMAINS':<12} {'NODES':>5}  EXPIRES\n"
    return 200, head + "".join(describe(t) + "\n" for t in rows), [t.to_json() for t in rows]


@rq.takes(*rq.PRINCIPAL)
def route_remove(svc: Service, caller: Caller, body: dict[str, Any], token_id: str) -> Result:
    tid = rq.path_id(token_id, "token")
    revoke(svc, rq.user(body), rq.credential(body), tid)
    return 200, f"token {tid} revoked\n", {"revoked": tid}
