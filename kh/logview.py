"""Showing a node's console log to the operator: text made safe for a terminal, and following
the log across rotation.

A node's console carries whatever its principal printed, escape sequences included; `kh logs`
must not let a principal drive the operator's terminal (retitle it, rewrite what was shown,
answer back through it), so control characters are shown in `cat -v` style. `kh console` is
raw by design and says so.
"""

from __future__ import annotations

import codecs
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

# C0 controls but tab and newline, DEL, and the C1 controls (U+0080..U+009F, which some
# terminals obey as ESC-sequences), as they come out of a UTF-8 decode with "replace".
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")


def _caret(m: re.Match[str]) -> str:
    c = ord(m.group())
    if c < 0x20:
        return "^" + chr(c + 0x40)
    if c == 0x7F:
        return "^?"
    return f"M-^{chr(c - 0x80 + 0x40)}"


def safe_text(text: str) -> str:
    """``text`` as a terminal only displays it: controls other than tab and newline in caret
    notation (ESC → ``^[``, CR → ``^M``, DEL → ``^?``, C1 → ``M-^X``)."""
    return _CONTROL.sub(_caret, text)


def one_line(text: str) -> str:
    """``text`` as one line a terminal only displays (a `kh: ...` error line): safe_text, and
    newlines as ``^J`` too."""
    return safe_text(text).replace("\n", "^J")


def terminal_writer(write: Callable[[str], None]) -> Callable[[bytes], None]:
    """A sink for console bytes that hands ``write`` safe text; a UTF-8 character split
    between two chunks stays whole (invalid UTF-8 becomes U+FFFD)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def sink(data: bytes) -> None:
        text = decoder.decode(data)
        if text:
            write(safe_text(text))

    return sink


def follow(path: Path, out: Callable[[bytes], None], *, follow: bool,
           poll: float = 0.2, stop: Callable[[], bool] = lambda: False) -> None:
    """Hand ``path``'s bytes to ``out``; with ``follow``, keep going as it grows and across
    rotation (the file renamed away and a new one made at ``path``: the old one is read to its
    end first, then the new one from its start). Returns at the end without ``follow``, or
    when ``stop()`` is true. Raises OSError when ``path`` cannot be opened at first."""
    f = open(path, "rb")
    try:
        while True:
            data = f.read()
            if data:
                out(data)
                continue
            if not follow or stop():
                return
            try:
                rotated = os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                rotated = False  # between the rename and the new file: wait for it
            if rotated:
                rest = f.read()  # whatever reached the old file after our last read
                if rest:
                    out(rest)
                f.close()
                f = open(path, "rb")
                continue
            time.sleep(poll)
    finally:
        f.close()
