"""Admission control: principals and their credentials.

A credential is never stored: only a random salt and its scrypt hash. Checks take constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path

from kh.errors import KhError, UsageError

USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# scrypt parameters: ~15 ms per check here, 16 MiB of memory.
N, R, P = 2**14, 8, 1
MAX_CREDENTIAL = 4096


class AuthError(KhError):
    """Wrong or missing credential; the state is left unchanged."""

    exit_code = 3


def check_user(user: str) -> str:
    if not USER_RE.match(user):
        raise UsageError(f"bad principal name {user!r}",
                         "use lower-case letters, digits, '_' and '-', at most 32")
    return user


def read_credential(value: str | None) -> str | None:
    """`-c` takes the credential itself or the path of a file holding it (the paper's
    `-c ./corp1cred`)."""
    if value is None:
        return None
    p = Path(value)
    if ("/" in value or value.startswith(".")) and p.is_file():
        text = p.read_text(encoding="utf-8", errors="strict").strip()
    else:
        text = value
    if not text:
        raise UsageError("empty credential")
    if len(text) > MAX_CREDENTIAL:
        raise UsageError("credential too long", f"at most {MAX_CREDENTIAL} characters")
    return text


def hash_credential(credential: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(credential.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    return salt, digest


def verify(credential: str | None, salt: bytes, digest: bytes, user: str) -> None:
    if credential is None:
        raise AuthError(f"principal {user} needs its credential", "pass it with -c")
    _, got = hash_credential(credential, salt)
    if not hmac.compare_digest(got, digest):
        raise AuthError(f"wrong credential for principal {user}")
