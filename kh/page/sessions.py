"""The live page's logins: sessions (a random cookie value mapped to who logged in), one-time
login links, and the operator's token file. In memory only: a khd restart logs everyone out.

A session is a principal's name, or None for the operator. Its cookie value is 32 random bytes
(URL-safe base64); only its SHA-256 is kept, so the table leaks no usable cookie. A session
ends IDLE seconds after its last use or LIFETIME after the login, whichever comes first, and at
logout. At most MAX_SESSIONS live at once (the oldest go first), MAX_PER_PRINCIPAL per
principal. A one-time link (`kh page`) is good for LINK_TTL seconds and one use.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kh.errors import KhError

IDLE = 30 * 60  # seconds without a request before a session ends
LIFETIME = 8 * 3600  # seconds from the login, whatever the use
MAX_SESSIONS = 256
MAX_PER_PRINCIPAL = 8
LINK_TTL = 60  # seconds a one-time login link is good for
MAX_LINKS = 64
OPERATOR = None  # a session's principal when it is the operator's


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("ascii", "replace")).hexdigest()


@dataclass(frozen=True)
class Session:
    """Who (a principal's name, or None: the operator), since when, last used (time.time())."""

    principal: str | None
    created: float
    used: float

    @property
    def operator(self) -> bool:
        return self.principal is None


class Sessions:
    """Live sessions and one-time links, thread-safe (waitress's workers share it)."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._links: dict[str, tuple[str | None, float]] = {}
        self.now: Callable[[], float] = clock or time.time

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.used >= IDLE or now - s.created >= LIFETIME

    def _sweep(self, now: float) -> None:
        for k in [k for k, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[k]
        for k in [k for k, (_, t) in self._links.items() if now - t > LINK_TTL]:
            del self._links[k]

    def create(self, principal: str | None) -> str:
        """A new session for ``principal`` (None: the operator); its cookie value."""
        value = secrets.token_urlsafe(32)
        now = self.now()
        with self._lock:
            self._sweep(now)
            mine = sorted((s.created, k) for k, s in self._sessions.items()
                          if s.principal == principal)
            while len(mine) >= MAX_PER_PRINCIPAL:
                del self._sessions[mine.pop(0)[1]]
            if len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions, key=lambda k: self._sessions[k].created)
                del self._sessions[oldest]
            self._sessions[_digest(value)] = Session(principal, now, now)
        return value

    def get(self, value: str | None) -> Session | None:
        """The live session whose cookie is ``value`` (its use noted), or None."""
        if not value or len(value) > 100:
            return None
        key = _digest(value)
        now = self.now()
        with self._lock:
            s = self._sessions.get(key)
            if s is None:
                return None
            if self._expired(s, now):
                del self._sessions[key]
                return None
            s = Session(s.principal, s.created, now)
            self._sessions[key] = s
            return s

    def end(self, value: str | None) -> None:
        with self._lock:
            self._sessions.pop(_digest(value or ""), None)

    def end_principal(self, principal: str) -> None:
        """Every session of ``principal`` (it was removed)."""
        with self._lock:
            for k in [k for k, s in self._sessions.items() if s.principal == principal]:
                del self._sessions[k]

    def link(self, principal: str | None) -> str:
        """A one-time login code for ``principal`` (None: the operator)."""
        code = secrets.token_urlsafe(32)
        now = self.now()
        with self._lock:
            self._sweep(now)
            if len(self._links) >= MAX_LINKS:
                del self._links[min(self._links, key=lambda k: self._links[k][1])]
            self._links[_digest(code)] = (principal, now)
        return code

    def redeem(self, code: str) -> tuple[bool, str | None]:
        """(True, the principal or None for the operator) for a live code, now used up;
        (False, None) when it is unknown, used or expired."""
        if len(code) > 100:
            return False, None
        now = self.now()
        with self._lock:
            got = self._links.pop(_digest(code), None)
        if got is None or now - got[1] > LINK_TTL:
            return False, None
        return True, got[0]


def write_operator_token(path: Path) -> None:
    """A new random operator token in ``path`` (mode 600, replacing any), readable by root
    alone: whoever can read it is the operator."""
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    os.replace(tmp, path)


def read_operator_token(path: Path) -> str:
    """The token in ``path``; KhError if it is missing, not a regular file of ours, or
    readable by anyone but its owner."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise KhError(f"cannot read the page's operator token {path}: {e.strerror}",
                      "as root, with khd running with a page port") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or st.st_uid != os.geteuid():
            raise KhError(f"{path} is not a private file of this user",
                          "khd writes it mode 600 at its start")
        return f.read(200).strip()


def same(a: str, b: str) -> bool:
    """Constant-time comparison of two tokens."""
    return hmac.compare_digest(a.encode("ascii", "replace"), b.encode("ascii", "replace"))
