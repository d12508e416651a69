"""Progress lines: rate and ETA from a fake clock, at most one line per interval plus the last."""

from __future__ import annotations

import logging

from saescale.progress import Progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_rate_and_eta_follow_the_work_done(caplog):
    clock = Clock()
    progress = Progress(logging.getLogger("t"), "tokenize", 1000, "windows", every=10, clock=clock)
    with caplog.at_level(logging.INFO):
        clock.t = 5
        progress.update(100)  # inside the interval: no line
        clock.t = 20
        progress.update(100)  # 200 in 20 s: 10/s, 800 left: 80 s
        clock.t = 25
        progress.update(800)  # the last one always logs
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "tokenize: 200/1,000 windows (20%), 10.0 windows/s, 20 s elapsed, ETA 1 min 20 s",
        "tokenize: 1,000/1,000 windows (100%), 40.0 windows/s, 25 s elapsed, done",
    ]


def test_an_unknown_total_counts_without_an_eta():
    clock = Clock()
    progress = Progress(logging.getLogger("t"), "read", 0, every=1, clock=clock)
    clock.t = 3700
    progress.update(5)
    assert progress.line() == "read: 5 in 1 h 01 min"
