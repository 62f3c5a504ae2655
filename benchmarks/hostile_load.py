"""What benchmarks/hostile.py and tests/integration/test_stress.py do to khd (issue 10): measure its
RSS and threads, open the hostile load (idle API clients, half-open ssh logins, a session that
never reads), run the paper's Listing 1 as a principal, guess credentials.

Everything here talks to a khd given by its ServiceConfig, the way a principal or an attacker on
the host would: the CLI (credential in KH_CREDENTIAL), TCP to 127.0.0.1, ssh (paramiko).
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from benchmarks.common import alloc_of, nodes_of
from kh.client import Client
from kh.errors import KhError
from kh.service.config import ServiceConfig
from tests.unit.as_user import connect_as

MIB = 1 << 20
# The attackers' source: loopback, where any local user's program is, but not the 127.0.0.1 of
# the principals they run beside (khd tells local users apart by uid, not by address).
ATTACKER = "127.0.0.2"
# The attackers' local user, when they run as one other than the principals': nobody.
ATTACKER_UID = 65534
HALF_REQUEST = b"POST /v1/allocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 64\r\n"
SSH_BANNER = b"SSH-2.0-kh_hostile_1.0\r\n"
# What the session that never reads asks its node for at the U-Boot prompt: 1 MiB of memory
# shown as 65,536 lines, about 4 MiB of output, far more than an ssh window.
QUIET_LINE = b"md.l 0 0x40000\n"


class Failed(KhError):
    """A step a principal takes (khget, khdo) did not work."""


@dataclass(frozen=True)
class Usage:
    rss_kib: int  # VmRSS
    threads: int

    @property
    def rss_mib(self) -> float:
        return self.rss_kib / 1024


def usage(pid: int) -> Usage:
    """khd's resident memory and thread count now (FileNotFoundError once it is gone)."""
    f = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
             if ":" in ln)
    return Usage(int(f["VmRSS"].split()[0]), int(f["Threads"]))


def settled(pid: int, quiet: float = 2.0, limit: float = 60.0) -> Usage:
    """khd's usage once its thread count has not changed for ``quiet`` seconds (the pool's
    last starts are over), or after ``limit`` seconds whatever it is doing."""
    deadline = time.monotonic() + limit
    last, since = usage(pid), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.1)
        now = usage(pid)
        if now.threads != last.threads:
            since = time.monotonic()
        last = now
    return last


