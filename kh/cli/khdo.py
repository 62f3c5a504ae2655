"""`khdo FUNC [ARGS]`: script an allocation's control channel (the paper's Listing 1).

Reads khget's text object on stdin and passes it through on stdout, so calls chain; what the
nodes print goes to stderr.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

import click

from kh import proc, textobj
from kh.cli import credential
from kh.cli.common import entry, handle_errors, setup_logging, stop_on_signals
from kh.errors import KhError, UsageError
from kh.hw import netns as nsutil
from kh.hw import uboot
from kh.hw.board import BOARDS
from kh.model import AllocationInfo

if TYPE_CHECKING:
    from kh.cc.client import ChannelClient

PER_NODE_AT_ONCE = 32  # peripcmd/pernodecmd commands running side by side
MRW_RE = re.compile(rb"^node(\d+): mrw: (?:(\d+) bytes at|error: (.*))", re.MULTILINE)


class Ctx:
    """``netns``: where peripcmd/pernodecmd run; None: khd's outside world (``where``); HOST:
    on the host itself."""

    def __init__(self, obj: AllocationInfo, cred: str | None, port: int,
                 key: Path | None, netns: str | None = None) -> None:
        self.netns = netns
        self.obj = obj
        self.cred = cred
        self.port = port
        self.key = key

    def channel(self) -> ChannelClient:
        from kh.cc.client import ChannelClient
        return ChannelClient(f"con{self.obj.id}", self.obj.server, self.port,
                             password=self.cred, key_file=self.key)


def _echo_err(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


# What a khd older than the channel's `send` answers it (kh.cc.sshd refuses an unknown command
# before reading the session's input).
UNKNOWN_SEND = b"kh: unknown channel command 'send'"


def do_write(c: Ctx, args: list[str]) -> int:
    """Each line of the text (see uboot.console_lines for the rule) to every node, whole;
    returns once every node has it (the channel's ``send``), not after the nodes' answers."""
    if not args:
        raise UsageError("write needs the text to write", 'khdo write "run kboot"')
    # argv's bytes that are not UTF-8 go to the node as given (surrogateescape)
    data = b"".join(uboot.line_bytes(line) + b"\n"
                    for line in uboot.console_lines(" ".join(args)))
    ch = c.channel()
    try:
        # send: back as soon as every node has the bytes; what they answer is readcon's
        _, err, status = ch.exec("send", data)
        if status == 2 and UNKNOWN_SEND in err:  # a khd from before `send`: nothing was sent
            _, err, status = ch.exec("raw", data, on_output=_echo_err)
    finally:
        ch.close()
    _echo_err(err)
    return status


def do_load(c: Ctx, addr: int, path: str) -> int:
    data = _read(path)
    ch = c.channel()
    try:
        out, err, status = ch.exec(f"load 0x{addr:x}", data)
    finally:
        ch.close()
    _echo_err(out + err)
    return status


def do_loadfile(c: Ctx, args: list[str]) -> int:
    """The paper's protocol: `mrw ADDR SIZE` then the raw bytes, over the console."""
    if len(args) != 2:
        raise UsageError("loadfile needs ADDR FILE", "khdo loadfile 0x9000000 ./blob")
    addr, path = args
    if not re.fullmatch(r"(0x)?[0-9a-fA-F]+", addr):
        raise UsageError(f"bad address {addr!r}", "write it in hex, e.g. 0x9000000")
    data = _read(path)
    ch = c.channel()
    try:
        out, err, _ = ch.exec("tagged", f"mrw {addr} {len(data)}\n".encode() + data)
    finally:
        ch.close()
    _echo_err(err)
    done = {}
    for m in MRW_RE.finditer(out):
        done[int(m[1])] = m[3].decode(errors="replace") if m[3] else None
    failed = 0
    for n in (x.number for x in c.obj.nodes):
        if n not in done:
            failed += 1
            _echo_err(f"node {n}: no mrw answer\n".encode())
        elif done[n]:
            failed += 1
            _echo_err(f"node {n}: mrw: {done[n]}\n".encode())
        else:
            _echo_err(f"node {n}: {len(data)} bytes at {addr}\n".encode())
    return 1 if failed else 0


def do_readcon(c: Ctx, args: list[str]) -> int:
    if len(args) > 1 or (args and not re.fullmatch(r"[0-9]{1,6}(\.[0-9]{1,6})?", args[0],
                                                  re.ASCII)):
        raise UsageError(f"readcon takes seconds to read, not {' '.join(args)[:40]!r}",
                         "khdo readcon 5")
    seconds = float(args[0]) if args else 2.0
    ch = c.channel()
    try:
        ch.exec("raw", read_for=seconds, on_output=_echo_err)
    finally:
        ch.close()
    return 0


HOST = ""  # --host: peripcmd/pernodecmd on the host itself


def where(c: Ctx) -> str | None:
    """The network namespace peripcmd/pernodecmd run in: --netns (KHDO_NETNS) if given, else
    khd's outside world, where external-domain nodes are reachable (from khd's status, over
    its socket: root only). None: on the host (--host; not root; khd has no outside world or
    does not answer, which is said on stderr)."""
    if c.netns is not None:
        return c.netns or None
    if os.geteuid() != 0:  # only root enters a namespace (or reads khd's socket)
        return None
    from kh.cli.outside import outside_netns
    from kh.client import Client
    from kh.service.config import from_env
    try:
        return outside_netns(Client(from_env().socket, timeout=30))
    except KhError as e:
        _echo_err(f"khdo: {e.message}; running on the host\n".encode())
        return None


def _per(c: Ctx, args: list[str], what: str) -> int:
    """The command once per node, PER_NODE_AT_ONCE side by side (a node that is slow to answer
    holds up no other); each node's output (stdout and stderr as they interleave) is printed
    whole, in the nodes' order, as soon as it and the nodes before it are done. The worst exit
    status (128+N for a command killed by signal N) is khdo's."""
    if len(args) != 1:
        raise UsageError(f"{what} needs one command", f'khdo {what} "ping -c1 %ip%"')
    cmds = [args[0].replace("%ip%", n.address).replace("%node%", str(n.number))
            for n in c.obj.nodes]
    netns = where(c)
    running: dict[int, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}
    done: dict[int, tuple[int, bytes]] = {}
    started = shown = worst = 0
    try:
        while shown < len(cmds):
            while len(running) < PER_NODE_AT_ONCE and started < len(cmds):
                f = tempfile.TemporaryFile()
                try:
                    running[started] = (proc.start(_per_argv(netns, cmds[started]), stdout=f,
                                                   stderr=subprocess.STDOUT), f)
                except BaseException:
                    f.close()
                    raise
                started += 1
            for i, (p, out) in list(running.items()):
                if p.poll() is not None:
                    out.seek(0)
                    done[i] = (p.returncode if p.returncode >= 0 else 128 - p.returncode,
                               out.read())
                    out.close()
                    del running[i]
            while shown in done:
                status, text = done.pop(shown)
                _echo_err(text)
                worst = max(worst, status)
                shown += 1
            if running:
                time.sleep(0.05)
    finally:
        for p, out in running.values():
            proc.reap(p)
            out.close()
    return worst


def _per_argv(netns: str | None, cmd: str) -> list[str]:
    argv = ["/bin/sh", "-c", cmd]
    if netns:  # the principal's "host" is the outside world, a network namespace
        argv = nsutil.enter_argv(netns) + argv
    return argv


def do_console(c: Ctx, args: list[str]) -> int:
    ch = c.channel()
    try:
        ch.interactive()
    finally:
        ch.close()
    return 0


FUNCS = {
    "write": do_write,
    "writecon": do_write,
    "loadkernel": lambda c, a: do_load(c, BOARDS["ppce500"].loadaddr, _one(a, "loadkernel")),
    "loadramdisk": lambda c, a: do_load(c, BOARDS["ppce500"].ramfsaddr, _one(a, "loadramdisk")),
    "loadfile": do_loadfile,
    "readcon": do_readcon,
    "peripcmd": lambda c, a: _per(c, a, "peripcmd"),
    "pernodecmd": lambda c, a: _per(c, a, "pernodecmd"),
    "console": do_console,
}


def _one(args: list[str], func: str) -> str:
    if len(args) != 1:
        raise UsageError(f"{func} needs one file", f"khdo {func} ./FILE")
    return args[0]


@click.command(context_settings={"help_option_names": ["-h", "--help"],
                                 "ignore_unknown_options": True})
@click.option("-c", "cred", metavar="FILE",
              help=f"File holding the principal's credential; without -c, "
                   f"${credential.ENV} holds the credential itself; else ssh keys are tried.")
@click.option("-p", "--port", type=int, envvar="KH_SSH_PORT", default=7422, show_default=True,
              help="The control channel's ssh port.")
@click.option("-i", "key", type=click.Path(path_type=Path), help="An ssh private key.")
@click.option("--netns", envvar="KHDO_NETNS",
              help="Run peripcmd/pernodecmd commands in this network namespace (default: "
                   "khd's outside world, where external nodes are reachable, when run as "
                   "root; else the host).")
@click.option("--host", "on_host", is_flag=True,
              help="Run peripcmd/pernodecmd commands on the host itself.")
@click.option("--debug", is_flag=True)
@click.argument("func")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def main(cred: str | None, port: int, key: Path | None, netns: str | None, on_host: bool,
         debug: bool, func: str, args: tuple[str, ...]) -> None:
    """Run FUNC on the allocation whose khget text object is on stdin.

    FUNC: write STR | loadkernel FILE | loadramdisk FILE | loadfile ADDR FILE | readcon [SECS]
    | peripcmd CMD (%ip%) | pernodecmd CMD (%node%) | console
    """
    setup_logging(debug)
    if func not in FUNCS:
        raise UsageError(f"unknown function {func!r}", f"one of: {', '.join(FUNCS)}")
    cred_text = credential.resolve(cred, stdin_free=False)
    if sys.stdin.isatty():
        raise UsageError("khdo reads khget's text object on stdin",
                         'echo "$nodes" | khdo ' + func)
    text = sys.stdin.read()
    obj = textobj.parse(text)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()
    if on_host and netns:
        raise UsageError("--host and --netns (or KHDO_NETNS) say different places",
                         "give one of them")
    c = Ctx(obj, cred_text, port, key, HOST if on_host else netns or None)
    try:
        with stop_on_signals():  # SIGTERM too ends peripcmd's commands, not only Ctrl-C
            status = FUNCS[func](c, list(args))
    except subprocess.SubprocessError as e:
        raise KhError(f"{func} failed: {e}") from None
    if status:
        sys.exit(status)


run = entry(main, "khdo")

if __name__ == "__main__":
    run()


