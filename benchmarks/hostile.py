"""Issue-10 numbers on this machine: what hostile principals cost khd.

khd's RSS and thread count (VmRSS and Threads of /proc/PID/status):
  (a) idle, with the whole pool (16 nodes) warm at the U-Boot prompt;
  (b) after one node printed a flood of console output, counted from its console log (1 GiB with
      ``--flood-mib 1024``; by default less, with the time 1 GiB takes at the measured rate and
      the RSS growth extrapolated to 1 GiB, both labelled as projections);
  (c) under the issue's stress load: 200 idle API clients, 50 half-open ssh logins and one
      session that never reads, while another principal runs Listing 1 on 4 apache nodes;
  (f) while every node of the pool prints at once (U-Boot's md) until their console logs grew
      by ``--console-mib`` MiB (1024 for the issue's 1 GiB; 64 by default), one session reading
      it all and one never reading (benchmarks/console_flood.py);
  (g) under unauthenticated ssh churn: ``--churn-clients`` clients each connecting, doing a key
      exchange and failing one password login, ``--churn-logins`` times in all
      (benchmarks/ssh_churn.py);
and (d) the time to refuse a wrong credential (and an unknown principal), (e) khget's latency
alone and while 20 clients guess credentials. Prints numbers (a table, or ``--json``); asserts
nothing. Runs its own khd (own prefix, state dir, ports, outside namespace), removed at the end.
Needs root.

Usage: .venv/bin/python -m benchmarks.hostile [--nodes 16] [--flood-mib 32] [--console-mib 64]
       [--only console-gib ssh-churn ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyroute2 import netns

from benchmarks import console_flood, ssh_churn
from benchmarks.common import REPO, alloc_of, free_port
from benchmarks.console_flood import LogBytes
from benchmarks.hostile_load import (
    MIB,
    QUIET_LINE,
    Failed,
    Guessers,
    HostileLoad,
    Listing1,
    Sampler,
    cli,
    khget,
    log_offsets,
    nodes_of,
    quiet_session,
    refusal,
    release,
    settled,
    spread,
    usage,
    wait_free,
    wait_log,
)
from kh.service import control
from kh.service.config import ServiceConfig
from kh.settings import paths

CRED = "hostile-bench"
# 99 characters; the node's terminal ends each line with \r\n, so 101 bytes of console output.
FLOOD_LINE = "kh-flood " + "0123456789" * 9
Result = dict[str, Any]


def mib(u_kib: int) -> float:
    return round(u_kib / 1024, 1)


def idle(cfg: ServiceConfig, pid: int) -> Result:
    wait_free(cfg, cfg.nodes)
    u = settled(pid)
    return {"nodes": cfg.nodes, "rss_mib": mib(u.rss_kib), "threads": u.threads}


def flood(cfg: ServiceConfig, pid: int, size_mib: int, timeout: float) -> Result:
    """One node boots the shell appliance and prints ``size_mib`` MiB of lines; how fast the
    console carried them and what khd holds afterwards."""
    text = khget(cfg, "flooder", CRED, 1)
    alloc, (node,) = alloc_of(text), nodes_of(text)
    try:
        since = log_offsets(cfg, [node])
        cli(cfg, "khdo", "write", "run kboot", cred=CRED, stdin=text)
        if wait_log(cfg, since, b"kh-ready: shell", 120):
            raise Failed(f"node {node} did not boot the shell appliance")
        time.sleep(2)
        lines = size_mib * MIB // (len(FLOOD_LINE) + 2)
        before = usage(pid)
        counter = LogBytes(cfg.console_log(node))
        # the command line's own echo reads kh-flood-""done: only the output matches
        cmd = (f"awk 'BEGIN{{for(i=0;i<{lines};i++)print \"{FLOOD_LINE}\"}}'; "
               f'echo kh-flood-""done')
        writer = threading.Thread(target=cli, args=(cfg, "khdo", "write", cmd),
                                  kwargs={"cred": CRED, "stdin": text}, daemon=True)
        t0 = time.monotonic()
        complete = False
        with Sampler(pid) as s:
            writer.start()
            while time.monotonic() - t0 < timeout:
                written = counter.poll()
                with open(cfg.console_log(node), "rb") as f:
                    f.seek(max(0, f.seek(0, 2) - 4096))
                    if b"kh-flood-done" in f.read():
                        complete = True
                        break
                time.sleep(0.25)
            seconds = time.monotonic() - t0
            written = counter.poll()
            writer.join(60)
            time.sleep(2)
        after = usage(pid)
        log_line = 25 + len(FLOOD_LINE) + 1  # "2025-01-01T00:00:00.000Z " + line + \n
        console = lines * (len(FLOOD_LINE) + 2) if complete else \
            written * (len(FLOOD_LINE) + 2) // log_line
        rate = console / seconds
        grown = (after.rss_kib - before.rss_kib) / 1024
    finally:
        release(cfg, "flooder", CRED, alloc)
    wait_free(cfg, cfg.nodes)
    time.sleep(2)
    released = usage(pid)
    return {"console_mib": round(console / MIB, 1), "complete": complete,
            "seconds": round(seconds, 1), "rate_kib_s": round(rate / 1024, 1),
            "log_mib_written": round(written / MIB, 1),
            "projected_1gib_s": round((1 << 30) / rate), "rss_before_mib": mib(before.rss_kib),
            "rss_after_mib": mib(after.rss_kib), "rss_peak_mib": mib(s.peak.rss_kib),
            "threads_peak": s.peak.threads, "rss_after_release_mib": mib(released.rss_kib),
            "projected_rss_growth_1gib_mib": round(grown * 1024 / (console / MIB))}


def stress(cfg: ServiceConfig, pid: int, http: int, ssh: int) -> Result:
    wait_free(cfg, cfg.nodes)
    before = usage(pid)
    a_text = khget(cfg, "quieta", CRED, 1)
    a_alloc = alloc_of(a_text)
    b = Listing1(cfg, "listingb", CRED)
    load = HostileLoad(cfg, http, ssh)
    quiet = None
    error = None
    try:
        with Sampler(pid) as s:
            load.open()
            opened = usage(pid)
            (a_node,) = nodes_of(a_text)
            a_log = LogBytes(cfg.console_log(a_node))
            quiet = quiet_session(cfg, a_alloc, CRED, QUIET_LINE)
            try:
                b.run()
            except Failed as e:
                error = str(e)
            closed = load.closed_by_khd()
            a_logged = a_log.poll()
        described = load.describe()
    finally:
        if quiet is not None:
            quiet.close()
        load.close()
        for user, alloc in (("quieta", a_alloc), ("listingb", b.alloc)):
            if alloc is not None:
                release(cfg, user, CRED, alloc)
    wait_free(cfg, cfg.nodes)
    time.sleep(2)
    after = usage(pid)
    return {"load": described, "rss_before_mib": mib(before.rss_kib),
            "threads_before": before.threads, "threads_load_open": opened.threads,
            "rss_load_open_mib": mib(opened.rss_kib),
            "rss_peak_mib": mib(s.peak.rss_kib), "threads_peak": s.peak.threads,
            "rss_after_mib": mib(after.rss_kib), "threads_after": after.threads,
            "closed_by_khd": closed, "quiet_node_log_kib": a_logged // 1024,
            "listing1_seconds": round(b.seconds, 1),
            "listing1_pages": f"{b.pages}/{b.count}", "listing1_error": error}


def register(cfg: ServiceConfig, user: str) -> None:
    """Make ``user`` a registered principal (its first khget), holding nothing afterwards: a
    wrong credential's khget for an unknown name would register that name instead."""
    release(cfg, user, CRED, alloc_of(khget(cfg, user, CRED, 1)))
    wait_free(cfg, cfg.nodes)


