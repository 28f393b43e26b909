"""A minimal progress line on stderr for the command-line tools (no dependency)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``what: done/total unit (rate/s)``, rewritten in place about every percent.

    ``total=None`` shows the count and rate only; ``update(0)`` shows the line at once.
    """

    def __init__(self, total: int | None, what: str, *, unit: str = "", enabled: bool = True):
        self.total, self.what, self.unit, self.enabled = total, what, unit, enabled
        self.start, self.done, self._shown = time.perf_counter(), 0, -1

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        step = max(1, (self.total or 100) // 100)
        if self.done // step != self._shown // step or self.done == self.total:
            self._shown = self.done
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            of = f"/{self.total}" if self.total else ""
            unit = f" {self.unit}" if self.unit else ""
            sys.stderr.write(f"\r{self.what}: {self.done}{of}{unit} ({rate:,.0f}/s)")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done != self.total and self._shown >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()
