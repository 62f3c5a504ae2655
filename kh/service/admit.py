"""Admission of a principal's request to khd: its credential checked without khd's lock (scrypt
takes ~15 ms), refused checks rate-limited (kh.admission.Limiter), then khd's lock held for
the request while the principal is still as it was checked. kh.service.core.Service's
``authenticate`` and ``admitted`` are these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kh import admission
from kh.service.request import current_caller

if TYPE_CHECKING:
    from kh.service.core import Service


@dataclass(frozen=True)
class Admitted:
    """A principal whose credential was checked: its stored (salt, hash) as seen then (None:
    a new principal), and for a new one the salted hash to store once the request succeeds."""

    user: str
    seen: tuple[bytes, bytes] | None
    pending: tuple[bytes, bytes] | None


def authenticate(svc: Service, user: str, credential: str | None, *, register: bool = False,
                 source: str | None = None) -> Admitted:
    """Check a principal's credential, without khd's lock. An unknown principal and a wrong
    credential get the same answer after the same work (admission.AuthError). With
    ``register`` an unknown principal is new: its salted hash comes back, to be stored once
    the request has succeeded (a refused request leaves no trace).

    Refused checks are rate-limited per ``source`` and per principal (admission.Limiter):
    past the limit, admission.Throttled (HTTP 429) comes before any hash is computed.
    ``source`` defaults to the API caller's (request.current_caller; the operator on the
    unix socket is not limited: it can read the state anyway); None outside a request
    (the ssh channel, until it passes its peer) limits by principal only."""
    admission.check_user(user)
    if credential is not None:
        admission.check_credential(credential)
    caller = current_caller()
    if source is None and caller is not None:
        source = caller.source
    limited = not (caller is not None and caller.operator and source == caller.source)
    known = svc.store.principal(user)
    if known is None and register:
        if credential is None:
            raise admission.missing(user)
        if limited and source is not None:  # the operator registers as many as it likes
            svc.limiter.registering(source)
        return Admitted(user, None, admission.hash_credential(credential))
    if limited and credential is not None:
        svc.limiter.check(user, source)
    try:
        admission.verify(credential, known, user)
    except admission.AuthError:
        if limited and credential is not None:
            svc.limiter.failed(user, source)
        raise
    if limited:
        svc.limiter.succeeded(user, source)
    return Admitted(user, known, None)


@contextlib.contextmanager
def admitted(svc: Service, user: str, credential: str | None, *, register: bool = False,
             source: str | None = None) -> Iterator[Admitted]:
    """Authenticate outside the lock (``svc.authenticate``), then hold khd's lock for the
    request while the principal is still as it was checked (a concurrent first use may have
    registered it in between: then the check is made again; refused after three tries)."""
    for _ in range(3):
        adm = svc.authenticate(user, credential, register=register, source=source)
        with svc.lock:
            if svc.store.principal(user) != adm.seen:
                continue
            yield adm
            return
    raise admission.refused(user)