def refusals(cfg: ServiceConfig, tries: int) -> Result:
    """``tries`` wrong credentials of each kind, the kinds taking turns, from 127.0.0.1: for a
    registered principal to khget's request and to `kh key list`'s, and for an unknown principal
    to the latter (a khget would register it). Times by HTTP status. A rate limit's 429 is
    counted, then its Retry-After waited out and the try made again (at most 3 times), so
    each kind also gets ``tries`` real refusals (403) to time."""
    register(cfg, "victim")
    kinds = (("wrong_credential_khget", "victim", "/v1/allocations"),
             ("wrong_credential_keylist", "victim", "/v1/keys/list"),
             ("unknown_principal_keylist", "nobody", "/v1/keys/list"))
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k, _, _ in kinds}
    for i in range(tries):
        for key, user, path in kinds:
            for _ in range(4):
                seconds, status, after = refusal(cfg.api_port, user, f"wrong-{i}", path=path)
                runs[key].append((seconds, status))
                if status != 429:
                    break
                time.sleep(min(after or 1.0, 10.0))
    return {k: {str(st): spread([t for t, s in v if s == st]) for st in sorted({s for _, s in v})}
            for k, v in runs.items()}


def khget_latency(cfg: ServiceConfig, cycles: int, guessers: int) -> Result:
    def measure() -> list[float]:
        times = []
        for _ in range(cycles):
            t0 = time.monotonic()
            text = khget(cfg, "bench", CRED, 1)
            times.append(time.monotonic() - t0)
            release(cfg, "bench", CRED, alloc_of(text))
            wait_free(cfg, cfg.nodes)
        return times

    alone = measure()
    register(cfg, "victim")  # the guessers' target (registered already after refusals())
    t0 = time.monotonic()
    with Guessers(cfg.api_port, "victim", guessers) as g:
        guessed = measure()
    dt = time.monotonic() - t0
    return {"alone": spread(alone), "guessing": spread(guessed), "guessers": guessers,
            "guesses_per_s": round(sum(g.statuses.values()) / dt, 1),
            "guess_statuses": {str(k): v for k, v in sorted(g.statuses.items())}}


