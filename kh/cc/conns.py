"""The control channel's records of one ssh connection: its TCP socket, login and channels
(``Conn``, ``Chan``), the session a channel runs (``Session``), and how a session is ended with
its reason (``end_session``). kh.cc.gate keeps them; kh.cc.sshd runs the sessions.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

import paramiko

from kh.service.access import Grant


@dataclass(eq=False)
class Session:
    """A channel running a command; ``ended`` says why the watcher ended it."""

    channel: paramiko.Channel
    nodes: frozenset[int]
    ended: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(eq=False)
class Chan:
    opened: float
    channel: paramiko.Channel | None = None
    session: Session | None = None


@dataclass(eq=False)
class Conn:
    """One TCP connection, from accept to close."""

    sock: socket.socket
    source: str
    deadline: float  # monotonic time by which the login must have succeeded
    ident: bytes = b""  # the client's identification line, as read so far
    ident_at: float | None = None  # when it was complete
    ready: bool = False  # the client began its key exchange
    slow: bool = False  # handed over without that (a client waiting for our key exchange)
    transport: paramiko.Transport | None = None
    grant: Grant | None = None
    failures: int = 0
    doomed: str | None = None  # the watcher ends it, for this reason
    closed: bool = False
    channels: dict[int, Chan] = field(default_factory=dict)


def end_session(s: Session, reason: str) -> None:
    """Tell the client why on stderr (never waiting for a client that does not read), then
    close the channel with exit status 1."""
    with s.lock:
        if s.ended is not None:
            return
        s.ended = reason
    ch = s.channel
    try:
        ch.settimeout(0.0)
        ch.send_stderr(f"kh: {reason}; this session ends\n".encode())
    except (OSError, EOFError, paramiko.SSHException):
        pass
    try:
        ch.send_exit_status(1)
        ch.close()
    except (OSError, EOFError, paramiko.SSHException):
        pass
