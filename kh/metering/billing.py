"""`kh bill` in khd: a principal's bill for a period, from the meter's records and a price list
(kh.metering.rating), and the API's routes for it.

Which price list: a list sent with the request (what-if: its text, at most prices.MAX_BYTES;
khd never opens a path a client names), else the operator's ``<state dir>/prices.toml`` when
there is one, else the default shipped with kh (kh/metering/default-prices.toml).

Who sees what, as for usage: a principal its own bill, with its credential (``POST /v1/bill``);
the operator (root on khd's unix socket) anyone's (``GET /v1/bill?principal=&period=``, or a
POST without a credential). Rating only reads: a bill changes nothing in the state.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kh.admission import AuthError, check_user
from kh.errors import KhError, UsageError
from kh.metering import prices as pricing
from kh.metering import rating, routes
from kh.metering import store as mstore
from kh.metering.query import REMOVED
from kh.metering.usage import gaps, usage_records
from kh.service import request as rq

if TYPE_CHECKING:
    from kh.service.core import Service
    from kh.service.request import Caller

DEFAULT = Path(__file__).with_name("default-prices.toml")
DEFAULT_NAME = "kh's default price list"
Result = tuple[int, str, Any]


class ServicePricesBroken(KhError):
    """The operator's price list in the state directory cannot be used (a 500: the service's
    fault, not the caller's)."""


def service_prices(state_dir: Path) -> pricing.PriceList:
    """The operator's ``<state_dir>/prices.toml``, else the default. Read at every bill, so
    a changed file counts from the next bill on; ServicePricesBroken when it is bad. Either is
    named by what it is, never by its path on the host (callers may be principals)."""
    own = state_dir / "prices.toml"
    if not own.exists():
        return pricing.parse(DEFAULT.read_bytes(), DEFAULT_NAME)
    where = "the service's price list (<state dir>/prices.toml)"
    try:
        with open(own, "rb") as f:
            data = f.read(pricing.MAX_BYTES + 1)
        return pricing.parse(data, where)
    except OSError as e:
        raise ServicePricesBroken(f"{where} cannot be read: {e.strerror}",
                                  "the operator fixes it, or removes it for kh's default") \
            from None
    except pricing.PriceError as e:
        raise ServicePricesBroken(e.message,
                                  "the operator fixes it, or removes it for kh's default") \
            from None


def this_month(zone: Any, now: datetime | None = None) -> str:
    """``YYYY-MM``, the current month of the price list's zone."""
    return (now or datetime.now(UTC)).astimezone(zone).strftime("%Y-%m")


def bill(svc: Service, principal: str, period_text: str | None,
         plist: pricing.PriceList, floor: datetime | None = None, removed: bool = False
         ) -> rating.Bill:
    """The bill for the period (default: this month) of principal ``principal`` (the one of
    that name now), or with ``removed`` of the removed principals of that name (the bill's
    principal reads "NAME (removed)"; kh.metering.query.who), of the samples taken from
    ``floor`` on (the principal's registration, when the principal asks). NotFound-like
    UsageError is the caller's business; this reads the meter's tables only."""
    text = period_text or this_month(plist.zone)
    start, end = rating.period(text, plist)
    step = rating.step_for(plist, start, end)
    label = principal + REMOVED if removed else principal
    lo = start if floor is None else max(start, floor)
    if lo >= end:  # registered after the period
        return rating.rate([], plist, label, text, start, end, [])
    records = usage_records(svc.store, lo, end, principal, step=step, by="principal",
                            removed=removed)
    return rating.rate(records, plist, label, text, start, end,
                       gaps(svc.store, lo, end, principal, removed))


def _prices(svc: Service, body: dict[str, Any]) -> pricing.PriceList:
    sent = body.get("prices")
    if sent is None:
        return service_prices(svc.cfg.state_dir)
    if not isinstance(sent, str):
        raise UsageError("`prices` must be a price list's text (TOML)")
    return pricing.parse(sent.encode("utf-8", "surrogatepass")[:pricing.MAX_BYTES + 1],
                         "the price list sent")


def _period(body: dict[str, Any]) -> str | None:
    p = body.get("period")
    if p is None or p == "":
        return None
    if not isinstance(p, str) or len(p) > 10:
        raise UsageError("`period` must be YYYY-MM or YYYY-MM-DD")
    return p


