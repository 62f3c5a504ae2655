"""Where a command finds the principal's credential, so that no secret is on a command line.

The rules, the same for khget, khdo and the `kh` commands that take `-u USER`:

- ``-c FILE`` reads the credential from FILE (a path, e.g. the paper's ``-c ./corp1cred``);
- ``-c -`` reads it from standard input (not khdo's: its stdin is khget's text object);
- without ``-c``, the environment variable ``KH_CREDENTIAL`` holds the credential itself
  (an empty one counts as unset);
- otherwise there is none (khdo then tries ssh keys).

What is read is the secret up to its end, less one trailing line ending (``\\n`` or
``\\r\\n``): what ``echo SECRET > FILE`` writes reads back as SECRET. It must be valid UTF-8,
not empty, and at most MAX_CREDENTIAL bytes. Only the CLI reads files: khd takes the
credential's bytes and never opens a path a client names.
"""

from __future__ import annotations

import os
import sys
from typing import BinaryIO

from kh.admission import MAX_CREDENTIAL
from kh.errors import UsageError

ENV = "KH_CREDENTIAL"
HELP = ("File holding the principal's credential; '-' reads it from stdin. "
        f"Without -c, ${ENV} holds the credential itself.")
_HINT = f"-c takes a file holding the credential, or '-' for stdin; ${ENV} holds the secret"


def _decode(data: bytes, where: str) -> str:
    if len(data) > MAX_CREDENTIAL + 2:
        raise UsageError(f"the credential in {where} is too long",
                         f"at most {MAX_CREDENTIAL} bytes")
    if data.endswith(b"\n"):
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"the credential in {where} is not UTF-8 text") from None
    if not text:
        raise UsageError(f"the credential in {where} is empty", _HINT)
    if len(data) > MAX_CREDENTIAL:
        raise UsageError(f"the credential in {where} is too long",
                         f"at most {MAX_CREDENTIAL} bytes")
    return text


def _read(stream: BinaryIO) -> bytes:
    return stream.read(MAX_CREDENTIAL + 3)


def resolve(option: str | None, *, stdin_free: bool = True) -> str | None:
    """The credential by the rules above, from ``-c``'s value ``option``."""
    if option == "-":
        if not stdin_free:
            raise UsageError("-c - cannot read the credential here: stdin carries khget's "
                             "text object", f"use -c FILE or ${ENV}")
        return _decode(_read(sys.stdin.buffer), "stdin")
    if option is not None:
        if not option:
            raise UsageError("-c needs a file name", _HINT)
        try:
            with open(option, "rb") as f:
                data = _read(f)
        except FileNotFoundError:
            raise UsageError(f"no credential file {option!r}", _HINT) from None
        except OSError as e:
            raise UsageError(f"cannot read credential file {option!r}: {e.strerror}",
                             _HINT) from None
        return _decode(data, option)
    env = os.environ.get(ENV)
    if not env:
        return None
    return _decode(os.fsencode(env), f"${ENV}")
