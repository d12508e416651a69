"""Progress lines with a rate and an ETA for long stages, written to the job's log (never a terminal bar).

A line at most every `every` seconds, plus the last one, so a log stays readable for an hour-long stage and a
user tailing it sees the stage move.
"""

from __future__ import annotations

import logging
import time


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """`update(count)` as work completes; logs 'what: done/total unit (pct), rate, ETA'."""

    def __init__(self, log: logging.Logger, what: str, total: int, unit: str = "", every: float = 15.0,
                 clock=time.monotonic):
        self.log, self.what, self.total, self.unit, self.every, self.clock = log, what, max(int(total), 0), unit, every, clock
        self.done = 0
        self.start = self.last = clock()

    def update(self, count: int = 1) -> None:
        self.done += count
        now = self.clock()
        if now - self.last >= self.every or (self.total and self.done >= self.total):
            self.last = now
            self.log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        unit = f" {self.unit}" if self.unit else ""
        if not self.total:
            return f"{self.what}: {self.done:,}{unit} in {_duration(elapsed)}"
        share = self.done / self.total
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        tail = "done" if self.done >= self.total else f"ETA {_duration(eta)}" if rate > 0 else "ETA unknown"
        return (f"{self.what}: {self.done:,}/{self.total:,}{unit} ({share:.0%}), {rate:,.1f}{unit}/s, "
                f"{_duration(elapsed)} elapsed, {tail}")
