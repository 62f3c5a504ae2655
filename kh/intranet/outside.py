"""A web server in the outside world, for the intranet's "worker reaches the outside world
through GW" arrow: Python's http.server run in the namespace the external domain's uplink
leads to, serving one page that carries a nonce.

The outside world is ``KHDO_NETNS`` when set (a namespace of the caller's, as the tests' uplink
is), else the service's own (``kh outside``). Nothing here sends traffic anywhere but into
that namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from kh import proc
from kh.errors import KhError

SERVING = re.compile(r"Serving HTTP on (\S+) port (\d+)")


@dataclass(frozen=True)
class OutsideWeb:
    """The page's URL (what a worker fetches) and the nonce it carries."""

    url: str
    nonce: str


def enter_argv(env: Mapping[str, str]) -> list[str]:
    """The argv prefix that runs a command in the outside world (KHDO_NETNS, else kh outside)."""
    ns = env.get("KHDO_NETNS") or os.environ.get("KHDO_NETNS")
    if ns:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", ns):
            raise KhError(f"KHDO_NETNS={ns[:40]!r} is not a namespace name")
        return ["nsenter", f"--net=/run/netns/{ns}", "--"]
    return [sys.executable, "-m", "kh.cli.main", "outside", "--"]


def address(prefix: list[str], env: Mapping[str, str]) -> str:
    """The outside world's own IPv4 address (not loopback)."""
    r = proc.run([*prefix, "ip", "-4", "-o", "addr", "show"], env=env, timeout=60,
                 check=False, what="ip addr in the outside world")
    if r.returncode:
        raise KhError("no outside world to put a web server in: "
                      f"{(r.stderr.strip().splitlines() or ['kh outside failed'])[-1]}",
                      "start khd with its outside world (kh service start), or set KHDO_NETNS")
    for m in re.finditer(r"\binet (\d+\.\d+\.\d+\.\d+)/", r.stdout):
        if not ipaddress.IPv4Address(m[1]).is_loopback:
            return m[1]
    raise KhError("the outside world has no IPv4 address", r.stdout.strip()[:200])


@contextlib.contextmanager
def web_server(env: Mapping[str, str], timeout: float = 30.0) -> Iterator[OutsideWeb]:
    """http.server in the outside world on a free port, serving ``index.html`` with a nonce;
    stopped (its process group) on the way out."""
    prefix = enter_argv(env)
    addr = address(prefix, env)
    nonce = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="kh-intranet-www-") as www:
        Path(www, "index.html").write_text(
            f"<html><body><h1>the outside world</h1><p>{nonce}</p></body></html>\n")
        argv = [*prefix, sys.executable, "-u", "-m", "http.server", "0", "--bind", addr,
                "--directory", www]
        with proc.spawn(argv, env=dict(env), stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL) as server:
            port = _port(server, timeout)
            yield OutsideWeb(f"http://{addr}:{port}/", nonce)


def _port(server: subprocess.Popen[bytes], timeout: float) -> int:
    """The port http.server says it serves on (its first line), read within ``timeout``."""
    found: list[int] = []

    def read() -> None:
        assert server.stdout is not None
        line = server.stdout.readline().decode(errors="replace")
        m = SERVING.search(line)
        if m:
            found.append(int(m[2]))
        # the rest of its output (none: requests are logged on stderr) is drained
        for _ in iter(lambda: server.stdout.read(4096) if server.stdout else b"", b""):
            pass

    t = threading.Thread(target=read, daemon=True, name="outside-web")
    t.start()
    t.join(timeout)
    if not found:
        raise KhError("the outside world's web server did not start",
                      f"exit status {server.poll()}")
    return found[0]
