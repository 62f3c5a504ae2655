"""What the paper's scenarios share (issue 12): examples' Python parts, tests and benchmarks
drive kh as a principal does, through this one small library.

    with Scenario(Principal("corp1", Path("corp1cred")), name="intranet") as sc:
        gw = sc.khget("-x", "-i", "-p", "1")         # khget's CLI, read with kh.textobj
        sc.boot(gw, "gateway")                       # Listing 1 (khdo), then every ready line
        out = sc.check(gw, gw.nodes[0], "ip -4 -o addr")   # a command on one node
    # every allocation the scenario made, and any the principal gained meanwhile (an in-node
    # khgetdisk's), is released here: also on an exception, Ctrl-C or SIGTERM

Only kh's public interfaces: the khget, khdo and kh commands (``env`` on top of the caller's
environment names the service: KH_STATE_DIR, KH_PREFIX, KH_SSH_PORT, KHDO_NETNS ...), and the
control channel: a ``tagged`` session on ``con<ID>`` from khget on (every node's console as the
principal sees it, read-only, for its log and ready line) and ``con<ID>.<N>`` for commands on
one node. khd lets a principal hold 16 ssh connections: one per allocation here, and at most
kh.scenario_consoles.MAX_SHELLS nodes' command consoles (the least recently used is closed,
and reopened when used); kh.scenario_consoles holds both kinds.

``logs`` (default: a new directory under $TMPDIR) receives node<N>.console.log per node and
report.json / report.txt (the steps and their seconds, the allocations, the error). A failed
scenario keeps it and says where on stderr; a directory the Scenario made is removed on success.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from kh import proc, textobj
from kh.cli import credential
from kh.errors import KhError, Stopped
from kh.hw import uboot
from kh.hw.console import Console
from kh.hw.nodeshell import BootedNode
from kh.model import AllocationInfo
from kh.scenario_consoles import Shells, Watch
from kh.settings import paths

CLI_TIMEOUT = 900.0  # seconds a khget/khdo/kh command may take (loads to 64 nodes included)


class ScenarioError(KhError):
    """A scenario's step failed: a command refused, a node not ready, a release undone."""


@dataclass(frozen=True)
class Principal:
    """Who runs the scenario: a name and the file holding its credential (what -c takes;
    the credential itself is never on a command line)."""

    user: str
    credential: Path

    def secret(self) -> str:
        s = credential.resolve(str(self.credential))
        assert s is not None  # resolve reads the file, or raises UsageError
        return s


@dataclass(frozen=True)
class Allocation:
    """What khget printed (``text``, for khdo's stdin) and what kh.textobj read from it."""

    text: str
    info: AllocationInfo

    @property
    def id(self) -> int:
        return self.info.id

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(n.number for n in self.info.nodes)

    def address(self, node: int) -> str:
        """The node's address khget gave (its first domain's)."""
        return next(n.address for n in self.info.nodes if n.number == node)

    def netid(self, iface: int) -> int:
        """The domain behind eth<iface>; ScenarioError if the nodes have no such interface."""
        d = self.info.domains[iface] if iface < len(self.info.domains) else None
        if d is None:
            raise ScenarioError(f"con{self.id} has no eth{iface}")
        return d.netid


