"""Run one node: its QEMU process, its console, and (optionally) its QMP monitor."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kh import proc
from kh.errors import BootError
from kh.hw import board, unixsock
from kh.hw.console import Console

log = logging.getLogger("kh.qemu")


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
        try:
            return self.stderr_log.read_text(errors="replace").strip()
        except OSError:
            return ""


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
        console = Console(spec.console, console_log, name=spec.name)
        stack.callback(console.close)
        try:
            console.connect(connect_timeout, alive=lambda: p.poll() is None)
        except BootError as e:
            detail = stderr_log.read_text(errors="replace").strip().splitlines()
            if detail:
                raise BootError(f"{spec.name}: QEMU failed: {detail[-1]}",
                                "run with --show-command to see the command line") from e
            raise
        yield Node(spec, p, console, stderr_log)