def table(r: Result) -> str:
    rows: list[tuple[str, str]] = [("git HEAD", r["head"])]
    if "idle" in r:
        i = r["idle"]
        rows.append((f"(a) idle, {i['nodes']} nodes warm", f"RSS {i['rss_mib']} MiB, "
                     f"{i['threads']} threads"))
    if "flood" in r:
        f = r["flood"]
        rows += [("(b) console output (measured)",
                  f"{f['console_mib']} MiB in {f['seconds']} s = {f['rate_kib_s']} KiB/s"
                  f"{'' if f['complete'] else ' (incomplete: counted from the log)'}; "
                  f"{f['log_mib_written']} MiB of log written"),
                 ("(b) khd RSS before / after / peak / released",
                  f"{f['rss_before_mib']} / {f['rss_after_mib']} / {f['rss_peak_mib']} / "
                  f"{f['rss_after_release_mib']} MiB; threads peak {f['threads_peak']}"),
                 ("(b) PROJECTED for 1 GiB (linear)",
                  f"{f['projected_1gib_s']} s ({f['projected_1gib_s'] / 3600:.1f} h); RSS "
                  f"growth {f['projected_rss_growth_1gib_mib']} MiB")]
    if "stress" in r:
        s = r["stress"]
        rows += [("(c) stress load", s["load"]),
                 ("(c) khd before / load open / peak / after",
                  f"threads {s['threads_before']} / {s['threads_load_open']} / "
                  f"{s['threads_peak']} / {s['threads_after']}; RSS {s['rss_before_mib']} / "
                  f"{s['rss_load_open_mib']} / {s['rss_peak_mib']} / {s['rss_after_mib']} MiB"),
                 ("(c) connections khd closed by the end", str(s["closed_by_khd"])),
                 ("(c) the quiet session's node logged", f"{s['quiet_node_log_kib']} KiB "
                  f"(md's 65,536 lines: about 5,800 KiB if the node is never stalled)"),
                 ("(c) Listing 1, 4 apache nodes", f"{s['listing1_pages']} pages in "
                  f"{s['listing1_seconds']} s" + (f"; FAILED: {s['listing1_error']}"
                                                   if s["listing1_error"] else ""))]
    def ms(v: dict[str, float]) -> str:
        return f"median {v['median_ms']:.0f} ms, p95 {v['p95_ms']:.0f} ms (n={v['n']})"

    for sub, by_status in r.get("refusal", {}).items():
        rows.append((f"(d) refuse {sub.replace('_', ' ')}",
                     "; ".join(f"{st}: {ms(v)}" for st, v in by_status.items())))
    for sub in ("alone", "guessing"):
        if "khget" in r:
            rows.append((f"(e) khget {sub}", ms(r["khget"][sub])))
    if "khget" in r:
        k = r["khget"]
        rows.append((f"(e) the {k['guessers']} guessers", f"{k['guesses_per_s']} guesses/s, "
                     f"answers {k['guess_statuses']}"))
    if "console-gib" in r:
        rows += console_flood.rows(r["console-gib"])
    if "ssh-churn" in r:
        rows += ssh_churn.rows(r["ssh-churn"])
    if "end" in r:
        rows.append(("khd at the end, released, pool refilled",
                     f"RSS {r['end']['rss_mib']} MiB, "
                     f"{r['end']['threads']} threads"))
    rows += [("ERROR", e) for e in r["errors"]]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--flood-mib", type=int, default=32, help="console output to print")
    ap.add_argument("--flood-timeout", type=float, default=900.0)
    ap.add_argument("--tries", type=int, default=20, help="wrong credentials of each kind")
    ap.add_argument("--cycles", type=int, default=10, help="khgets alone and while guessing")
    ap.add_argument("--guessers", type=int, default=20)
    ap.add_argument("--http", type=int, default=200, help="idle API clients in the stress load")
    ap.add_argument("--ssh", type=int, default=50, help="half-open ssh logins in the stress load")
    ap.add_argument("--prefix", default=f"kb{os.getpid() % 10000}")
    ap.add_argument("--console-mib", type=int, default=64,
                    help="console-gib: MiB the nodes' logs must grow by, all nodes at once")
    ap.add_argument("--console-timeout", type=float, default=14400.0)
    ap.add_argument("--churn-clients", type=int, default=50)
    ap.add_argument("--churn-logins", type=int, default=2000)
    ap.add_argument("--only", nargs="*", choices=("refusal", "khget", "stress", "flood",
                                                  "console-gib", "ssh-churn"),
                    help="these phases only (the idle numbers are always taken)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    head = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                          capture_output=True, text=True).stdout.strip() or "unknown"
    r: Result = {"head": head, "errors": []}
    outside = f"{args.prefix}-out"  # the outside world Listing 1 fetches pages from
    with tempfile.TemporaryDirectory(prefix="kh-bench-") as tmp:
        netns.create(outside)
        cfg = ServiceConfig(state_dir=Path(tmp) / "state", images=paths().out,
                            nodes=args.nodes, api_port=free_port(), ssh_port=free_port(),
                            prefix=args.prefix, uplink_netns=outside)
        try:
            control.start(cfg)
            pid = control.pid_of(cfg)
            assert pid is not None
            r["idle"] = idle(cfg, pid)
            # The guessing leaves khd larger (each scrypt takes 16 MiB): it comes last.
            phases: list[tuple[str, Callable[[], Result]]] = [
                ("stress", lambda: stress(cfg, pid, args.http, args.ssh)),
                ("flood", lambda: flood(cfg, pid, args.flood_mib, args.flood_timeout)),
                ("console-gib", lambda: console_flood.console_flood(
                    cfg, pid, CRED, args.console_mib, args.console_timeout)),
                ("ssh-churn", lambda: ssh_churn.ssh_churn(
                    cfg, pid, CRED, args.churn_clients, args.churn_logins, 1800.0)),
                ("refusal", lambda: refusals(cfg, args.tries)),
                ("khget", lambda: khget_latency(cfg, args.cycles, args.guessers))]
            for key, phase in phases:
                if args.only and key not in args.only:
                    continue
                try:
                    r[key] = phase()
                except Failed as e:
                    r["errors"].append(f"{key}: {e}")
            # Settled: every released node replaced, so threads that stay are a leak.
            wait_free(cfg, args.nodes)
            u = usage(pid)
            r["end"] = {"rss_mib": mib(u.rss_kib), "threads": u.threads}
        finally:
            control.clean(cfg)
            netns.remove(outside)
    print(json.dumps(r, indent=1) if args.json else table(r))


if __name__ == "__main__":
    main()
