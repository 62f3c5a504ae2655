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
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kh.appliance import uimage
from kh.errors import BootError, ImageError, KhTimeout, UsageError
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
# `kh boot` runs whose console logs are kept (in <cache>/logs/kh-boot/).
KEEP_LOGS = 20
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
_LEFT_WHAT = {"halted": "halted (powered off)", "off": "powered off", "restart": "rebooted",
              "uboot": "restarted into U-Boot"}
# How the lines LEFT_LINUX looks for begin: a last, unfinished line that may be one of them is
# not handed on as the command's output.
_LEFT_STARTS = (b"reboot: ", b"System Halted", b"Kernel panic", b"U-Boot 20")
# Bytes before a match's start that LEFT_LINUX looks at again: a line begun in one read and
# ended in the next.
_LEFT_OVERLAP = 256


class NodeLeft(BootError):
    """The node stopped running Linux before the command ended: it powered off, halted,
    rebooted or panicked, or its QEMU exited. kh boot exits 125 for it (any other status may
    be the command's own)."""

    exit_code = 125


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
    """Fill in images/out defaults for whatever the caller did not name. Raises UsageError for
    an appliance that has neither a spec nor a built ramdisk, naming the known ones."""
    if ramdisk is None:
        ramdisk = paths.out / f"{appliance}.cpio.gz.uimg"
        if not ramdisk.exists() and not (paths.specs / f"{appliance}.toml").is_file():
            known = sorted(p.stem for p in paths.specs.glob("*.toml"))
            raise UsageError(f"no appliance named {appliance!r}",
                             f"known appliances: {', '.join(known) or 'none'}")
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
        mem_mib=cfg.mem_mib, no_reboot=True,  # a reset (`reboot`) ends QEMU, never loops
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
        line ends. Raises UsageError for a NUL, KhTimeout, NodeLeft if the node powers off,
        halts, reboots, panics or its QEMU exits first, or BootError.
        """
        parts: list[bytes] = []
        status = self.run_streaming(command, parts.append, timeout)
        return b"".join(parts).decode("utf-8", "replace"), status

    def run_streaming(self, command: str, output: Callable[[bytes], None],
                      timeout: float | None = None) -> int:
        """``run``, handing the command's output to ``output`` as it arrives (bytes, ``\\n``
        line ends); return its status. All but a tail that could be the start of the end
        marker (which follows the output directly, so a line's newline is never held) is
        handed on at once."""
        tok = "KH" + secrets.token_hex(6)
        *chunks, line = typed_lines(command, tok)
        con = self.console
        for i, chunk in enumerate(chunks):
            start = con.mark()
            con.write(chunk.encode() + b"\n")
            con.expect(re.compile(b"%s_C%d\r?\n" % (tok.encode(), i)), LINE_TIMEOUT,
                       stage=f"part {i + 1} of {len(chunks)} of a long command", start=start)
        start = con.mark()
        # Markers are printed by printf with the token as an argument, so the terminal's echo
        # of the typed line can never be mistaken for them; one line, so that echo is complete
        # before the begin marker prints.
        con.write(line.encode() + b"\n")
        begin = con.expect(re.compile(tok.encode() + rb"_B\r?\n"), LINE_TIMEOUT,
                           stage="command start", start=start)
        what = command if len(command) <= 60 else command[:57] + "..."
        end_rx = re.compile(tok.encode() + rb"_E(\d+)\r?\n")
        deadline = None if timeout is None else time.monotonic() + timeout
        done = seen = begin.end()  # handed on everything before done; looked at up to seen
        while True:
            more = con.wait_past(seen, None if deadline is None else deadline - time.monotonic())
            text = con.text(done)
            seen = done + len(text)
            end = end_rx.search(text)
            if end:
                output(text[:end.start()].replace(b"\r\n", b"\n"))
                return int(end.group(1))
            back = min(done - begin.end(), _LEFT_OVERLAP)
            left = LEFT_LINUX.search(con.text(done - back))
            if left:  # the output before the kernel's line is the command's
                output(text[: max(0, left.start(left.lastgroup or 0) - back)]
                       .replace(b"\r\n", b"\n"))
                raise self._left(left)
            if con.closed:
                why = self._qemu_reason() or "its console closed"
                raise NodeLeft(f"the node stopped while running the command: {why}",
                               con.log_hint())
            if not more:
                raise KhTimeout(f"{con.name}: no end of command {what!r} within {timeout:g} s",
                                con.log_hint())
            cut = held_back(text, tok)
            if cut:
                output(text[:cut].replace(b"\r\n", b"\n"))
                done += cut

    def _qemu_reason(self) -> str | None:
        return self.console.closed_reason() if self.console.closed_reason else None

    def _left(self, m: re.Match[bytes]) -> NodeLeft:
        hint = self.console.log_hint()
        if m.group("panic"):
            return NodeLeft("the kernel panicked while running the command: "
                            + m.group("panic").decode(errors="replace"), hint)
        kind = next(k for k in _LEFT_WHAT if m.group(k))
        return NodeLeft(f"the node {_LEFT_WHAT[kind]} while running the command", hint)

    def interact(self) -> None:
        """Attach this terminal to the console until Ctrl-] (or the node stops)."""
        attach(self.console)


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


def default_console_log(paths: Paths, keep: int = KEEP_LOGS) -> Path:
    """A new file for this `kh boot`'s console transcript (kept after it stops), in
    ``<cache>/logs/kh-boot/``; only the newest ``keep`` runs' logs stay there."""
    d = paths.cache / "logs" / "kh-boot"
    d.mkdir(parents=True, exist_ok=True)
    logs = sorted(d.glob("*.console.log"), key=_mtime)
    for old in logs[: max(0, len(logs) - keep + 1)]:
        for f in (old, *old.parent.glob(old.name + ".*")):  # and its rotated parts
            f.unlink(missing_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    fd, name = tempfile.mkstemp(prefix=f"{stamp}-{os.getpid()}-", suffix=".console.log", dir=d)
    os.close(fd)
    return Path(name)


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:  # pruned by a concurrent kh boot
        return 0.0


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
