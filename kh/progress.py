"""A progress display for long work (image builds, multi-node boots).

On a terminal it redraws one line with a bar; elsewhere (CI logs) it prints a line at each
tenth of the work, so logs stay short but show that work is moving.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Progress of one named step whose size is only estimated (e.g. make output lines)."""

    def __init__(self, label: str, total: float, *, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.label = label
        self.total = max(total, 1.0)
        self.done = 0.0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1
        self.detail = ""

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 0.99)

    def advance(self, amount: float = 1.0, detail: str = "") -> None:
        self.done += amount
        if detail:
            self.detail = detail
        self._draw()

    def _elapsed(self) -> str:
        s = int(time.monotonic() - self.start)
        return f"{s // 60}m{s % 60:02d}s"

    def _draw(self, final: str | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if final is None and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            width = 24
            frac = 1.0 if final else self.fraction
            filled = int(frac * width)
            bar = "#" * filled + "." * (width - filled)
            text = final or self.detail[:40]
            line = f"\r{self.label:<10} [{bar}] {int(frac * 100):3d}% {self._elapsed():>7} {text}"
            self.stream.write(line.ljust(100)[:110] + ("\n" if final else ""))
            self.stream.flush()
        else:
            decile = int(self.fraction * 10)
            if final is not None:
                self.stream.write(f"{self.label}: {final} ({self._elapsed()})\n")
            elif decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(f"{self.label}: {decile * 10}% ({self._elapsed()})\n")
            self.stream.flush()

    def finish(self, message: str = "done") -> None:
        self._draw(final=message)