def _known(svc: Service, name: str) -> None:
    """The operator asks for a principal of the state, or a removed one whose usage is kept
    (its last bill); NotFound (404) otherwise."""
    from kh.service.core import NotFound
    if not mstore.known(svc.store, name):
        raise NotFound(f"no principal {name}", "kh principal list shows them")


@rq.takes("principal", "period", "removed")
def route_get(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    """GET /v1/bill?principal=NAME&period=2026-11[&removed=true]: the operator's, for anyone
    (the principal of that name now; the removed ones of that name with ``removed``, or when
    there is none now)."""
    if not caller.operator:
        raise AuthError("a bill over TCP needs the principal's credential",
                        "POST /v1/bill with user and credential")
    name = body.get("principal")
    if not isinstance(name, str) or not name:
        raise UsageError("`principal` is required", "GET /v1/bill?principal=NAME")
    check_user(name)
    _known(svc, name)
    return _answer(bill(svc, name, _period(body), _prices(svc, {}),
                        removed=routes.removed(svc, body, name)))


@rq.takes(*rq.PRINCIPAL, "period", "prices", "removed")
def route_post(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    """POST /v1/bill {user, credential, period, prices}: a principal's own bill (the operator
    needs no credential, and may ask for ``removed`` as in GET), rated with the price list
    sent, else the service's."""
    user = rq.user(body)
    cred = rq.credential(body)
    if cred is None and caller.operator:
        check_user(user)
        _known(svc, user)
        floor, removed = None, routes.removed(svc, body, user)
    else:
        if body.get("removed") is not None:
            raise UsageError("`removed` is the operator's", "a principal's bill is its own")
        svc.authenticate(user, cred)
        floor, removed = routes.registered(svc, user), False
    plist = _prices(svc, body)  # after the credential: a stranger learns nothing by it
    return _answer(bill(svc, user, _period(body), plist, floor, removed))


def _answer(b: rating.Bill) -> Result:
    return 200, text(b), b.to_json()


def text(b: rating.Bill) -> str:
    """The bill as `kh bill` prints it."""
    p = b.prices
    zone = p.zone
    lines = [f"bill for {b.principal}, {b.period} ({b.start.astimezone(zone):%Y-%m-%d %H:%M} "
             f"to {b.end.astimezone(zone):%Y-%m-%d %H:%M} {p.timezone}), prices: "
             f"{p.name or p.source} (sha256 {p.sha256[:12]})"]
    rows = [("ENTRY", "QUANTITY", "DOMAIN", "RATE", "AMOUNT", "PRICE", "CHARGE")]
    for x in b.lines:
        per = "" if x.per == 1 else f"/{rating.num(x.per)}"
        rows.append((x.entry, x.quantity.value, x.domain.value if x.domain else "-", x.rate,
                     f"{rating.num(x.amount)} {x.unit}", rating.num(x.price) + per,
                     str(x.charge)))
    rows.append(("total", "", "", "", "", p.currency, str(b.total)))
    width = [max(len(r[i]) for r in rows) for i in range(7)]
    for r in rows:  # the first four columns to the left, the figures to the right
        lines.append("  ".join([*(c.ljust(w) for c, w in zip(r[:4], width, strict=False)),
                                *(c.rjust(w) for c, w in zip(r[4:], width[4:],
                                                             strict=False))]).rstrip())
    if b.unpriced:
        lines.append("not priced (free): " + ", ".join(
            f"{u.quantity.value}{' ' + u.domain.value if u.domain else ''} "
            f"{rating.num(u.amount)} {u.unit}" for u in b.unpriced))
    for g in b.gaps:
        lines.append(f"not metered: node {g.node} (allocation {g.allocation}) {g.what} from "
                     f"{g.start.astimezone(zone):%Y-%m-%d %H:%M:%S} to "
                     f"{g.end.astimezone(zone):%Y-%m-%d %H:%M:%S} (khd could not see it)")
    return "\n".join(lines) + "\n"


ROUTES = [("GET", r"/v1/bill", route_get), ("POST", r"/v1/bill", route_post)]
