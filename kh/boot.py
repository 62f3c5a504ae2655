"""`kh boot`: one ppce500 node through our U-Boot into an appliance, like virtme-ng for PPC.

The kernel and ramdisk are placed in guest RAM by QEMU's loader at U-Boot's ``${loadaddr}``
and ``${ramfsaddr}`` before the firmware runs; U-Boot's own ``run kboot`` then boots them, so
the path from prompt to Linux is exactly the one a principal drives over a control channel.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import shlex
import shutil
import sys
import tempfile
import termios
import tty
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kh.appliance import uimage
from kh.errors import ImageError, UsageError
from kh.hw import board, qemu, uboot
from kh.hw.console import Console
from kh.settings import Paths

DETACH = b"\x1d"  # Ctrl-]

# The longest line kh types at a node's shell, newline included. Busybox ash's line editor keeps
# 1022 characters of a line and drops the rest without a word (FEATURE_EDITING_MAX_LEN 1024; the
# kernel's canonical mode keeps 4095): a longer line would run cut short, so a longer command
# goes over in several lines.
LINE_MAX = 960
# Seconds the node's shell may take to answer a typed line (a chunk's or the begin marker):
# it is at its prompt, and a line of LINE_MAX bytes crosses the UART (~20 KB/s) in 50 ms.
LINE_TIMEOUT = 60.0
# printf format units for each byte: printable ASCII as itself, but for the quote that delimits
# the format, the backslash and the percent sign; anything else as a 3-digit octal escape (a
# control character would be a line-editing key, a tab a completion, a newline the end of the
# line). Three digits always, so a following digit is never taken into the escape.
_FORMAT = [chr(b) if 0x20 <= b < 0x7F and chr(b) not in "'\\%" else f"\\{b:03o}"
           for b in range(256)]
_FORMAT[ord("%")] = "%%"
_BEGIN = "printf '%s_B\\n' {tok}; "
_END = "printf '\\n%s_E%d\\n' {tok} $?"
# Runs the script in a subshell, so `exit N` (or exec, or set -e) ends the subshell and never
# the console's shell; stdin is /dev/null, so a command that reads it can never swallow the
# lines kh types next.
_RUN = _BEGIN + '( eval "$(printf {fmt})" ) </dev/null; ' + _END
_CHUNK = "{var}={prev}'{body}'; printf '%s_C%d\\n' {tok} {i}"


@dataclass(frozen=True)
class BootConfig:
    kernel: Path
    ramdisk: Path
    bios: Path
    mem_mib: int = 256
    board: board.Board = board.BOARDS["ppce500"]
    khargs: str = ""
    prompt_timeout: float = 30.0
    ready_timeout: float = 90.0
    console_log: Path | None = None
    name: str = "kh-boot"


def default_config(paths: Paths, *, appliance: str = "shell", kernel: Path | None = None,
                   ramdisk: Path | None = None, bios: Path | None = None, mem_mib: int = 256,
                   khargs: str = "", console_log: Path | None = None,
                   ready_timeout: float = 90.0) -> BootConfig:
    """Fill in images/out defaults for whatever the caller did not name."""
    if ramdisk is None:
        ramdisk = paths.out / f"{appliance}.cpio.gz.uimg"
    return BootConfig(kernel=kernel or paths.out / "uImage", ramdisk=ramdisk,
                      bios=bios or paths.out / "u-boot.elf", mem_mib=mem_mib, khargs=khargs,
                      console_log=console_log, ready_timeout=ready_timeout)


def check_images(cfg: BootConfig) -> None:
    """Refuse a missing or corrupt image before starting anything."""
    if not cfg.bios.is_file():
        raise ImageError(f"U-Boot image {cfg.bios} does not exist", "run `kh images build`")
    if cfg.bios.read_bytes()[:4] != b"\x7fELF":
        raise ImageError(f"U-Boot image {cfg.bios} is not an ELF file")
    kh = uimage.check_file(cfg.kernel, type="kernel", what="kernel")
    uimage.check_file(cfg.ramdisk, type="ramdisk", what="ramdisk")
    room = cfg.board.ramfsaddr - cfg.board.loadaddr
    if kh.size + uimage.HEADER.size > room:
        raise ImageError(f"kernel {cfg.kernel} is {kh.size} bytes; only {room} fit below "
                         f"${{ramfsaddr}}")


def node_spec(cfg: BootConfig, workdir: Path) -> board.NodeSpec:
    return board.NodeSpec(
        name=cfg.name, bios=cfg.bios, console=workdir / "console.sock", board=cfg.board,
        mem_mib=cfg.mem_mib,
        loads=(board.Load(cfg.kernel, cfg.board.loadaddr),
               board.Load(cfg.ramdisk, cfg.board.ramfsaddr)))


def show_command(cfg: BootConfig) -> str:
    spec = node_spec(cfg, Path(tempfile.gettempdir()) / "kh-boot-XXXX")
    return shlex.join(board.qemu_argv(spec))


class BootedNode:
    """A node that reached its appliance's shell; run commands or attach a terminal."""

    def __init__(self, console: Console, appliance: str, node: qemu.Node | None = None) -> None:
        self.node = node
        self.appliance = appliance
        self.console = console

    def run(self, command: str, timeout: float | None = 120.0) -> tuple[str, int]:
        """Run the shell command line ``command`` on the node; return its output and status.

        The command runs in a subshell of the console's shell with stdin from /dev/null, so
        whatever it does (``exit 7`` included) the console's shell lives on and answers
        ``$?``: the status is 0-255 (128+N for a command killed by signal N). ``command`` may
        hold any characters but NUL, and be of any length (see ``typed_lines``). ``timeout``:
        seconds the command may run, None for as long as it runs. Output is text with ``\\n``
        line ends. Raises UsageError for a NUL, KhTimeout, or BootError if the node stops.
        """
        tok = "KH" + secrets.token_hex(6)
        *chunks, line = typed_lines(command, tok)
        for i, chunk in enumerate(chunks):
            start = self.console.mark()
            self.console.write(chunk.encode() + b"\n")
            self.console.expect(re.compile(b"%s_C%d\r?\n" % (tok.encode(), i)), LINE_TIMEOUT,
                                stage=f"part {i + 1} of {len(chunks)} of a long command",
                                start=start)
        start = self.console.mark()
        # Markers are printed by printf with the token as an argument, so the terminal's echo
        # of the typed line can never be mistaken for them; one line, so that echo is complete
        # before the begin marker prints.
        self.console.write(line.encode() + b"\n")
        begin = self.console.expect(re.compile(tok.encode() + rb"_B\r?\n"), LINE_TIMEOUT,
                                    stage="command start", start=start)
        what = command if len(command) <= 60 else command[:57] + "..."
        end = self.console.expect(re.compile(rb"\r?\n" + tok.encode() + rb"_E(\d+)\r?\n"),
                                  timeout, stage=f"end of command {what!r}",
                                  start=begin.end())
        out = self.console.text(begin.end())[: end.start() - begin.end()]
        return out.decode("utf-8", "replace").replace("\r\n", "\n"), int(end.group(1))

    def interact(self) -> None:
        """Attach this terminal to the console until Ctrl-] (or the node stops)."""
        attach(self.console)


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
    ``<tok>_E<status>`` on a line of its own after it. The command travels as a printf format
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


