"""Faults while the intranet runs: a node of the principal's that dies (its QEMU killed, a
disk node gone) is seen from ``kh ps -u`` within a few seconds and reported, the waits of the
run give up at once instead of waiting out their timeouts, and the file server says what it
sees of its disks (``khstorage status``: LVM's missing PVs, disks that do not answer)."""

from __future__ import annotations

import json
import threading
from types import TracebackType

from kh.errors import KhError
from kh.intranet.report import Report
from kh.scenario import Allocation, Scenario

POLL = 3.0  # seconds between looks at kh ps
STATUS_TIMEOUT = 300.0  # seconds for khstorage status (LVM waits for a dead disk's I/O)


class NodeDied(KhError):
    """A node of the intranet died while it ran."""


class Watch:
    """A thread that looks at the principal's nodes (``kh ps -u USER --json``) every POLL
    seconds and reports each one that failed, once, with khd's reason; ``raise_if_died`` lets
    a waiting step end early."""

    def __init__(self, corp: Scenario, rep: Report, mine: dict[int, str]) -> None:
        self.corp = corp
        self.rep = rep
        self.mine = mine  # allocation id -> what it is (GW, FS, ...); others: disk nodes
        self.died: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="intranet-watch")

    def _run(self) -> None:
        while not self._stop.wait(POLL):
            try:
                self.look()
            except (KhError, ValueError, KeyError):
                continue  # khd busy or the principal gone: look again

    def look(self) -> None:
        r = self.corp.kh("ps", "--json", check=False)
        if r.returncode:
            return
        for n in json.loads(r.stdout)["nodes"]:
            if n.get("state") == "failed" and n["node"] not in self.died:
                what = self.mine.get(n.get("allocation") or 0, "disk node")
                why = n.get("reason") or n.get("note") or "failed"
                self.died[n["node"]] = what
                self.rep.fault(f"{what} {n['node']} (con{n.get('allocation')}) died: {why}")

    def raise_if_died(self) -> None:
        if self.died:
            raise NodeDied("; ".join(f"{what} {node} died" for node, what in self.died.items()),
                           "see the faults in the report")

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(POLL + 30)


def file_server_view(corp: Scenario, rep: Report, fs: Allocation) -> None:
    """What FS says of its disks (``khstorage status``), each missing one as a fault."""
    rep.command(f"khstorage status    # on FS (node {fs.nodes[0]})")
    try:
        out, code = corp.run(fs, fs.nodes[0], "khstorage status", STATUS_TIMEOUT)
    except KhError as e:
        rep.fault(f"file server: khstorage status did not answer: {e.message}")
        return
    for line in out.strip().splitlines():
        rep.say(f"    {line}")
        if "MISSING" in line:
            rep.fault(f"file server (node {fs.nodes[0]}): {line.strip()}")
    if code and "MISSING" not in out:
        rep.fault(f"file server: khstorage status exited {code}: {out.strip()[-200:]}")