class Sampler:
    """Samples ``usage(pid)`` every ``interval`` seconds in a thread while entered; ``peak``
    holds the largest RSS and the largest thread count seen (not necessarily at one time)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.peak = usage(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sampler")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                u = usage(self.pid)
            except OSError:
                return  # khd is gone; the peak so far stands
            self.peak = Usage(max(self.peak.rss_kib, u.rss_kib),
                              max(self.peak.threads, u.threads))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _connect(port: int, source: str, uid: int | None = None) -> socket.socket | None:
    """A connection to 127.0.0.1:``port`` from ``source``, made by local user ``uid`` (None:
    this process's), or None if it cannot be made within 2 s."""
    if uid is not None:
        try:
            return connect_as(uid, ("127.0.0.1", port), source, timeout=2)
        except OSError:
            return None
    s = socket.socket()
    s.settimeout(2)  # a server that stopped accepting (its backlog full) drops our SYNs
    try:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    return s


def _closed_by_peer(s: socket.socket) -> bool:
    """True when the server has closed (or reset) this connection; what it sent is left."""
    try:
        s.setblocking(False)
        data = s.recv(65536, socket.MSG_PEEK)
        while data:  # whatever it answered (an ssh banner, an error): read past it
            s.recv(len(data))
            data = s.recv(65536, socket.MSG_PEEK)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


class HostileLoad:
    """The issue's attackers: ``http`` TCP clients of khd's API that stay idle (half send
    nothing, half the first lines of a request and no more) and ``ssh`` half-open logins (half
    send nothing, half only an ssh version banner), all from ``source``, made by local user
    ``uid`` (None: this process's). ``close`` closes every socket."""

    def __init__(self, cfg: ServiceConfig, http: int = 200, ssh: int = 50,
                 source: str = ATTACKER, uid: int | None = None) -> None:
        self.cfg, self.http, self.ssh, self.source, self.uid = cfg, http, ssh, source, uid
        self.socks: dict[str, list[socket.socket]] = {"http": [], "ssh": []}
        self.refused = Counter[str]()  # connections that could not be made (or not tried)

    def open(self) -> None:
        for kind, count, port, first in (("http", self.http, self.cfg.api_port, HALF_REQUEST),
                                         ("ssh", self.ssh, self.cfg.ssh_port, SSH_BANNER)):
            failed = 0
            for i in range(count):
                s = _connect(port, self.source, self.uid) if failed < 3 else None
                if s is None:  # after three in a row, the rest are not tried
                    self.refused[kind] += 1
                    failed += 1
                    continue
                failed = 0
                self.socks[kind].append(s)
                if i % 2:
                    try:
                        s.sendall(first)
                    except OSError:
                        pass

    def closed_by_khd(self) -> dict[str, int]:
        """How many of the open connections khd has closed so far, by kind."""
        return {k: sum(_closed_by_peer(s) for s in v) for k, v in self.socks.items()}

    def describe(self) -> str:
        return (f"{len(self.socks['http'])} idle HTTP clients and {len(self.socks['ssh'])} "
                f"half-open ssh logins from {self.source}"
                f"{'' if self.uid is None else f' as uid {self.uid}'} "
                f"({dict(self.refused) or 'none'} "
                f"refused at connect)")

    def close(self) -> None:
        for v in self.socks.values():
            for s in v:
                s.close()
            v.clear()


def quiet_session(cfg: ServiceConfig, alloc: int, cred: str, line: bytes,
                  window: int = 32768) -> paramiko.SSHClient:
    """A principal's session on ``con<alloc>`` (password ``cred``) that sends ``line`` to its
    nodes and never reads: once ``window`` bytes of their output are unread, khd's sends on the
    channel cannot proceed. Close the returned client to end it."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", port=cfg.ssh_port, username=f"con{alloc}", password=cred,
                   look_for_keys=False, allow_agent=False, timeout=30, banner_timeout=30,
                   auth_timeout=30)
    transport = client.get_transport()
    assert transport is not None
    chan = transport.open_session(window_size=window)
    chan.exec_command("raw")
    chan.sendall(line)
    return client


def cli(cfg: ServiceConfig, prog: str, *args: str, cred: str, stdin: str = "",
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`khget`/`khdo`/`kh` as a principal runs them against ``cfg``'s khd; the credential in
    KH_CREDENTIAL (never on a command line); peripcmd runs in the outside namespace."""
    env = {**os.environ, "KH_STATE_DIR": str(cfg.state_dir), "KH_PREFIX": cfg.prefix,
           "KH_API_PORT": str(cfg.api_port), "KH_SSH_PORT": str(cfg.ssh_port),
           "KH_CREDENTIAL": cred, "KHDO_NETNS": cfg.uplink_netns or ""}
    mod = {"khget": "kh.cli.khget", "khdo": "kh.cli.khdo", "kh": "kh.cli.main"}[prog]
    return subprocess.run([sys.executable, "-m", mod, *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=timeout)


def khget(cfg: ServiceConfig, user: str, cred: str, count: int, *opts: str) -> str:
    """The text object of `khget [OPTS] USER COUNT` (Failed with khget's error)."""
    r = cli(cfg, "khget", *opts, user, str(count), cred=cred)
    if r.returncode:
        raise Failed(f"khget {user} {count}: {r.stderr.strip()}")
    return r.stdout


def release(cfg: ServiceConfig, user: str, cred: str, alloc: int) -> None:
    Client(cfg.socket).call("POST", f"/v1/allocations/{alloc}/release",
                            {"user": user, "credential": cred})


def wait_free(cfg: ServiceConfig, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        nodes = json.loads(Client(cfg.socket).call("GET", "/v1/ps", as_json=True))["nodes"]
        if sum(x["state"] == "free" for x in nodes) >= n:
            return
        if time.monotonic() > deadline:
            states = collections.Counter(x["state"] for x in nodes)
            notes = sorted({f"node {x['node']}: {x['note']}" for x in nodes
                            if x["state"] != "free" and x.get("note")})[:4]
            raise Failed(f"{n} nodes did not come back to the pool within {timeout:.0f} s "
                         f"({dict(states)}{'; ' if notes else ''}{'; '.join(notes)})")
        time.sleep(0.2)


def log_offsets(cfg: ServiceConfig, nodes: list[int]) -> dict[int, int]:
    return {n: cfg.console_log(n).stat().st_size if cfg.console_log(n).exists() else 0
            for n in nodes}


def wait_log(cfg: ServiceConfig, since: dict[int, int], pattern: bytes,
             timeout: float) -> list[int]:
    """Wait until each node's console log shows ``pattern`` past its offset in ``since``;
    the nodes that did not within ``timeout`` seconds."""
    missing = set(since)
    deadline = time.monotonic() + timeout
    while missing and time.monotonic() < deadline:
        for n in list(missing):
            try:
                with open(cfg.console_log(n), "rb") as f:
                    if f.seek(0, 2) >= since[n]:  # smaller: rotated meanwhile, read it all
                        f.seek(since[n])
                    else:
                        f.seek(0)
                    if pattern in f.read():
                        missing.discard(n)
            except FileNotFoundError:
                pass
        time.sleep(0.5)
    return sorted(missing)


@dataclass
class Listing1:
    """The paper's Listing 1 for one principal: khget -x, loadkernel, loadramdisk, write
    "run kboot", then each node's page fetched from the outside world (peripcmd wget)."""

    cfg: ServiceConfig
    user: str
    cred: str
    count: int = 4
    appliance: str = "apache"
    alloc: int | None = None
    nodes: list[int] = field(default_factory=list)
    pages: int = 0  # nodes whose page was fetched
    seconds: float = 0.0

    def run(self, timeout: float = 180) -> None:
        """Raises Failed naming the step that did not work."""
        t0 = time.monotonic()
        text = khget(self.cfg, self.user, self.cred, self.count, "-x")
        self.alloc, self.nodes = alloc_of(text), nodes_of(text)
        for step in (("loadkernel", str(self.cfg.images / "uImage")),
                     ("loadramdisk", str(self.cfg.images / f"{self.appliance}.cpio.gz.uimg"))):
            r = cli(self.cfg, "khdo", *step, cred=self.cred, stdin=text)
            if r.returncode:
                raise Failed(f"khdo {step[0]}: {r.stderr.strip()[-400:]}")
        since = log_offsets(self.cfg, self.nodes)
        r = cli(self.cfg, "khdo", "write", "run kboot", cred=self.cred, stdin=text)
        if r.returncode:
            raise Failed(f"khdo write: {r.stderr.strip()[-400:]}")
        late = wait_log(self.cfg, since, b"kh-ready: " + self.appliance.encode(),
                        timeout - (time.monotonic() - t0))
        if late:
            raise Failed(f"nodes {late} did not boot the {self.appliance} appliance in time")
        out = ""
        for _ in range(3):  # a page or two may come late after the ready line
            r = cli(self.cfg, "khdo", "peripcmd", "wget -q -T 10 -O - http://%ip%/",
                    cred=self.cred, stdin=text)
            out = r.stderr
            self.pages = sum(f"<h1>node{n}</h1>" in out for n in self.nodes)
            if self.pages == self.count:
                break
            time.sleep(2)
        self.seconds = time.monotonic() - t0
        if self.pages != self.count:
            raise Failed(f"{self.pages} of {self.count} pages fetched: {out.strip()[-400:]}")


def post(port: int, path: str, body: dict[str, object], source: str = "127.0.0.1"
         ) -> tuple[int, dict[str, object]]:
    """One JSON POST to khd's API over TCP from ``source``: (HTTP status, answer as JSON, or
    {"text": ...} when it is not)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        conn.request("POST", path, json.dumps(body),
                     {"Content-Type": "application/json", "Accept": "application/json"})
        resp = conn.getresponse()
        raw = resp.read().decode("utf-8", "replace")
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"text": raw}
        return resp.status, answer if isinstance(answer, dict) else {"value": answer}
    finally:
        conn.close()


def refusal(port: int, user: str, cred: str, source: str = "127.0.0.1",
            path: str = "/v1/allocations") -> tuple[float, int, float]:
    """One POST of ``path`` (a request that authenticates) over TCP with a wrong credential:
    (seconds, HTTP status or 0 for no answer, the Retry-After it asked for in seconds or 0).
    Only a registered ``user`` for /v1/allocations: an unknown one would be registered."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        conn.request("POST", path, json.dumps({"user": user, "credential": cred, "count": 1}),
                     {"Content-Type": "application/json", "Accept": "application/json"})
        resp = conn.getresponse()
        resp.read()
        after = resp.getheader("Retry-After") or ""
        return (time.monotonic() - t0, resp.status,
                float(after) if after.isdigit() else 0.0)
    except OSError:
        return time.monotonic() - t0, 0, 0.0
    finally:
        conn.close()


class Guessers:
    """``n`` threads guessing ``user``'s credential over TCP from ``source`` until closed."""

    def __init__(self, port: int, user: str, n: int = 20, source: str = ATTACKER) -> None:
        self.port, self.user, self.source = port, user, source
        self.statuses = Counter[int]()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(n)]

    def _run(self, i: int) -> None:
        k = 0
        while not self._stop.is_set():
            k += 1
            self.statuses[refusal(self.port, self.user, f"guess-{i}-{k}", self.source)[1]] += 1

    def __enter__(self) -> Guessers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def spread(xs: list[float]) -> dict[str, float]:
    """Median and 95th percentile, in milliseconds."""
    s = sorted(xs)
    return {"median_ms": statistics.median(s) * 1000,
            "p95_ms": s[min(len(s) - 1, round(0.95 * (len(s) - 1)))] * 1000, "n": len(s)}
