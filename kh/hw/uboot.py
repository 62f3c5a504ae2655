"""kh's U-Boot over a node's serial console: the prompt, a command, khargs, `run kboot`, `mrw`.

Used by `kh boot` and by khd's node manager.
"""

from __future__ import annotations

import re

from kh.errors import BootError, UsageError
from kh.hw.console import Console, ConsoleMatch

# The longest command line U-Boot takes whole: CONFIG_SYS_CBSIZE=1024 in the u-boot.config kh
# builds, less its terminating NUL. Measured here: a longer line is cut (at 1024 characters)
# without a word. Linux's tty takes 4095, so this is the limit for a line to any node.
LINE_MAX = 1023
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def console_lines(text: str) -> list[str]:
    """``text`` as the command lines a node's console will run, one per line, each to be sent
    ending in one ``\\n``: \\r\\n, \\r and \\n all end a line (so ``a\\r\\n`` is one command,
    not ``a`` and then an empty line, which U-Boot takes as "repeat the last command"), and a
    final line end adds no empty line.

    Raises UsageError for a line longer than LINE_MAX bytes or one holding a control character
    (at U-Boot's prompt Tab completes, Ctrl-U erases, ...: the node would not run what was sent).

    Bytes that are not UTF-8 (a command line's argv arrives with them as surrogate escapes)
    count, and are sent, as the bytes they stand for: encode a line with line_bytes.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines, 1):
        where = f"line {i}" if len(lines) > 1 else "the line"
        size = len(line_bytes(line))
        if size > LINE_MAX:
            raise UsageError(f"{where} is {size} bytes; a node's console takes at most "
                             f"{LINE_MAX} (U-Boot's command buffer cuts longer ones)",
                             "split the command, or send data with `khdo loadfile`")
        if m := _CONTROL.search(line):
            raise UsageError(f"{where} holds control character {m[0]!r} at column "
                             f"{m.start() + 1}", "send raw bytes with `khdo loadfile`")
    return lines


def line_bytes(line: str) -> bytes:
    """The bytes a console line stands for: UTF-8, and the bytes themselves for surrogate
    escapes (``"\\udcff"`` → ``b"\\xff"``, as os.fsencode gives argv back)."""
    return line.encode("utf-8", "surrogateescape")


UBOOT_PROMPT = re.compile(rb"(?:^|\n)=> ")  # at a line start: "==> " in crc32 output is no prompt
READY = re.compile(rb"kh-ready: (?P<appliance>[\w.-]+)[^\r\n]*\r?\n")
KBOOT_OUTCOME = re.compile(
    READY.pattern
    # Whole lines only: the console may hand over half a line, and the message is the point.
    + rb"|kh-failed: (?P<failed>[^\r\n]*)\r?\n"
    + rb"|(?P<panic>Kernel panic[^\r\n]*)\r?\n"
    + rb"|(?P<uboot>(?:Bad Magic Number|Wrong Image Format|Bad Data CRC|Bad Header Checksum"
    rb"|ERROR: )[^\r\n]*)\r?\n")
MRW_OUTCOME = re.compile(rb"^mrw: (?:(?P<ok>\d+ bytes at 0x[0-9a-fA-F]+)"
                         rb"|error: (?P<error>[^\r\n]*))(?=\r?\n)", re.MULTILINE)


def wait_prompt(console: Console, timeout: float, *, stage: str = "U-Boot prompt",
                start: int | None = None) -> ConsoleMatch:
    """Wait ``timeout`` seconds at most for U-Boot's prompt after offset ``start`` (default:
    the last match's end). Raises KhTimeout naming ``stage``, or BootError if the console
    closes first."""
    return console.expect(UBOOT_PROMPT, timeout, stage=stage, start=start)


def set_khargs(console: Console, khargs: str) -> None:
    """At the U-Boot prompt, make ``khargs`` (the appliance's boot keys) U-Boot's ``khargs``.
    Raises UsageError for a single quote, which would end the quoted value."""
    if "'" in khargs:
        raise UsageError("kernel arguments must not contain a single quote")
    uboot_command(console, f"setenv khargs '{khargs}'")


def uboot_command(console: Console, line: str, timeout: float = 10.0) -> str:
    """Type one command at the U-Boot prompt and return what it printed (the lines between
    the echoed command and the next prompt, ``\\n`` line ends)."""
    if len(console_lines(line)) != 1:
        raise UsageError(f"one U-Boot command is one line, not {line[:60]!r}")
    start = console.mark()
    console.write(line_bytes(line) + b"\n")
    m = console.expect(UBOOT_PROMPT, timeout, stage=f"U-Boot prompt after {line!r}",
                       start=start)
    text = console.text(start)[: m.start() - start].decode("utf-8", "replace")
    text = text.replace("\r\n", "\n")
    return text.split("\n", 1)[1] if "\n" in text else ""


def run_kboot(con: Console, timeout: float) -> str:
    """Type `run kboot` at a U-Boot prompt and wait for the appliance's ready line; return the
    appliance's name. Raises BootError for a failed appliance, a kernel panic or images U-Boot
    refused (with the line that said so), KhTimeout after ``timeout`` seconds."""
    start = con.mark()
    con.write(b"run kboot\n")
    return kboot_outcome(con, start, timeout)


def kboot_outcome(con: Console, start: int, timeout: float) -> str:
    """Wait for what `run kboot`, typed after offset ``start`` (by run_kboot, or broadcast to
    many nodes over a control channel), came to; return the appliance's name. Raises as
    run_kboot does."""
    log = con.log_path
    m = con.expect(KBOOT_OUTCOME, timeout, stage="appliance ready line", start=start)
    if m.group("failed"):
        raise BootError(f"the appliance failed: {m.group('failed').decode(errors='replace')}",
                        f"console log: {log}")
    if m.group("panic"):
        raise BootError(f"the kernel panicked: {m.group('panic').decode(errors='replace')}",
                        f"console log: {log}")
    if m.group("uboot"):
        raise BootError(f"U-Boot refused the images: {m.group('uboot').decode(errors='replace')}",
                        f"console log: {log}")
    return m.group("appliance").decode()


def mrw(console: Console, addr: int, data: bytes, timeout: float | None = None) -> str:
    """Load ``data`` at ``addr`` through the console with U-Boot's ``mrw``; return its line.

    The data follows the command line at once: ``mrw`` takes exactly ``len(data)`` raw bytes
    from the console, so nothing has to be escaped.
    """
    start = console.mark()
    console.write(f"mrw 0x{addr:x} {len(data)}\n".encode() + data)
    budget = timeout if timeout is not None else 30 + len(data) / 5000
    m = console.expect(MRW_OUTCOME, budget, stage="mrw completion line", start=start)
    console.expect(UBOOT_PROMPT, 10, stage="U-Boot prompt after mrw", start=m.end())
    if m.group("error"):
        raise BootError(f"mrw refused the load: {m.group('error').decode(errors='replace')}",
                        "load into free RAM below U-Boot's own memory")
    return m.group(0).decode().strip()
