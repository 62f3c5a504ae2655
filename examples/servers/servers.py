"""The paper's general-purpose servers, both approaches, as a principal runs them
(examples/servers/nfsroot.sh and aoeroot.sh run this).

nfsroot: the file server of Figure 3 (AoE disks, LVM2, ext3) holds the full root, exported
    over NFS on pnet; a server boots it read-only, its writable parts in RAM.
aoeroot: a disk node's RAM holds an ext3 copy of the full root (the rootdisk appliance); a
    server boots with that AoE disk as its read-write root.

On either server the principal logs in over ssh (its own key, passed as boot key kh.sshkey;
the server's host key read from its console through the control channel and pinned), runs
python3, starts `python3 -m http.server`, and a worker on pnet fetches its page. Nothing is
installed: everything comes from the root. The nodes are released at the end, also on a
failure or Ctrl-C (kh.scenario), and a failed run keeps every console log and the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kh.allocation import node_address
from kh.errors import KhError
from kh.scenario import Allocation, Principal, Scenario, ScenarioError

HOSTKEY = re.compile(rb"kh: ssh host key (ssh-ed25519 [A-Za-z0-9+/]+={0,2})\r?\n")
SERVER_READY = re.compile(rb"kh-ready: server [^\r\n]*\r?\n")
PORT = 8000  # the principal's service on the server
DISK_MB = 96  # nfsroot: each of the file server's two AoE disks (the root is ~94 MB)


OUT = [sys.stdout]  # where the run is told: stderr with --json (stdout carries the report)


def say(text: str) -> None:
    print(text, file=OUT[0], flush=True)


def ip(netid: int, node: int) -> str:
    """A node's address in a domain: kh's address rule (docs/service.md)."""
    return str(node_address(netid, node).ip)


def iface_of(alloc: Allocation, netid: int) -> int:
    """Which ethN of the allocation's nodes is in domain ``netid``."""
    for i, d in enumerate(alloc.info.domains):
        if d is not None and d.netid == netid:
            return i
    raise ScenarioError(f"con{alloc.id} has no interface in domain {netid}")


