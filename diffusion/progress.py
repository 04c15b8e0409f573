"""Progress lines with rate and ETA for the long stages of a run (features, bound, sampling)."""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

__all__ = ["Progress", "format_seconds"]


def format_seconds(s: float) -> str:
    """``75.3`` -> ``'1m15s'``; ``3725`` -> ``'1h02m'``; under a minute: ``'12.3s'``."""
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int((s % 3600) // 60):02d}m"


class Progress:
    """Logs "<what>: k/total <unit> (rate/s, elapsed, ETA)" at most every ``every_s`` seconds and
    at the end. ``update(n)`` adds n done units."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "images",
        every_s: float = 30.0,
        log: Optional[Callable[[str], None]] = None,
    ):
        self.what, self.total, self.unit, self.every_s = what, int(total), unit, every_s
        self.done, self.t0 = 0, time.time()
        self.last = self.t0
        self.log = log or logging.info

    def update(self, n: int) -> None:
        self.done = min(self.done + int(n), self.total)
        now = time.time()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            self.log(self.line(now))

    def line(self, now: Optional[float] = None) -> str:
        elapsed = (now or time.time()) - self.t0
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        tail = "done" if self.done >= self.total else f"ETA {format_seconds(eta)}"
        return (
            f"{self.what}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, "
            f"{format_seconds(elapsed)} elapsed, {tail})"
        )
