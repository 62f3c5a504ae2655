"""The usage API (docs/api.yaml):

  GET  /v1/usage?principal=&since=&until=&by=   the operator's (root on khd's unix socket):
                                                 everyone's usage, or one principal's
  POST /v1/usage {user, credential | token, since, until, by}
                                                 a principal's own usage; with a token, only
                                                 the allocations that token made

Times and ``by`` as kh.metering.report says. A principal sees nothing from before it was
registered (the usage of a removed principal of the same name stays the operator's). An
unknown principal is 404 for the operator (a principal kh never knew and no usage kept), and
for anyone else the same 403 as a wrong credential; a malformed or reversed range, or a bad
``by``, is 400; nothing is changed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kh.admission import AuthError, check_user
from kh.errors import UsageError
from kh.metering import report
from kh.metering import store as mstore
from kh.service import request as rq
from kh.service import tokens
from kh.service.core import NotFound, Service
from kh.service.request import Caller

Result = tuple[int, str, Any]


def _answer(svc: Service, body: dict[str, Any], principal: str | None,
            token: int | None = None, floor: datetime | None = None,
            removed: bool = False) -> Result:
    since, until = report.time_range(body.get("since"), body.get("until"))
    by = report.check_by(body.get("by"))
    data = report.report(svc.store, since, until, principal, by, token, floor, removed)
    return 200, report.text(data), data


def registered(svc: Service, user: str) -> datetime | None:
    """When principal ``user`` was registered: a principal sees no usage from before it (a
    removed principal of the same name's)."""
    rows = svc.store._rows("SELECT created FROM principals WHERE name=?", (user,))
    return datetime.fromtimestamp(rows[0][0], UTC) if rows else None


def removed(svc: Service, body: dict[str, Any], name: str) -> bool:
    """Whether the operator asks for the removed principals of name ``name`` (``removed``:
    true/false, or 1/0 in a query string), as it must when there is none of that name now."""
    v = body.get("removed")
    if v in (None, "", False, "0", "false"):
        asked = False
    elif v in (True, "1", "true"):
        asked = True
    else:
        raise UsageError(f"`removed` must be true or false, not {str(v)[:20]!r}")
    return asked or svc.store.principal(name) is None


@rq.takes("principal", "since", "until", "by", "removed")
def usage_all(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    """GET /v1/usage: the operator's: everyone's (a removed principal's rows labelled "NAME
    (removed)"), or one principal's (the one of that name now; the removed ones with
    ``removed``, or when there is none now)."""
    if not caller.operator:
        raise AuthError("everyone's usage is the operator's",
                        "as root, on khd's unix socket; a principal asks POST /v1/usage")
    name = body.get("principal") or None
    if name is None:
        if body.get("removed") is not None:
            raise UsageError("`removed` goes with `principal`")
        return _answer(svc, body, None)
    check_user(name)
    if not mstore.known(svc.store, name):
        raise NotFound(f"no principal {name}", "kh principal list shows them")
    return _answer(svc, body, name, removed=removed(svc, body, name))


@rq.takes(*rq.PRINCIPAL, "token", "since", "until", "by")
def usage_own(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    """POST /v1/usage: a principal's own (a token's: its allocations')."""
    user = rq.user(body)
    token = tokens.from_body(body)
    if token is not None:
        row = tokens.authenticate(svc, user, token)
        return _answer(svc, body, user, row.id, registered(svc, user))
    svc.authenticate(user, rq.credential(body))
    return _answer(svc, body, user, floor=registered(svc, user))


ROUTES = [("GET", r"/v1/usage", usage_all), ("POST", r"/v1/usage", usage_own)]
