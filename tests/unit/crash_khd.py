"""A real Service (store, admission, allocation, recovery) whose host parts are stand-ins that
outlive the process, so that a khd can be killed at any step of a request and a new one can
recover on the same state directory.

- a node's QEMU is a real process carrying the node tag (``-name TAG,process=TAG``), started in
  a session of its own as khd starts QEMUs, so khd's own PID checks and kills work on it;
- its U-Boot environment and its wiring are files under ``<host>/env/<pid>`` and
  ``<host>/wire/<pid>`` (what `setenv khargs` and the fabric's attach would leave in that QEMU);
- the fabric's bridges are files ``<host>/bridges/<netid>``.

Run as ``python -m tests.unit.crash_khd HOST SCENARIO TARGET WHEN NTH``: sets the scenario up,
then runs its request with ``TARGET`` (``store.commit_allocation``, ``nodes.stop``, ...) made to
kill the process (``os._exit``, no clean-up of any kind runs) before or after its NTH call.
Exits CRASHED when it did, 0 when the request finished first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kh.allocation import Request
from kh.model import NodeState
from kh.service import procid
from kh.service.config import ServiceConfig
from kh.service.core import Service
from kh.service.qemunode import IDENT_FILE, node_tag
from kh.store import NodeRow

CRASHED = 77
CRED = {"alice": "alice-secret", "bob": "bob-secret"}


def host_of(cfg: ServiceConfig) -> Path:
    return cfg.state_dir.parent


def save_config(cfg: ServiceConfig) -> None:
    """For the child khd: the same settings."""
    (host_of(cfg) / "cfg.json").write_text(json.dumps(
        {"state_dir": str(cfg.state_dir), "images": str(cfg.images), "nodes": cfg.nodes,
         "prefix": cfg.prefix}))


def load_config(host: Path) -> ServiceConfig:
    d = json.loads((host / "cfg.json").read_text())
    return ServiceConfig(state_dir=Path(d["state_dir"]), images=Path(d["images"]),
                         nodes=d["nodes"], prefix=d["prefix"])


@dataclass
class FakeRunning:
    pid: int


def spawn(cfg: ServiceConfig, number: int) -> int:
    """A stand-in QEMU for node ``number``: sleeps, carries the tag, leads its own session."""
    tag = node_tag(cfg, number)
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "-name",
                          f"{tag},process={tag}"], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    while (ident := procid.identify(p.pid, tag)) is None:  # exec shows the new argv later
        time.sleep(0.005)
    cfg.node_dir(number).mkdir(parents=True, exist_ok=True)
    procid.save(cfg.node_dir(number) / IDENT_FILE, ident)  # as khd records a QEMU it starts
    return p.pid


def is_node(cfg: ServiceConfig, number: int, pid: int | None) -> bool:
    return bool(pid) and procid.identify(pid or 0, node_tag(cfg, number)) is not None


def tagged(cfg: ServiceConfig) -> Iterator[tuple[int, str]]:
    """(PID, node tag) of every process with an argument that starts with a node tag of
    ``cfg``'s prefix (``<prefix>-node<N>``, up to a comma): the stand-in QEMUs, whoever started
    them."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for a in args:
                tag = a.split(b",")[0].decode(errors="replace")
                if tag.startswith(f"{cfg.prefix}-node"):
                    yield int(entry), tag
                    break


def kill_all(cfg: ServiceConfig) -> None:
    """End every stand-in QEMU of this test (by its tag), whoever started it."""
    for pid, _ in tagged(cfg):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


