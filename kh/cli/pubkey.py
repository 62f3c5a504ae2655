"""`kh key add`'s file: read and checked on the client, so that only one OpenSSH public key
line ever leaves it; a private key (a common slip: ``~/.ssh/id_ed25519`` for its ``.pub``) is
refused here, never sent to khd (docs/control-channel.md, "Keys")."""

from __future__ import annotations

from pathlib import Path

from kh.errors import UsageError

MAX_FILE = 16 * 1024  # bytes of a key file read: khd takes a key line of at most this
# What begins a private key in the formats ssh-keygen, OpenSSL and PuTTY write.
PRIVATE_MARKS = (b"PRIVATE KEY-----", b"PuTTY-User-Key-File-", b"SSH PRIVATE KEY FILE")


def read_public_key(path: str | Path) -> str:
    """The OpenSSH public key line (``type base64 [comment]``) in the file at ``path``, as
    kh.cc.keys.parse_public_key normalises it. The file is read once (a pipe works), at most
    MAX_FILE bytes. UsageError, naming the file but none of its content, for a private key or
    anything that is not one public key line; OSError's reason when it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if any(mark in data for mark in PRIVATE_MARKS):
        raise UsageError(f"{path} holds a private key, which never leaves this host",
                         f"pass its public half, e.g. {path}.pub")
    if len(data) > MAX_FILE:
        raise UsageError(f"{path} is over {MAX_FILE} bytes: not an OpenSSH public key",
                         "pass a .pub file's one line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not text: not an OpenSSH public key",
                         "pass a .pub file's one line") from None
    from kh.cc.keys import parse_public_key
    try:
        key, comment = parse_public_key(text)
    except UsageError as e:
        raise UsageError(f"{path}: {e.message}", e.hint) from None
    return f"{key} {comment}".rstrip()