class Run:
    """One scenario's state: the harness, the principal's ssh key, what was measured."""

    def __init__(self, sc: Scenario, work: Path, key: Path | None) -> None:
        self.sc = sc
        self.work = work
        self.result: dict[str, Any] = {}
        self.ssh_argv: list[str] = []  # ssh to the server as root, once published
        self.ssh_login: list[str] = []  # the same, as a user would type it
        self.domains: list[int] = []  # the private domains khget -p made, oldest first
        if key is None:
            key = work / "id_ed25519"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kh-servers",
                            "-f", str(key)], check=True)
        self.key = key
        kind, b64 = Path(f"{key}.pub").read_text().split()[:2]
        self.sshkey = f"{kind}:{b64}"  # the boot key's form: ':' for the space

    def khget(self, role: str, *opts: str, count: int = 1) -> Allocation:
        p = self.sc.principal
        with self.sc.step(f"khget {role}"):
            a = self.sc.khget(*opts, count=count)
        if "-p" in opts:  # the new domains are the allocation's last ones
            made = int(opts[opts.index("-p") + 1])
            self.domains += [d.netid for d in a.info.domains if d is not None][-made:]
        say(f"$ {role}=$(khget {' '.join(opts)} -c {p.credential} {p.user} {count})"
            f"    # con{a.id}: node{'s' if count > 1 else ''} {' '.join(map(str, a.nodes))}")
        return a

    def boot(self, alloc: Allocation, appliance: str, *, keys: str = "",
             node_keys: dict[int, str] | None = None, timeout: float = 180) -> dict[int, str]:
        shown = keys or " | ".join(f"node{n}: {k}" for n, k in (node_keys or {}).items())
        keys_said = f"khargs += {shorten(shown)}, " if shown else ""
        say(f"  khdo loadkernel, loadramdisk {appliance}, {keys_said}write \"run kboot\"")
        t0 = time.monotonic()
        ready = self.sc.boot(alloc, appliance, keys=keys, node_keys=node_keys, timeout=timeout)
        for n, line in ready.items():
            say(f"  node{n}: {line}")
        self.result.setdefault("boot_seconds", {})[appliance] = round(time.monotonic() - t0, 1)
        return ready

    def server_up(self, alloc: Allocation, node: int, mark: int, timeout: float) -> str:
        """After the boot appliance's ready line: the root's own init (rcS), its ssh server's
        host key (printed on the console, read through the control channel) and its ready
        line. Returns the host key ("ssh-ed25519 BASE64")."""
        con = self.sc.console(alloc, node)
        with self.sc.step("the root's init: ssh server and ready line"):
            key = con.expect(HOSTKEY, timeout, stage="the server's ssh host key line",
                             start=mark)
            line = con.expect(SERVER_READY, timeout, stage="the root's ready line (rcS)",
                              start=mark)
        say(f"  node{node}: {line.group(0).decode(errors='replace').strip()}")
        hostkey = key.group(1).decode()
        say(f"  node{node}: ssh host key {shorten(hostkey, 60)} (pinned from the console)")
        return hostkey

    def login(self, alloc: Allocation, node: int, hostkey: str, worker: Allocation,
              worker_node: int, server_ip: str) -> None:
        """kh publish NODE 22, then as the principal over ssh: python3, a page and
        `python3 -m http.server`; the worker fetches the page."""
        with self.sc.step("kh publish NODE 22"):
            r = self.sc.kh("publish", str(node), "22")
        m = re.search(r"127\.0\.0\.1:(\d+)", r.stdout)
        if not m:
            raise ScenarioError(f"kh publish printed no host port: {r.stdout.strip()[:200]}")
        port = int(m[1])
        p = self.sc.principal
        say(f"$ kh publish -u {p.user} -c {p.credential} {node} 22    # 127.0.0.1:{port}")
        known = self.work / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {hostkey}\n")
        self.ssh_argv = ["ssh", "-i", str(self.key), "-p", str(port), "-o", "IdentitiesOnly=yes",
                         "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                         "-o", "BatchMode=yes", "-o", "ConnectTimeout=30",
                         "-o", "LogLevel=ERROR", "root@127.0.0.1"]
        self.ssh_login = ["ssh", "-i", str(self.key), "-p", str(port), "-o",
                          f"UserKnownHostsFile={known}", "root@127.0.0.1"]
        say(f"$ ssh -p {port} root@127.0.0.1    # the key pinned: UserKnownHostsFile={known}")
        with self.sc.step("ssh: python3"):
            t0 = time.monotonic()
            out = self.ssh("python3 -c 'import platform, sys; print(\"python\", "
                           "platform.python_version(), sys.platform, platform.machine(), "
                           "platform.node())'; "
                           "awk '$2 == \"/\" {print \"root:\", $1, $3, $4}' /proc/mounts "
                           "| tail -n 1")
            self.result["ssh_python_seconds"] = round(time.monotonic() - t0, 1)
        for line in out.splitlines():
            say(f"  {shorten(line)}")
        self.result["python"] = out.splitlines()[0] if out else ""
        self.result["root_mount"] = out.splitlines()[-1] if out else ""
        token = self.result["token"] = secrets.token_hex(8)
        page = f"hello from {{host}}: kh general-purpose server {token}"
        with self.sc.step("ssh: python3 -m http.server"):
            self.ssh(f"mkdir -p /var/www/kh && cd /var/www/kh && "
                     f"echo \"{page.format(host='$(hostname)')}\" > index.html && "
                     f"nohup python3 -m http.server {PORT} >/var/log/kh-http.log 2>&1 "
                     f"</dev/null & echo started")
        say(f"  python3 -m http.server {PORT} in /var/www/kh (started over ssh)")
        self.fetch(worker, worker_node, f"http://{server_ip}:{PORT}/", token)

    def ssh(self, command: str, timeout: float = 300) -> str:
        r = subprocess.run([*self.ssh_argv, command], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=timeout)  # not the user's typing
        if r.returncode:
            raise ScenarioError(f"ssh {command[:50]!r} exited {r.returncode}: "
                                f"{(r.stderr or r.stdout).strip()[-300:]}")
        return r.stdout.strip()

    def fetch(self, worker: Allocation, node: int, url: str, token: str,
              timeout: float = 180) -> None:
        """The worker fetches the page (retrying while python3 starts on the server)."""
        with self.sc.step("a worker fetches the page"):
            t0 = time.monotonic()
            deadline = t0 + timeout
            while True:
                out, status = self.sc.run(worker, node, f"wget -q -T 10 -O - {url}", 60)
                if status == 0 and token in out:
                    break
                if time.monotonic() > deadline:
                    raise ScenarioError(f"node {node}: wget {url} gave no page in {timeout:.0f} "
                                        f"s (last: status {status}, {out.strip()[-200:]!r})")
                time.sleep(2)
            self.result["fetch_seconds"] = round(time.monotonic() - t0, 1)
        page = out.strip().splitlines()[-1]
        self.result["page"] = page
        say(f"  node{node}$ wget -q -O - {url}\n  {page}")


def shorten(text: str, width: int = 100) -> str:
    text = re.sub(r"(ssh-ed25519:)\S{12,}", r"\1...", text)
    return text if len(text) <= width else text[:width - 3] + "..."


