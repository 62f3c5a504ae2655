"""Admission control: principals and their credentials.

A credential is a secret string, never a path: khd reads no file on a caller's behalf (only the
CLI reads `-c FILE`, see kh.cli.credential). It is never stored either: only a random salt and
its scrypt hash. A check takes the same time, and gives the same answer, whether the principal
is unknown or the credential wrong, so principals cannot be enumerated through it. Failed
checks are rate-limited (Limiter) per source and per principal, before the hash is computed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kh import peer
from kh.errors import KhError, UsageError

# Whole-string, ASCII-only match: "alice\n" or a non-ASCII look-alike is not a name.
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}", re.ASCII)
# scrypt parameters: ~15 ms per check here, 16 MiB of memory.
N, R, P = 2**14, 8, 1
MAX_CREDENTIAL = 4096  # bytes of UTF-8
# scrypt computations at once, in all of khd: each holds 128·N·R = 16 MiB while it runs, and
# the allocator may keep what a thread freed in that thread's arena, so many logins checked at
# once (the API's workers and every ssh connection's thread) grew khd by hundreds of MiB. Two
# keep both cores busy; more waiting callers cost nothing but time, which the rate limits
# (Limiter, and the ssh channel's caps on logins under way) already bound.
SCRYPT_AT_ONCE = 2
_scrypt_slots = threading.BoundedSemaphore(SCRYPT_AT_ONCE)
# What an unknown principal's credential is checked against, so that refusing it costs what
# refusing a wrong one does.
_DUMMY_SALT = b"kh-no-such-principal"


class AuthError(KhError):
    """Wrong or missing credential; the state is left unchanged."""

    exit_code = 3


def check_user(user: str) -> str:
    if not isinstance(user, str) or not USER_RE.fullmatch(user):
        raise UsageError(f"bad principal name {user!r}",
                         "use lower-case letters, digits, '_' and '-', at most 32")
    return user


def check_credential(value: object) -> str:
    """A credential as the API receives it: a non-empty string of at most MAX_CREDENTIAL bytes
    of UTF-8. Never a path: nothing is read on the caller's behalf."""
    if not isinstance(value, str):
        raise UsageError("`credential` must be a string (the secret itself)")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise UsageError("the credential is not valid UTF-8") from None
    if size == 0:
        raise UsageError("empty credential")
    if size > MAX_CREDENTIAL:
        raise UsageError("credential too long", f"at most {MAX_CREDENTIAL} bytes")
    if "\0" in value:
        raise UsageError("the credential contains a NUL byte")
    return value


def source_of(address: str) -> str:
    """A peer's IP address (text) → its *source*, as every per-source limit counts it (the
    API's connections and refused credentials, the ssh channel's logins): the address itself,
    an IPv4-mapped IPv6 address as its IPv4 one, and all of loopback (127.0.0.0/8, ::1) as the
    one source ``loopback``, since any local user can pick an address there (source_of_peer
    tells local users apart by uid instead). Anything that is not an address (``unix:uid=N``,
    ``loopback:uid=N``) is returned as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # one host, one source, however it is written
    return "loopback" if ip.is_loopback else str(ip)


def source_of_peer(sock: socket.socket, address: str) -> str:
    """The source of an accepted TCP connection ``sock`` from ``address``: a fabric address
    is its own source; a loopback peer is the local user that owns the connecting socket,
    ``loopback:uid=N`` (kh.peer.loopback_peer_uid, from the kernel), so one local user's
    connections and failed guesses never count against another's. A loopback peer whose
    socket is already gone is ``loopback``."""
    source = source_of(address)
    if source != "loopback":
        return source
    uid = peer.loopback_peer_uid(sock)
    return source if uid is None else f"loopback:uid={uid}"


def hash_credential(credential: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    """(salt, 32-byte scrypt hash) of ``credential``, with a new random 16-byte salt unless one
    is given. At most SCRYPT_AT_ONCE run at once in the process: a caller may wait its turn."""
    salt = salt or os.urandom(16)
    with _scrypt_slots:
        digest = hashlib.scrypt(credential.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    return salt, digest


def refused(user: str) -> AuthError:
    """The one answer for an unknown principal and a wrong credential alike."""
    return AuthError(f"credential refused for principal {user}",
                     "check -c FILE or KH_CREDENTIAL; a new principal registers with khget")


def missing(user: str) -> AuthError:
    return AuthError(f"principal {user} needs its credential",
                     "pass -c FILE, -c - (stdin) or KH_CREDENTIAL")


def verify(credential: str | None, known: tuple[bytes, bytes] | None, user: str) -> None:
    """Check ``credential`` against ``known`` (salt, hash), or against nothing when the
    principal is unknown: the same work and the same refusal either way."""
    if credential is None:
        raise missing(user)
    salt, digest = known if known is not None else (_DUMMY_SALT, b"")
    _, got = hash_credential(credential, salt)
    if not hmac.compare_digest(got, digest) or known is None:
        raise refused(user)


class Throttled(AuthError):
    """Too many refused credentials lately (HTTP 429): refused without checking this one.
    ``retry_after``: whole seconds until the next attempt is checked again."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, f"try again in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass(frozen=True)
class Rate:
    """A token bucket's shape: ``burst`` failures at once, then one per 1/``per_second`` s."""

    burst: int
    per_second: float


