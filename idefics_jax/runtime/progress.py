"""One status line for long work (conversion, export, training) on stderr.

On a terminal the line is rewritten in place at every update. Elsewhere (a log file, CI, a pipe) each shown update is
a line of its own, at most one every `interval` seconds plus the first and the last, so a long run's log stays short.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """`what: pct% (done / total unit, rate unit/s) note`.

    total: the amount of work (bytes, steps, ...); `scale` divides amounts for display (2**20 with unit "MiB");
    `rate`: show the amount per second; enabled=False shows nothing (the counter still runs).
    """

    def __init__(self, what: str, total: int, *, unit: str = "", scale: float = 1, rate: bool = True,
                 enabled: bool = True, interval: float = 10.0, file=None):
        self.what, self.total, self.unit, self.scale, self.rate = what, max(total, 1), unit, scale, rate
        self.enabled, self.interval = enabled, interval
        self.file = file if file is not None else sys.stderr
        self.tty = self.file.isatty()
        self.done, self.t0, self.shown_at = 0, time.perf_counter(), None
        self.open = False  # a terminal line without its newline yet

    def update(self, n: int = 1, note: str = "") -> None:
        """`n` more units done."""
        self.set(self.done + n, note)

    def set(self, done: int, note: str = "") -> None:
        """`done` units done in all."""
        self.done = done
        if not self.enabled:
            return
        now, last = time.perf_counter(), self.done >= self.total
        if not (self.tty or last or self.shown_at is None or now - self.shown_at >= self.interval):
            return
        self.shown_at = now
        print(("\r" if self.tty else "") + self.line(now) + (f" {note}" if note else ""),
              end="" if self.tty and not last else "\n", file=self.file, flush=True)
        self.open = self.tty and not last

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        fmt = (lambda v: f"{v / self.scale:,.1f}") if self.scale != 1 else (lambda v: f"{v:,}")
        detail = f"{fmt(self.done)} / {fmt(self.total)}{' ' + self.unit if self.unit else ''}"
        if self.rate:
            rate = self.done / self.scale / max(now - self.t0, 1e-9)
            # Two significant digits below 10 (an evaluation's 0.4 samples/s), whole numbers above.
            detail += f", {rate:,.0f}" if rate >= 10 else f", {rate:.2g}"
            detail += f" {self.unit or 'units'}/s"
        return f"{self.what}: {int(100 * self.done / self.total):3d}% ({detail})"

    def close(self) -> None:
        """Ends an unfinished terminal line (work stopped early), so that what follows starts on a line of its own."""
        if self.open:
            print(file=self.file, flush=True)
            self.open = False


def bytes_progress(what: str, nbytes: int, enabled: bool = True) -> Progress:
    """Progress over `nbytes` bytes, shown in MiB with the rate (conversion, export)."""
    return Progress(what, nbytes, unit="MiB", scale=2**20, enabled=enabled)
