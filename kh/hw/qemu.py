"""Run one node: its QEMU process, its console, and (optionally) its QMP monitor."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kh import proc
from kh.errors import BootError
from kh.hw import board, unixsock
from kh.hw.console import Console

log = logging.getLogger("kh.qemu")

# QEMU's own words that never explain a failure: when kh ends it, its warnings, its notes.
_NOISE = re.compile(r"terminating on signal|^qemu-system-[\w-]+: (?:.*: )?(?:warning|info): ")
MAX_REASON = 300
# Seconds a QEMU whose console closed may take to exit before kh says why it stopped.
EXIT_WAIT = 5.0


def last_words(text: str) -> str | None:
    """The last meaningful line of a QEMU's output (its stderr), e.g. ``qemu-system-ppc:
    -device ...: failed to find romfile "efi-virtio.rom"``; None if it said nothing useful."""
    for line in reversed(text.splitlines()):
        line = " ".join(line.split())
        if line and not _NOISE.search(line):
            return line if len(line) <= MAX_REASON else line[:MAX_REASON - 3] + "..."
    return None


def died_reason(exit_code: int | None, qemu_output: str) -> str:
    """Why a node that had been running is gone."""
    said = last_words(qemu_output)
    status = f" with status {exit_code}" if exit_code is not None else ""
    return f"QEMU exited{status}" + (f": {said}" if said else "")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class Qmp:
    """A minimal QMP client: enough for reset, stop and status."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        try:
            self.sock = unixsock.connect(path, timeout)
        except unixsock.NotUp as e:
            raise BootError(f"QMP socket {path} does not answer: {e.reason}") from None
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise BootError("QMP connection closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def command(self, name: str, /, **args: Any) -> Any:
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise BootError(f"QMP {name}: {reply['error'].get('desc')}")
        return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


class Node:
    """A running node: process + console. Created by ``running()``."""

    def __init__(self, spec: board.NodeSpec, process: subprocess.Popen[bytes],
                 console: Console, stderr_log: Path) -> None:
        self.spec = spec
        self.process = process
        self.console = console
        self.stderr_log = stderr_log

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def qemu_stderr(self) -> str:
        return _read(self.stderr_log).strip()

    def exit_reason(self, wait: float = EXIT_WAIT) -> str | None:
        """Why the node's QEMU stopped, with its own last meaningful words (its console closed:
        it is exiting, so wait up to ``wait`` seconds); None if it is still running."""
        return _exit_reason(self.process, self.stderr_log, wait)


def _exit_reason(p: subprocess.Popen[bytes], stderr_log: Path, wait: float) -> str | None:
    try:
        code = p.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        return None
    return died_reason(code, _read(stderr_log))


@contextlib.contextmanager
def running(spec: board.NodeSpec, *, console_log: Path | None, workdir: Path,
            connect_timeout: float = 10.0, die_with_parent: bool = False) -> Iterator[Node]:
    """Start the node's QEMU, connect its console; always stop and reap it on the way out.

    ``die_with_parent``: QEMU also gets SIGKILL when the calling thread ends without leaving
    the block (kh SIGKILLed); see ``proc.spawn``.
    """
    board.check_memory(spec)
    argv = board.qemu_argv(spec)
    stderr_log = workdir / f"{spec.name}.qemu.log"
    with contextlib.ExitStack() as stack:
        err = stack.enter_context(open(stderr_log, "wb"))
        p = stack.enter_context(proc.spawn(argv, stdout=err, stderr=err,
                                           die_with_parent=die_with_parent))
        stack.callback(lambda: spec.console.unlink(missing_ok=True))
        if spec.qmp is not None:
            stack.callback(lambda: spec.qmp.unlink(missing_ok=True) if spec.qmp else None)
        console = Console(spec.console, console_log, name=spec.name,
                          closed_reason=lambda: _exit_reason(p, stderr_log, EXIT_WAIT))
        stack.callback(console.close)
        try:
            console.connect(connect_timeout, alive=lambda: p.poll() is None)
        except BootError as e:
            said = last_words(_read(stderr_log))
            if said:
                raise BootError(f"{spec.name}: QEMU failed: {said}",
                                "run with --show-command to see the command line") from e
            raise
        yield Node(spec, p, console, stderr_log)