class Host:
    """The stand-in host parts of one Service, as files."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.dir = host_of(svc.cfg)
        for d in ("env", "wire", "bridges"):
            (self.dir / d).mkdir(exist_ok=True)
        self.reset_hook: Callable[[int], None] = lambda n: None
        s, f, nodes = svc, svc.fabric, svc.nodes
        f.ensure = lambda: None  # type: ignore[method-assign]
        f.ensure_domain = self.ensure_domain  # type: ignore[method-assign]
        f.remove_domain = self.remove_domain  # type: ignore[method-assign]
        f.domain_bridges = self.bridges  # type: ignore[method-assign]
        f.attach = self.attach  # type: ignore[method-assign]
        nodes.uboot = self.uboot  # type: ignore[method-assign]
        nodes.set_links = lambda number, used: None  # type: ignore[method-assign]
        nodes.stop = self.stop  # type: ignore[method-assign]
        nodes.reset = self.reset  # type: ignore[method-assign]
        nodes.reattach = self.reattach  # type: ignore[method-assign]
        s.pool.start = lambda: None  # type: ignore[method-assign]
        s.forwards.start = lambda: None  # type: ignore[method-assign]  # no outside world

    # fabric
    def ensure_domain(self, netid: int) -> str:
        (self.dir / "bridges" / str(netid)).touch()
        return f"br{netid}"

    def remove_domain(self, netid: int) -> None:
        (self.dir / "bridges" / str(netid)).unlink(missing_ok=True)

    def bridges(self) -> list[int]:
        return sorted(int(p.name) for p in (self.dir / "bridges").iterdir())

    def attach(self, number: int, slot: int, netid: int | None) -> None:
        wire = self.dir / "wire" / f"{self._pid(number)}.{slot}"
        if netid is None:
            wire.unlink(missing_ok=True)
        else:
            wire.write_text(str(netid))

    # nodes
    def _pid(self, number: int) -> int:
        return self.svc.nodes.running[number].pid  # type: ignore[attr-defined]

    def uboot(self, number: int, line: str, timeout: float = 10.0) -> str:
        (self.dir / "env" / str(self._pid(number))).write_text(line)
        return ""

    def reset(self, number: int, timeout: float = 30.0) -> None:
        pid = self._pid(number)
        self.reset_hook(number)
        (self.dir / "env" / str(pid)).unlink(missing_ok=True)  # U-Boot starts afresh

    def stop(self, number: int) -> None:
        node = self.svc.nodes.running.pop(number, None)
        if node is not None:
            os.killpg(node.pid, signal.SIGKILL)  # type: ignore[attr-defined]
            while is_node(self.svc.cfg, number, node.pid):  # type: ignore[attr-defined]
                time.sleep(0.005)

    def reattach(self, number: int, pid: int) -> FakeRunning | None:
        if not is_node(self.svc.cfg, number, pid):
            return None
        node = FakeRunning(pid)
        self.svc.nodes.running[number] = node  # type: ignore[assignment]
        return node

    def fill(self) -> None:
        """What the pool does: every configured node that has no row gets a fresh QEMU."""
        for n in range(1, self.svc.cfg.nodes + 1):
            if self.svc.store.node(n) is None:
                pid = spawn(self.svc.cfg, n)
                self.svc.store.put_node(NodeRow(n, self.svc.store.new_uid(), NodeState.FREE,
                                                pid, None, str(self.svc.cfg.node_dir(n)),
                                                time.time(), None))
                self.svc.nodes.running[n] = FakeRunning(pid)  # type: ignore[assignment]

    def env(self, pid: int | None) -> str | None:
        p = self.dir / "env" / str(pid)
        return p.read_text() if p.exists() else None

    def wired(self, pid: int | None) -> list[str]:
        return sorted(p.name for p in (self.dir / "wire").glob(f"{pid}.*"))


def service(cfg: ServiceConfig) -> tuple[Service, Host]:
    svc = Service(cfg)
    return svc, Host(svc)


def khget(svc: Service, user: str, count: int = 2, **kw: Any) -> int:
    return svc.khget(Request(user=user, count=count, **kw), CRED[user]).id


SCENARIOS: dict[str, tuple[Callable[[Service], Any], Callable[[Service, Any], Any]]] = {
    # (set-up, the request that is cut short)
    "khget": (lambda s: None, lambda s, _: khget(s, "alice", new_private=1)),
    "release": (lambda s: khget(s, "alice", new_private=1),
                lambda s, a: s.release(a, "alice", CRED["alice"])),
    "reset": (lambda s: khget(s, "alice", count=1),
              lambda s, a: s.reset(s.store.nodes_of(a)[0].number, "alice", CRED["alice"])),
    "remove": (lambda s: (khget(s, "alice", new_private=2), khget(s, "bob", count=1)),
               lambda s, _: s.remove_principal("alice")),
}


def arm(svc: Service, target: str, when: str, nth: int) -> None:
    """Make ``target`` (``store.x``, ``fabric.x``, ``nodes.x``) end the process before or
    after its ``nth`` call."""
    owner_name, attr = target.split(".")
    owner = {"store": svc.store, "fabric": svc.fabric, "nodes": svc.nodes}[owner_name]
    real = getattr(owner, attr)
    calls = [0]
    lock = threading.Lock()

    def crashing(*args: Any, **kw: Any) -> Any:
        with lock:  # khget configures its nodes in parallel: each call knows its own number
            calls[0] += 1
            this = calls[0]
        if this == nth and when == "before":
            os._exit(CRASHED)
        result = real(*args, **kw)
        if this == nth and when == "after":
            os._exit(CRASHED)
        return result

    setattr(owner, attr, crashing)


def main(argv: list[str]) -> int:
    host, scenario, target, when, nth = Path(argv[0]), argv[1], argv[2], argv[3], int(argv[4])
    cfg = load_config(host)
    svc, fake = service(cfg)
    fake.fill()
    prepare, request = SCENARIOS[scenario]
    made = prepare(svc)
    (host / "before.json").write_text(json.dumps(svc.ps(), default=str))
    arm(svc, target, when, nth)
    request(svc, made)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