# Per source (source_of_peer: a fabric address, a local user's uid on loopback, `unix:uid=N`):
# a person who mistypes never meets it, a guesser gets one guess per 2 s after a burst of 10.
PER_SOURCE = Rate(10, 0.5)
# Per principal, over all sources: it bounds guessing one principal's credential from many
# sources (a principal's nodes can take many fabric addresses) to about one a second. One
# source alone can never empty it (its own bucket is smaller and refills slower), so a flood
# from one source does not lock the principal out anywhere else.
PER_PRINCIPAL = Rate(30, 1.0)
# New principals per source (a principal registers itself on first use): every principal may
# hold --domain-quota of the 251 private domain ids, so without this one local user could make
# principals until no id is left for anyone (seen: 16 principals in 28 s). 4 at once, then one
# an hour: one source can hold at most 4 quotas' worth of ids, plus one quota an hour.
PER_SOURCE_REGISTRATIONS = Rate(4, 1 / 3600)
# Buckets tracked per kind; a bucket that has refilled is forgotten, so this is only reached
# under attack from many sources or names at once (then the fullest buckets go first).
MAX_TRACKED = 4096
# A (principal, source) pair whose credential was accepted is trusted this long: a flood from
# other sources that empties the source's or the principal's bucket does not lock the
# principal out of where it has logged in from before (only the pair's own bucket applies).
TRUST_SECONDS = 24 * 3600.0


class Limiter:
    """Token buckets of failed credential checks, by source, by principal name (known or
    not: an unknown principal is limited like a known one, so answers do not tell them apart)
    and by the pair. check() before the hash, failed() after a refusal, succeeded() after an
    acceptance. A pair that succeeded lately is limited by its own bucket alone, so floods
    from elsewhere cannot lock a principal out of a source it has used; one that shares its
    source (all of loopback is one) still can, for as long as it keeps failing. Thread-safe;
    memory is bounded by MAX_TRACKED entries per kind."""

    def __init__(self, per_source: Rate = PER_SOURCE, per_principal: Rate = PER_PRINCIPAL,
                 max_tracked: int = MAX_TRACKED,
                 clock: Callable[[], float] = time.monotonic,
                 registrations: Rate = PER_SOURCE_REGISTRATIONS) -> None:
        self.rates = {"source": per_source, "principal": per_principal, "pair": per_source,
                      "register": registrations}
        self.max_tracked = max_tracked
        self.clock = clock
        self.buckets: dict[str, dict[str, _Bucket]] = {"source": {}, "principal": {},
                                                       "pair": {}, "register": {}}
        self.trusted: dict[str, float] = {}  # pair -> when its credential was last accepted
        self.lock = threading.Lock()

    @staticmethod
    def _pair(user: str, source: str | None) -> str | None:
        return None if source is None else f"{user}\0{source}"

    def _is_trusted(self, pair: str | None, now: float) -> bool:
        at = self.trusted.get(pair) if pair is not None else None
        return at is not None and now - at < TRUST_SECONDS

    def succeeded(self, user: str, source: str | None) -> None:
        """``user``'s credential was accepted from ``source``: trust the pair."""
        pair = self._pair(user, source)
        if pair is None:
            return
        with self.lock:
            now = self.clock()
            self.trusted.pop(pair, None)
            if len(self.trusted) >= self.max_tracked:  # the oldest acceptance goes first
                for old in [k for k, t in self.trusted.items() if now - t >= TRUST_SECONDS]:
                    del self.trusted[old]
                while len(self.trusted) >= self.max_tracked:
                    del self.trusted[next(iter(self.trusted))]
            self.trusted[pair] = now

    def _level(self, kind: str, key: str, now: float) -> float:
        """The bucket's tokens now; a full bucket is forgotten (it is the default)."""
        rate, table = self.rates[kind], self.buckets[kind]
        b = table.get(key)
        if b is None:
            return rate.burst
        b.tokens = min(rate.burst, b.tokens + (now - b.stamp) * rate.per_second)
        b.stamp = now
        if b.tokens >= rate.burst:
            del table[key]
        return b.tokens

    def check(self, user: str, source: str | None) -> None:
        """Raise Throttled when ``source`` (None: not known, e.g. the ssh channel) or
        ``user`` has no failure left to spend."""
        pair = self._pair(user, source)
        with self.lock:
            now = self.clock()
            kinds: list[tuple[str, str | None, str]] = []
            if not self._is_trusted(pair, now):
                kinds += [("source", source, f"from {source}"),
                          ("principal", user, f"for principal {user}")]
            kinds.append(("pair", pair, f"for principal {user} from {source}"))
            for kind, key, what in kinds:
                if key is None:
                    continue
                level = self._level(kind, key, now)
                if level < 1:
                    wait = math.ceil((1 - level) / self.rates[kind].per_second)
                    raise Throttled(f"too many refused credentials {what}", max(1, wait))

    def registering(self, source: str) -> None:
        """A new principal from ``source``: spend one of its registrations, or raise
        Throttled (HTTP 429) when it has none left."""
        with self.lock:
            now = self.clock()
            level = self._level("register", source, now)
            if level < 1:
                wait = math.ceil((1 - level) / self.rates["register"].per_second)
                raise Throttled(f"too many new principals from {source}", max(1, wait))
            table = self.buckets["register"]
            if source not in table and len(table) >= self.max_tracked:
                self._evict("register", now)
            table[source] = _Bucket(level - 1, now)

    def failed(self, user: str, source: str | None) -> None:
        """Spend one failure of ``source``'s and ``user``'s."""
        with self.lock:
            now = self.clock()
            for kind, key in (("source", source), ("principal", user),
                              ("pair", self._pair(user, source))):
                if key is None:
                    continue
                level = self._level(kind, key, now)
                table = self.buckets[kind]
                if key not in table and len(table) >= self.max_tracked:
                    self._evict(kind, now)
                table[key] = _Bucket(max(0.0, level - 1), now)

    def _evict(self, kind: str, now: float) -> None:
        table = self.buckets[kind]
        for key in list(table):
            self._level(kind, key, now)  # forgets the refilled ones
        while len(table) >= self.max_tracked:
            del table[max(table, key=lambda k: table[k].tokens)]