def nfsroot(run: Run, disks: int) -> None:
    """First approach: the full root on the file server (AoE disks, LVM2, ext3), over NFS."""
    fs = run.khget("fs", "-i", "-p", "2")
    (fsn,) = fs.nodes
    pnet, disknet = fs.netid(1), fs.netid(2)
    say(f"  pnet is domain {pnet}, disknet is domain {disknet}")
    if disks:
        d = run.khget("disks", "-n", str(disknet), count=disks)
        run.boot(d, "vblade", node_keys={n: f"kh.aoe=1.{i} kh.disksize={DISK_MB}M"
                                         for i, n in enumerate(d.nodes)})
    ready = run.boot(fs, "fileserver", keys=f"kh.disks={disks} kh.export=eth1 kh.aoeif=eth2 "
                                            "kh.rootimage=root.tar.gz", timeout=1200)
    if "export=" not in ready[fsn]:
        raise ScenarioError(f"the file server exports nothing: {ready[fsn]}")
    srv = run.khget("server", "-x", "-n", str(pnet))
    (sn,) = srv.nodes
    root = f"{ip(pnet, fsn)}:/export/root"
    mark = run.sc.console(srv, sn).mark()
    run.boot(srv, "nfsroot", keys=f"kh.nfsroot={root} kh.sshkey={run.sshkey}")
    hostkey = run.server_up(srv, sn, mark, 300)
    w = run.khget("worker", "-n", str(pnet))
    run.boot(w, "worker")
    run.result.update(approach="nfsroot", server=sn, root=root)
    run.login(srv, sn, hostkey, w, w.nodes[0], ip(pnet, sn))
    # the root is the file server's, read-only: what the principal wrote went to RAM
    _, status = run.sc.run(fs, fsn, "test -e /export/root/var/www/kh/index.html", 60)
    if status == 0:
        raise ScenarioError("the server's page landed on the file server's read-only root")


