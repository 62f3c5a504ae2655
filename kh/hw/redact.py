"""Secrets out of console logs: the boot keys ``kh.token=`` and ``kh.cred=`` (issue 11).

A principal hands a disk server its token as a boot key, typed at U-Boot (``setenv khargs
"${khargs} kh.token=..."``, which U-Boot echoes) and printed again by the kernel (``Kernel
command line: ...``). khd logs every console line (kh.hw.console.ConsoleLog), and `kh logs`
replays that file, so each logged line has those values cut to their first KEEP characters
and MARK: enough to tell which token it was (with `kh token list`), never enough to use.
"""

from __future__ import annotations

import re

KEEP = 4  # characters of a secret left in the log
MARK = b"..."
# The value, quoted or not (kh.token="..." typed at U-Boot), runs to a blank, a quote (U-Boot's
# setenv quoting) or the end of the line.
_SECRET = re.compile(rb"(kh\.(?:token|cred)=[\"']?)([^\s'\"]*)")


def _cut(m: re.Match[bytes]) -> bytes:
    value = m.group(2)
    return m.group(1) + (value if len(value) <= KEEP else value[:KEEP] + MARK)


def redact(line: bytes) -> bytes:
    """``line`` with every ``kh.token=``/``kh.cred=`` value cut to KEEP characters and MARK
    (values that short already are left as they are)."""
    if b"kh." not in line:
        return line
    return _SECRET.sub(_cut, line)
