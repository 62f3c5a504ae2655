"""What the intranet run prints as it goes (one line per command and per check) and its
report: the time of each step, each check, the growth and what went wrong (text or JSON)."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass(frozen=True)
class Check:
    """One arrow of the figure: its name, whether it held, and what was seen."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


@dataclass
class Report:
    """Filled in as the run goes; ``out`` receives the running lines (stdout, or stderr when
    the report itself goes to stdout as JSON). Thread-safe: a watcher adds faults."""

    out: TextIO = sys.stdout
    checks: list[Check] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    growth: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def say(self, text: str) -> None:
        with self._lock:
            print(text, file=self.out, flush=True)

    def command(self, text: str) -> None:
        """A command as the principal would type it (the paper's)."""
        self.say(f"$ {text}")

    def check(self, name: str, ok: bool, detail: str) -> bool:
        c = Check(name, ok, detail)
        with self._lock:
            self.checks.append(c)
        self.say(c.line())
        return ok

    def fault(self, text: str) -> None:
        with self._lock:
            if text in self.faults:
                return
            self.faults.append(text)
        self.say(f"FAULT {text}")

    @property
    def ok(self) -> bool:
        return not self.faults and all(c.ok for c in self.checks)

    def to_json(self, steps: list[dict[str, Any]], error: str | None) -> dict[str, Any]:
        """{"scenario", "ok", "error", "seconds", "steps": [{name, seconds, ok}], "checks":
        [{name, ok, detail}], "growth": {...}, "faults": [...], plus the run's facts
        (allocations, domains, addresses)}."""
        return {"scenario": "intranet", "ok": self.ok and error is None, "error": error,
                "seconds": round(time.monotonic() - self.started, 1),
                "steps": [{k: s[k] for k in ("name", "seconds", "ok", "error") if k in s}
                          for s in steps],
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail}
                           for c in self.checks],
                "growth": self.growth, "faults": list(self.faults), **self.facts}


def render(rep: dict[str, Any]) -> str:
    """The report as text: the verdict, each step with its seconds, each check, the growth."""
    lines = [f"intranet (Figure 3): {'PASSED' if rep['ok'] else 'FAILED'} in "
             f"{rep['seconds']:.0f} s" + (f": {rep['error']}" if rep.get("error") else "")]
    lines.append("steps:")
    lines += [f"  {s['name']:<56} {s.get('seconds', 0):7.1f} s"
              f"{'' if s.get('ok') else '  FAILED'}" for s in rep["steps"]]
    failed = [c for c in rep["checks"] if not c["ok"]]
    lines.append(f"checks: {len(rep['checks']) - len(failed)}/{len(rep['checks'])} held")
    lines += [f"  FAIL {c['name']}: {c['detail']}" for c in failed]
    g = rep.get("growth") or {}
    if g:
        lines.append("growth:")
        if "size_mb" in g:
            lines.append(f"  volume {g['size_mb'][0]} MB on {g['disks'][0]} disks -> "
                         f"{g['size_mb'][1]} MB on {g['disks'][1]} disks")
        w = g.get("writer")
        if w:
            phases = ", ".join(f"{n} {p}" for p, n in w["files"].items())
            lines.append(f"  writer: {phases} files, {w['errors']} errors; "
                         f"{w['mb_per_s'].get('before', 0):.2f} MB/s before growth, "
                         f"{w['mb_per_s'].get('during', 0):.2f} MB/s during")
        if "verified" in g:
            lines.append(f"  {g['verified']} files read back with the checksum they were "
                         f"written with, {len(g.get('mismatched', []))} did not")
    if rep["faults"]:
        lines.append("faults:")
        lines += [f"  {f}" for f in rep["faults"]]
    return "\n".join(lines) + "\n"