def aoeroot(run: Run, disk_size: str) -> None:
    """Second approach: a disk node's RAM holds the root (ext3); the server boots from it."""
    rd = run.khget("disk", "-i", "-p", "1")
    (dn,) = rd.nodes
    disknet = rd.netid(1)
    say(f"  disknet is domain {disknet}")
    run.boot(rd, "rootdisk", keys=f"kh.aoe=1.0 kh.aoeif=eth1 kh.disksize={disk_size}",
             timeout=1200)
    srv = run.khget("server", "-x", "-n", str(disknet), "-p", "1")
    (sn,) = srv.nodes
    pnet = srv.netid(2)
    say(f"  pnet is domain {pnet}")
    mark = run.sc.console(srv, sn).mark()
    run.boot(srv, "aoeroot", keys=f"kh.aoeroot=1.0 kh.aoeif=eth{iface_of(srv, disknet)} "
                                  f"kh.sshkey={run.sshkey}")
    hostkey = run.server_up(srv, sn, mark, 300)
    w = run.khget("worker", "-n", str(pnet))
    run.boot(w, "worker")
    run.result.update(approach="aoeroot", server=sn, root="e1.0")
    run.login(srv, sn, hostkey, w, w.nodes[0], ip(pnet, sn))
    # read-write: the page's bytes are in the disk node's RAM, in the file vblade serves, at
    # the block the server's ext3 put them (FIBMAP, asked with python3 on the server: _IO(0, 1),
    # which is 0x20000001 on powerpc, whose _IOC_NONE is 1 at bit 29)
    with run.sc.step("the page is on the disk node"):
        block = int(run.ssh("sync; python3 -c 'import fcntl, os, struct; "
                            "fd = os.open(\"/var/www/kh/index.html\", os.O_RDONLY); print(struct."
                            "unpack(\"i\", fcntl.ioctl(fd, 0x20000001, b\"\\0\" * 4))[0])'"))
        token = run.result["token"]
        out = run.sc.check(rd, dn, f"dd if=/disk/root.img bs=4096 skip={block} count=1 "
                                   f"2>/dev/null | grep -a -o {token}", 60)
    if token not in out:
        raise ScenarioError(f"the page written on the server is not in block {block} of the "
                            f"disk node {dn}'s /disk/root.img")
    say(f"  node{dn} (the disk): the page's bytes are in block {block} of /disk/root.img, in "
        "its RAM")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="servers", description=__doc__.split("\n\n")[0])
    ap.add_argument("approach", choices=("nfsroot", "aoeroot"))
    ap.add_argument("-u", "--user", default=os.environ.get("KH_USER", "corp1"),
                    help="the principal (default corp1, or $KH_USER)")
    ap.add_argument("-c", "--cred", type=Path, default=None,
                    help="file holding its credential (default ./<user>cred, made if missing)")
    ap.add_argument("-i", "--key", type=Path, default=None,
                    help="the ssh private key to log in with (default: a new one for the run)")
    ap.add_argument("--disks", type=int, default=2, help="nfsroot: the file server's AoE "
                    f"disks, {DISK_MB} MB each (default 2)")
    ap.add_argument("--disksize", default="160M", help="aoeroot: the root disk (default 160M)")
    ap.add_argument("--logs", type=Path, default=None,
                    help="console logs and report.json here (kept on failure)")
    ap.add_argument("--login", action="store_true",
                    help="at the end, an interactive ssh session on the server; the nodes are "
                         "released when it ends (unless --keep)")
    ap.add_argument("--keep", action="store_true",
                    help="leave the nodes running (and the ssh key and known_hosts) and say "
                         "how to log in and how to release them")
    ap.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    a = ap.parse_args(argv)
    if not 1 <= a.disks <= 8 and a.approach == "nfsroot":
        ap.error("--disks: 1 to 8")
    cred = a.cred or Path(f"{a.user}cred")
    if not cred.exists():
        old = os.umask(0o077)
        try:
            cred.write_text(secrets.token_urlsafe(24) + "\n")
        finally:
            os.umask(old)
        print(f"servers: made a credential for {a.user} in {cred} (mode 600)", file=sys.stderr)
    OUT[0] = sys.stderr if a.json else sys.stdout
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        if a.keep:
            tmp = tempfile.mkdtemp(prefix="kh-servers-")
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kh-servers-"))
        sc = Scenario(Principal(a.user, cred), logs=a.logs, name=a.approach,
                      env=os.environ)
        run = Run(sc, Path(tmp), a.key)
        error: KhError | None = None
        try:
            with sc:
                play(a, run, cred, t0)
        except (KhError, subprocess.SubprocessError) as e:
            error = e if isinstance(e, KhError) else ScenarioError(str(e))
        if not a.keep:  # the allocations are released: their private domains go too
            for netid in reversed(run.domains):
                r = sc.cli("main", "domain", "rm", "-u", a.user, "-c", str(cred), str(netid),
                           check=False)
                if r.returncode and error is None:
                    error = ScenarioError(f"kh domain rm {netid}: {r.stderr.strip()[-200:]}")
        if error is not None:
            print(f"kh: {error.message}" + (f" ({error.hint})" if error.hint else ""),
                  file=sys.stderr)
            if "khd is not running" in error.message:
                need = 3 if a.approach == "aoeroot" else 3 + a.disks
                print(f"servers: {a.approach} needs a running khd with {need} free nodes; start "
                      f"one (as root): kh service start --nodes {need}", file=sys.stderr)
        report(a, sc, run, None if error is None else str(error))
        return 0 if error is None else error.exit_code  # 128+N when stopped by signal N


def play(a: argparse.Namespace, run: Run, cred: Path, t0: float) -> None:
    """The scenario, then --login's session and --keep's word."""
    sc = run.sc
    say(f"== {a.approach}: a general-purpose server, principal {a.user}")
    if a.approach == "nfsroot":
        nfsroot(run, a.disks)
    else:
        aoeroot(run, a.disksize)
    run.result["seconds"] = round(time.monotonic() - t0, 1)
    say(f"{a.approach}: ssh login on node{run.result['server']} (root {run.result['root']}), "
        f"{run.result['python']}, its http.server fetched by a worker; "
        f"{run.result['seconds']:.0f} s")
    if a.login and sys.stdin.isatty():
        say("== interactive ssh session" + ("" if a.keep else
                                              "; the nodes are released when it ends"))
        subprocess.run([*run.ssh_argv[:-1], "-t", "-o", "BatchMode=no", run.ssh_argv[-1]])
    if a.keep:
        sc.keep()
        who = f"-u {a.user} -c {cred}"
        say(f"kept: {' '.join(f'con{i}' for i in sorted(sc.allocations))}\n"
            f"  log in:  {' '.join(run.ssh_login)}\n  release: "
            + "; ".join([f"kh release {who} con{i}" for i in sorted(sc.allocations, reverse=True)]
                        + [f"kh domain rm {who} {d}" for d in reversed(run.domains)]))


def report(a: argparse.Namespace, sc: Scenario, run: Run, error: str | None) -> None:
    rep = {**sc.report(), **run.result, "ok": error is None, "error": error}
    if a.json:
        print(json.dumps(rep, indent=1))
    if error is None:
        print("steps: " + ", ".join(f"{s['name']} {s['seconds']:.0f} s" for s in sc.steps
                                      if s.get("seconds", 0) >= 1), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
