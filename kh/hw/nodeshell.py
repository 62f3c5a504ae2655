"""A booted node's shell over its serial console: run a command, get its output and status.

``BootedNode.run`` types the lines kh.hw.framing makes and reads the command's output between
its markers, handing it on as it comes, until the end marker gives its status or the node
leaves Linux (NodeLeft). Used by `kh boot`, khd's scenarios and the tests.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable

from kh.errors import BootError, KhTimeout
from kh.hw import framing, qemu
from kh.hw.console import Console

# Seconds the node's shell may take to answer a typed line (a chunk's or the begin marker):
# it is at its prompt, and a line of framing.LINE_MAX bytes crosses the UART (~20 KB/s) in
# 50 ms.
LINE_TIMEOUT = 60.0


class NodeLeft(BootError):
    """The node stopped running Linux before the command ended: it powered off, halted,
    rebooted or panicked, or its QEMU exited. kh boot exits 125 for it (any other status may
    be the command's own)."""

    exit_code = 125


class BootedNode:
    """A node that reached its appliance's shell; run commands on it."""

    def __init__(self, console: Console, appliance: str, node: qemu.Node | None = None) -> None:
        self.node = node
        self.appliance = appliance
        self.console = console

    def run(self, command: str, timeout: float | None = 120.0) -> tuple[str, int]:
        """Run the shell command line ``command`` on the node; return its output and status.

        The command runs in a subshell of the console's shell with stdin from /dev/null, so
        whatever it does (``exit 7`` included) the console's shell lives on and answers
        ``$?``: the status is 0-255 (128+N for a command killed by signal N). ``command`` may
        hold any characters but NUL, and be of any length (see ``framing.typed_lines``).
        ``timeout``: seconds the command may run, None for as long as it runs. Output is text
        with ``\\n`` line ends. Raises UsageError for a NUL, KhTimeout, NodeLeft if the node
        powers off, halts, reboots, panics or its QEMU exits first, or BootError.
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
        *chunks, line = framing.typed_lines(command, tok)
        con = self.console
        for i, chunk in enumerate(chunks):
            start = con.mark()
            con.write(chunk.encode() + b"\n")
            con.expect(framing.chunk_marker(tok, i), LINE_TIMEOUT,
                       stage=f"part {i + 1} of {len(chunks)} of a long command", start=start)
        start = con.mark()
        # Markers are printed by printf with the token as an argument, so the terminal's echo
        # of the typed line can never be mistaken for them; one line, so that echo is complete
        # before the begin marker prints.
        con.write(line.encode() + b"\n")
        begin = con.expect(framing.begin_marker(tok), LINE_TIMEOUT, stage="command start",
                           start=start)
        what = command if len(command) <= 60 else command[:57] + "..."
        end_rx = framing.end_marker(tok)
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
            back = min(done - begin.end(), framing.LEFT_OVERLAP)
            left = framing.LEFT_LINUX.search(con.text(done - back))
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
            cut = framing.held_back(text, tok)
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
        kind = next(k for k in framing.LEFT_WHAT if m.group(k))
        return NodeLeft(f"the node {framing.LEFT_WHAT[kind]} while running the command", hint)
