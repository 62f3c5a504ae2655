"""How a command travels to a node's shell over its serial console, and how its end is found.

The lines kh types (``typed_lines``: the command as a printf format between printed begin and
end markers, in several lines when it is long), how much of the output read so far can be
handed on (``held_back``), and the kernel's lines that say the node left Linux meanwhile
(``LEFT_LINUX``). Pure functions of text: kh.hw.nodeshell drives them over a console.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from kh.errors import UsageError

# The longest line kh types at a node's shell, newline included. Busybox ash's line editor keeps
# 1022 characters of a line and drops the rest without a word (FEATURE_EDITING_MAX_LEN 1024; the
# kernel's canonical mode keeps 4095): a longer line would run cut short, so a longer command
# goes over in several lines.
LINE_MAX = 960
# printf format units for each byte: printable ASCII as itself, but for the quote that delimits
# the format, the backslash and the percent sign; anything else as a 3-digit octal escape (a
# control character would be a line-editing key, a tab a completion, a newline the end of the
# line). Three digits always, so a following digit is never taken into the escape.
_FORMAT = [chr(b) if 0x20 <= b < 0x7F and chr(b) not in "'\\%" else f"\\{b:03o}"
           for b in range(256)]
_FORMAT[ord("%")] = "%%"
_BEGIN = "printf '%s_B\\n' {tok}; "
_END = "printf '%s_E%d\\n' {tok} $?"
# Runs the script in a subshell, so `exit N` (or exec, or set -e) ends the subshell and never
# the console's shell; stdin is /dev/null, so a command that reads it can never swallow the
# lines kh types next.
_RUN = _BEGIN + '( eval "$(printf {fmt})" ) </dev/null; ' + _END
_CHUNK = "{var}={prev}'{body}'; printf '%s_C%d\\n' {tok} {i}"
# The node leaving Linux while a command runs: the kernel's halt, power-off and restart lines
# (a ppce500 kernel cannot power the machine off: `poweroff -f` halts it, "System halted"), a
# panic, or U-Boot's banner after a reset. Whole lines (the console may hand over half a
# line); a command that prints one of them itself is taken at its word.
LEFT_LINUX = re.compile(
    rb"(?P<halted>reboot: System halted|System Halted, OK to turn off power)\r?\n"
    rb"|(?P<off>reboot: Power down)\r?\n"
    rb"|(?P<restart>reboot: Restarting system)\r?\n"
    rb"|(?P<panic>Kernel panic[^\r\n]*)\r?\n"
    rb"|(?:^|\n)(?P<uboot>U-Boot 20\d\d\.\d\d[^\r\n]*)\r?\n")
# What each of LEFT_LINUX's groups but ``panic`` says the node did.
LEFT_WHAT = {"halted": "halted (powered off)", "off": "powered off", "restart": "rebooted",
             "uboot": "restarted into U-Boot"}
# How the lines LEFT_LINUX looks for begin: a last, unfinished line that may be one of them is
# not handed on as the command's output.
_LEFT_STARTS = (b"reboot: ", b"System Halted", b"Kernel panic", b"U-Boot 20")
# Bytes before a match's start that LEFT_LINUX looks at again: a line begun in one read and
# ended in the next.
LEFT_OVERLAP = 256


def chunk_marker(tok: str, i: int) -> re.Pattern[bytes]:
    """The node's answer to the ``i``-th (from 0) of a long command's parts (typed_lines)."""
    return re.compile(b"%s_C%d\r?\n" % (tok.encode(), i))


def begin_marker(tok: str) -> re.Pattern[bytes]:
    """The line printed before the command's output."""
    return re.compile(tok.encode() + rb"_B\r?\n")


def end_marker(tok: str) -> re.Pattern[bytes]:
    """The line printed right after the command's output; group 1: its status (0-255)."""
    return re.compile(tok.encode() + rb"_E(\d+)\r?\n")


def held_back(text: bytes, tok: str) -> int:
    """How much of ``text`` (a command's output so far) can be handed on: all but a tail that
    may be the beginning of its end marker, ``<tok>_E<status>\\r?\\n``, a last ``\\r`` (its
    ``\\n`` may come in the next read), or an unfinished last line that may be the kernel's
    saying the node leaves Linux (see LEFT_LINUX)."""
    cut = _marker_start(text, tok)
    if text[cut - 1:cut] == b"\r":
        cut -= 1  # a \r\n cut between two reads: the \r goes on with its \n
    line = text.rfind(b"\n", 0, cut) + 1
    last = text[line:cut]
    if last and any(p.startswith(last) or last.startswith(p) for p in _LEFT_STARTS):
        return line
    return cut


def _marker_start(text: bytes, tok: str) -> int:
    """Where a tail of ``text`` that may begin ``<tok>_E<status>\\r?\\n`` starts, else its end."""
    marker = tok.encode() + b"_E"
    for i in range(max(0, len(text) - len(marker) - 8), len(text)):
        rest = text[i:]
        if marker.startswith(rest) or (rest.startswith(marker)
                                       and re.fullmatch(rb"\d{0,3}\r?", rest[len(marker):])):
            return i
    return len(text)


def argv_command(argv: Sequence[str]) -> str:
    """The shell command line that runs exactly ``argv`` (shlex quoting, for a POSIX shell).

    The first word is quoted even when plain, so it is looked up as a command name only: a
    builtin, a function or a program, never a keyword or an alias. ``["exit", "7"]`` is the
    ``exit`` builtin (``BootedNode.run`` answers 7); ``["exit 7"]`` is a program of that name
    (127, not found). Raises UsageError for an empty argv.
    """
    if not argv:
        raise UsageError("no command given")
    first = shlex.quote(argv[0])
    return " ".join([first if first.startswith("'") else f"'{first}'",
                     *(shlex.quote(a) for a in argv[1:])])


def typed_lines(command: str, tok: str) -> list[str]:
    """The lines (printable ASCII, no newline) that run ``command`` at a node's shell.

    All lines but the last carry a part of a command too long for one line (LINE_MAX) into a
    shell variable; the node answers each with ``<tok>_C<i>``. The last runs the command in a
    subshell with stdin from /dev/null, printing ``<tok>_B`` before its output and
    ``<tok>_E<status>`` and a newline right after it (no newline of its own first, so the
    output's last line is handed on as soon as it ends). The command travels as a printf format
    (octal escapes for all but plain printable ASCII), so no byte of it is typed as itself
    where the line editor, the tty or the shell would read it as more than text. ``command``
    is UTF-8 (lone surrogates from undecodable argv bytes go back to those bytes). Raises
    UsageError for a NUL byte, which no shell word can hold.
    """
    data = command.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise UsageError("a command cannot contain a NUL byte")
    units = [_FORMAT[b] for b in data]
    line = _RUN.format(tok=tok, fmt="'" + "".join(units) + "'")
    if len(line) < LINE_MAX:
        return [line]
    var = f"kh_{tok}"
    room = LINE_MAX - 1 - len(_CHUNK.format(var=var, prev=f"${{{var}}}", body="", tok=tok,
                                            i=len(units)))
    chunks: list[str] = []
    body = ""
    for u in units:
        if len(body) + len(u) > room:
            chunks.append(body)
            body = ""
        body += u
    chunks.append(body)
    return [_CHUNK.format(var=var, prev=f"${{{var}}}" if i else "", body=b, tok=tok, i=i)
            for i, b in enumerate(chunks)] + [
        _RUN.format(tok=tok, fmt=f'"${{{var}}}"') + f"; unset {var}"]
