"""Issue-10 numbers: khd's RSS and threads under unauthenticated ssh churn. ``clients`` threads
each connect to khd's ssh port from loopback, do a key exchange, fail one password login and
disconnect, again and again until ``logins`` logins were tried: half for a live allocation's
channel (``con<ID>``: its owner's credential, wrong), half for one that does not exist (khd
hashes that password all the same). Used by benchmarks/hostile.py (``--only ssh-churn``).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from typing import Any

import paramiko

from benchmarks.hostile_load import (
    Sampler,
    Usage,
    alloc_of,
    khget,
    release,
    settled,
    spread,
    usage,
    wait_free,
)
from kh.service.config import ServiceConfig

Result = dict[str, Any]
NO_ALLOCATION = 9999  # con9999: no such allocation


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


def one_login(port: int, user: str, password: str) -> str:
    """One TCP connection: key exchange, one password login, close. What came of it:
    "refused" (the login was), "accepted" (it should not be), or what failed before."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    except OSError as e:
        return f"connect: {type(e).__name__}"
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=60)
        t.auth_password(user, password, fallback=False)
        return "accepted"
    except paramiko.AuthenticationException:
        return "refused"
    except (OSError, EOFError, paramiko.SSHException) as e:
        return f"{type(e).__name__}: {str(e)[:60]}"
    finally:
        t.close()
        sock.close()


class Churn:
    """``clients`` threads trying ``logins`` logins in all; ``done`` counts them, ``outcomes``
    by what came of each and by target ("live"/"none"), ``seconds`` each one's duration."""

    def __init__(self, port: int, alloc: int, clients: int, logins: int) -> None:
        self.port, self.alloc, self.logins = port, alloc, logins
        self.lock = threading.Lock()
        self.next = 0
        self.done = 0
        self.outcomes = Counter[str]()
        self.seconds: dict[str, list[float]] = {"live": [], "none": []}
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"churn-{i}")
                        for i in range(clients)]

    def _run(self) -> None:
        while True:
            with self.lock:
                i = self.next
                if i >= self.logins:
                    return
                self.next += 1
            target = "live" if i % 2 == 0 else "none"
            t0 = time.monotonic()
            out = one_login(self.port, f"con{self.alloc if target == 'live' else NO_ALLOCATION}",
                            f"wrong-{i}")
            dt = time.monotonic() - t0
            with self.lock:
                self.done += 1
                self.outcomes[f"{target} {out}"] += 1
                self.seconds[target].append(dt)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> bool:
        """Wait for every thread (``timeout`` seconds in all); True when all ended."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)


def ssh_churn(cfg: ServiceConfig, pid: int, cred: str, clients: int, logins: int,
              timeout: float) -> Result:
    """khd's usage (RSS, threads) before, at every tenth of the logins, at its peak and once
    settled afterwards, with one live allocation of one node whose channel is attacked."""
    wait_free(cfg, cfg.nodes)
    text = khget(cfg, "churned", cred, 1)
    alloc = alloc_of(text)
    series: list[Result] = []
    try:
        before = settled(pid)
        churn = Churn(cfg.ssh_port, alloc, clients, logins)
        t0 = time.monotonic()
        with Sampler(pid, interval=0.2) as s:
            churn.start()
            while churn.done < logins and time.monotonic() - t0 < timeout:
                time.sleep(0.2)
                if churn.done >= (len(series) + 1) * logins // 10:
                    u = usage(pid)
                    series.append({"logins": churn.done, "rss_mib": mib(u.rss_kib),
                                   "threads": u.threads})
            finished = churn.join(max(1.0, timeout - (time.monotonic() - t0)))
            seconds = time.monotonic() - t0
        after = settled(pid)
        time.sleep(30)  # past the 20 s login timeout: anything held for a login is gone
        later = settled(pid)
    finally:
        release(cfg, "churned", cred, alloc)
    wait_free(cfg, cfg.nodes)
    return {"clients": clients, "logins": churn.done, "finished": finished,
            "seconds": round(seconds, 1), "per_s": round(churn.done / seconds, 1),
            "login_time": {k: spread(v) for k, v in churn.seconds.items() if v},
            "outcomes": dict(sorted(churn.outcomes.items())),
            "before": _u(before), "peak": _u(s.peak), "after": _u(after),
            "after_30s": _u(later), "series": series}


def _u(u: Usage) -> Result:
    return {"rss_mib": mib(u.rss_kib), "threads": u.threads}


def rows(c: Result) -> list[tuple[str, str]]:
    """The table rows of an ssh_churn result."""
    def u(k: str) -> str:
        return f"{c[k]['rss_mib']} MiB/{c[k]['threads']}"

    late = "" if c["finished"] else " (TIMED OUT)"
    times = "; ".join(f"con{'ID' if k == 'live' else NO_ALLOCATION} median {v['median_ms']:.0f} "
                      f"ms, p95 {v['p95_ms']:.0f} ms" for k, v in c["login_time"].items())
    curve = ", ".join(f"{p['logins']}:{p['rss_mib']}/{p['threads']}" for p in c["series"])
    return [
        (f"(g) ssh churn, {c['clients']} clients",
         f"{c['logins']} failed logins in {c['seconds']} s ({c['per_s']}/s{late}; each login: "
         f"{times})"
         f"; {c['outcomes']}"),
        ("(g) khd RSS/threads before / peak / settled / 30 s later",
         " / ".join(u(k) for k in ("before", "peak", "after", "after_30s"))),
        ("(g) khd RSS MiB/threads by logins done", curve)]
