"""Admission control: principals and their credentials.

A credential is a secret string, never a path: khd reads no file on a caller's behalf (only the
CLI reads `-c FILE`, see kh.cli.credential). It is never stored either: only a random salt and
its scrypt hash. A check takes the same time, and gives the same answer, whether the principal
is unknown or the credential wrong, so principals cannot be enumerated through it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

from kh.errors import KhError, UsageError

# Whole-string, ASCII-only match: "alice\n" or a non-ASCII look-alike is not a name.
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}", re.ASCII)
# scrypt parameters: ~15 ms per check here, 16 MiB of memory.
N, R, P = 2**14, 8, 1
MAX_CREDENTIAL = 4096  # bytes of UTF-8
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


def hash_credential(credential: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    salt = salt or os.urandom(16)
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
