"""Sockets created by another local user, for tests of what tells local users apart: a child
process drops to ``uid`` and connects, then hands the socket back (SCM_RIGHTS). The socket
keeps its creator's uid, as the kernel reports it (kh.peer). Needs root."""

from __future__ import annotations

import os
import socket

import pytest

NOBODY = 65534


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("creating a socket as another user needs root")


def connect_as(uid: int, address: tuple[str, int], source: str = "127.0.0.1",
               timeout: float | None = None) -> socket.socket:
    """A TCP connection to ``address`` from ``source``, created by a process running as
    ``uid`` (root only: PermissionError otherwise); the caller gets the connected socket.
    OSError when it cannot be made (within ``timeout`` seconds, if given)."""
    if os.geteuid() != 0:
        raise PermissionError("creating a socket as another user needs root")
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: as ``uid``, connect, hand over, exit without cleanup
        code = 1
        try:
            parent.close()
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket()
            s.settimeout(timeout)
            s.bind((source, 0))
            s.connect(address)
            socket.send_fds(child, [b"s"], [s.fileno()])
            code = 0
        finally:
            os._exit(code)
    child.close()
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(parent, 1, 1)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    if not fds:
        raise ConnectionError(f"no connection to {address[0]}:{address[1]} as uid {uid}")
    s = socket.socket(fileno=fds[0])
    s.settimeout(None)
    return s