def attach(console: Console) -> None:
    out = sys.stdout.buffer

    def show(data: bytes) -> None:
        out.write(data)
        out.flush()

    unsub = console.subscribe(show)
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd) if os.isatty(fd) else None
    try:
        if old is not None:
            tty.setraw(fd)
        while not console.closed:
            r, _, _ = select.select([fd], [], [], 0.2)
            if not r:
                continue
            data = os.read(fd, 4096)
            if not data or DETACH in data:
                data = data.split(DETACH)[0]
                if data:
                    console.write(data)
                break
            console.write(data)
    finally:
        unsub()
        if old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
        out.write(b"\r\n")
        out.flush()


def default_console_log(paths: Paths) -> Path:
    """Where `kh boot` keeps the last node's console transcript (kept after it stops)."""
    log = paths.cache / "logs" / "kh-boot-console.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    return log


@contextlib.contextmanager
def at_prompt(cfg: BootConfig, paths: Paths) -> Iterator[qemu.Node]:
    """Start a node and wait for its U-Boot prompt; always tear it down on the way out."""
    check_images(cfg)
    paths.runtime.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="kh-boot-", dir=paths.runtime))
    try:
        spec = node_spec(cfg, workdir)
        log = cfg.console_log or default_console_log(paths)
        # The node is the calling thread's: its QEMU dies with it even if kh is SIGKILLed.
        with qemu.running(spec, console_log=log, workdir=workdir,
                          die_with_parent=True) as node:
            node.console.expect(uboot.UBOOT_PROMPT, cfg.prompt_timeout, stage="U-Boot prompt")
            yield node
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def kboot(node: qemu.Node, cfg: BootConfig) -> BootedNode:
    """From the U-Boot prompt: set khargs, `run kboot`, wait for the appliance's ready line."""
    if cfg.khargs:
        if "'" in cfg.khargs:
            raise UsageError("kernel arguments must not contain a single quote")
        uboot.uboot_command(node.console, f"setenv khargs '{cfg.khargs}'")
    return BootedNode(node.console, uboot.run_kboot(node.console, cfg.ready_timeout), node)


@contextlib.contextmanager
def booted(cfg: BootConfig, paths: Paths) -> Iterator[BootedNode]:
    """Start a node, boot it through U-Boot into the appliance; tear it down on exit."""
    with at_prompt(cfg, paths) as node:
        yield kboot(node, cfg)
