"""A one-line progress bar on stderr: units done, units per second, time left.

Shared by corpus sweeps (tokens) and the engine's long runs (patched or interpolated rows)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts units; the rate counts only units run now (not shards a resumed run reuses)."""

    def __init__(
        self,
        total: int,
        done: int = 0,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        unit: str = "tokens",
        rate_unit: str = "tok/s",
        label: str = "",
    ) -> None:
        self.total, self.done, self.enabled = total, done, enabled
        self.stream = stream or sys.stderr
        self.unit, self.rate_unit, self.label = unit, rate_unit, label
        self.start, self.ran = time.perf_counter(), 0

    def advance(self, tokens: int) -> None:
        self.done += tokens
        self.ran += tokens
        if self.enabled:
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.ran / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 24
        filled = width * self.done // max(self.total, 1)
        eta = _duration(left) if left != float("inf") else "?"
        label = f"{self.label}: " if self.label else ""
        return (
            f"{label}[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{self.unit}  {rate:,.0f} {self.rate_unit}  ETA {eta}"
        )

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
