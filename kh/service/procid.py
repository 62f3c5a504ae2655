"""Which process is a node's QEMU, so that khd never signals a process it did not verify.

A PID alone names a process only while it runs: once it exits the number is handed to the next
process. A node's identity is therefore (PID, start time, tag): the start time is field 22 of
``/proc/PID/stat`` (clock ticks after boot, fixed for a process's life and unchanged by exec),
and the tag is kh's node tag, ``<prefix>-node<N>``, in its command line (QEMU's ``-name
TAG,process=TAG``). khd records PID and start time when it starts a QEMU (``save``, a file in
the node's run directory) and checks all three before every signal. A signal goes through a
pidfd opened before the check, so a process that exits after the check is never confused with
the PID's next owner.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("kh.procid")

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcId:
    pid: int
    start: int  # clock ticks after boot: /proc/PID/stat field 22
    tag: str  # kh's node tag in its command line

    def __str__(self) -> str:
        return f"PID {self.pid} ({self.tag}, started at tick {self.start})"


def parse_stat(text: str) -> tuple[str, int]:
    """(state, start time) from ``/proc/PID/stat`` text. The command name (field 2) may hold
    spaces and parentheses, so fields are counted after its last ')'."""
    rest = text.rsplit(")", 1)[1].split()
    return rest[0], int(rest[19])  # fields 3 and 22


def stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of ``pid``, or None when there is no such process."""
    try:
        return parse_stat((PROC / str(pid) / "stat").read_text())
    except (OSError, IndexError, ValueError):
        return None


def tags(pid: int, prefix: str | None = None) -> set[str]:
    """The node tags (``<prefix>-node<N>``) in ``pid``'s command line (any prefix when None)."""
    try:
        args = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return set()
    return set(tags_in(args, prefix))


def tags_in(args: list[bytes], prefix: str | None = None) -> list[str]:
    """Node tags carried by these command-line words: each ``,process=<prefix>-node<N>``."""
    want = re.escape(prefix) if prefix is not None else r"[a-z][a-z0-9]*"
    pattern = re.compile(rb",process=(" + want.encode() + rb"-node[0-9]+)(?:,|$)")
    return [m[1].decode() for a in args if (m := pattern.search(a))]


def identify(pid: int, tag: str) -> ProcId | None:
    """The identity of ``pid`` now, if it runs carrying ``tag``; None otherwise."""
    before = stat(pid)
    if before is None or before[0] == "Z" or tag not in tags(pid):
        return None
    after = stat(pid)  # the PID may have changed hands while the command line was read
    # Only the start time tells that: the state (R, S, D...) of a busy QEMU changes between
    # two reads, and comparing it too let `kh clean` pass over one node in several (issue 10).
    if after is None or after[0] == "Z" or after[1] != before[1]:
        return None
    return ProcId(pid, before[1], tag)


def mismatch(ident: ProcId) -> str | None:
    """Why ``pid`` is no longer the process ``ident`` names (gone, a zombie, another start
    time, no tag), or None when it still is."""
    now = stat(ident.pid)
    if now is None:
        return "it has exited"
    if now[0] == "Z":
        return "it has exited (a zombie)"
    if now[1] != ident.start:
        return f"the PID now belongs to a process started at tick {now[1]}"
    if ident.tag not in tags(ident.pid):
        return f"its command line does not carry {ident.tag}"
    return None


def is_alive(ident: ProcId) -> bool:
    return mismatch(ident) is None


def send(ident: ProcId, sig: int) -> bool:
    """Signal the process ``ident`` names, and its process group when it leads one (kh
    starts each QEMU in a session of its own: whatever it started goes too), after checking
    it is still that process; a mismatch is logged and nothing is signalled. True if sent."""
    try:
        pidfd = os.pidfd_open(ident.pid)
    except OSError:
        return False  # gone
    try:
        why = mismatch(ident)  # checked after the pidfd pinned the process
        if why is not None:
            if not why.startswith("it has exited"):
                log.warning("not signalling %s: %s", ident, why)
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(ident.pid) == ident.pid:
                # A live leader's PID cannot be reused, nor a group ID while the group has
                # members: this reaches the verified group or no one.
                os.killpg(ident.pid, sig)
                return True
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, sig)
        return True
    finally:
        os.close(pidfd)


def stop(idents: list[ProcId], grace: float = 5.0, kill_wait: float = 10.0) -> list[ProcId]:
    """Stop processes that are not our children (nodes found again after a khd restart):
    SIGTERM each verified one, wait up to ``grace`` s, SIGKILL those still there and wait up
    to ``kill_wait`` s more for them to be gone (a process that was SIGKILLed still runs
    while the kernel frees its memory: a caller that looks right after must not see it).
    Returns those that were signalled (a process that failed its check is left alone)."""
    sent = [i for i in idents if send(i, signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_alive(i) for i in sent):
        time.sleep(0.02)
    killed = [i for i in sent if is_alive(i) and send(i, signal.SIGKILL)]
    deadline = time.monotonic() + kill_wait
    while time.monotonic() < deadline and any(is_alive(i) for i in killed):
        time.sleep(0.02)
    return sent


def sweep(prefix: str, rounds: int = 5, grace: float = 5.0) -> tuple[list[ProcId], list[ProcId]]:
    """Stop every process carrying a node tag of ``prefix`` (``tagged``, then ``stop``), and
    look again until a look finds none, at most ``rounds`` looks: a process that was forked
    by a khd but had not yet exec'd QEMU at the first look carries its tag only from its exec
    on. Returns (those stopped, those still running after the last look)."""
    stopped: list[ProcId] = []
    for _ in range(rounds):
        found = tagged(prefix)
        if not found:
            return stopped, []
        stopped += stop(found, grace)
    return stopped, tagged(prefix)


def tagged(prefix: str) -> list[ProcId]:
    """Every running process carrying a node tag of ``prefix``, with its identity."""
    found = []
    for entry in os.listdir(PROC):
        if entry.isdigit():
            for tag in sorted(tags(int(entry), prefix)):
                ident = identify(int(entry), tag)
                if ident is not None:
                    found.append(ident)
                    break
    return found


def save(path: Path, ident: ProcId) -> None:
    """Record a QEMU's PID and start time (``PID START``; written whole or not at all)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{ident.pid} {ident.start}\n")
    tmp.replace(path)


def load(path: Path) -> tuple[int, int] | None:
    """(PID, start time) recorded by ``save``; None when missing or unreadable."""
    try:
        pid, start = path.read_text().split()
        return int(pid), int(start)
    except (OSError, ValueError):
        return None


def recorded(record: Path, tag: str, pid: int | None, what: str) -> ProcId | None:
    """The process ``pid`` if it is still the one ``record`` (``save``) names and carries
    ``tag``; else None, and a PID that now names another process is logged (``what`` it was:
    ``node 3``) and left alone. A QEMU started by a khd older than the record has none: its
    tag alone identifies it then, and the log says so."""
    if not pid:
        return None
    saved = load(record)
    if saved is None:
        ident = identify(pid, tag)
        if ident is not None:
            log.warning("%s: no start time recorded for PID %d; identified by its tag %s "
                        "alone", what, pid, tag)
        return ident
    if saved[0] != pid:
        log.warning("%s: the state names PID %d, %s PID %d: signalling neither", what, pid,
                    record, saved[0])
        return None
    ident = ProcId(pid, saved[1], tag)
    why = mismatch(ident)
    if why is None:
        return ident
    if not why.startswith("it has exited"):
        log.warning("%s: PID %d is not its process any more (%s); left alone", what, pid, why)
    return None

