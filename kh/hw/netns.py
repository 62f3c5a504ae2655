"""Doing things inside a network namespace kh created.

A thread may switch its own network namespace (setns affects only the calling thread), so kh
runs such work in a short-lived thread: a listening socket created there stays in that
namespace for good. External programs enter it through ``nsenter``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from kh.errors import KhError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def path(name: str) -> str:
    return f"{NETNS_DIR}/{name}"


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def enter(name: str) -> None:
    """Move the calling thread (only it) into network namespace ``name`` for good: sockets it
    makes from then on are that namespace's, and so are threads it starts. OSError when
    there is no such namespace; KhError when the kernel refuses (not root)."""
    fd = os.open(path(name), os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise KhError(f"cannot enter network namespace {name}: {os.strerror(err)}",
                          "kh's fabric needs root")
    finally:
        os.close(fd)


def run_in(name: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a thread that has entered network namespace ``name``."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            enter(name)
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name=f"netns-{name}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def sysctl(name: str, key: str, value: str) -> bool:
    """Set a /proc/sys/net key inside namespace ``name``; False if the key does not exist."""
    file = "/proc/sys/" + key.replace(".", "/")

    def write() -> bool:
        if not os.path.exists(file):
            return False
        with open(file, "w") as f:
            f.write(value)
        return True

    return run_in(name, write)


def enter_argv(name: str) -> list[str]:
    """Prefix that runs a program inside namespace ``name``."""
    return ["nsenter", f"--net={path(name)}", "--"]
