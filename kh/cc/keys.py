"""The control channel's ssh keys: khd's host key file, and a principal's public key line.

``host_key`` makes khd's key on first start and loads it after; ``parse_public_key`` checks and
normalises an OpenSSH public key line a principal registers, so it compares equal to the key a
client offers at login (kh.cc.sshd).
"""

from __future__ import annotations

import base64
from pathlib import Path

import paramiko

from kh.errors import UsageError


def host_key(path: Path) -> paramiko.PKey:
    """khd's ssh host key, made on first start and kept in the state directory."""
    if path.exists():
        return paramiko.RSAKey.from_private_key_file(str(path))
    key = paramiko.RSAKey.generate(2048)
    path.parent.mkdir(parents=True, exist_ok=True)
    key.write_private_key_file(str(path))
    path.chmod(0o600)
    return key


def parse_public_key(text: str) -> tuple[str, str]:
    """An OpenSSH public key line (``type base64 [comment]``, one line of printable ASCII) →
    (normalised "type base64", comment). The base64 is strict, its blob names the same type
    (its first SSH string) and paramiko loads it as a key of that type.

    Raises UsageError (the caller's input: HTTP 400) for anything else."""
    hint = "pass the .pub file's one line, e.g. ssh-ed25519 AAAA... me@host"
    line = text.strip()
    if not line.isascii() or not line.isprintable():
        raise UsageError("not an OpenSSH public key (not one line of printable ASCII)", hint)
    parts = line.split()
    if len(parts) < 2:
        raise UsageError("not an OpenSSH public key (no type and key)", hint)
    kind, b64 = parts[0], parts[1]
    try:
        blob = base64.b64decode(b64, validate=True)
    except ValueError:
        raise UsageError("not an OpenSSH public key (bad base64)", hint) from None
    n = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if n < 0 or blob[4:4 + n] != kind.encode():
        raise UsageError(f"not an OpenSSH public key (its data is not a {kind[:40]!r} key)",
                         hint)
    try:
        key = paramiko.PKey.from_type_string(kind, blob)
        loaded = key.get_name() == kind and key.asbytes() == blob
    except Exception:  # paramiko's parsers raise many kinds on malformed key material
        loaded = False
    if not loaded:  # unknown type, a certificate, or key material cut short or with a tail
        raise UsageError(f"not an OpenSSH public key (not a {kind[:40]!r} key kh can use)",
                         "ssh-ed25519, ssh-rsa or ecdsa-sha2-nistp256/384/521")
    # as the server names a key at login (its canonical base64), so that the two compare equal
    return f"{kind} {base64.b64encode(blob).decode()}", " ".join(parts[2:])