class Scenario:
    """A principal's run: allocations made with khget, released on the way out (see the
    module's docstring). ``images``: where khdo loads kernel and appliances from (default
    images/out). ``name`` names the logs directory and the report."""

    def __init__(self, principal: Principal, *, env: Mapping[str, str] | None = None,
                 images: Path | None = None, logs: Path | None = None,
                 name: str = "scenario") -> None:
        self.principal = principal
        self.env = dict(env or {})
        self.images = images or paths().out
        self.name = name
        self._own_logs = logs is None
        self.logs = logs or Path(tempfile.mkdtemp(prefix=f"kh-{name}-"))
        self.logs.mkdir(parents=True, exist_ok=True)
        self.steps: list[dict[str, Any]] = []
        self.allocations: dict[int, Allocation] = {}
        self._watches: dict[int, Watch] = {}
        self._shells = Shells(self.logs)
        self._before: set[int] = set()
        self._stack = contextlib.ExitStack()
        self._lock = threading.Lock()
        self._keep = False

    # -- the commands, as a principal types them ------------------------------------------
    def cli(self, module: str, *args: str, stdin: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """``python -m kh.cli.<module> ARGS`` with the scenario's environment; ScenarioError
        (with its stderr's last lines) when it exits non-zero and ``check``."""
        r = proc.run([sys.executable, "-m", f"kh.cli.{module}", *args], env=self.env,
                     input=stdin.encode() if stdin is not None else None, check=False,
                     timeout=CLI_TIMEOUT, what=module)
        if check and r.returncode:
            tail = "\n".join(r.stderr.strip().splitlines()[-5:])
            raise ScenarioError(f"{module} {' '.join(args[:3])[:60]} exited {r.returncode}: "
                                f"{tail}", f"logs: {self.logs}")
        return r

    def khget(self, *opts: str, count: int = 1) -> Allocation:
        """``khget -c FILE OPTS USER COUNT``: the allocation, watched from now on."""
        p = self.principal
        r = self.cli("khget", "-c", str(p.credential), *opts, p.user, str(count))
        alloc = Allocation(r.stdout, textobj.parse(r.stdout))
        with self._lock:
            self.allocations[alloc.id] = alloc
        self._watches[alloc.id] = Watch(alloc, self.ssh_port, p.secret(), self.logs)
        return alloc

    def adopt(self, text: str) -> Allocation:
        """An allocation made earlier (its khget text object, e.g. a lab's remembered one),
        watched from now on as if khget had just made it."""
        alloc = Allocation(text, textobj.parse(text))
        with self._lock:
            self.allocations[alloc.id] = alloc
        secret = self.principal.secret()
        self._watches[alloc.id] = Watch(alloc, self.ssh_port, secret, self.logs)
        return alloc

    def khdo(self, alloc: Allocation, func: str, *args: str, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        """``echo "$nodes" | khdo -c FILE FUNC ARGS``; what the nodes said is its stderr."""
        return self.cli("khdo", "-c", str(self.principal.credential), func, *args,
                        stdin=alloc.text, check=check)

    def kh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``kh ARGS -u USER -c FILE`` (ps, release, domain, token ...)."""
        sub, *rest = args
        return self.cli("main", sub, "-u", self.principal.user, "-c",
                        str(self.principal.credential), *rest, check=check)

    @property
    def ssh_port(self) -> int:
        return int(self.env.get("KH_SSH_PORT") or os.environ.get("KH_SSH_PORT") or 7422)

    # -- booting and reaching nodes -------------------------------------------------------
    def boot(self, alloc: Allocation, appliance: str, *, keys: str = "",
             node_keys: Mapping[int, str] | None = None, timeout: float = 120.0,
             kernel: str = "uImage") -> dict[int, str]:
        """Listing 1: khdo loadkernel and loadramdisk (``appliance``), boot keys appended to
        khargs (``keys`` on every node with khdo write, ``node_keys`` each on its own node's
        console), khdo write "run kboot" (``kernel``: its file in ``images``); then every
        node's ready line, by node. ScenarioError names each node that failed (its line) or
        was not ready within ``timeout`` seconds."""
        with self.step(f"boot {appliance} on con{alloc.id}"):
            self.khdo(alloc, "loadkernel", str(self.images / kernel))
            self.khdo(alloc, "loadramdisk", str(self.images / f"{appliance}.cpio.gz.uimg"))
            if keys:
                self.khdo(alloc, "write", f'setenv khargs "${{khargs}} {keys}"')
            for n, k in (node_keys or {}).items():
                uboot.uboot_command(self._shell(alloc, n), f'setenv khargs "${{khargs}} {k}"')
            marks = {n: c.mark() for n, c in self._watches[alloc.id].consoles.items()}
            self.khdo(alloc, "write", "run kboot")
            return self.wait_ready(alloc, marks, timeout)

    def wait_ready(self, alloc: Allocation, marks: Mapping[int, int], timeout: float
                   ) -> dict[int, str]:
        """Each node's ready line printed past its console offset in ``marks`` (see
        ``console(...).mark()``), waiting up to ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        ready: dict[int, str] = {}
        failed: list[str] = []
        for n, start in marks.items():
            con = self.console(alloc, n)
            try:
                uboot.kboot_outcome(con, start, max(0.1, deadline - time.monotonic()))
            except KhError as e:
                failed.append(f"node {n}: {e.message}")
                continue
            m = uboot.READY.search(con.text(start))
            ready[n] = m.group(0).decode(errors="replace").strip() if m else ""
        if failed:
            raise ScenarioError("; ".join(failed), f"console logs in {self.logs}")
        return ready

    def console(self, alloc: Allocation, node: int) -> Console:
        """The node's console as the principal sees it, read-only (mark, expect, text)."""
        return self._watches[alloc.id].consoles[node]

    def run(self, alloc: Allocation, node: int, command: str, timeout: float = 120.0
            ) -> tuple[str, int]:
        """A shell command on a booted node (kh.hw.nodeshell.BootedNode.run over con<ID>.<N>):
        its output and exit status."""
        return BootedNode(self._shell(alloc, node), "").run(command, timeout)

    def check(self, alloc: Allocation, node: int, command: str, timeout: float = 120.0) -> str:
        """``run``, raising ScenarioError unless the command exits 0."""
        out, status = self.run(alloc, node, command, timeout)
        if status:
            raise ScenarioError(f"node {node}: {command[:60]!r} exited {status}: "
                                f"{out.strip()[-300:]}", f"console logs in {self.logs}")
        return out

    def _shell(self, alloc: Allocation, node: int) -> Console:
        return self._shells.get(alloc, node, self.ssh_port, self.principal.secret())

    # -- release and the report -----------------------------------------------------------
    def release(self, alloc: Allocation | int) -> None:
        """``kh release`` of the allocation; its consoles are closed first."""
        aid = alloc if isinstance(alloc, int) else alloc.id
        self._close_consoles(aid)
        self.kh("release", str(aid))
        with self._lock:
            self.allocations.pop(aid, None)

    def _close_consoles(self, aid: int) -> None:
        self._shells.close(aid)
        watch = self._watches.pop(aid, None)
        if watch:
            watch.close()

    def keep(self) -> None:
        """Leave every allocation running past the scenario's end (a user's --keep): the way
        out releases nothing; it only closes its consoles and writes the report."""
        self._keep = True

    def held(self) -> set[int]:
        """The principal's live allocations (kh ps -u); none for a principal khd does not know."""
        r = self.kh("ps", "--json", check=False)
        return {a["id"] for a in json.loads(r.stdout)["allocations"]} if r.returncode == 0 \
            else set()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a step for the report: {"name", "seconds", "ok"} (and "error")."""
        entry: dict[str, Any] = {"name": name, "ok": False}
        self.steps.append(entry)
        t0 = time.monotonic()
        try:
            yield entry
            entry["ok"] = True
        except BaseException as e:
            entry["error"] = str(e)
            raise
        finally:
            entry["seconds"] = round(time.monotonic() - t0, 3)

    def report(self, error: BaseException | None = None) -> dict[str, Any]:
        return {"scenario": self.name, "principal": self.principal.user, "ok": error is None,
                "error": None if error is None else f"{type(error).__name__}: {error}",
                "steps": self.steps, "allocations": sorted(self.allocations),
                "logs": str(self.logs)}

    def __enter__(self) -> Scenario:
        if threading.current_thread() is threading.main_thread():
            from kh.cli.common import stop_on_signals
            self._stack.enter_context(stop_on_signals())
        self._before = self.held()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        problems: list[str] = []
        self._stack.close()
        with _signals_held() as held:
            gone = set() if self._keep else set(self.allocations) | (self.held() - self._before)
            for aid in list(self._watches) if self._keep else []:
                self._close_consoles(aid)
            for aid in sorted(gone, reverse=True):
                try:
                    self.release(aid)
                except KhError as e:
                    problems.append(f"con{aid}: {e.message}")
        failure = error or (ScenarioError("release failed: " + "; ".join(problems))
                            if problems else None)
        self._write_report(failure)
        if failure is not None:
            print(f"kh: scenario {self.name} failed; console logs and report kept in "
                  f"{self.logs}", file=sys.stderr)
        elif self._own_logs:
            shutil.rmtree(self.logs, ignore_errors=True)
        if error is None and problems:
            raise ScenarioError("release failed: " + "; ".join(problems),
                                f"kh ps -u {self.principal.user} shows what is left")
        if error is None and held:
            raise Stopped(held[0])

    def _write_report(self, error: BaseException | None) -> None:
        rep = self.report(error)
        (self.logs / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
        lines = [f"{self.name}: {'ok' if rep['ok'] else 'FAILED: ' + str(rep['error'])}"]
        lines += [f"  {s['name']:<48} {s.get('seconds', 0):8.1f} s  "
                  f"{'ok' if s['ok'] else 'failed: ' + str(s.get('error', ''))[:200]}"
                  for s in self.steps]
        (self.logs / "report.txt").write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Within the block (the release), SIGTERM, SIGHUP and SIGINT are noted, not acted on, so
    a signal never cuts a release short; the list holds those that came."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return
    sigs = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    old = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in sigs}
    try:
        yield came
    finally:
        for s, h in old.items():
            signal.signal(s, h)
